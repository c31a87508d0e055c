"""What the machine can do: device names, peak FLOP/s tables, a calibration matmul that measures a CPU's peak,
memory readings. It depends on torch only, so the trainer (for MFU in its metrics) and the benchmark harness
both read it."""
