"""Sequence parallelism: the layouts and the attention functions that run on an SP group.

    local = seqpar.sp.shard(full, group, layout="zigzag")
    o_local, state = seqpar.sp.linear_attention(q, k, v, variant="gla", g=g, group=group, layout="zigzag")
    full = seqpar.sp.unshard(o_local, group, layout="zigzag")
"""
from .layout import LAYOUTS, shard, unshard
from .linear_attention import METHODS, linear_attention
from .tokens import LocalTokens, local_tokens, previous_tokens

__all__ = ["LAYOUTS", "METHODS", "shard", "unshard", "linear_attention", "LocalTokens", "local_tokens",
           "previous_tokens"]
