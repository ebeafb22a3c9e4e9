"""The building blocks of the models: token mixers (linear attention in six variants, softmax
attention), the SwiGLU MLP and norms. Each takes an explicit ParallelContext (its SP group, layout
and methods) and a Projections object that builds its weights (nn.Linear for the plain model,
Megatron's Column/RowParallelLinear for the tensor-parallel build); none knows about Megatron."""
from .conv import ShortConv
from .linear_mixer import LinearMixer
from .mlp import SwiGLU
from .norm import HeadRMSNorm, RMSNorm
from .projections import PLAIN, Projections, plain_linear
from .rope import apply_rope
from .softmax_mixer import SoftmaxMixer

__all__ = ["ShortConv", "LinearMixer", "SwiGLU", "HeadRMSNorm", "RMSNorm", "PLAIN", "Projections", "plain_linear",
           "apply_rope", "SoftmaxMixer"]
