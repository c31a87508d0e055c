"""Moved: generation lives in :mod:`spannorm.inference.generation`. This module keeps the old import path."""

from spannorm.inference.generation import generate

__all__ = ["generate"]
