"""Datasets: deterministic records with ids, groups and seeded splits (stage 1 input)."""
