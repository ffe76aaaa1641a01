"""Serve model_b over HTTP: python -m model_b --port 8002."""

from model_b import model
from modelserver.server import main

raise SystemExit(main(model))
