"""The error raised for checkpoints that cannot be converted."""

from __future__ import annotations


class InteropError(ValueError):
    """A checkpoint (or a model to export) that this converter cannot represent faithfully. The message is
    one line: what is wrong and what is supported."""


def require_transformers():
    """Import ``transformers`` on demand; it is the optional ``hf`` extra, needed only to run HF models."""
    try:
        import transformers  # optional dependency: the 'hf' extra
    except ImportError:
        raise InteropError("this step runs the model in Hugging Face transformers, which is not installed; "
                           "install the optional extra: pip install 'spannorm[hf]'") from None
    return transformers
