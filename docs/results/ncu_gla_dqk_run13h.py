"""One gla forward+backward at 16K on the GPU (for ncu to profile the dq/dk kernel)."""
import sys
import torch
import torch.nn.functional as F
import seqpar_kernels

dev = "cuda" if torch.cuda.is_available() else "cpu"
T = int(sys.argv[1]) if len(sys.argv) > 1 else 16384
backend = "triton" if dev == "cuda" else "torch"
torch.manual_seed(0)
B, H, K = 1, 16, 128
q, k, v = (torch.randn(B, T, H, K, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
g = F.logsigmoid(torch.randn(B, T, H, K, device=dev)).to(torch.bfloat16).requires_grad_()
for _ in range(2):
    o, _ = seqpar_kernels.chunk("gla", q, k, v, g=g, backend=backend)
    o.sum().backward()
if dev == "cuda":
    torch.cuda.synchronize()
print("ok", o.shape)
