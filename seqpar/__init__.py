"""seqpar: sequence-parallel training for linear-attention and hybrid language models."""
__version__ = "0.1.0"
