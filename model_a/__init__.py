"""model_a."""
