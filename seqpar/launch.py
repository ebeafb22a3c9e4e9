"""`seqpar launch`: print the command lines that start `seqpar train` on nodes x GPUs per node with
torchrun, SLURM (sbatch + srun) or mpirun. It runs nothing; the scripts in launch/ are the same commands
as files. Every launcher runs the same `seqpar train ...` on every rank; seqpar.train.distributed reads
the ranks from the launcher's environment.
"""
from __future__ import annotations

import shlex

LAUNCHERS = ("torchrun", "slurm", "mpirun")


def torchrun(nodes: int, per_node: int, train_args: list[str], master_addr: str, port: int) -> list[str]:
    args = " ".join(map(shlex.quote, train_args))
    if nodes == 1:
        return [f"torchrun --standalone --nproc-per-node={per_node} -m seqpar.cli train {args}".rstrip()]
    return [f"# on node i = 0..{nodes - 1} (node 0 is {master_addr}):",
            f"torchrun --nnodes={nodes} --nproc-per-node={per_node} --node-rank=$i --master-addr={master_addr} "
            f"--master-port={port} -m seqpar.cli train {args}".rstrip()]


def slurm(nodes: int, per_node: int, train_args: list[str], gpus: bool) -> list[str]:
    args = " ".join(map(shlex.quote, train_args))
    gpu = f" --gpus-per-node={per_node}" if gpus else ""
    return [f"sbatch --nodes={nodes} --ntasks-per-node={per_node}{gpu} launch/slurm.sbatch {args}".rstrip(),
            "# or, inside an allocation:",
            f"srun --nodes={nodes} --ntasks-per-node={per_node}{gpu} --kill-on-bad-exit=1 seqpar train {args}".rstrip()]


def mpirun(nodes: int, per_node: int, train_args: list[str], hosts: str) -> list[str]:
    args = " ".join(map(shlex.quote, train_args))
    where = f" -hosts {hosts}" if nodes > 1 else ""
    return [f"mpirun -n {nodes * per_node} -ppn {per_node}{where} seqpar train {args}".rstrip(),
            f"# Open MPI: mpirun -n {nodes * per_node} --npernode {per_node}"
            f"{' --host ' + hosts if nodes > 1 else ''} seqpar train {args}".rstrip()]


def commands(launcher: str, nodes: int, per_node: int, train_args: list[str], master_addr: str = "NODE0",
             port: int = 29500, gpus: bool = True) -> list[str]:
    if nodes < 1 or per_node < 1:
        raise ValueError(f"--nodes and --gpus-per-node must be >= 1, got {nodes} and {per_node}")
    if launcher == "torchrun":
        return torchrun(nodes, per_node, train_args, master_addr, port)
    if launcher == "slurm":
        return slurm(nodes, per_node, train_args, gpus)
    if launcher == "mpirun":
        hosts = ",".join([master_addr] + [f"NODE{i}" for i in range(1, nodes)])
        return mpirun(nodes, per_node, train_args, hosts)
    raise ValueError(f"unknown launcher {launcher!r}; choose one of {LAUNCHERS}")


def configure(parser) -> None:
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=1, help="ranks per node (one per GPU)")
    parser.add_argument("--launcher", choices=LAUNCHERS + ("all",), default="all")
    parser.add_argument("--master-addr", default="NODE0", help="address of node 0 (torchrun, mpirun host list)")
    parser.add_argument("--master-port", type=int, default=29500)
    parser.add_argument("--cpu", action="store_true", help="CPU ranks: no GPU request in the SLURM lines")
    parser.add_argument("train_args", nargs="*", metavar="TRAIN_ARG",
                        help="arguments of seqpar train, e.g. --config configs/hybrid-125m.yaml train.steps=100 "
                             "(put them after --)")
    parser.set_defaults(func=_main)


def _main(args) -> int:
    launchers = LAUNCHERS if args.launcher == "all" else (args.launcher,)
    world = args.nodes * args.gpus_per_node
    print(f"# {args.nodes} node(s) x {args.gpus_per_node} rank(s) = {world} ranks; "
          f"parallel.tp x pp x sp x dp must equal {world} (dp: 0 takes what is left)")
    for name in launchers:
        print(f"\n# {name}")
        for line in commands(name, args.nodes, args.gpus_per_node, args.train_args, args.master_addr,
                             args.master_port, gpus=not args.cpu):
            print(line)
    return 0
