"""Training: typed recipes, the Accelerate-based engine, checkpoints and domain adaptation."""
