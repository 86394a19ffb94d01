"""Training objectives beyond next-token cross-entropy (which the model computes itself)."""
