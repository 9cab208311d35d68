"""Encoders: a registry of named frozen encoders (stage 1 only; imports transformers lazily)."""
