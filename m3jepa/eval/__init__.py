"""Stage 3: retrieval, classification and VQA metrics on trained runs."""
