"""Training: run configuration, the trainer loop, checkpoints, schedules and progress display."""
