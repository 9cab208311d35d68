"""The M3-JEPA predictor: multi-gate mixture of experts, baselines, and losses."""
