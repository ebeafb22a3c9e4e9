"""Every Triton launch of the delta rules (forward, backward, and one shard as the SP call runs it,
over several state segments) compiles for Hopper (sm_90) with the installed Triton, without a GPU.
The interpreter tests run only the branches a launch takes; a GPU build type-checks every branch of
a launch's kernel, and a branch that is never run can still fail to compile (as the reverse chain
did in a forward-only launch, before state_pass chose it at compile time). Run in a fresh process:
other test modules switch the interpreter on before the kernels are defined."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

SCRIPT = """
import torch
from seqpar_kernels.triton import resources
n = sum(1 for _ in resources.compile_all(("delta_rule", "gated_delta_rule"), torch.bfloat16, 128, 128, 2))
print("compiled", n)
"""


def test_delta_launches_compile_for_hopper():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    assert int(out.stdout.split("compiled")[-1]) >= 20, out.stdout
