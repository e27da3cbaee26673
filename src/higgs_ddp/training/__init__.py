"""The step and what keeps it going: trainer, optimizer, parallel strategy, checkpoints, stops, logs."""
