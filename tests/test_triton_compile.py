"""Every kind of Triton launch (resources.VARIANTS' forward and backward, and the delta rules as one
shard under SP, over several state segments) compiles for Hopper (sm_90) with the installed Triton,
without a GPU, in each input dtype, and fits sm_90's shared memory.
The interpreter tests run only the branches a launch takes; a GPU build type-checks every branch of
a launch's kernel, and a branch that is never run can still fail to compile (as the reverse chain
did in a forward-only launch, before state_pass chose it at compile time). Launch settings chosen
on bf16 can ask for more shared memory than the GPU has in fp32 (dq/dk at 3 stages did, run 13),
which only a launch on the GPU reported. Run in a fresh process: other test modules switch the
interpreter on before the kernels are defined."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

SCRIPT = """
import json, torch
from seqpar_kernels.triton import resources
for dtype in (torch.bfloat16, torch.float16, torch.float32):
    for fn, kernel, constexprs, options in resources.compile_all(resources.VARIANTS, dtype, 128, 128, 2):
        print(json.dumps({"dtype": str(dtype), "kernel": fn.__name__, "delta": fn.__module__.endswith("delta_kernels"),
                          "options": options, "shared": kernel.metadata.shared}))
"""


def test_every_launch_compiles_for_hopper_and_fits_its_shared_memory():
    from seqpar_kernels.triton.resources import SM90_SHARED_BYTES

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-4000:]
    launches = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    for dtype in ("torch.bfloat16", "torch.float16", "torch.float32"):
        of_dtype = [x for x in launches if x["dtype"] == dtype]
        # floors against an empty recording, not exact counts (adding a launch must not break them)
        assert sum(x["delta"] for x in of_dtype) >= 20 and sum(not x["delta"] for x in of_dtype) >= 15, of_dtype
    too_big = [x for x in launches if x["shared"] > SM90_SHARED_BYTES]
    assert not too_big, f"launches over sm_90's {SM90_SHARED_BYTES} bytes of shared memory: {too_big}"
