"""LoRA mode: adapters on the last encoder layers, trained with the predictor from prefix stores."""
