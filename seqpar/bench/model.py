"""`seqpar bench model`: alpha-beta cost model of one linear-attention layer call under SP.

    seqpar bench model --variant gla --t-local 65536 --out cost_model.json --plot cost_model.png

Predicts, for P ranks on nodes of G GPUs, the forward+backward time of one SP layer call and its
SP efficiency = (plain kernel on T_local tokens) / (SP call on P x T_local tokens over P ranks),
the figure of merit of `seqpar bench sp`, for five ways to parallelise the sequence:

* lasp2_ring / lasp2_tree: one all-gather of every rank's (T, dS) summary (ring or tree algorithm),
  each rank folds its prefix; backward all-gathers the state gradients D;
* zeco: the state travels rank to rank in `zeco_slices` V-pieces, pipelined (ZeCO All-Scan);
* ring: the same chain in one piece (LASP-1);
* a2a: Megatron-style head-parallel context parallelism: all-to-alls turn [T_local, H, D]
  activations into [P T_local, H/P, D] and back, the kernel runs on whole sequences.

A link moves n bytes in alpha + n / bandwidth. Links are fitted per operation (all_gather, p2p,
all_to_all) and level (intra-node NVLink, inter-node InfiniBand) from measured NCCL times in a
calibration (JSON, format in docs/cost_model.md); the built-in one holds the two-H200 numbers of
DESIGN.md sections 7-8. The formulas, assumptions and what calibrates each term are in
docs/cost_model.md; tests/test_bench_model.py checks them on hand-computed cases.
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, replace

from seqpar_kernels import VARIANTS, get_variant

METHODS = ("lasp2_ring", "lasp2_tree", "zeco", "ring", "a2a")
SCAN_METHODS = ("lasp2_ring", "lasp2_tree", "zeco", "ring")  # exchange state summaries; can overlap
OPS = ("all_gather", "p2p", "all_to_all")
LEVELS = ("intra", "inter")
FP32 = 4

MiB = 1 << 20
DEFAULT_CALIBRATION: dict = {
    "name": "2xH200 (NV18 NVLink), NCCL 2.28.9, DESIGN.md section 7; kernels and SP summaries measured (runs 3, 11, 12)",
    "links": {
        # Fallbacks where an operation has no measurement at a level.
        "intra": {"alpha_us": 30.0, "bandwidth_GBps": 250.0,
                  "note": "all-gather of 64 KiB takes 0.03 ms; 256 MiB moves at ~250 GB/s (DESIGN.md section 7)"},
        "inter": {"extra_alpha_us": 10.0, "bandwidth_GBps": 40.0,
                  "note": "assumed, not measured: NDR InfiniBand 400 Gb/s per GPU at ~80% of peak; an inter-node "
                          "message costs the operation's intra-node latency plus 10 us"},
    },
    "collectives": [  # DESIGN.md section 7; ranges are entered as their two ends
        {"op": "all_gather", "level": "intra", "world_size": 2, "bytes_per_rank": 64 * 1024, "seconds": 0.03e-3},
        {"op": "all_gather", "level": "intra", "world_size": 2, "bytes_per_rank": 4 * MiB, "seconds": 0.08e-3},
        {"op": "all_gather", "level": "intra", "world_size": 2, "bytes_per_rank": 256 * MiB, "seconds": 1.08e-3},
        {"op": "p2p", "level": "intra", "world_size": 2, "bytes_per_rank": 1 * MiB, "seconds": 0.06e-3},
        {"op": "p2p", "level": "intra", "world_size": 2, "bytes_per_rank": 1 * MiB, "seconds": 0.11e-3},
        {"op": "all_to_all", "level": "intra", "world_size": 2, "bytes_per_rank": 1024 * MiB, "seconds": 1.65e-3},
    ],
    "kernels": [  # seqpar's Triton kernels on one H200 (`seqpar bench kernels`; the gated family run 13
        # with its H200 tiles, the delta rules runs 12d/12e), bf16, B=1, H=16, K=V=128, fwd+bwd: the
        # kernel the SP call runs, so the work that hides its exchange
        *({"variant": v, "tokens": t, "heads": 16, "head_dim_k": 128, "head_dim_v": 128, "fwd_bwd_s": ms * 1e-3}
          for v, times in (("linear_attn", ((65536, 3.20), (262144, 12.77))),
                           ("simple_gla", ((65536, 4.08), (262144, 16.20))),
                           ("gla", ((65536, 13.41), (262144, 53.35))),
                           ("delta_rule", ((65536, 6.37), (262144, 25.37))),
                           ("gated_delta_rule", ((65536, 7.42), (262144, 29.52))))
          for t, ms in times),
    ],
    "device": {"hbm_GBps": 4800.0, "fp32_TFLOPS": 67.0, "note": "H200 spec sheet (for the state folds)"},
    "sp": {
        "fwd_fraction": 1 / 3,
        "overlap_window": 0.5,
        # measured: scalar and diagonal by `seqpar bench sp` on two H200s (run 3, medians of 34 and 6
        # rows); dense by `delta_tune --sp` on one H100 (runs 11, 12a: the delta rules' summaries since
        # the kernel after them reuses their pass; run 3, before that change, measured 0.20)
        "summary_fraction": {"scalar": 0.018, "diagonal": 0.001, "dense": 0.10},
        "note": "fwd_fraction and overlap_window are estimates: the forward's share of kernel time; the share of "
                "each kernel pass that runs before it needs the exchanged state. summary_fraction, the SP-only "
                "state passes as a share of the kernel's fwd+bwd time per transition family, is measured "
                "(docs/cost_model.md)",
    },
}


# ---- calibration ------------------------------------------------------------------------------------
def merge_calibration(base: dict, override: dict) -> dict:
    """`override`'s measurements replace `base`'s for the same (level, op) and the same kernel variant;
    links, device and sp settings are merged key by key; anything not named in `override` is kept."""
    unknown = set(override) - set(DEFAULT_CALIBRATION)
    if unknown:
        raise ValueError(f"calibration: unknown keys {sorted(unknown)}; allowed: {sorted(DEFAULT_CALIBRATION)}")
    out = copy.deepcopy(base)
    for key in ("name",):
        if key in override:
            out[key] = override[key]
    for key in ("links", "device", "sp"):
        for sub, value in override.get(key, {}).items():
            if isinstance(value, dict) and isinstance(out[key].get(sub), dict):
                out[key][sub] = {**out[key][sub], **value}
            else:
                out[key][sub] = value
    if "collectives" in override:
        for m in override["collectives"]:
            _check_measurement(m)
        groups = {(m["level"], m["op"]) for m in override["collectives"]}
        out["collectives"] = [m for m in out["collectives"] if (m["level"], m["op"]) not in groups]
        out["collectives"] += copy.deepcopy(override["collectives"])
    if "kernels" in override:
        for k in override["kernels"]:
            _check_kernel_entry(k)
        names = {k["variant"] for k in override["kernels"]}
        out["kernels"] = [k for k in out["kernels"] if k["variant"] not in names] + copy.deepcopy(override["kernels"])
    return out


def load_calibration(paths=None, comm_level: str = "intra") -> dict:
    """The built-in calibration overridden by each file in turn: a calibration JSON, or the JSON
    that `seqpar bench comm` or `seqpar bench sp` writes (see calibration_from_bench)."""
    cal = copy.deepcopy(DEFAULT_CALIBRATION)
    names = []
    for path in [paths] if isinstance(paths, str) else (paths or []):
        with open(path) as f:
            data = json.load(f)
        override = calibration_from_bench(data, comm_level) if _is_bench(data) else data
        cal = merge_calibration(cal, override)
        names.append(override.get("name", path))
    if names:
        cal["name"] = " + ".join(names) + " (over the built-in 2xH200 numbers)"
    return cal


def _is_bench(data: dict) -> bool:
    return "meta" in data and ("times_ms" in data or "results" in data)


def calibration_from_bench(data: dict, comm_level: str = "intra") -> dict:
    """A calibration override from a benchmark's JSON. `seqpar bench comm`: every timed call becomes
    a collective measurement at `comm_level` (intra: the ranks share a node; inter: one rank per
    node). `seqpar bench sp`: the plain kernel's time per variant and T_local becomes a kernel time,
    and state_passes_ms / local_kernel_ms (median per transition family) the summary fraction."""
    import statistics

    meta = data["meta"]
    if comm_level not in LEVELS:
        raise ValueError(f"comm level must be one of {LEVELS}, got {comm_level!r}")
    name = f"seqpar bench {'comm' if 'times_ms' in data else 'sp'}, P={meta.get('P')}, {meta.get('device', '?')}"
    if "times_ms" in data:
        if meta["P"] < 2:
            raise ValueError("a `seqpar bench comm` run on one rank measures no communication; run it on 2 or more")
        return {"name": name, "collectives": [
            {"op": op, "level": comm_level, "world_size": meta["P"], "bytes_per_rank": n, "seconds": ms * 1e-3}
            for op, times in data["times_ms"].items() if op in OPS for n, ms in zip(data["bytes_per_rank"], times)]}
    rows = data["results"]
    kernels = {}
    for r in rows:
        kernels.setdefault((r["variant"], r["t_local"]), []).append(r["single_ms"] * 1e-3)
    fractions = {}
    for r in rows:
        if r.get("local_kernel_ms"):
            fractions.setdefault(get_variant(r["variant"]).transition, []).append(
                r["state_passes_ms"] / r["local_kernel_ms"])
    out = {"name": name, "kernels": [
        {"variant": v, "tokens": t, "heads": meta["heads"], "head_dim_k": meta["head_dim"],
         "head_dim_v": meta["head_dim"], "fwd_bwd_s": statistics.median(ts)} for (v, t), ts in kernels.items()]}
    if fractions:
        out["sp"] = {"summary_fraction": {fam: statistics.median(fs) for fam, fs in fractions.items()}}
    return out


def _check_measurement(m: dict) -> None:
    need = {"op", "level", "world_size", "bytes_per_rank", "seconds"}
    if not need <= set(m):
        raise ValueError(f"calibration collective {m} lacks {sorted(need - set(m))}")
    if m["op"] not in OPS or m["level"] not in LEVELS:
        raise ValueError(f"calibration collective {m}: op must be one of {OPS}, level one of {LEVELS}")
    if m["world_size"] < 2 or m["bytes_per_rank"] <= 0 or m["seconds"] <= 0:
        raise ValueError(f"calibration collective {m}: needs world_size >= 2, bytes_per_rank > 0, seconds > 0")


def _check_kernel_entry(k: dict) -> None:
    need = {"variant", "tokens", "heads", "head_dim_k", "head_dim_v", "fwd_bwd_s"}
    if not need <= set(k):
        raise ValueError(f"calibration kernel entry {k} lacks {sorted(need - set(k))}")
    get_variant(k["variant"])
    if k["tokens"] <= 0 or k["fwd_bwd_s"] <= 0:
        raise ValueError(f"calibration kernel entry {k}: tokens and fwd_bwd_s must be > 0")


@dataclass(frozen=True)
class Link:
    """n bytes in alpha_s + n / bandwidth_Bps seconds."""
    alpha_s: float
    bandwidth_Bps: float
    source: str = ""

    def time(self, latencies: float, nbytes: float) -> float:
        return latencies * self.alpha_s + nbytes / self.bandwidth_Bps


def _features(op: str, n: int, nbytes: float) -> tuple[float, float]:
    """(latency terms, bytes on the critical path) of one single-level NCCL call on n ranks."""
    if op == "all_gather":  # ring: n-1 steps of one rank's part
        return n - 1, (n - 1) * nbytes
    if op == "p2p":
        return 1, nbytes
    return 1, (n - 1) / n * nbytes  # all_to_all: every peer's share at once


def fit_link(measurements: list[dict], fallback: Link) -> Link:
    """Least-squares alpha and 1/bandwidth (relative errors) from measured single-level calls.
    With one distinct (world_size, size), only the parameter that dominates the measured time is
    fitted; the other comes from `fallback`."""
    import numpy as np

    rows = [(*_features(m["op"], m["world_size"], m["bytes_per_rank"]), m["seconds"]) for m in measurements]
    t = np.array([r[2] for r in rows])
    A = np.array([[r[0], r[1]] for r in rows]) / t[:, None]
    what = f"fit of {len(rows)} measurement(s)"
    if len({(r[0], r[1]) for r in rows}) >= 2:
        (alpha, inv_bw), *_ = np.linalg.lstsq(A, np.ones(len(rows)), rcond=None)
        if alpha > 0 and inv_bw > 0:
            return Link(float(alpha), float(1 / inv_bw), what)
    lat, nbytes = rows[0][0], rows[0][1]
    t_mean = float(t.mean())
    if lat * fallback.alpha_s >= nbytes / fallback.bandwidth_Bps:  # latency-bound: fit alpha
        alpha = max(t_mean - nbytes / fallback.bandwidth_Bps, 0.0) / lat
        return Link(alpha, fallback.bandwidth_Bps, what + " (alpha; bandwidth from links)")
    bw = nbytes / max(t_mean - lat * fallback.alpha_s, 1e-12)
    return Link(fallback.alpha_s, bw, what + " (bandwidth; alpha from links)")


@dataclass(frozen=True)
class Device:
    hbm_Bps: float
    fp32_flops: float


@dataclass(frozen=True)
class Machine:
    """Links per (level, op), GPUs per node, and the device roofline for the state folds."""
    gpus_per_node: int
    links: dict
    device: Device

    def link(self, level: str, op: str) -> Link:
        return self.links[(level, op)]


def build_machine(cal: dict, gpus_per_node: int = 8, intra_alpha_us=None, intra_bw_GBps=None,
                  inter_alpha_us=None, inter_bw_GBps=None, hop_alpha_us=None) -> Machine:
    """Fit every (level, op) link; the four level overrides, when given, set that parameter of
    every operation at that level (inter_alpha_us is then the whole inter-node latency).
    hop_alpha_us sets the p2p latency a chain pays per hop (inside a node; across nodes it adds the
    inter-node extra latency): an isolated P2P call's time includes launch costs that a chain,
    whose sends and receives are all enqueued ahead, does not pay at every hop."""
    if gpus_per_node < 1:
        raise ValueError(f"gpus_per_node must be >= 1, got {gpus_per_node}")
    li, le = cal["links"]["intra"], cal["links"]["inter"]
    intra_fallback = Link(li["alpha_us"] * 1e-6, li["bandwidth_GBps"] * 1e9, "links.intra")
    links = {}
    for op in OPS:
        ms = [m for m in cal["collectives"] if m["op"] == op and m["level"] == "intra"]
        links[("intra", op)] = fit_link(ms, intra_fallback) if ms else intra_fallback
    for op in OPS:
        ms = [m for m in cal["collectives"] if m["op"] == op and m["level"] == "inter"]
        derived = Link(links[("intra", op)].alpha_s + le["extra_alpha_us"] * 1e-6, le["bandwidth_GBps"] * 1e9,
                       "links.inter (intra-node latency of the op + extra_alpha_us)")
        links[("inter", op)] = fit_link(ms, derived) if ms else derived
    for (level, alpha_us, bw) in (("intra", intra_alpha_us, intra_bw_GBps), ("inter", inter_alpha_us, inter_bw_GBps)):
        for op in OPS:
            link = links[(level, op)]
            if alpha_us is not None:
                link = replace(link, alpha_s=alpha_us * 1e-6, source=link.source + "; alpha set on the command line")
            if bw is not None:
                link = replace(link, bandwidth_Bps=bw * 1e9, source=link.source + "; bandwidth set on the command line")
            links[(level, op)] = link
    if hop_alpha_us is not None:
        inter_hop = inter_alpha_us if inter_alpha_us is not None else hop_alpha_us + le["extra_alpha_us"]
        for level, alpha_us in (("intra", hop_alpha_us), ("inter", inter_hop)):
            links[(level, "p2p")] = replace(links[(level, "p2p")], alpha_s=alpha_us * 1e-6,
                                            source=links[(level, "p2p")].source + "; per-hop alpha set on the command line")
    d = cal["device"]
    return Machine(gpus_per_node, links, Device(d["hbm_GBps"] * 1e9, d["fp32_TFLOPS"] * 1e12))


_PROXY = {"scalar": "simple_gla", "diagonal": "gla", "dense": "gated_delta_rule"}


def kernel_time(cal: dict, variant: str, tokens: int, heads: int, head_dim_k: int, head_dim_v: int):
    """Single-GPU fwd+bwd seconds of one layer call on `tokens` tokens, and where it comes from:
    log-log interpolation over the variant's measured lengths (or a variant of the same transition
    family: scalar -> simple_gla, diagonal -> gla, dense -> gated_delta_rule), scaled by H K V."""
    family = get_variant(variant).transition
    entries = [k for k in cal["kernels"] if k["variant"] == variant]
    name = variant
    if not entries:
        same = [k["variant"] for k in cal["kernels"] if get_variant(k["variant"]).transition == family]
        if not same:
            raise ValueError(f"no kernel time for {variant!r} or any {family}-transition variant in the calibration; "
                             "add a 'kernels' entry or pass --kernel-us-per-token")
        name = _PROXY[family] if _PROXY[family] in same else same[0]
        entries = [k for k in cal["kernels"] if k["variant"] == name]
    ref = entries[0]
    shape = (heads * head_dim_k * head_dim_v) / (ref["heads"] * ref["head_dim_k"] * ref["head_dim_v"])
    pts = sorted({k["tokens"]: k["fwd_bwd_s"] for k in entries if
                  (k["heads"], k["head_dim_k"], k["head_dim_v"]) == (ref["heads"], ref["head_dim_k"], ref["head_dim_v"])
                  }.items())
    if len(pts) == 1:
        (t0, s0), = pts
        seconds = s0 * tokens / t0
    else:
        i = max(0, min(len(pts) - 2, sum(1 for t, _ in pts if t <= tokens) - 1))
        (t0, s0), (t1, s1) = pts[i], pts[i + 1]
        slope = math.log(s1 / s0) / math.log(t1 / t0)
        seconds = s0 * (tokens / t0) ** slope
    src = f"{name} kernel times" + ("" if name == variant else f" (proxy for {variant})")
    if shape != 1:
        src += f", scaled x{shape:.3g} for H*K*V"
    return seconds * shape, src


# ---- collective and chain times (the formulas of docs/cost_model.md) ---------------------------------
def placement(P: int, G: int) -> tuple[int, int]:
    """(nodes, ranks per node) for P ranks packed onto nodes of G GPUs."""
    if P <= G:
        return 1, P
    if P % G:
        raise ValueError(f"P={P} ranks do not fill nodes of {G} GPUs; choose P <= G or a multiple of G")
    return P // G, G


def _steps(n: int, algo: str) -> int:
    if n <= 1:
        return 0
    return n - 1 if algo == "ring" else math.ceil(math.log2(n))


def all_gather_s(P: int, G: int, nbytes: float, intra: Link, inter: Link, algo: str = "ring") -> float:
    """Hierarchical all-gather of nbytes per rank: across nodes (one rank per node, rail-aligned),
    then inside each node on the node's gathered data. ring: n-1 latency steps; tree: ceil(log2 n)."""
    if algo not in ("ring", "tree"):
        raise ValueError(f"all-gather algorithm must be 'ring' or 'tree', got {algo!r}")
    nodes, per_node = placement(P, G)
    t = inter.time(_steps(nodes, algo), (nodes - 1) * nbytes) if nodes > 1 else 0.0
    if per_node > 1:
        t += intra.time(_steps(per_node, algo), (per_node - 1) * nodes * nbytes)
    return t


def chain_s(hops_intra: int, hops_inter: int, nbytes: float, pieces: int, intra: Link, inter: Link,
            combine_s: float = 0.0) -> float:
    """A state of nbytes passed along a chain of hops in `pieces` pieces, each piece combined
    (combine_s) and forwarded as soon as it arrives: the first piece crosses every hop, the others
    follow one slowest-hop time apart."""
    if hops_intra + hops_inter == 0:
        return 0.0
    piece = nbytes / pieces
    t_in = intra.time(1, piece) + combine_s
    t_out = inter.time(1, piece) + combine_s
    slowest = max(t_in if hops_intra else 0.0, t_out if hops_inter else 0.0)
    return hops_intra * t_in + hops_inter * t_out + (pieces - 1) * slowest


def all_to_all_s(P: int, G: int, nbytes: float, intra: Link, inter: Link) -> float:
    """Each rank sends nbytes/P to every other rank; NVLink and InfiniBand shares move concurrently."""
    nodes, per_node = placement(P, G)
    share = nbytes / P
    t_in = intra.time(1, (per_node - 1) * share) if per_node > 1 else 0.0
    t_out = inter.time(1, (P - per_node) * share) if nodes > 1 else 0.0
    return max(t_in, t_out)


def transition_elems(family: str, K: int) -> int:
    """Numbers in one head's shard transition: a scalar, a diagonal of K, or a dense K x K."""
    return {"scalar": 1, "diagonal": K, "dense": K * K}[family]


def apply_s(family: str, heads: int, K: int, V_cols: float, device: Device) -> float:
    """One fold step T S + dS on a state of heads x K x V_cols fp32 (roofline: HBM or fp32 FLOPs)."""
    elems = heads * K * V_cols
    t_elems = transition_elems(family, K) * heads
    nbytes = (3 * elems + t_elems) * FP32
    flops = 2 * K * elems if family == "dense" else 2 * elems
    return max(nbytes / device.hbm_Bps, flops / device.fp32_flops)


# ---- the layer-call model ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Problem:
    """One linear-attention layer call: B=1, `heads` heads of K x V state, T_local tokens per rank."""
    variant: str = "gla"
    t_local: int = 65536
    heads: int = 16
    head_dim_k: int = 128
    head_dim_v: int = 128
    act_bytes: int = 2            # bf16 activations (what a2a moves)
    layout: str = "contiguous"    # zigzag: 2 shards per rank (LASP-2 gathers twice as much, chains have 2(P-1) hops)
    zeco_slices: int = 4
    a2a_tensors: int = 4          # per pass: q, k, v in and o out (forward); their gradients (backward)
    overlap: bool = True

    def __post_init__(self):
        get_variant(self.variant)
        if self.layout not in ("contiguous", "zigzag"):
            raise ValueError(f"layout must be 'contiguous' or 'zigzag', got {self.layout!r}")
        for name in ("t_local", "heads", "head_dim_k", "head_dim_v", "zeco_slices", "a2a_tensors", "act_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def family(self) -> str:
        return get_variant(self.variant).transition

    @property
    def state_bytes(self) -> int:
        return self.heads * self.head_dim_k * self.head_dim_v * FP32

    @property
    def transition_bytes(self) -> int:
        return self.heads * transition_elems(self.family, self.head_dim_k) * FP32


@dataclass
class Prediction:
    method: str
    P: int
    nodes: int
    kernel_s: float               # plain kernel fwd+bwd on T_local tokens: the numerator
    sp_s: float | None            # predicted SP call fwd+bwd
    efficiency: float | None
    comm_fwd_s: float = 0.0       # side-stream time per pass: collectives and folds
    comm_bwd_s: float = 0.0
    exposed_s: float = 0.0        # what the kernel does not hide
    sp_compute_s: float = 0.0     # SP-only compute on the critical path: state passes (a2a: the kernel on
                                  # the whole sequence with H/P heads, minus the numerator)
    bytes_received_per_rank: float = 0.0  # fwd + bwd
    note: str = ""


@dataclass
class Model:
    problem: Problem
    machine: Machine
    cal: dict
    kernel_us_per_token: float | None = None  # overrides the calibration's kernel times

    def kernel_s(self, tokens: int, heads: int) -> float:
        return self._kernel(tokens, heads)[0]

    @property
    def kernel_source(self) -> str:
        return self._kernel(self.problem.t_local, self.problem.heads)[1]

    def _kernel(self, tokens: int, heads: int):
        p = self.problem
        if self.kernel_us_per_token is not None:
            return (self.kernel_us_per_token * 1e-6 * tokens * heads / p.heads,
                    f"{self.kernel_us_per_token} us per token (command line)")
        return kernel_time(self.cal, p.variant, tokens, heads, p.head_dim_k, p.head_dim_v)

    def predict(self, method: str, P: int) -> Prediction:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
        if P < 1:
            raise ValueError(f"P must be >= 1, got {P}")
        p, G = self.problem, self.machine.gpus_per_node
        nodes, _ = placement(P, G)
        kernel = self.kernel_s(p.t_local, p.heads)
        if P == 1:
            return Prediction(method, 1, 1, kernel, kernel, 1.0)
        if method == "a2a":
            return self._a2a(P, nodes, kernel)
        return self._scan(method, P, nodes, kernel)

    def _scan(self, method, P, nodes, kernel) -> Prediction:
        p, m, sp = self.problem, self.machine, self.cal["sp"]
        s = 2 if p.layout == "zigzag" else 1
        mS, mT = p.state_bytes, p.transition_bytes
        fold = apply_s(p.family, p.heads, p.head_dim_k, p.head_dim_v, m.device)
        if method.startswith("lasp2"):
            algo = method.split("_")[1]
            ag = m.link("intra", "all_gather"), m.link("inter", "all_gather")
            n_shards = s * P
            fwd = all_gather_s(P, m.gpus_per_node, s * (mT + mS), *ag, algo) + (n_shards - 1) * fold
            bwd = all_gather_s(P, m.gpus_per_node, s * mS, *ag, algo) + (n_shards - 1) * fold
            received = (P - 1) * s * (mT + mS) + (P - 1) * s * mS
        else:
            pieces = p.zeco_slices if method == "zeco" else 1
            hops_inter = s * (nodes - 1)
            hops_intra = s * (P - 1) - hops_inter
            combine = apply_s(p.family, p.heads, p.head_dim_k, p.head_dim_v / pieces, m.device)
            link = m.link("intra", "p2p"), m.link("inter", "p2p")
            fwd = bwd = chain_s(hops_intra, hops_inter, mS, pieces, *link, combine)
            received = 2 * s * mS  # each direction: one state per shard boundary entering this rank
        sp_compute = sp["summary_fraction"][p.family] * kernel
        if p.overlap:
            win_f = sp["overlap_window"] * sp["fwd_fraction"] * kernel
            win_b = sp["overlap_window"] * (1 - sp["fwd_fraction"]) * kernel
            exposed = max(0.0, fwd - win_f) + max(0.0, bwd - win_b)
        else:
            exposed = fwd + bwd
        total = kernel + sp_compute + exposed
        return Prediction(method, P, nodes, kernel, total, kernel / total, fwd, bwd, exposed, sp_compute, received)

    def _a2a(self, P, nodes, kernel) -> Prediction:
        p, m = self.problem, self.machine
        if p.heads % P:
            return Prediction("a2a", P, nodes, kernel, None, None,
                              note=f"head-parallel needs P to divide H={p.heads}")
        tensor = p.t_local * p.heads * (p.head_dim_k + p.head_dim_v) / 2 * p.act_bytes  # one [T_local, H, D]
        one = all_to_all_s(P, m.gpus_per_node, tensor, m.link("intra", "all_to_all"), m.link("inter", "all_to_all"))
        comm = p.a2a_tensors * one  # per pass
        compute = self.kernel_s(P * p.t_local, p.heads // P)  # whole sequence, H/P heads
        total = compute + 2 * comm
        return Prediction("a2a", P, nodes, kernel, total, kernel / total, comm, comm, 2 * comm, compute - kernel,
                          2 * p.a2a_tensors * tensor * (P - 1) / P)


def predict_all(model: Model, Ps, methods=METHODS) -> list[Prediction]:
    return [model.predict(method, P) for P in Ps for method in methods]


def predict_point(variant: str, t_local: int, world_size: int, method: str, gpus_per_node: int = 8,
                  heads: int = 16, head_dim: int = 128, overlap: bool = True, calibration=None,
                  hop_alpha_us: float | None = None) -> dict:
    """One prediction as a flat dict: the cost model as a `seqpar bench sweep` point function."""
    cal = load_calibration(calibration)
    machine = build_machine(cal, gpus_per_node, hop_alpha_us=hop_alpha_us)
    problem = Problem(variant=variant, t_local=t_local, heads=heads, head_dim_k=head_dim, head_dim_v=head_dim,
                      overlap=overlap)
    r = Model(problem, machine, cal).predict(method, world_size)
    return {"efficiency": r.efficiency, "sp_ms": None if r.sp_s is None else r.sp_s * 1e3,
            "kernel_ms": r.kernel_s * 1e3, "exposed_ms": r.exposed_s * 1e3, "nodes": r.nodes,
            "tokens_per_s_per_gpu": None if r.sp_s is None else t_local / r.sp_s, "note": r.note}


# ---- output ------------------------------------------------------------------------------------------
def format_table(preds: list[Prediction], methods) -> str:
    Ps = sorted({r.P for r in preds})
    by = {(r.P, r.method): r for r in preds}
    head = f"{'P':>5} {'nodes':>5}  " + "  ".join(f"{m:>20}" for m in methods)
    lines = [head, " " * 13 + "  ".join(f"{'efficiency (exposed)':>20}" for _ in methods)]
    for P in Ps:
        cells = []
        for m in methods:
            r = by[(P, m)]
            cells.append(f"{'n/a':>20}" if r.efficiency is None else
                         f"{r.efficiency:>8.3f} ({r.exposed_s * 1e3:7.2f} ms)")
        lines.append(f"{P:>5} {by[(P, methods[0])].nodes:>5}  " + "  ".join(cells))
    return "\n".join(lines)


def plot(preds: list[Prediction], methods, path: str, title: str, published: list[dict] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.6), dpi=110)
    styles = {"lasp2_ring": ("tab:blue", "-"), "lasp2_tree": ("tab:blue", "--"), "zeco": ("tab:green", "-"),
              "ring": ("tab:red", "-"), "a2a": ("tab:purple", "-")}
    for m in methods:
        rows = sorted((r for r in preds if r.method == m and r.efficiency is not None), key=lambda r: r.P)
        color, ls = styles[m]
        ax.plot([r.P for r in rows], [r.efficiency for r in rows], ls, color=color, label=f"model: {m}", lw=1.8)
    markers = {"lasp2": ("tab:blue", "s"), "zeco": ("tab:green", "o"), "lasp1": ("tab:red", "^")}
    for series in dict.fromkeys(pt["series"] for pt in published or []):
        pts = [pt for pt in published if pt["series"] == series]
        color, mk = markers[pts[0]["method"]]
        filled = "ZeCO" in series
        ax.plot([pt["P"] for pt in pts], [pt["efficiency"] for pt in pts], mk, ls=":", lw=0.8, color=color,
                mfc=color if filled else "white", ms=6, label=series)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("SP ranks P")
    ax.set_ylabel("SP efficiency")
    ax.set_ylim(0, 1.05)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6.5, loc="lower left", ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run(args) -> dict:
    """Everything `seqpar bench model` computes, as one JSON-ready dict."""
    cal = load_calibration(args.calibration, args.comm_level)
    machine = build_machine(cal, args.gpus_per_node, args.intra_alpha_us, args.intra_bw_gbps,
                            args.inter_alpha_us, args.inter_bw_gbps, args.hop_alpha_us)
    if args.overlap_window is not None:
        cal["sp"]["overlap_window"] = args.overlap_window
    problem = Problem(variant=args.variant, t_local=args.t_local, heads=args.heads, head_dim_k=args.head_dim,
                      head_dim_v=args.head_dim, layout=args.layout, zeco_slices=args.zeco_slices,
                      overlap=not args.no_overlap)
    model = Model(problem, machine, cal, args.kernel_us_per_token)
    preds = predict_all(model, args.P, args.methods)
    return {
        "problem": asdict(problem) | {"family": problem.family, "state_bytes": problem.state_bytes,
                                      "transition_bytes": problem.transition_bytes},
        "gpus_per_node": machine.gpus_per_node,
        "links": {f"{lv}/{op}": {"alpha_us": lk.alpha_s * 1e6, "bandwidth_GBps": lk.bandwidth_Bps / 1e9,
                                 "source": lk.source} for (lv, op), lk in machine.links.items()},
        "kernel": {"fwd_bwd_s_at_t_local": model.kernel_s(problem.t_local, problem.heads),
                   "source": model.kernel_source},
        "calibration": cal,
        "predictions": [asdict(r) for r in preds],
    }


def configure(parser) -> None:
    parser.add_argument("--variant", default="gla", choices=list(VARIANTS))
    parser.add_argument("--t-local", type=int, default=65536, help="tokens per rank")
    parser.add_argument("--P", type=int, nargs="+", default=[2 ** i for i in range(1, 11)], help="SP sizes")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128, help="K = V")
    parser.add_argument("--layout", default="contiguous", choices=["contiguous", "zigzag"])
    parser.add_argument("--zeco-slices", type=int, default=4)
    parser.add_argument("--no-overlap", action="store_true", help="scan exchanges not hidden behind the kernel")
    parser.add_argument("--overlap-window", type=float, default=None,
                        help="share of each kernel pass that can hide the exchange (default: calibration's)")
    parser.add_argument("--calibration", nargs="+", default=None,
                        help="JSON files of measured numbers, applied in order: a calibration (docs/cost_model.md) "
                             "or the output of `seqpar bench comm` / `seqpar bench sp`")
    parser.add_argument("--comm-level", default="intra", choices=list(LEVELS),
                        help="what a `seqpar bench comm` file measured: ranks in one node (intra) or one per node")
    parser.add_argument("--dump-calibration", default=None, help="write the calibration in use as JSON and exit")
    parser.add_argument("--kernel-us-per-token", type=float, default=None,
                        help="single-GPU fwd+bwd microseconds per token (instead of the calibration's kernel times)")
    parser.add_argument("--intra-alpha-us", type=float, default=None)
    parser.add_argument("--intra-bw-gbps", type=float, default=None)
    parser.add_argument("--inter-alpha-us", type=float, default=None)
    parser.add_argument("--inter-bw-gbps", type=float, default=None)
    parser.add_argument("--hop-alpha-us", type=float, default=None,
                        help="per-hop latency of the zeco/ring chains (default: the fitted p2p call latency)")
    parser.add_argument("--no-published", action="store_true", help="leave the papers' points off the plot")
    parser.add_argument("--out", default="cost_model.json")
    parser.add_argument("--plot", default="cost_model.png", help="PNG path ('' for none)")
    parser.set_defaults(func=main)


def main(args) -> int:
    if args.dump_calibration:
        with open(args.dump_calibration, "w") as f:
            json.dump(load_calibration(args.calibration, args.comm_level), f, indent=1)
        print(f"wrote {args.dump_calibration}")
        return 0
    from .published import SOURCES, published_points

    result = run(args)
    preds = [Prediction(**r) for r in result["predictions"]]
    p = result["problem"]
    title = (f"{p['variant']} ({p['family']}), T_local={p['t_local']}, H={p['heads']}, K=V={p['head_dim_k']}, "
             f"{args.gpus_per_node} GPUs/node, overlap {'on' if p['overlap'] else 'off'}\n"
             f"calibration: {result['calibration']['name']}")
    print("cost model: " + title.replace("\n", "; "))
    print(f"kernel fwd+bwd at T_local: {result['kernel']['fwd_bwd_s_at_t_local'] * 1e3:.2f} ms "
          f"({result['kernel']['source']})")
    for name, lk in result["links"].items():
        print(f"  {name:18s} alpha {lk['alpha_us']:8.2f} us  bandwidth {lk['bandwidth_GBps']:8.1f} GB/s  ({lk['source']})")
    print(format_table(preds, args.methods))
    published = [] if args.no_published else published_points()
    result["published"] = {"points": published, "sources": SOURCES}
    if p["family"] == "dense":  # the papers measured linear attention and GLA, not the delta rules
        published = []
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")
    if args.plot:
        plot(preds, args.methods, args.plot, title, published)
        print(f"wrote {args.plot}")
    return 0
