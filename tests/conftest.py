"""Test-session setup. On a CPU machine Triton kernels run only in its interpreter, and the switch
must be on before *anything* imports triton (megatron-core and DeepSpeed do, while pytest collects):
otherwise Triton's own `tl` builtins are built for compilation and the interpreted kernels fail.
On a machine with an NVIDIA driver the kernels are compiled instead (the GPU-only tests need that)."""
import os

if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
