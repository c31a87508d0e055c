"""The theory of SPEC §3 and §5: predictions at init, growth classes, bounds and the stability criterion."""
