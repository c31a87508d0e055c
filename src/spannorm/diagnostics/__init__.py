"""Measurements on the residual stream, collected through the model's hook points (SPEC §6).

- :mod:`~spannorm.diagnostics.recorder`: record activations and gradients at the hook points.
- :mod:`~spannorm.diagnostics.stats`: the statistics of one hidden state (moments, headroom, collapse).
- :mod:`~spannorm.diagnostics.measure`: ``measure(model, idx, targets)``: everything, at every point.
- :mod:`~spannorm.diagnostics.profile`: init profiles across depth (``spannorm profile``).
- :mod:`~spannorm.diagnostics.callback`: measurements during training (``train.diagnostics_every``).
- :mod:`~spannorm.diagnostics.custom`: a user's block wrapped in an LM with the same hook points.
- :mod:`~spannorm.diagnostics.check`, :mod:`~spannorm.diagnostics.check_results`,
  :mod:`~spannorm.diagnostics.verdicts`, :mod:`~spannorm.diagnostics.report`: ``spannorm check``.
"""
