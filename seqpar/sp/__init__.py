"""Sequence parallelism: the layouts and the attention functions that run on an SP group.

    local = seqpar.sp.shard(full, group, layout="zigzag")
    o_local, state = seqpar.sp.linear_attention(q, k, v, variant="gla", g=g, group=group, layout="zigzag")
    o_local = seqpar.sp.softmax_attention(q, k, v, group=group, method="allgather", layout="zigzag")
    full = seqpar.sp.unshard(o_local, group, layout="zigzag")
"""
from .layout import LAYOUTS, shard, unshard
from .linear_attention import METHODS, linear_attention
from .softmax_attention import METHODS as SOFTMAX_METHODS
from .softmax_attention import softmax_attention
from .tokens import LocalTokens, local_tokens, previous_tokens

__all__ = ["LAYOUTS", "METHODS", "SOFTMAX_METHODS", "shard", "unshard", "linear_attention", "softmax_attention",
           "LocalTokens", "local_tokens", "previous_tokens"]
