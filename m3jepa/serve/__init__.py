"""`m3jepa serve`: an HTTP service and web page over search indexes of one trained model (docs/serve.md)."""

from m3jepa.serve.app import create_app
from m3jepa.serve.engine import Engine
from m3jepa.serve.errors import RequestError
from m3jepa.serve.limits import Limits
from m3jepa.serve.server import open_engine, serve

__all__ = ["Engine", "Limits", "RequestError", "create_app", "open_engine", "serve"]
