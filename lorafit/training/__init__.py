"""Small helpers that the recipes share: optimizer, schedule, checkpoints, metrics. No framework."""
