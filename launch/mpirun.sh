#!/usr/bin/env bash
# seqpar train under mpirun / mpiexec: mpi4py gives every rank its rank and the world size, and rank 0
# broadcasts its host name and a free port (seqpar/train/distributed.py). The MPI runtime only starts
# the processes; the training traffic runs over NCCL (GPUs) or gloo (CPU).
#   NP=2 launch/mpirun.sh train.steps=50                      # one machine
#   NP=16 PPN=8 HOSTS=node0,node1 launch/mpirun.sh --config configs/hybrid-1.3b.yaml
# MPI from PyPI works: pip install mpi4py mpich (this script then uses that mpirun).
set -euo pipefail
NP=${NP:-2}
PPN=${PPN:-$NP}
HOSTS_ARG=()
if [[ -n "${HOSTS:-}" ]]; then HOSTS_ARG=(-hosts "$HOSTS"); fi
exec mpirun -n "$NP" -ppn "$PPN" "${HOSTS_ARG[@]}" seqpar train "$@"
