"""Pretraining data: corpora, text -> shards, memory-mapped datasets, masking and batching."""
