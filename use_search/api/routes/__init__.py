"""The API's routes, one router per concern; ``create_app`` includes them in this order."""

from use_search.api.routes import images, like, ops, search, segment, segments

ROUTERS = (ops.router, search.router, like.router, segments.router, images.router, segment.router)
