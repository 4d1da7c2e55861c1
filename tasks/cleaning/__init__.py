"""Cleaning phase: validation, dedup, embeddings, exact search, ranking filter, hard negatives, export, report."""
