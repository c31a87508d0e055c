"""spannorm: deep Transformers where normalization placement and residual scaling are declarative choices."""

from spannorm.config import PLACEMENTS, ConfigError, ModelConfig, MoEConfig
from spannorm.model import DecoderLM, LMOutput, SpanNormLM, flops_per_token, param_counts

__version__ = "0.1.0"

__all__ = ["PLACEMENTS", "ConfigError", "DecoderLM", "LMOutput", "ModelConfig", "MoEConfig", "SpanNormLM",
           "__version__", "flops_per_token", "param_counts"]
