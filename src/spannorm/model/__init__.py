"""The model: layers, placement blocks, the MoE FFN, the LM, and analytic counts."""

from spannorm.model.counting import flops_per_token, param_counts
from spannorm.model.placements import (
                                      BLOCKS,
                                      PATTERNS,
                                      Block,
                                      Knob,
                                      deepnorm_constants,
                                      span_post_constants,
                                      span_scales,
)
from spannorm.model.transformer import DecoderLM, LMOutput, SpanNormLM

__all__ = ["BLOCKS", "PATTERNS", "Block", "DecoderLM", "Knob", "LMOutput", "SpanNormLM", "deepnorm_constants",
           "flops_per_token", "param_counts", "span_post_constants", "span_scales"]
