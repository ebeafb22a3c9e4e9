"""The training loop, the same on every rank and under every launcher.

A step: load this data-parallel rank's micro-batches (full sequences) and count the labelled tokens of
the whole global batch (one all-reduce); for each micro-batch, take this SP rank's shard, run the
model, score it with the chunked cross-entropy divided by that global count, and backward; then sum
the gradients over the data x sequence ranks (every one holds a share), clip, check for NaN/Inf and
step. The loss is therefore the mean over the global batch, and its gradient the one a single
device would compute on the unsplit batch.
"""
from __future__ import annotations

import math
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from seqpar import config as cfg
from seqpar.comm import collectives
from seqpar.models import HybridLM
from seqpar.parallel import ParallelContext

from . import checkpoint, faults, memory, metrics
from .data import Loader, make_source
from .distributed import Launch, discover, init_distributed, pick_device
from .loss import cross_entropy


def lr_at(step: int, t: cfg.TrainConfig) -> float:
    """Learning rate of step (0-based): linear warmup, then cosine / linear decay to min_lr, or constant."""
    warmup = min(t.warmup_steps, t.steps)
    if step < warmup:
        return t.lr * (step + 1) / warmup
    if t.schedule == "constant" or t.steps <= warmup:
        return t.lr
    frac = (step - warmup) / max(t.steps - warmup, 1)
    shape = 0.5 * (1 + math.cos(math.pi * frac)) if t.schedule == "cosine" else 1 - frac
    return t.min_lr + (t.lr - t.min_lr) * shape


class LMWithLoss(torch.nn.Module):
    """The language model and its loss as one module: forward(tokens, labels) -> (loss sum, correct).
    One forward covers every parameter, the output head included (ZeRO-3 gathers by module forward)."""

    def __init__(self, lm: torch.nn.Module, ce_chunk: int):
        super().__init__()
        self.lm, self.ce_chunk = lm, ce_chunk

    def forward(self, tokens, labels, cu_seqlens=None):
        hidden = self.lm(tokens, cu_seqlens=cu_seqlens)
        return cross_entropy(hidden, self.lm.output_weight, labels, chunk=self.ce_chunk)


def build_model(config: cfg.Config, parallel: ParallelContext, device: torch.device, dtype=None) -> LMWithLoss:
    torch.manual_seed(config.train.seed)  # the same initial weights on every rank
    lm = HybridLM(config.model, parallel)
    if config.train.checkpointing != "none":
        lm.set_activation_checkpointing(True, offload=config.train.checkpointing == "offload")
    lm.set_mlp_token_chunk(config.train.mlp_chunk)
    if dtype is None:
        dtype = torch.bfloat16 if config.train.precision in ("bf16", "bf16-master") else torch.float32
    return LMWithLoss(lm, config.train.ce_chunk).to(device=device, dtype=dtype)


def make_optimizer(model: torch.nn.Module, t: cfg.TrainConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on vectors (norm scales, gates, biases)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=t.lr, betas=t.betas)


class NativeEngine:
    """Plain PyTorch: AdamW, gradients summed over the data x sequence ranks with bucketed all-reduces.
    With `master` (train.precision: bf16-master) the optimizer and the checkpoints hold an fp32 copy
    of the model: each step moves the bf16 gradients onto it, steps it, and copies it back to the bf16
    weights."""
    name = "native"

    def __init__(self, model, config: cfg.Config, optimizer, replica_group, master=None):
        self.module, self.config, self.optimizer, self.group = model, config, optimizer, replica_group
        self.forward = model
        self.master = master  # None, or the fp32 model that the optimizer steps
        self.stepped = master if master is not None else model

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def discard(self) -> None:
        """Drop the gradients accumulated so far in this step."""
        self.module.zero_grad(set_to_none=True)
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, lr: float) -> tuple[float, str | None]:
        """Sum gradients, clip, step. Returns (gradient norm, None) or (norm, name of the first parameter
        with a non-finite gradient) without stepping."""
        if self.master is not None:  # the gradients move to the fp32 copy, summed over ranks in fp32
            for p, m in zip(self.module.parameters(), self.master.parameters()):
                m.grad = None if p.grad is None else p.grad.float()
                p.grad = None
        params = [p for p in self.stepped.parameters() if p.grad is not None]
        all_reduce_buckets([p.grad for p in params], self.group)
        clip = self.config.train.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        norm = float(norm)
        if not math.isfinite(norm):
            bad = faults.first_nonfinite_grad(self.stepped)
            self.optimizer.zero_grad(set_to_none=True)
            return norm, bad or "?"
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._copy_master()
        return norm, None

    def _copy_master(self) -> None:
        if self.master is not None:
            with torch.no_grad():
                for p, m in zip(self.module.parameters(), self.master.parameters()):
                    p.copy_(m)

    def save(self, root, step: int, meta: dict, keep: int) -> Path:
        return checkpoint.save_native(root, step, self.stepped, self.optimizer, meta, keep)

    def load(self, path: Path) -> dict:
        meta = checkpoint.load_native(path, self.stepped, self.optimizer)
        self._copy_master()
        return meta


def all_reduce_buckets(tensors: list[torch.Tensor], group, bucket_bytes: int = 64 << 20) -> None:
    """Sum tensors over group in place, a few large flat all-reduces instead of one per tensor."""
    if dist.get_world_size(group) == 1:
        return
    bucket, size = [], 0
    for i, t in enumerate(tensors):
        bucket.append(t)
        size += t.numel() * t.element_size()
        if size >= bucket_bytes or i == len(tensors) - 1:
            by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
            for b in bucket:
                by_dtype.setdefault(b.dtype, []).append(b)
            for same in by_dtype.values():
                flat = torch.cat([b.reshape(-1) for b in same])
                dist.all_reduce(flat, group=group)
                offset = 0
                for b in same:
                    b.copy_(flat[offset:offset + b.numel()].view_as(b))
                    offset += b.numel()
            bucket, size = [], 0


def make_engine(config: cfg.Config, parallel: ParallelContext, device: torch.device):
    model = build_model(config, parallel, device)
    # bf16-master: the same initial weights (same seed) in fp32, which the optimizer steps
    master = build_model(config, parallel, device, torch.float32) if config.train.precision == "bf16-master" else None
    optimizer = make_optimizer(master if master is not None else model, config.train)
    if config.train.engine == "deepspeed":
        from .deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(model, config, parallel, optimizer)
    return NativeEngine(model, config, optimizer, dist.group.WORLD, master)


class Trainer:
    def __init__(self, config: cfg.Config, launch: Launch, device: torch.device, watchdog: faults.Watchdog | None):
        self.config, self.launch, self.device, self.watchdog = config, launch, device, watchdog
        p, t = config.parallel, config.train
        world = dist.get_world_size()
        self.dp = p.dp or world // (p.tp * p.pp * p.sp)
        self.gbs = t.global_batch_size or t.micro_batch_size * self.dp
        # from before the model exists, so that parameters and optimizer state are in the record too
        self.recording = config.log.memory_report == "on" and memory.start(device)
        if config.log.memory_report == "on" and not self.recording and dist.get_rank() == 0:
            print("seqpar: log.memory_report needs CUDA GPUs; no report on this device", flush=True)
        if t.engine == "megatron":
            from .megatron_engine import MegatronEngine

            self.engine = MegatronEngine(config, device)
            self.parallel = self.engine.parallel
        else:
            self.parallel = ParallelContext.create(sp=p.sp, layout=p.layout, linear_method=p.method,
                                                   softmax_method=p.softmax_method, zeco_slices=p.zeco_slices,
                                                   backend=p.backend)
            self.engine = make_engine(config, self.parallel, device)
        self.model = self.engine.module
        dp_rank = dist.get_rank(self.parallel.dp_group) if self.parallel.dp_group is not None else 0
        self.loader = Loader(make_source(config), t.micro_batch_size, self.gbs, self.dp, dp_rank, config.data.pack)
        self.run_dir = Path(config.log.dir)
        self.ckpt_dir = Path(config.checkpoint.dir or self.run_dir / "checkpoints")
        self.is_main = dist.get_rank() == 0
        self.flops_per_token = config.model.flops_per_token(t.seq_len)
        self.peak = metrics.peak_tflops(device)
        self.start_step = 0

    # ------------------------------------------------------------ one step

    def _mark(self, step, phase):
        if self.watchdog is not None:
            self.watchdog.mark(step, phase)

    def _autocast(self):
        enabled = self.config.train.precision == "bf16-autocast"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def _forward_backward(self, step: int, batches, total_targets: int):
        """Returns [loss sum, correct] summed over this rank's micro-batches, or raises on NaN/Inf."""
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        for batch in batches:
            local = batch.local(self.parallel.sp_group, self.parallel.layout, self.device)
            self._mark(step, "forward")
            with self._autocast():
                loss_sum, correct = self.engine.forward(local.tokens, local.labels, local.cu_seqlens)
            check = loss_sum.detach().reshape(1).double()
            dist.all_reduce(check)  # one scalar: every rank decides alike about a NaN
            if not math.isfinite(float(check)):
                self._nonfinite(step, local)
                return None
            self._mark(step, "backward")
            self.engine.backward(loss_sum / total_targets)
            sums += torch.stack([loss_sum.detach().double(), correct.double()])
        return sums

    def _nonfinite(self, step: int, local) -> None:
        """The loss is NaN/Inf on some rank: find the first layer that produced it (on every rank, since
        the forward runs collectives) and stop, or skip the step if so configured."""
        def forward():
            with self._autocast():
                self.model.lm(local.tokens, cu_seqlens=local.cu_seqlens)
        layer = faults.first_nonfinite_module(self.model.lm, forward)
        found = [None] * dist.get_world_size()
        dist.all_gather_object(found, layer)
        where = next((f"layer {name} (first on rank {r})" for r, name in enumerate(found) if name),
                     "the loss itself (every layer's output is finite)")
        message = f"non-finite loss at step {step + 1}: first non-finite output in {where}"
        if self.config.train.nonfinite == "stop":
            raise faults.FaultError(message + "; set train.nonfinite: skip to skip such steps")
        if self.is_main:
            print(f"seqpar: {message}; skipping the step (train.nonfinite: skip)", flush=True)

    def _step(self, step: int, batches, lr: float, profiled: bool):
        """One optimizer step. Returns ([loss sum, correct] over the global batch, its number of labelled
        tokens, gradient norm, SP communication share or None), or None if the step was skipped."""
        t = self.config.train

        def measured(fn):
            if not profiled:
                return fn(), None
            result, wall, comm = metrics.profile_comm(fn, self.device)
            return result, comm / wall

        if self.engine.name == "megatron":  # Megatron's schedule runs forward, backward and the update
            (sums, grad_norm), share = measured(lambda: self.engine.run_step(batches, lr))
            dist.all_reduce(sums)  # the last pipeline stage of every data x context rank, once per TP rank
            sums /= self.parallel.tp_size
            if not math.isfinite(float(sums[0])):
                raise faults.FaultError(f"non-finite loss at step {step + 1} (train.engine: megatron; rerun the step "
                                        "with engine native to trace the layer)")
            return sums[:2], max(float(sums[2]), 1.0), grad_norm, share
        count = torch.tensor([sum(b.num_targets for b in batches)], dtype=torch.float64, device=self.device)
        dist.all_reduce(count, group=self.parallel.dp_group)  # SP ranks of a replica hold the same batch
        total = max(float(count), 1.0)
        sums, share = measured(lambda: self._forward_backward(step, batches, total))
        if sums is None:
            self.engine.discard()
            return None
        self._mark(step, "optimizer")
        grad_norm, bad = self.engine.step(lr)
        if bad is not None:
            message = f"non-finite gradient at step {step + 1} (norm {grad_norm}): first in parameter {bad}"
            if t.nonfinite == "stop":
                raise faults.FaultError(message + "; set train.nonfinite: skip to skip such steps")
            if self.is_main:
                print(f"seqpar: {message}; step skipped", flush=True)
            return None
        dist.all_reduce(sums)  # every rank holds a share of the global batch
        return sums, total, grad_norm, share

    def train(self) -> dict:
        t, log_cfg = self.config.train, self.config.log
        # Megatron-LM's own checkpoints serve that route
        saves = self.engine.name != "megatron" and self.config.checkpoint.save == "on"
        resume = checkpoint.find(self.config.checkpoint.resume, self.ckpt_dir) if saves else None
        if resume is not None:
            meta = self.engine.load(resume)
            self.start_step = meta["step"]
            if self.is_main:
                print(f"seqpar: resumed from {resume} (step {self.start_step})", flush=True)
        runlog = metrics.RunLog(self.run_dir, self.is_main, t.steps, log_cfg.progress, log_cfg.tensorboard,
                                log_cfg.interval)
        if self.is_main:
            (self.run_dir / "config.yaml").write_text(cfg.dump(self.config))
            print(self._banner(), flush=True)
        tokens_per_step = self.gbs * t.seq_len
        world = dist.get_world_size()
        last, history = {}, []
        skipped = 0
        saved = None
        for step in range(self.start_step, t.steps):
            self._mark(step, "data")
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            t0 = time.perf_counter()
            batches = self.loader.step(step)
            lr = lr_at(step, t)
            profiled = bool(log_cfg.profile_interval and (step + 1) % log_cfg.profile_interval == 0)
            try:
                with collectives.counting() as stats:
                    result = self._step(step, batches, lr, profiled)
            except torch.OutOfMemoryError:
                if self.recording:
                    self.recording = False
                    memory.report(self.device, self.run_dir, dist.get_rank(), f"step {step + 1} (out of memory)")
                raise
            if result is None:  # a non-finite loss or gradient, and train.nonfinite: skip
                skipped += 1
                continue
            sums, total, grad_norm, comm_share = result
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            dt = time.perf_counter() - t0
            tokens_per_s = tokens_per_step / dt
            tflops = self.flops_per_token * tokens_per_s / world / 1e12
            last = {"step": step + 1, "loss": float(sums[0]) / total, "accuracy": float(sums[1]) / total,
                    "lr": lr, "grad_norm": grad_norm, "step_s": dt, "tokens_per_s": tokens_per_s,
                    "tflops_per_gpu": tflops, "peak_memory_gib": metrics.peak_memory_gib(self.device),
                    "sp_calls": sum(stats.calls.values()), "sp_bytes": sum(stats.bytes_sent.values())}
            if self.peak:
                last["mfu"] = tflops / self.peak
            if comm_share is not None:
                last["sp_comm_share"] = comm_share
            if skipped:
                last["skipped_steps"] = skipped
            history.append(last)
            if len(history) == 1 and hasattr(self.model, "lm"):
                # the first step checked every SP call's arguments across ranks; the rest repeat them
                self.model.lm.set_sp_validation(False)
            if self.recording and (step + 1 - self.start_step >= 2 or step + 1 == t.steps):
                # two steps: the second is the first with the optimizer state allocated
                self.recording = False
                memory.report(self.device, self.run_dir, dist.get_rank(), f"steps {self.start_step + 1}-{step + 1}")
            if (step + 1) % log_cfg.interval == 0 or step + 1 == t.steps or profiled or step == self.start_step:
                runlog.write(last)
            runlog.progress(step + 1, f"loss {last['loss']:.3f} acc {last['accuracy']:.3f} "
                                      f"{tokens_per_s / 1e3:.1f}k tok/s")
            ci = self.config.checkpoint.interval
            leaving = t.exit_interval and step + 1 - self.start_step >= t.exit_interval
            if saves and ((ci and (step + 1) % ci == 0) or step + 1 == t.steps or leaving):
                self._mark(step, "checkpoint")
                saved = self.engine.save(self.ckpt_dir, step + 1, self._meta(), self.config.checkpoint.keep)
            if leaving:
                if self.is_main:
                    print(f"seqpar: stopping after {t.exit_interval} steps (train.exit_interval); run the same "
                          f"command again to resume from step {step + 1}", flush=True)
                break
        runlog.close()
        if self.is_main and log_cfg.summary:
            metrics.write_summary(log_cfg.summary, history, self._meta())
        if self.is_main:
            where = saved or (checkpoint.complete(self.ckpt_dir) or [None])[-1]
            print(f"seqpar: done. metrics: {self.run_dir / 'metrics.jsonl'}; config: {self.run_dir / 'config.yaml'}; "
                  f"checkpoint: {where}", flush=True)
        return last

    def _meta(self) -> dict:
        return {"engine": self.engine.name, "world_size": dist.get_world_size(), "dp": self.dp,
                "sp": self.config.parallel.sp, "config": self.config.to_dict()}

    def _banner(self) -> str:
        c, p, t = self.config, self.parallel, self.config.train
        n_params = sum(x.numel() for x in self.model.parameters())
        return (f"seqpar: training {n_params / 1e6:.2f}M parameters ({c.model.pattern} x {c.model.num_layers} layers, "
                f"{c.model.linear_variant}) on {dist.get_world_size()} ranks ({self.launch.launcher}, "
                f"{dist.get_backend()}, {self.device.type}): {p.describe()}; task {c.data.task}, seq_len {t.seq_len}, "
                f"global batch {self.gbs}, {t.steps} steps; logs in {self.run_dir}, checkpoints in {self.ckpt_dir}")


def run(config: cfg.Config) -> dict:
    """Train on this rank (a launcher started it, or it is the only one)."""
    launch = discover()
    cfg.check(config, launch.world_size)
    device = pick_device(launch, config.train.device)
    if config.train.engine == "megatron" and device.type != "cuda":
        raise cfg.ConfigError("train.engine: megatron needs GPUs (megatron-core's pipeline schedules run on CUDA); "
                              "use train.engine: native on CPUs")
    backend = "nccl" if device.type == "cuda" else "gloo"
    store = init_distributed(launch, backend, config.train.fault_timeout_s)
    watchdog = faults.Watchdog(launch.master_addr, launch.master_port, launch.rank, launch.world_size,
                               config.train.fault_timeout_s)
    watchdog.start()
    dist.barrier()
    try:
        result = Trainer(config, launch, device, watchdog).train()
        dist.barrier()
    except faults.FaultError as e:  # raised alike on every rank
        faults.abort(str(e))
    except Exception as e:  # noqa: BLE001
        if faults.is_comm_error(e):  # a collective failed here: name the rank to blame, not the socket
            watchdog.abort(watchdog.explain(e))
        traceback.print_exc()  # this rank's own failure: tell the others, who may wait for it in a collective
        watchdog.abort(f"rank {launch.rank} failed at step {watchdog.step + 1}: {type(e).__name__}: {e}")
    watchdog.stop()
    dist.destroy_process_group()
    del store  # rank 0 served it until here
    return result
