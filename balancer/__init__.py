"""A/B-testing load balancer for ML model containers."""

from balancer import native

__version__ = "0.1.0"

native.select()  # compiled request path if built from these sources, else the .py files (see balancer.native)
