"""The model configuration, its layer pattern, the checks of a parallel layout against it, and the
FLOP count used for MFU.

Layer pattern: one symbol per block, repeated to fill num_layers ("LLLS" with 8 layers is LLLSLLLS).
Every block is [RMSNorm, token mixer, RMSNorm, SwiGLU MLP].

    seqpar symbols      L  linear attention (config.linear_variant)     S  softmax attention
    Megatron symbols    M  Mamba layer -> linear attention (config.linear_variant)
    (hybrid_layer_      G  GatedDeltaNet layer -> linear attention, gated_delta_rule
     pattern)           *  attention layer -> softmax attention
                        -  MLP layer: must follow a mixer symbol; together they make one block
                        |  pipeline-stage separator: ignored (stages split the blocks evenly)

Megatron's pattern has one symbol per layer, with mixers and MLPs as separate layers, so "M-M-M-*-"
is the 4-block pattern LLLS. Megatron symbols without a seqpar counterpart (E MoE, D DSA, + MLA,
/ MTP) and a mixer without its MLP (or an MLP without a mixer) are rejected with the reason.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from seqpar_kernels import VARIANTS

SEQPAR_SYMBOLS = {"L": "linear", "S": "softmax"}
MEGATRON_MIXERS = {"M": "linear", "G": "gated_delta_rule", "*": "softmax"}
MEGATRON_OTHER = {"E": "MoE layers", "D": "DeepSeek sparse attention", "+": "multi-latent attention",
                  "/": "multi-token prediction"}


@dataclass
class ModelConfig:
    vocab_size: int = 256
    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int | None = None      # softmax layers (GQA); None: num_heads
    head_dim: int | None = None          # None: hidden_size // num_heads
    ffn_hidden_size: int | None = None   # None: 8/3 hidden rounded up to a multiple of 64 (Llama)
    pattern: str = "LLLS"
    linear_variant: str = "gated_delta_rule"
    conv_size: int = 4                   # short convolution of the linear layers; 0: off
    rope_base: float = 10000.0
    tie_embeddings: bool = False
    init_std: float = 0.02               # output projections use init_std / sqrt(2 num_layers)
    norm_eps: float = 1e-5

    def __post_init__(self):
        problems = []
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if problems:
            raise ValueError("ModelConfig: " + "; ".join(problems))
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(f"ModelConfig: hidden_size {self.hidden_size} is not divisible by num_heads "
                                 f"{self.num_heads}; set head_dim explicitly or change num_heads")
            self.head_dim = self.hidden_size // self.num_heads
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = -(-8 * self.hidden_size // 3 // 64) * 64
        if self.num_heads % self.num_kv_heads:
            problems.append(f"num_heads {self.num_heads} must be a multiple of num_kv_heads {self.num_kv_heads}")
        if self.linear_variant not in VARIANTS:
            problems.append(f"linear_variant {self.linear_variant!r} is not one of {sorted(VARIANTS)}")
        if self.conv_size == 1 or self.conv_size < 0:
            problems.append(f"conv_size must be 0 (off) or >= 2, got {self.conv_size}")
        if self.head_dim % 2 and "softmax" in self._kinds_or_none():
            problems.append(f"softmax layers use RoPE, which needs an even head_dim, got {self.head_dim}")
        if problems:
            raise ValueError("ModelConfig: " + "; ".join(problems))
        self.layer_kinds()  # raises on a bad pattern

    def _kinds_or_none(self):
        try:
            return self.layer_kinds()
        except ValueError:
            return ()

    def layer_kinds(self) -> tuple[str, ...]:
        """The mixer of every block: "softmax" or a linear-attention variant name."""
        return expand_pattern(self.pattern, self.num_layers, self.linear_variant)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"ModelConfig: unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**d)

    @property
    def out_init_std(self) -> float:
        return self.init_std / (2 * self.num_layers) ** 0.5

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3 x forward; recomputation not counted):
        2 x every weight a token meets (projections, MLP, output head) plus the mixing itself:
        causal softmax 2 x 2 x heads x head_dim x seq_len / 2 (scores and values over half the sequence
        on average); linear attention 2 x 2 x heads x K x V (state write and read, recurrent form),
        delta rules one more K x V product (the prediction k^T S)."""
        h, H, Hkv, D, F = self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim, self.ffn_hidden_size
        fwd = 2 * h * self.vocab_size
        for kind in self.layer_kinds():
            fwd += 2 * 3 * h * F
            if kind == "softmax":
                fwd += 2 * h * D * (2 * H + 2 * Hkv) + 2 * H * D * seq_len
            else:
                fwd += 2 * h * H * D * 5 + 2 * 3 * H * D * self.conv_size  # q k v gate o, convolutions
                fwd += 2 * h * {"simple_gla": H, "gla": H * D, "gated_delta_rule": 2 * H,
                                "delta_rule": H}.get(kind, 0)
                fwd += (6 if VARIANTS[kind].delta else 4) * H * D * D
        return 3.0 * fwd


def pattern_blocks(pattern: str, linear_variant: str) -> tuple[str, ...]:
    """The mixers of one period of the pattern (raises on a bad pattern)."""
    return tuple(_parse(pattern, linear_variant))


def expand_pattern(pattern: str, num_layers: int, linear_variant: str) -> tuple[str, ...]:
    blocks = pattern_blocks(pattern, linear_variant)
    if num_layers % len(blocks):
        raise ValueError(f"the layer pattern {pattern!r} has {len(blocks)} blocks, which does not divide "
                         f"num_layers = {num_layers}; the pattern is repeated to fill the layers, so choose "
                         f"num_layers as a multiple of {len(blocks)} (or a pattern of length {num_layers})")
    return tuple(blocks) * (num_layers // len(blocks))


def _parse(pattern: str, linear_variant: str) -> list[str]:
    if not pattern:
        raise ValueError("the layer pattern is empty; use e.g. 'LLLS' (3 linear : 1 softmax) or 'L'")
    resolve = {"linear": linear_variant}
    megatron = any(c in MEGATRON_MIXERS or c in "-|" or c in MEGATRON_OTHER for c in pattern)
    if not megatron:
        bad = sorted(set(pattern) - set(SEQPAR_SYMBOLS))
        if bad:
            raise ValueError(f"layer pattern {pattern!r}: unknown symbols {bad}; use L (linear) and S (softmax), "
                             "or Megatron's hybrid symbols M, G, *, - (see docs/models.md)")
        return [resolve.get(SEQPAR_SYMBOLS[c], SEQPAR_SYMBOLS[c]) for c in pattern]
    blocks: list[str] = []
    open_mixer = None
    for i, c in enumerate(pattern):
        if c in SEQPAR_SYMBOLS:
            raise ValueError(f"layer pattern {pattern!r} mixes seqpar symbols (L, S) with Megatron's (M, G, *, -); "
                             "use one kind")
        if c in MEGATRON_OTHER:
            raise ValueError(f"layer pattern {pattern!r}: symbol {c!r} ({MEGATRON_OTHER[c]}) at position {i} has no "
                             "seqpar counterpart; seqpar supports M, G, * mixers each followed by - (MLP)")
        if c == "|":
            continue
        if c in MEGATRON_MIXERS:
            if open_mixer is not None:
                raise ValueError(_unpaired(pattern, i))
            open_mixer = MEGATRON_MIXERS[c]
        elif c == "-":
            if open_mixer is None:
                raise ValueError(f"layer pattern {pattern!r}: the MLP '-' at position {i} follows no mixer; seqpar "
                                 "blocks pair one mixer with one MLP (write e.g. 'M-' or '*-')")
            blocks.append(resolve.get(open_mixer, open_mixer))
            open_mixer = None
        else:
            raise ValueError(f"layer pattern {pattern!r}: unknown symbol {c!r} at position {i}")
    if open_mixer is not None:
        raise ValueError(_unpaired(pattern, len(pattern)))
    return blocks


def _unpaired(pattern: str, i: int) -> str:
    return (f"layer pattern {pattern!r}: the mixer before position {i} has no MLP '-' after it; seqpar blocks "
            "pair every mixer with an MLP (write e.g. 'M-M-*-')")


def check_parallel(config: ModelConfig, *, tp: int = 1, pp: int = 1, sp: int = 1, dp: int | None = None,
                   world_size: int | None = None, seq_len: int | None = None, layout: str = "contiguous") -> None:
    """Every way a parallel layout can fail to fit the model, all reported at once (ValueError)."""
    problems = []
    for name, n in (("num_heads", config.num_heads), ("num_kv_heads", config.num_kv_heads),
                    ("ffn_hidden_size", config.ffn_hidden_size)):
        if n % tp:
            problems.append(f"{name} = {n} is not divisible by the tensor-parallel size {tp}")
    if config.num_layers % pp:
        problems.append(f"num_layers = {config.num_layers} is not divisible by the {pp} pipeline stages")
    if seq_len is not None:
        shards = 2 * sp if layout == "zigzag" else sp
        if seq_len % shards:
            problems.append(f"sequence length {seq_len} is not divisible by {shards} "
                            f"({'2 x SP (CP) size for the zigzag layout' if layout == 'zigzag' else 'the SP size'})")
        elif config.conv_size and seq_len // shards < config.conv_size - 1:
            problems.append(f"each of the {shards} shards holds {seq_len // shards} tokens, fewer than the "
                            f"{config.conv_size - 1} the short convolution reaches back")
    if world_size is not None:
        if dp is None:
            if world_size % (tp * pp * sp):
                problems.append(f"world size {world_size} is not divisible by TP x PP x SP = {tp} x {pp} x {sp}")
        elif tp * pp * sp * dp != world_size:
            problems.append(f"TP x PP x SP x DP = {tp} x {pp} x {sp} x {dp} = {tp * pp * sp * dp} does not equal "
                            f"the world size {world_size}")
    if problems:
        raise ValueError("parallel layout does not fit: " + "; ".join(problems))
