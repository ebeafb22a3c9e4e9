"""GPU check of the Megatron build on two GPUs (NCCL), megatron-core 0.16 or 0.19:

1. parity with the plain model (float64, exact torch kernels) at TP=2, at PP=2 (through Megatron's
   1F1B schedule) and at CP=2, for a hybrid and a pure-linear pattern, both layouts, with and
   without packed documents, and once per layout with every layer recomputed in backward
   (train.checkpointing: full): loss and every gradient;
2. training steps with Megatron's DDP, optimizer and pipeline schedule at PP=2 (2 micro-batches,
   the GPU kernels): the loss must stay finite and fall on a repeated batch.

    torchrun --nproc-per-node 2 -m seqpar.megatron.gpu_check --out results.json

Prints one PASS/FAIL line per check and writes every number to the JSON file (rank 0).
Exit status 0 only if everything passed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist

TOL = 1e-9
PARITY_LAYOUTS = (("TP=2", dict(tp=2, pp=1, cp=1), True), ("PP=2", dict(tp=1, pp=2, cp=1), True),
                  ("CP=2", dict(tp=1, pp=1, cp=2), False))


def parity_model(pattern: str, variant: str):
    from seqpar.models import ModelConfig

    return ModelConfig(vocab_size=64, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, ffn_hidden_size=128,
                       pattern=pattern, linear_variant=variant, conv_size=4)


def tokens(T: int, vocab: int, packed: bool, seed: int, device):
    gen = torch.Generator().manual_seed(seed)
    B = 1 if packed else 2
    ids = torch.randint(0, vocab, (B, T), generator=gen).to(device)
    labels = torch.randint(0, vocab, (B, T), generator=gen).to(device)
    cu = [0, 7, T // 4, T // 2 + 3, T - 5, T] if packed else None
    return ids, labels, cu


def run_parity(device, report, only=tuple(n for n, _, _ in PARITY_LAYOUTS)) -> bool:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from seqpar.megatron.model import initialize_model_parallel, recompute_options
    from seqpar.megatron.parity import check_parity
    from seqpar.parallel import ParallelContext

    alone = ParallelContext.create(sp=1, backend="torch")
    ok = True
    T = 64
    for name, sizes, schedule in PARITY_LAYOUTS:
        if name not in only:
            continue
        initialize_model_parallel(parity_model("LLLS", "gla"), seq_len=T, layout="zigzag", **sizes)
        model_parallel_cuda_manual_seed(1234)
        models = (("LLLS", "gated_delta_rule"), ("L", "gla"))
        cases = [(*m, layout, packed, "none") for m in models for layout in ("zigzag", "contiguous")
                 for packed in (False, True)]
        cases.append(("LLLS", "gated_delta_rule", "zigzag", True, "full"))  # every layer recomputed
        for pattern, variant, layout, packed, checkpointing in cases:
            ids, labels, cu = tokens(T, 64, packed, seed=len(report["parity"]), device=device)
            t0 = time.perf_counter()
            errors = check_parity(parity_model(pattern, variant), ids, labels, cu, layout=layout, alone=alone,
                                  seed=7, schedule=schedule, **recompute_options(checkpointing))
            worst = _max_over_ranks(max(errors.values()))
            passed = worst < TOL and len(errors) > 5
            ok &= passed
            case = dict(parallel=name, pattern=pattern, linear_variant=variant, layout=layout, packed=packed,
                        checkpointing=checkpointing, schedule=schedule, max_rel_err=worst,
                        tensors_compared=len(errors), passed=passed, seconds=round(time.perf_counter() - t0, 3))
            report["parity"].append(case)
            _say(f"{'PASS' if passed else 'FAIL'} parity {name} {pattern}/{variant} {layout} "
                 f"{'packed' if packed else 'B=2'}{' recomputed' if checkpointing != 'none' else ''}: "
                 f"max rel err {worst:.2e} over {len(errors)} tensors")
        parallel_state.destroy_model_parallel()
    return ok


def run_training(device, report, steps: int, backend: str, seq_len: int) -> bool:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from seqpar import sp
    from seqpar.megatron.model import build_gpt_model, initialize_model_parallel, transformer_config
    from seqpar.megatron.train_step import train_step, wrap_for_training
    from seqpar.models import ModelConfig

    model = ModelConfig(vocab_size=512, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2,
                        ffn_hidden_size=704, pattern="LLLS", linear_variant="gated_delta_rule")
    T, micro, n_micro = seq_len, 1, 2
    initialize_model_parallel(model, tp=1, pp=2, cp=1, seq_len=T, layout="zigzag")
    model_parallel_cuda_manual_seed(1234)
    config = transformer_config(model, pp=2, dtype=torch.float32)
    gpt = build_gpt_model(model, config, backend=backend).to(device)
    ddp, optimizer = wrap_for_training(gpt, config, lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    data = [torch.randint(0, model.vocab_size, (micro, T + 1), generator=gen).to(device) for _ in range(n_micro)]
    group = parallel_state.get_context_parallel_group()
    batches = [{"input_ids": sp.shard(d[:, :-1], group, "zigzag"), "labels": sp.shard(d[:, 1:], group, "zigzag")}
               for d in data]
    losses, times = [], []
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        stats = train_step(ddp, optimizer, iter(batches), num_microbatches=n_micro, seq_len=T, micro_batch_size=micro)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(_from_last_stage(stats["loss"]))
    ok = all(l == l and abs(l) != float("inf") for l in losses) and losses[-1] < losses[0]
    report["train"] = dict(parallel="PP=2 (1F1B, 2 micro-batches)", model=model.to_dict(), seq_len=T, backend=backend,
                           losses=losses, step_seconds=times, passed=ok)
    _say(f"{'PASS' if ok else 'FAIL'} training with Megatron's pipeline schedule: losses "
         + " ".join(f"{l:.4f}" for l in losses) + f"; step {min(times):.3f} s (best)")
    parallel_state.destroy_model_parallel()
    return ok


def _max_over_ranks(x: float) -> float:
    t = torch.tensor([x], dtype=torch.float64, device=torch.cuda.current_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _from_last_stage(loss) -> float:
    """The loss lives on the last pipeline stage; share it with every rank."""
    t = torch.tensor([loss if loss is not None else -float("inf")], device=torch.cuda.current_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _say(line: str) -> None:
    if dist.get_rank() == 0:
        print(line, flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="where rank 0 writes the JSON results")
    p.add_argument("--steps", type=int, default=5, help="training steps")
    p.add_argument("--train-backend", default="auto", help="kernel backend of the training steps (auto: Triton)")
    p.add_argument("--train-seq-len", type=int, default=2048, help="tokens per sequence in the training steps")
    p.add_argument("--parallel", nargs="+", default=[n for n, _, _ in PARITY_LAYOUTS],
                   choices=[n for n, _, _ in PARITY_LAYOUTS], help="which parity layouts to check")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check needs CUDA GPUs (megatron-core's schedules do); launch with torchrun on a GPU machine")
        return 2
    local = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    if dist.get_world_size() != 2:
        _say(f"gpu_check is written for 2 GPUs (TP=2, PP=2, CP=2 on one pair); got {dist.get_world_size()} ranks")
        return 2
    import megatron.core

    device = torch.device("cuda", local)
    report = dict(device=torch.cuda.get_device_name(local), gpus=dist.get_world_size(), torch=torch.__version__,
                  megatron_core=megatron.core.__version__, python=sys.version.split()[0], parity=[], train=None)
    ok = run_parity(device, report, args.parallel)
    ok &= run_training(device, report, args.steps, args.train_backend, args.train_seq_len)
    report["passed"] = bool(ok)
    if dist.get_rank() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    _say(f"{'PASS' if ok else 'FAIL'} gpu_check: {sum(c['passed'] for c in report['parity'])}/{len(report['parity'])} "
         f"parity cases, training {'ok' if report['train']['passed'] else 'failed'}; results in {args.out}")
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
