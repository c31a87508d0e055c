"""The Hugging Face config of a spannorm model exported with its own modeling code (``modeling_spannorm.py``).

Written by ``spannorm export-hf``; depends on transformers only. Every derived constant (the placement of each
layer, SpanNorm's α, the embedding multiplier, whether there is a final norm, the expert width) is stored
resolved, so the modeling code does not re-derive spannorm's defaults. ``spannorm_config`` keeps spannorm's own
``ModelConfig`` for re-import.
"""

from transformers import PretrainedConfig


class SpanNormConfig(PretrainedConfig):
    model_type = "spannorm"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, vocab_size=256, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=None, intermediate_size=352, max_position_embeddings=256,
                 layer_placements=None, norm="rms", norm_eps=1e-6, delta_t=1.0, span_alpha=1.0, span_beta=1.0,
                 span_clean_beta=1.0,
                 embedding_multiplier=1.0, embed_norm=False, final_norm=True, rotary_theta=10000.0,
                 rotary_scaling=None, attention_window=None, bias=False, tie_embeddings=True, moe=None,
                 spannorm_config=None, use_cache=True, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        # The block placement of every layer: pre, post, peri, span, span_b2t, span_clean, deepnorm, lns, hybrid
        # or residual.
        self.layer_placements = list(layer_placements or ["pre"] * num_hidden_layers)
        # rms (RMSNorm with a gain) or layer (LayerNorm with gain and bias).
        self.norm = norm
        self.norm_eps = norm_eps
        # Residual step Δt of pre, post, peri, lns and span_clean.
        self.delta_t = delta_t
        # The clean-skip multiplier α of span and span_b2t (resolved from spannorm's span_scaling).
        self.span_alpha = span_alpha
        self.span_beta = span_beta
        # span_clean's run-time β (1/sqrt(L) in its fixed form, 1 in its learnable form, whose Nₒ gain holds it).
        self.span_clean_beta = span_clean_beta
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
