"""Serve model_a over HTTP: python -m model_a --port 8001."""

from model_a import model
from modelserver.server import main

raise SystemExit(main(model))
