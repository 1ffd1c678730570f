"""File formats and safe file handling: weights, checkpoints, adapters, caches, run folders."""
