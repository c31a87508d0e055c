"""The Hugging Face config of a spannorm model exported with its own modeling code (``modeling_spannorm.py``).

Written by ``spannorm export-hf``; depends on transformers only. Every derived constant (the placement of each
layer, SpanNorm's α, the embedding multiplier, whether there is a final norm, the expert width) is stored
resolved, so the modeling code does not re-derive spannorm's defaults. ``spannorm_config`` keeps spannorm's own
``ModelConfig`` for re-import.

``placement_names`` is the version of the placement names (spannorm's ``PLACEMENT_NAMES``). A config without it
was exported before version 2 and is read with version 1's names: its ``span`` blocks are ``span_post``, its
``span_clean`` blocks ``span``, and its ``span_alpha``, ``span_beta`` and ``span_clean_beta`` are
``span_post_alpha``, ``span_post_beta`` and ``span_beta``.
"""

from transformers import PretrainedConfig

PLACEMENT_NAMES = 2
RENAMED_PLACEMENTS_V1 = {"span": "span_post", "span_clean": "span"}


class SpanNormConfig(PretrainedConfig):
    model_type = "spannorm"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, vocab_size=256, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=None, intermediate_size=352, max_position_embeddings=256,
                 layer_placements=None, norm="rms", norm_eps=1e-6, delta_t=1.0, span_beta=1.0,
                 span_post_alpha=1.0, span_post_beta=1.0, placement_names=None,
                 embedding_multiplier=1.0, embed_norm=False, final_norm=True, rotary_theta=10000.0,
                 rotary_scaling=None, attention_window=None, bias=False, tie_embeddings=True, moe=None,
                 spannorm_config=None, use_cache=True, **kwargs):
        if placement_names is None:  # exported before the names had a version: version 1's names
            layer_placements = [RENAMED_PLACEMENTS_V1.get(p, p) for p in layer_placements or ()] or None
            span_post_alpha = kwargs.pop("span_alpha", 1.0)
            span_post_beta = span_beta  # version 1's span_beta was span_post's
            span_beta = kwargs.pop("span_clean_beta", 1.0)
        self.placement_names = PLACEMENT_NAMES
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        # The block placement of every layer: pre, post, peri, span, span_post, span_b2t, deepnorm, lns, hybrid
        # or residual.
        self.layer_placements = list(layer_placements or ["pre"] * num_hidden_layers)
        # rms (RMSNorm with a gain) or layer (LayerNorm with gain and bias).
        self.norm = norm
        self.norm_eps = norm_eps
        # Residual step Δt of pre, post, peri, lns and span.
        self.delta_t = delta_t
        # span's run-time β (1/sqrt(L) in its fixed form, 1 in its learnable form, whose Nₒ gain holds it).
        self.span_beta = span_beta
        # The clean-skip multiplier α and branch multiplier β of span_post and span_b2t (α resolved from
        # spannorm's span_post_scaling).
        self.span_post_alpha = span_post_alpha
        self.span_post_beta = span_post_beta
        self.embedding_multiplier = embedding_multiplier
        self.embed_norm = embed_norm
        self.final_norm = final_norm
        self.rotary_theta = rotary_theta
        # None (plain RoPE) or {"rope_type": linear | llama3 | yarn, ...} as Hugging Face writes it.
        self.rotary_scaling = rotary_scaling
        # Sliding attention window of the checkpoint the model was imported from (None: full attention).
        self.attention_window = attention_window
        self.bias = bias
        # The output head is the embedding matrix (there is no lm_head weight).
        self.tie_embeddings = tie_embeddings
        # None (dense SwiGLU) or {"n_experts", "top_k", "expert_hidden", "shared_expert"}.
        self.moe = moe
        self.spannorm_config = spannorm_config
        self.use_cache = use_cache
        kwargs["tie_word_embeddings"] = False  # a tied model has no lm_head module: nothing for transformers to tie
        super().__init__(**kwargs)
