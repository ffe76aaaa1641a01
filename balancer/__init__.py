"""A/B-testing load balancer for ML model containers."""

__version__ = "0.1.0"
