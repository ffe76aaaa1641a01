"""model_b."""
