"""The plain hybrid model under SP (real gloo, float64) against the same weights on one process:
hidden states, loss and every parameter gradient, for every linear variant and hybrid patterns
with softmax blocks, both layouts, a batch of 2 and packed documents that
cross ranks. Plus the pattern language, the parallel checks and activation checkpointing."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from seqpar import sp
from seqpar.models import HybridLM, ModelConfig, check_parallel, expand_pattern
from seqpar.parallel import ParallelContext
from seqpar.testing import run_ranks
from seqpar_kernels import VARIANTS
from seqpar_kernels.testing import rel_err

TOL = 1e-9


def tiny_config(pattern: str, variant: str, **kw) -> ModelConfig:
    base = dict(vocab_size=37, hidden_size=16, num_layers=len(pattern), num_heads=2, num_kv_heads=1,
                ffn_hidden_size=24, pattern=pattern, linear_variant=variant, conv_size=4)
    return ModelConfig(**{**base, **kw})


def problem(P: int, packed: bool, L: int = 4, seed: int = 0):
    """Token ids, targets and (packed) global document boundaries; documents of odd lengths that
    cross shard edges, one ending exactly on an edge."""
    T = 2 * P * L
    gen = torch.Generator().manual_seed(seed)
    B = 1 if packed else 2
    ids = torch.randint(0, 37, (B, T), generator=gen)
    targets = torch.randint(0, 37, (B, T), generator=gen)
    cu = sorted({0, 3, L, L + 5, T - 2, T}) if packed else None
    return ids, targets, cu


def loss_of(model, hidden, targets, n_total):
    logits = hidden @ model.output_weight.T
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum") / n_total


def reference(config, ids, targets, cu, seed, alone=None):
    """The whole sequence on this process alone (`alone`: a context without SP, needed when
    torch.distributed runs)."""
    torch.manual_seed(seed)
    model = HybridLM(config, alone).double()
    hidden = model(ids, cu_seqlens=cu)
    loss = loss_of(model, hidden, targets, targets.numel())
    loss.backward()
    return model, hidden.detach(), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def check_sp_case(alone, P, pattern, variant, layout, packed, method="lasp2", seed=1, offload=None):
    """offload: None, or recompute every block in backward (offload=False) with its input kept in
    host memory (True): the SP collectives then run again inside backward."""
    config = tiny_config(pattern, variant)
    ids, targets, cu = problem(P, packed)
    ref_model, h_ref, loss_ref, g_ref = reference(config, ids, targets, cu, seed, alone)
    par = ParallelContext(sp_group=dist.group.WORLD, layout=layout, linear_method=method, backend="torch")
    model = HybridLM(config, par).double()
    model.load_state_dict(ref_model.state_dict())
    if offload is not None:
        model.set_activation_checkpointing(True, offload=offload)
    group = par.sp_group
    hidden = model(sp.shard(ids, group, layout), cu_seqlens=cu)
    loss = loss_of(model, hidden, sp.shard(targets, group, layout), targets.numel())
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    errs = {"hidden": rel_err(hidden, sp.shard(h_ref, group, layout)), "loss": rel_err(total, loss_ref)}
    for n, p in model.named_parameters():
        g = p.grad.clone()
        dist.all_reduce(g)  # parameters are replicated over SP: their gradient is the sum of the shares
        errs[n] = rel_err(g, g_ref[n])
    bad = {k: v for k, v in errs.items() if not v < TOL}
    assert not bad, f"{pattern}/{variant}/{layout}/P={P}/{'packed' if packed else 'B=2'}: {bad}"
    return len(errs)


def sp_cases(rank, P):
    alone = ParallelContext.create(sp=1, backend="torch")
    checked = 0
    patterns = [("LL", v) for v in VARIANTS] + [("LS", "gla"), ("SL", "gated_delta_rule")]
    for i, (pattern, variant) in enumerate(patterns):
        # P = 2: every layout x {batch, packed}; P = 3 (slower on 2 cores): one combination per pattern, rotating
        combos = [(lay, pk) for lay in ("contiguous", "zigzag") for pk in (False, True)]
        for layout, packed in (combos if P == 2 else [combos[i % 4]]):
            checked += check_sp_case(alone, P, pattern, variant, layout, packed)
    check_sp_case(alone, P, "LL", "gated_delta_rule", "zigzag", True, method="zeco")
    check_sp_case(alone, P, "LS", "gla", "zigzag", True, offload=True)
    return checked


@pytest.mark.parametrize("P", [2, 3])
def test_plain_model_sp_matches_one_process(P):
    assert all(n > 0 for n in run_ranks(sp_cases, P))


@pytest.mark.parametrize("checkpointed,offload,mlp_chunk", [(True, False, 0), (True, False, 5), (False, False, 7),
                                                             (True, True, 0), (True, True, 5)])
def test_activation_checkpointing_and_mlp_chunks_same_gradients(checkpointed, offload, mlp_chunk):
    """Recomputing blocks (their inputs kept on the device or offloaded to host memory), and
    computing the MLP a few tokens at a time (odd chunks, the last one short; nested in the block's
    checkpoint or alone), change no number."""
    config = tiny_config("LS", "gla")
    ids, targets, cu = problem(1, True, L=6)
    _, _, loss_ref, g_ref = reference(config, ids, targets, cu, seed=3)
    torch.manual_seed(3)
    model = HybridLM(config).double()
    model.set_activation_checkpointing(checkpointed, offload=offload)
    model.set_mlp_token_chunk(mlp_chunk)
    assert mlp_chunk == 0 or ids.shape[1] > mlp_chunk
    loss = loss_of(model, model(ids, cu_seqlens=cu), targets, targets.numel())
    loss.backward()
    assert rel_err(loss, loss_ref) < TOL
    for n, p in model.named_parameters():
        assert rel_err(p.grad, g_ref[n]) < TOL, n


def test_packed_documents_do_not_mix():
    """Changing one document leaves the hidden states of the others unchanged (conv, linear layers)."""
    torch.manual_seed(0)
    model = HybridLM(tiny_config("LL", "simple_gla")).double()
    ids, _, cu = problem(1, True, L=6)
    h1 = model(ids, cu_seqlens=cu)
    ids2 = ids.clone()
    ids2[0, cu[1]:cu[2]] = (ids2[0, cu[1]:cu[2]] + 1) % 37
    h2 = model(ids2, cu_seqlens=cu)
    assert torch.equal(h1[0, :cu[1]], h2[0, :cu[1]])
    assert torch.equal(h1[0, cu[2]:], h2[0, cu[2]:])
    assert not torch.equal(h1[0, cu[1]:cu[2]], h2[0, cu[1]:cu[2]])


def test_pattern_symbols():
    assert expand_pattern("LLLS", 8, "gla") == ("gla",) * 3 + ("softmax",) + ("gla",) * 3 + ("softmax",)
    assert expand_pattern("M-M-G-*-", 4, "gla") == ("gla", "gla", "gated_delta_rule", "softmax")
    assert expand_pattern("M-*-|M-*-", 4, "simple_gla") == ("simple_gla", "softmax") * 2
    for bad, words in [("LLLS", "does not divide"), ("LX", "unknown symbols"), ("M*-", "has no MLP"),
                       ("-M-", "follows no mixer"), ("M-E-", "MoE"), ("L-", "mixes"), ("", "empty")]:
        with pytest.raises(ValueError, match=words):
            expand_pattern(bad, 6 if bad == "LLLS" else 2, "gla")


def test_parallel_checks_name_every_problem():
    config = ModelConfig(hidden_size=64, num_heads=4, num_kv_heads=2, num_layers=6, ffn_hidden_size=192, pattern="LLS")
    check_parallel(config, tp=2, pp=3, sp=2, dp=1, world_size=12, seq_len=64, layout="zigzag")
    with pytest.raises(ValueError) as e:
        check_parallel(config, tp=4, pp=4, sp=3, dp=1, world_size=8, seq_len=64, layout="zigzag")
    msg = str(e.value)
    for words in ("num_kv_heads = 2 is not divisible by the tensor-parallel size 4",
                  "num_layers = 6 is not divisible by the 4 pipeline stages",
                  "sequence length 64 is not divisible by 6", "does not equal the world size 8"):
        assert words in msg, (words, msg)
    with pytest.raises(ValueError, match="num_heads = 4 is not divisible by the tensor-parallel size 3"):
        check_parallel(config, tp=3)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        ModelConfig(hidden_size=10, num_heads=3)
    with pytest.raises(ValueError, match="conv_size"):
        ModelConfig(conv_size=1)
