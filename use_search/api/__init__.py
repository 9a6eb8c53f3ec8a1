"""HTTP API (FastAPI) and the web page it serves."""

from use_search.api.app import create_app, serve

__all__ = ["create_app", "serve"]
