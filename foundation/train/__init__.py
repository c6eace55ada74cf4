"""Training: distributed setup, the loop, checkpoints, schedules, optimiser and logging."""
