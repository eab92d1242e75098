"""Synthetic catalogue, training, evaluation, and index shard build/publish."""
