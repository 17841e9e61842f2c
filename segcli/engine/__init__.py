"""The training engine: optimizers, learning-rate schedules and the training/evaluation loops."""
