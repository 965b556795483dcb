"""The training engine shared by every method: loop, schedules, checkpoints, accounting."""
