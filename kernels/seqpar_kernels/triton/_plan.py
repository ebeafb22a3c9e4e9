"""How a call's tokens are cut into chunks and segments (shared by the Triton kernels).

Every sequence (a batch row, or a document of a packed cu_seqlens row) is cut into chunks of C
tokens (the last one shorter), and runs of consecutive chunks of one sequence form segments. A
state pass runs one program per segment (sequentially over its chunks, in parallel over segments
and heads); a small scan over the segments of each sequence then supplies each segment's incoming
state. Tokens are addressed as rows of the flattened [B*T, H, D] tensors.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

_CACHE: dict = {}


@dataclass(frozen=True)
class Plan:
    chunk_size: int
    chunk_start: torch.Tensor  # [NT] int32: first row of each chunk
    chunk_end: torch.Tensor    # [NT] int32: one past its last row
    chunk_seg: torch.Tensor    # [NT] int32: its segment
    seg_first: torch.Tensor    # [NS] int32: first chunk of each segment
    seg_count: torch.Tensor    # [NS] int32: number of chunks
    seq_first: torch.Tensor    # [N] int32: first segment of each sequence
    seq_count: torch.Tensor    # [N] int32: number of segments

    @property
    def n_chunks(self) -> int:
        return self.chunk_start.numel()

    @property
    def n_segs(self) -> int:
        return self.seg_first.numel()

    @property
    def n_seqs(self) -> int:
        return self.seq_first.numel()


def cdiv(a: int, b: int) -> int:
    """Host-side ceiling division (triton.cdiv is a constexpr function: ~10 us a host call)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """Host-side triton.next_power_of_2, without its per-call cost."""
    return 1 << max(0, n - 1).bit_length()


def dot_precision(dtype: torch.dtype) -> str:
    """input_precision of every tl.dot: full fp32 for fp32 inputs (Triton's default, TF32, errs
    ~1e-3; the compile option default_dot_input_precision does not reach the kernels), else tf32
    (which 16-bit operands ignore)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def default_segment_chunks(total_chunks: int, programs_per_segment: int, device: torch.device) -> int:
    """Chunks per segment: enough segments that a state pass fills the GPU about four times over,
    but no shorter than 4 chunks (shorter segments only move work into the scan)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    want_segments = max(1, -(-4 * sms // max(1, programs_per_segment)))
    return max(4, min(64, -(-total_chunks // want_segments)))


def make_plan(bounds: list[tuple[int, int]], device: torch.device, chunk_size: int, segment_chunks: int) -> Plan:
    """The plan for sequences with the given (first row, end row) bounds; cached."""
    key = (tuple(bounds), str(device), chunk_size, segment_chunks)
    plan = _CACHE.get(key)
    if plan is not None:
        return plan
    cs, ce, cg, sf, sc, qf, qc = [], [], [], [], [], [], []
    for bos, eos in bounds:
        starts = list(range(bos, eos, chunk_size))
        qf.append(len(sf))
        for i in range(0, len(starts), segment_chunks):
            part = starts[i:i + segment_chunks]
            sf.append(len(cs))
            sc.append(len(part))
            for s in part:
                cs.append(s)
                ce.append(min(s + chunk_size, eos))
                cg.append(len(sf) - 1)
        qc.append(len(sf) - qf[-1])

    def t(x):
        return torch.tensor(x, dtype=torch.int32).to(device, non_blocking=True)

    plan = Plan(chunk_size, t(cs), t(ce), t(cg), t(sf), t(sc), t(qf), t(qc))
    if len(_CACHE) > 64:
        _CACHE.clear()
    _CACHE[key] = plan
    return plan
