"""The hybrid model built by megatron-core (real Column/RowParallelLinear, TransformerLayer,
GPTModel, parallel_state groups) at TP=2 x CP=2 on 4 gloo ranks against the plain model with the
same weights on one process, in float64: loss and every parameter gradient. Pure-linear and
hybrid patterns, both layouts, a batch of 2 and packed documents (packed_seq_params)."""
from __future__ import annotations

import pytest
import torch.distributed as dist

pytest.importorskip("megatron.core")

from megatron.core import parallel_state  # noqa: E402

from seqpar.megatron.model import (build_gpt_model, initialize_model_parallel, recompute_options,  # noqa: E402
                                   transformer_config)
from seqpar.megatron.parity import check_parity  # noqa: E402
from seqpar.models import ModelConfig  # noqa: E402
from seqpar.parallel import ParallelContext  # noqa: E402
from seqpar.testing import run_ranks  # noqa: E402

from test_model import problem  # noqa: E402

TOL = 1e-9
TP, CP = 2, 2


def config(pattern, variant):
    return ModelConfig(vocab_size=38, hidden_size=16, num_layers=len(pattern), num_heads=4, num_kv_heads=2,
                       ffn_hidden_size=24, pattern=pattern, linear_variant=variant, conv_size=3)


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
             ("LL", "lightning", "zigzag", True), ("LL", "simple_gla", "contiguous", False),
             ("LS", "gated_delta_rule", "zigzag", True), ("SL", "gla", "contiguous", False)]
    checked = 0
    for pattern, variant, layout, packed in cases:
        ids, labels, cu = problem(CP, packed, L=3)
        errors = check_parity(config(pattern, variant), ids, labels % 38, cu, layout=layout, alone=alone, seed=5)
        assert "loss" in errors and len(errors) > 10
        bad = {k: v for k, v in errors.items() if not v < TOL}
        assert not bad, f"{pattern}/{variant}/{layout}/{'packed' if packed else 'B=2'}: {bad}"
        checked += len(errors)
    with pytest.raises(ValueError, match="num_heads = 3 is not divisible by the tensor-parallel size 2"):
        bad = ModelConfig(vocab_size=38, hidden_size=12, num_layers=1, num_heads=3, pattern="L")
        build_gpt_model(bad, transformer_config(bad, tp=TP, cp=CP))
    parallel_state.destroy_model_parallel()
    return checked


def test_megatron_tp2_cp2_matches_plain_model():
    assert all(n > 0 for n in run_ranks(megatron_cases, TP * CP))


def test_checkpointing_maps_to_megatron_recompute():
    """train.checkpointing: full recomputes every layer under the Megatron engine too (Megatron's
    full granularity, one layer per checkpoint); its parity on GPUs is in seqpar.megatron.gpu_check
    (Megatron's recompute needs the CUDA RNG tracker)."""
    cfg = config("LS", "gla")
    full = transformer_config(cfg, **recompute_options("full"))
    assert (full.recompute_granularity, full.recompute_method, full.recompute_num_layers) == ("full", "uniform", 1)
    assert transformer_config(cfg, **recompute_options("none")).recompute_granularity is None
    with pytest.raises(ValueError, match="use none or full"):
        recompute_options("offload")
