"""The hybrid linear/softmax language model, its configuration and layer pattern."""
from .config import ModelConfig, check_parallel, expand_pattern
from .hybrid import Block, HybridLM, make_mixer

__all__ = ["ModelConfig", "check_parallel", "expand_pattern", "Block", "HybridLM", "make_mixer"]
