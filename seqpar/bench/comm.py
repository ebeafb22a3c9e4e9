"""`seqpar bench comm`: latency and bandwidth of the collectives SP uses, on this machine.

    torchrun --nproc-per-node 2 -m seqpar.cli bench comm --out comm.json

Times all-gather, all-to-all and a point-to-point exchange (rank r sends to r+1) over message sizes
from a few KB to a few hundred MB, and fits t = alpha + bytes / beta to each (least squares over the
sizes). The fit calibrates the communication cost model (`seqpar bench model --calibration`).
"""
from __future__ import annotations

import json

import torch
import torch.distributed as dist

from seqpar.comm import collectives as C

from .timing import init_distributed, median_ms


def configure(parser) -> None:
    parser.add_argument("--sizes-kb", nargs="+", type=int,
                        default=[4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144],
                        help="bytes per rank of each message, in KiB")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--out", default="comm_bench.json")
    parser.set_defaults(func=main)


def fit_alpha_beta(sizes_bytes, times_ms):
    """Least-squares fit t = alpha + n / beta; returns (alpha seconds, beta bytes/second)."""
    n = torch.tensor(sizes_bytes, dtype=torch.float64)
    t = torch.tensor(times_ms, dtype=torch.float64) / 1e3
    A = torch.stack([torch.ones_like(n), n], 1)
    alpha, inv_beta = torch.linalg.lstsq(A, t[:, None]).solution[:, 0].tolist()
    return max(alpha, 0.0), (1.0 / inv_beta if inv_beta > 0 else float("inf"))


def main(args) -> int:
    device = init_distributed()
    P, rank = C.size(), C.rank()
    rows = {"all_gather": [], "all_to_all": [], "p2p": []}
    for kb in args.sizes_kb:
        n = kb * 1024 // 4
        x = torch.randn(n, device=device)
        rows["all_gather"].append(median_ms(lambda: C.all_gather(x), device, 3, args.repeat))
        y = torch.randn(P * (n // P or 1), device=device)
        z = torch.empty_like(y)
        rows["all_to_all"].append(median_ms(lambda: dist.all_to_all_single(z, y), device, 3, args.repeat))
        if P > 1:
            buf = torch.empty_like(x)

            def p2p():
                reqs = [dist.P2POp(dist.isend, x, (rank + 1) % P), dist.P2POp(dist.irecv, buf, (rank - 1) % P)]
                for r in dist.batch_isend_irecv(reqs):
                    r.wait()
            rows["p2p"].append(median_ms(p2p, device, 3, args.repeat))
        if rank == 0:
            print(f"{kb:>8d} KiB  all_gather {rows['all_gather'][-1]:8.3f} ms  all_to_all {rows['all_to_all'][-1]:8.3f}"
                  f" ms  p2p {rows['p2p'][-1] if rows['p2p'] else float('nan'):8.3f} ms", flush=True)
    sizes = [kb * 1024 for kb in args.sizes_kb]
    fits = {op: dict(zip(("alpha_s", "beta_Bps"), fit_alpha_beta(sizes, t))) for op, t in rows.items() if t}
    if rank == 0:
        name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
        with open(args.out, "w") as f:
            json.dump({"meta": {"P": P, "device": name, "backend": dist.get_backend()},
                       "bytes_per_rank": sizes, "times_ms": rows, "fit": fits}, f, indent=1)
        for op, fit in fits.items():
            print(f"{op:10s} alpha {fit['alpha_s'] * 1e6:7.1f} us  beta {fit['beta_Bps'] / 1e9:7.1f} GB/s")
        print(f"wrote {args.out}")
    dist.destroy_process_group()
    return 0
