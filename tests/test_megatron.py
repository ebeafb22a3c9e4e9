"""The hybrid model built by megatron-core (real Column/RowParallelLinear, TransformerLayer,
GPTModel, parallel_state groups) at TP=2 x CP=2 on 4 gloo ranks against the plain model with the
same weights on one process, in float64: loss and every parameter gradient. Pure-linear and
hybrid patterns, both layouts, a batch of 2 and packed documents (packed_seq_params)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("megatron.core")

from megatron.core import parallel_state  # noqa: E402
from megatron.core.packed_seq_params import PackedSeqParams  # noqa: E402
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region  # noqa: E402

import seqpar.sp  # noqa: E402
from seqpar import sp  # noqa: E402
from seqpar.megatron.convert import load_plain_state, to_plain  # noqa: E402
from seqpar.megatron.model import build_gpt_model, initialize_model_parallel, transformer_config  # noqa: E402
from seqpar.models import ModelConfig  # noqa: E402
from seqpar.parallel import ParallelContext  # noqa: E402
from seqpar.testing import run_ranks  # noqa: E402
from seqpar_kernels.testing import rel_err  # noqa: E402

from test_model import loss_of, problem, reference  # noqa: E402

TOL = 1e-9
TP, CP = 2, 2
HAS_SOFTMAX = hasattr(seqpar.sp, "softmax_attention")


def config(pattern, variant):
    return ModelConfig(vocab_size=38, hidden_size=16, num_layers=len(pattern), num_heads=2, num_kv_heads=2,
                       ffn_hidden_size=24, pattern=pattern, linear_variant=variant, conv_size=3)


def vocab_parallel_loss(logits, labels, tp_group):
    """Cross-entropy over TP-split logits in their own dtype (Megatron's casts to fp32): the
    max and the sums are reduced over TP, with Megatron's identity backward."""
    V = logits.shape[-1]
    m = logits.detach().max(-1, keepdim=True).values
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=tp_group)
    z = reduce_from_tensor_model_parallel_region((logits - m).exp().sum(-1), tp_group)
    local = labels - dist.get_rank(tp_group) * V
    mine = (local >= 0) & (local < V)
    picked = logits.gather(-1, local.clamp(0, V - 1)[..., None])[..., 0] * mine
    target = reduce_from_tensor_model_parallel_region(picked, tp_group)
    return z.log() + m[..., 0] - target


def check_case(alone, pattern, variant, layout, packed, seed=5):
    cfg = config(pattern, variant)
    ids, targets, cu = problem(CP, packed, L=3)
    targets = targets % cfg.vocab_size
    plain, _, loss_ref, g_ref = reference(cfg, ids, targets, cu, seed, alone)
    tp_group, cp_group = parallel_state.get_tensor_model_parallel_group(), parallel_state.get_context_parallel_group()
    gpt = build_gpt_model(cfg, transformer_config(cfg, tp=TP, cp=CP, dtype=torch.float64), layout=layout,
                          backend="torch").double()
    load_plain_state(gpt, plain.state_dict(), tp_group)
    packed_params = None
    if packed:
        cu_t = torch.tensor(cu, dtype=torch.int32)
        packed_params = PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu_t, cu_seqlens_kv=cu_t)
    logits = gpt(sp.shard(ids, cp_group, layout), None, None, packed_seq_params=packed_params)
    per_token = vocab_parallel_loss(logits, sp.shard(targets, cp_group, layout), tp_group)
    loss = per_token.sum() / targets.numel()
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total, group=cp_group)
    errs = {"loss": rel_err(total, loss_ref)}
    grads = {}
    for n, p in gpt.named_parameters():
        g = p.grad.clone()
        dist.all_reduce(g, group=cp_group)  # Megatron's DDP sums over DP x CP; here DP = 1
        grads[n] = g
    full = to_plain(gpt, grads, tp_group)
    assert set(full) == set(g_ref), sorted(set(full) ^ set(g_ref))
    errs.update({n: rel_err(g, g_ref[n]) for n, g in full.items()})
    bad = {k: v for k, v in errs.items() if not v < TOL}
    assert not bad, f"{pattern}/{variant}/{layout}/{'packed' if packed else 'B=2'}: {bad}"
    return len(errs)


def megatron_cases(rank, world):
    cfg = config("LL", "gla")
    with pytest.raises(ValueError, match="does not equal the world size|not divisible by TP x PP x SP"):
        initialize_model_parallel(cfg, tp=2, pp=1, cp=3)
    with pytest.raises(ValueError, match="not divisible by 4"):
        initialize_model_parallel(cfg, tp=2, cp=2, seq_len=18, layout="zigzag")
    initialize_model_parallel(cfg, tp=TP, pp=1, cp=CP, seq_len=4 * CP, layout="zigzag")
    assert [dist.get_process_group_ranks(parallel_state.get_context_parallel_group())] == [[rank % 2, rank % 2 + 2]]
    alone = ParallelContext.create(sp=1, backend="torch")
    cases = [("LL", "gated_delta_rule", "zigzag", False), ("LL", "gla", "contiguous", True),
             ("LL", "lightning", "zigzag", True), ("LL", "simple_gla", "contiguous", False)]
    if HAS_SOFTMAX:
        cases += [("LS", "gated_delta_rule", "zigzag", True), ("SL", "gla", "contiguous", False)]
    checked = sum(check_case(alone, *c) for c in cases)
    with pytest.raises(ValueError, match="num_heads = 3 is not divisible by the tensor-parallel size 2"):
        bad = ModelConfig(vocab_size=38, hidden_size=12, num_layers=1, num_heads=3, pattern="L")
        build_gpt_model(bad, transformer_config(bad, tp=TP, cp=CP))
    parallel_state.destroy_model_parallel()
    return checked


def test_megatron_tp2_cp2_matches_plain_model():
    assert all(n > 0 for n in run_ranks(megatron_cases, TP * CP))
