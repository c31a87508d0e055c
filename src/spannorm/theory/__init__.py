"""The theory of SPEC §3 and §5 at init, beside the measurements of :mod:`spannorm.diagnostics`.

- :mod:`~spannorm.theory.meanfield`: the mean-field Gram recursion per placement: the variance recursion,
  token correlation, the identity-path product ∏ α/σ_l and the gradient profile (``predict_init``).
- :mod:`~spannorm.theory.gaussian`: the Gaussian integrals it needs (SiLU moments and kernels, softmax
  collision).
- :mod:`~spannorm.theory.bounds`: the Peri-LN bound's constants, DeepNorm's and SpanNorm's scalings.
- :mod:`~spannorm.theory.growth`: growth-class fitting with a parsimony rule, and depth dependence.
- :mod:`~spannorm.theory.criterion`: the Δt or α that keeps the predictions within a band.
"""
