"""Training: the loop (trainer), data, loss, checkpoints, metrics, faults, launch discovery and the
DeepSpeed route. `seqpar train` (seqpar.train.cli) is the entry point."""
