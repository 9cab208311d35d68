"""Shared runtime of stages 2 and 3 and the LoRA mode: paired splits, feeding, objective, checkpoints."""
