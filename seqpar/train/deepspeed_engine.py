"""The DeepSpeed route (train.engine: deepspeed): ZeRO stages 1-3 over the data x sequence ranks.

DeepSpeed must know the SP group, or ZeRO shards and reduces gradients over the data-parallel ranks
only and the copies of the parameters on the ranks of one SP group drift apart (the config key
`sequence_parallel_size` alone let them diverge: docs/training.md). `SequenceParallelMpu` is the
object DeepSpeed asks for its groups (`deepspeed.initialize(..., mpu=)`): ZeRO partitions and
reduces over the "sequence data parallel" group (every rank holding the same parameters), and
divides the gradient by its size over the SP size, i.e. by dp. Our loss is already the mean over the
global batch and its gradient a sum of every rank's share, so the loss is multiplied by dp before
DeepSpeed's backward.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from . import checkpoint, faults


class SequenceParallelMpu:
    """The groups of an SP x DP run (no tensor or pipeline parallelism: the model-parallel group of
    every rank is the rank alone)."""

    def __init__(self, parallel):
        self.parallel = parallel
        world, me = dist.get_world_size(), dist.get_rank()
        self._alone = None
        for r in range(world):  # new_group is collective: every rank creates every singleton
            g = dist.new_group([r])
            if r == me:
                self._alone = g

    # sequence parallel
    def get_sequence_parallel_group(self):
        return self.parallel.sp_group

    def get_sequence_parallel_world_size(self):
        return self.parallel.sp_size

    def get_sequence_parallel_rank(self):
        return self.parallel.sp_rank

    # the ranks that hold the same parameters: ZeRO partitions and reduces over them
    def get_sequence_data_parallel_group(self):
        return dist.group.WORLD

    def get_sequence_data_parallel_world_size(self):
        return dist.get_world_size()

    def get_sequence_data_parallel_rank(self):
        return dist.get_rank()

    # data parallel
    def get_data_parallel_group(self):
        return self.parallel.dp_group

    def get_data_parallel_world_size(self):
        return dist.get_world_size(self.parallel.dp_group)

    def get_data_parallel_rank(self):
        return dist.get_rank(self.parallel.dp_group)

    def get_data_parallel_group_ranks(self):
        return dist.get_process_group_ranks(self.parallel.dp_group)

    # model (tensor) parallel: none
    def get_model_parallel_group(self):
        return self._alone

    def get_model_parallel_world_size(self):
        return 1

    def get_model_parallel_rank(self):
        return 0

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank

    def get_tensor_model_parallel_src_rank(self):
        return dist.get_rank()


def ds_config(config, dp: int) -> dict:
    t = config.train
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": (t.global_batch_size or t.micro_batch_size * dp) // (t.micro_batch_size * dp),
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "zero_allow_untested_optimizer": True,  # our torch AdamW (DeepSpeed's fused ones need compiled ops)
        "bf16": {"enabled": t.precision == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine:
    name = "deepspeed"

    def __init__(self, model, config, parallel, optimizer: torch.optim.Optimizer):
        import deepspeed

        self.parallel = parallel
        self.dp = parallel.dp_size
        if config.train.zero_stage == 3:  # the output head is used by the loss, outside its own forward
            deepspeed.zero.register_external_parameter(model, model.lm.output_weight)
        self.ds, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds_config(config, self.dp), mpu=SequenceParallelMpu(parallel),
            dist_init_required=False)
        self.module, self.forward = model, self.ds

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss * self.dp, scale_wrt_gas=False)
        if not self.ds.is_gradient_accumulation_boundary():
            self.ds.step()  # DeepSpeed counts micro-steps; it updates only at the boundary

    def discard(self) -> None:
        raise faults.FaultError("a step cannot be skipped with train.engine: deepspeed")

    def step(self, lr: float) -> tuple[float, str | None]:
        for group in self.ds.optimizer.param_groups:
            group["lr"] = lr
        self.ds.step()
        norm = self.ds.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        return norm, (None if norm == norm and norm != float("inf") else "? (ZeRO holds the gradients)")

    def save(self, root, step: int, meta: dict, keep: int) -> Path:
        return checkpoint.save(root, step, lambda folder: self.ds.save_checkpoint(str(folder), tag="zero"), meta, keep)

    def load(self, path: Path) -> dict:
        self.ds.load_checkpoint(str(path), tag="zero")
        return checkpoint.read_meta(path)
