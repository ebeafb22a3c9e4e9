"""The hybrid language model (Linear-Llama style): embedding, N blocks of
[RMSNorm, token mixer, RMSNorm, SwiGLU MLP] with residual connections, final RMSNorm, output head.

    model = HybridLM(ModelConfig(pattern="LLLS", linear_variant="gla"), ParallelContext.create(sp=2))
    hidden = model(input_ids_local, cu_seqlens=None)    # [B, T_local, hidden], this rank's tokens
    logits = hidden @ model.output_weight.T              # the trainer does this chunked

Under SP every rank passes its own tokens (seqpar.sp.shard with the context's layout) and gets its
own hidden states; all parameters are replicated over the SP group (build them under the same seed,
and sum their gradients over the group, as for data parallelism).
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from seqpar.comm import collectives as C
from seqpar.layers import PLAIN, LinearMixer, Projections, RMSNorm, SoftmaxMixer, SwiGLU
from seqpar.parallel import ParallelContext
from seqpar.sp.tokens import cu_list

from .config import ModelConfig


def make_mixer(kind: str, config: ModelConfig, parallel: ParallelContext, proj: Projections = PLAIN) -> nn.Module:
    """The token mixer of one block: "softmax" or a linear-attention variant name."""
    c = config
    if kind == "softmax":
        return SoftmaxMixer(c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, parallel=parallel, proj=proj,
                            rope_base=c.rope_base, init_std=c.init_std, out_init_std=c.out_init_std)
    return LinearMixer(kind, c.hidden_size, c.num_heads, c.head_dim, parallel=parallel, proj=proj,
                       conv_size=c.conv_size, init_std=c.init_std, out_init_std=c.out_init_std, norm_eps=c.norm_eps)


class Block(nn.Module):
    def __init__(self, kind: str, config: ModelConfig, parallel: ParallelContext, proj: Projections = PLAIN):
        super().__init__()
        self.kind = kind
        self.checkpointed = False
        self.offload_input = False  # with checkpointed: keep the block input in host memory
        self.attn_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.mixer = make_mixer(kind, config, parallel, proj)
        self.mlp_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.ffn_hidden_size, proj, config.init_std, config.out_init_std)

    def _forward(self, x, cu_seqlens):
        x = x + self.mixer(self.attn_norm(x), cu_seqlens)
        return x + self.mlp(self.mlp_norm(x))

    def forward(self, x, cu_seqlens=None):
        if self.checkpointed and torch.is_grad_enabled():
            # recomputed in backward; the SP collectives inside run again, in the same order on every rank
            if not self.offload_input:
                return checkpoint(self._forward, x, cu_seqlens, use_reentrant=False)
            # the reentrant form saves its input through save_for_backward, which save_on_cpu sends
            # to (pinned) host memory; the non-reentrant form would keep a reference to it on the GPU
            with torch.autograd.graph.save_on_cpu(pin_memory=x.is_cuda):
                return checkpoint(self._forward, x, cu_seqlens, use_reentrant=True)
        return self._forward(x, cu_seqlens)


class HybridLM(nn.Module):
    def __init__(self, config: ModelConfig, parallel: ParallelContext | None = None):
        super().__init__()
        parallel = parallel or ParallelContext()
        if parallel.tp_size > 1:
            raise ValueError("HybridLM is the plain (SP x DP) model; for tensor parallelism build it through "
                             "seqpar.megatron (build_gpt_model)")
        self.config, self.parallel = config, parallel
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        nn.init.normal_(self.embed.weight, std=config.init_std)
        self.blocks = nn.ModuleList(Block(kind, config, parallel) for kind in config.layer_kinds())
        self.final_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        if not config.tie_embeddings:
            self.output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
            nn.init.normal_(self.output.weight, std=config.init_std)

    @property
    def output_weight(self) -> torch.Tensor:
        """[vocab, hidden]: logits = hidden @ output_weight.T (the embedding when tied)."""
        return self.embed.weight if self.config.tie_embeddings else self.output.weight

    def set_activation_checkpointing(self, enabled: bool = True, offload: bool = False) -> None:
        """Recompute every block in backward instead of keeping its activations (only the block
        inputs stay); with `offload` the block inputs wait in host memory (one [T_local, hidden]
        copy per block each way over PCIe, for ~2 bytes x hidden x layers of GPU memory per token)."""
        for block in self.blocks:
            block.checkpointed = enabled
            block.offload_input = enabled and offload

    def set_sp_validation(self, enabled: bool) -> None:
        """Whether every SP call first checks across ranks that all passed the same arguments (one
        small host-side exchange per call, ParallelContext.validate). The trainer turns it off after
        a first step has passed: later steps repeat the same calls."""
        for m in self.modules():
            if isinstance(getattr(m, "parallel", None), ParallelContext):
                m.parallel = replace(m.parallel, validate=enabled)

    def set_mlp_token_chunk(self, tokens: int) -> None:
        """Compute every block's MLP `tokens` tokens at a time (0: all at once); see SwiGLU."""
        for block in self.blocks:
            block.mlp.token_chunk = tokens

    def flops_per_token(self, seq_len: int) -> float:
        return self.config.flops_per_token(seq_len)

    def forward(self, input_ids: torch.Tensor, *, cu_seqlens=None) -> torch.Tensor:
        """input_ids [B, T_local]: this rank's tokens in the layout's order; cu_seqlens: global
        document boundaries (B = 1), identical on every rank. Returns the final-norm hidden states
        [B, T_local, hidden]."""
        cu = cu_list(cu_seqlens)
        self._check(input_ids, cu)
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x, cu)
        return self.final_norm(x)

    def _check(self, input_ids, cu):
        """One small host-side exchange per forward: every rank of the SP group must pass the same
        shapes and documents, or every rank raises the same error (no rank is left in a collective)."""
        par = self.parallel
        error = None
        if input_ids.dim() != 2:
            error = f"input_ids must be [B, T_local], got shape {tuple(input_ids.shape)}"
        elif cu is not None and input_ids.shape[0] != 1:
            error = f"cu_seqlens packs documents into one row and needs batch size 1, got {input_ids.shape[0]}"
        elif cu is not None and (cu[0] != 0 or cu[-1] != input_ids.shape[1] * par.sp_size):
            error = (f"cu_seqlens must run from 0 to the global length {input_ids.shape[1] * par.sp_size} "
                     f"(SP size x local length), got {list(cu)}")
        if par.validate and par.sp_size > 1 and dist.is_initialized():
            C.agree(dict(shape=tuple(input_ids.shape), cu_seqlens=cu), error, par.sp_group, what="HybridLM.forward")
        elif error:
            raise ValueError(error)
