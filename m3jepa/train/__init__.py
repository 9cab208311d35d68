"""Stage 2: AGD training of the predictor from feature stores."""
