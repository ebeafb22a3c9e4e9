"""The single-device kernels, re-exported: ``from seqpar.ops import chunk_gla``.

They live in the ``seqpar_kernels`` package (folder ``kernels/``); see its docstring for the call.
"""
from seqpar_kernels import *  # noqa: F401,F403
from seqpar_kernels import __all__  # noqa: F401
