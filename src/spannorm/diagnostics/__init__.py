"""Measurements on the residual stream, collected through the model hook points."""
