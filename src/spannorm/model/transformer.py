"""The decoder-only LM: embedding, a stack of placement blocks, an optional final norm and a head (untied by
default, or the embedding itself)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from spannorm.config import ModelConfig
from spannorm.model.layers import ResidualHook, make_norm
from spannorm.model.loss import chunked_cross_entropy
from spannorm.model.moe import Experts, MoEFFN
from spannorm.model.placements import Block, BlockInit, has_dual_stream, has_final_norm, make_block


@dataclass
class LMOutput:
    logits: torch.Tensor | None
    """(batch, T, vocab); None when the loss was computed in chunks (:attr:`DecoderLM.loss_chunk_tokens`)."""
    loss: torch.Tensor | None = None
    """Mean next-token cross-entropy, when targets were given. MoE auxiliary losses are not added."""
    balance_loss: torch.Tensor | None = None
    """Mean over MoE layers of the Switch balance loss (1.0 at uniform routing); None for dense models."""
    z_loss: torch.Tensor | None = None
    """Mean over MoE layers of the router z-loss; None for dense models."""
    expert_load: torch.Tensor | None = None
    """Per-layer fraction of assignments per expert, shape (n_moe_layers, E); None for dense models."""


class DecoderLM(nn.Module):
    """A decoder-only Transformer whose block placement is ``cfg.placement`` (with per-layer overrides).

    Every placement, SpanNorm and each baseline, is this one class; :data:`SpanNormLM` is its older name.

    Two memory settings change what is kept, not what is computed (the trainer sets them from ``train.``):
    ``activation_checkpointing = k`` recomputes blocks 0, k, 2k, ... in backward instead of keeping their
    activations (0: none, 1: every block), and ``loss_chunk_tokens = n`` computes the loss given targets
    ``n`` tokens at a time (:func:`~spannorm.model.loss.chunked_cross_entropy`; the output then has no
    logits; 0: all at once)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.embed_norm = make_norm(cfg) if cfg.embed_norm else None
        self.hook_embed = ResidualHook()
        self.blocks = nn.ModuleList(make_block(cfg, layer) for layer in range(cfg.n_layers))
        self.dual_final_norm = make_norm(cfg) if has_dual_stream(cfg) else None
        """ResiDual's norm of the dual stream d_L before it joins x_L (None for single-stream placements)."""
        self.final_norm = make_norm(cfg) if has_final_norm(cfg) else None
        # skip_init: building the head draws no random numbers, so the embedding and the blocks get the same
        # draws with and without a head of their own (reset_parameters draws the head's init last)
        self.lm_head = None if cfg.tie_embeddings else nn.utils.skip_init(
            nn.Linear, cfg.d_model, cfg.vocab_size, bias=False, device=torch.empty(0).device)
        self._checkpoint_every = 0
        self.loss_chunk_tokens = 0
        self.reset_parameters()

    # ------------------------------------------------------------------ init (SPEC §3)
    def _std(self, fan_in: int) -> float:
        cfg = self.cfg
        return cfg.init_std / math.sqrt(fan_in) if cfg.init == "fan_in" else cfg.init_std

    def head_std(self) -> float:
        """The init std of the untied head (``cfg.head_init``): the other input projections' std, halved
        (``half``), over a further sqrt(d) (``small``) or as is (``fan_in``). A dual-stream model (ResiDual)
        hands the head x_L + N(d_L), the sum of two unit-RMS terms, whose RMS is at most 2 (triangle
        inequality); its head std is halved again so that its logits are no larger than a one-stream model's."""
        d = self.cfg.d_model
        output_terms = 1 if self.dual_final_norm is None else 2
        scale = {"half": 0.5, "small": 1 / math.sqrt(d), "fan_in": 1.0}[self.cfg.head_init]
        return self._std(d) * scale / output_terms

    @torch.no_grad()
    def reset_parameters(self) -> None:
        d = self.cfg.d_model
        nn.init.normal_(self.embed.weight, std=self._std(d))
        for module in self.modules():
            if (isinstance(module, (nn.LayerNorm, nn.Embedding, nn.Linear))
                    and getattr(module, "bias", None) is not None):
                nn.init.zeros_(module.bias)
            if hasattr(module, "weight") and module.weight is not None and module.weight.dim() == 1:
                nn.init.ones_(module.weight)
        for block in self.blocks:
            self._init_block(block, block.init_rule(self.cfg))
        if self.lm_head is not None:  # last, so that the stream's weights draw what a tied model draws
            nn.init.normal_(self.lm_head.weight, std=self.head_std())

    def _init_block(self, block: Block, rule: BlockInit) -> None:
        attn, ffn = block.attn, block.ffn
        if "block_out" in block.norm_positions:  # after reset_parameters' ones: the block's init wins
            block.block_out_norm.weight.fill_(rule.block_out_gain)
        if rule.xavier_gain is not None:
            for linear in (attn.q_proj, attn.k_proj):
                nn.init.xavier_normal_(linear.weight, gain=1.0)
            branch = [attn.v_proj.weight, attn.o_proj.weight]
            for w in branch:
                nn.init.xavier_normal_(w, gain=rule.xavier_gain)
            for w, fan_in, fan_out, _ in _ffn_matrices(ffn):
                nn.init.normal_(w, std=rule.xavier_gain * math.sqrt(2.0 / (fan_in + fan_out)))
            if isinstance(ffn, MoEFFN):
                nn.init.normal_(ffn.router.weight, std=self._std(self.cfg.d_model))
            return
        for linear in (attn.q_proj, attn.k_proj, attn.v_proj):
            nn.init.normal_(linear.weight, std=self._std(linear.in_features))
        nn.init.normal_(attn.o_proj.weight, std=self._std(attn.o_proj.in_features) * rule.out_proj_scale)
        for w, fan_in, _, is_output in _ffn_matrices(ffn):
            nn.init.normal_(w, std=self._std(fan_in) * (rule.out_proj_scale if is_output else 1.0))
        if isinstance(ffn, MoEFFN):
            nn.init.normal_(ffn.router.weight, std=self._std(self.cfg.d_model))

    # ------------------------------------------------------------------ memory settings
    @property
    def activation_checkpointing(self) -> int:
        return self._checkpoint_every

    @activation_checkpointing.setter
    def activation_checkpointing(self, every: int) -> None:
        self._checkpoint_every = int(every)
        if every and self.moe_layers():
            _let_compiled_checkpoints_skip_side_effects()

    # ------------------------------------------------------------------ forward
    @property
    def head_weight(self) -> torch.Tensor:
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def moe_layers(self) -> list[MoEFFN]:
        return [m for m in self.modules() if isinstance(m, MoEFFN)]

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> LMOutput:
        x = self.embed(idx) * self.cfg.embedding_multiplier
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        x = self.hook_embed(x)
        every = self._checkpoint_every if self.training and torch.is_grad_enabled() else 0
        # ResiDual (dual_final_norm set): the blocks carry the pair (x, d), d_0 = x_0; the head reads x_L + N(d_L)
        stream = x if self.dual_final_norm is None else (x, x)
        for layer, block in enumerate(self.blocks):
            stream = checkpoint(block, stream, use_reentrant=False) if every and layer % every == 0 else block(stream)
        x = stream if self.dual_final_norm is None else stream[0] + self.dual_final_norm(stream[1])
        if self.final_norm is not None:
            x = self.final_norm(x)
        if targets is not None and self.loss_chunk_tokens:
            out = LMOutput(logits=None, loss=chunked_cross_entropy(x, self.head_weight, targets,
                                                                   self.loss_chunk_tokens))
        else:
            logits = F.linear(x, self.head_weight.to(x.dtype))
            out = LMOutput(logits=logits)
            if targets is not None:
                out.loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))
        moe = self.moe_layers()
        if moe:
            aux = [m.last_aux for m in moe]
            out.balance_loss = torch.stack([a.balance_loss for a in aux]).mean()
            out.z_loss = torch.stack([a.z_loss for a in aux]).mean()
            out.expert_load = torch.stack([a.load for a in aux])
        return out


def _let_compiled_checkpoints_skip_side_effects() -> None:
    """An MoE layer hands its auxiliary losses back by setting an attribute in forward. Under torch.compile
    a checkpointed block with such a side effect is refused unless dynamo may skip replaying it when the
    block is recomputed in backward, which is what the model wants (the forward's losses are the ones
    used). This turns that refusal into the eager semantics minus the replay and changes nothing else."""
    import torch._dynamo.config  # here, not at the top: importing dynamo adds seconds to every start-up

    if hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True


SpanNormLM = DecoderLM
"""The model class's name before it said what the class is; kept so that code, checkpoints and docs that
name it keep working."""


def _ffn_matrices(ffn: nn.Module) -> list[tuple[torch.Tensor, int, int, bool]]:
    """Every FFN matrix (router excluded) as (weight, fan_in, fan_out, is_output_projection); stacked
    expert weights count per expert."""
    out = []
    for module in ffn.modules():
        if isinstance(module, Experts):
            out += [(w, w.shape[1], w.shape[2], w is module.w_down)
                    for w in (module.w_gate, module.w_up, module.w_down)]
        elif hasattr(module, "down_proj"):
            out += [(lin.weight, lin.in_features, lin.out_features, lin is module.down_proj)
                    for lin in (module.gate_proj, module.up_proj, module.down_proj)]
    return out
