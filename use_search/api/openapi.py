"""The OpenAPI document: FastAPI's, with what it cannot say from the route signatures."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

OPEN_PATHS = ("/health",)  # no key needed


def document(app: FastAPI, keyed: bool) -> dict[str, Any]:
    """The app's OpenAPI document (``keyed``: the server has an API key)."""
    return tidy_openapi(get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes), keyed)


def tidy_openapi(doc: dict[str, Any], keyed: bool) -> dict[str, Any]:
    """What FastAPI cannot say from the signatures: a multipart part is absent or present, never
    "null"; links from the responses that hand out ids to the routes that take them; and, on a
    server with a key, the X-API-Key scheme on every route that needs it."""
    for path, method in (("/segment", "post"), ("/images", "post"), ("/search/image", "post")):
        ref = doc["paths"][path][method]["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"]
        for prop in doc["components"]["schemas"][ref.rsplit("/", 1)[1]]["properties"].values():
            options = [o for o in prop.pop("anyOf", []) if o.get("type") != "null"]
            if options:
                prop.update(options[0])
            if "contentMediaType" in prop:  # a file: generated clients need the OpenAPI 3.0 spelling to send bytes
                prop["format"] = "binary"
    hit = {"get_segment": {"seg_id": "$response.body#/hits/0/id"}, "get_mask": {"seg_id": "$response.body#/hits/0/id"},
           "get_image": {"img_id": "$response.body#/hits/0/image_id"},
           "get_overlay": {"img_id": "$response.body#/hits/0/image_id", "segment": "$response.body#/hits/0/id"}}
    upload = {"get_image": {"img_id": "$response.body#/id"}, "get_overlay": {"img_id": "$response.body#/id"}}
    for path, status, links in (("/search", "200", hit), ("/images", "201", upload), ("/images", "200", upload)):
        response = doc["paths"][path]["post"]["responses"][status]
        response["links"] = {op: {"operationId": op, "parameters": params} for op, params in links.items()}
    if keyed:
        doc.setdefault("components", {})["securitySchemes"] = {
            "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}}
        for path, ops in doc["paths"].items():
            for op in ops.values():
                if path not in OPEN_PATHS:
                    op["security"] = [{"apiKey": []}]
    return doc
