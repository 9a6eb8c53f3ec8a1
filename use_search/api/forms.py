"""Reading request bodies strictly: JSON without duplicate keys, multipart forms with only the route's
parts, uploads within the size limit, and an upload's file name made safe to show."""

from __future__ import annotations

import json
from typing import Any

from fastapi import HTTPException, Request, UploadFile
from fastapi.responses import Response
from fastapi.routing import APIRoute

from use_search.api.errors import jsonable

FORM_PARTS = {
    "/images": {"file": 1}, "/segment": {"file": 1, "image_id": 1, "labels_format": 1, "classes": None},
    "/search/image": {"file": 1, "x": 1, "y": 1, "k": 1, "min_score": 1, "group": 1},
}


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are all different (``json.loads`` keeps the last of duplicates)."""
    seen: set[str] = set()
    for k, _ in pairs:
        if k in seen:
            raise json.JSONDecodeError(f"duplicate key {jsonable(k)!r}", "", 0)
        seen.add(k)
    return dict(pairs)


class StrictJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = json.loads(await self.body(), object_pairs_hook=unique_keys)
        return self._json


class StrictJSONRoute(APIRoute):
    """Routes whose JSON bodies refuse duplicate keys (FastAPI's documented way to change how a
    request body is read: a route class with its own Request)."""

    def get_route_handler(self):  # type: ignore[no-untyped-def]
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict


async def check_form_parts(request: Request, route: str) -> None:
    """A multipart body has only the route's parts, each at most as often as it may appear: a second
    image, or a field the route does not take, is a 422 naming it (not silently ignored). An empty
    field is refused too (FastAPI reads it as absent: ``image_id=`` beside a file went unnoticed)."""
    allowed = FORM_PARTS[route]
    form = await request.form()  # parsed once already, for the route's parameters
    seen: dict[str, int] = {}
    for name, value in form.multi_items():
        if value == "" and name in allowed:
            raise HTTPException(422, f"form field {name!r} is empty: give a value or leave the field out")
        seen[name] = seen.get(name, 0) + 1
        if name not in allowed:
            raise HTTPException(422, f"unknown form field {jsonable(name)!r}: this route takes {', '.join(sorted(allowed))}")
        if allowed[name] is not None and seen[name] > allowed[name]:
            raise HTTPException(422, f"more than one {name!r} part: send one per request")


async def read_upload(file: UploadFile, limit: int) -> bytes:
    data = await file.read(limit + 1)
    if len(data) > limit:
        raise HTTPException(413, f"upload over the {limit:,}-byte limit")
    return data


def upload_name(name: str | None) -> str | None:
    """An upload's file name for display: the last path component, printable, at most 255 characters
    (a longer name is cut before its extension)."""
    if not name:
        return None
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(c for c in base if c.isprintable()).strip()
    try:
        base.encode("utf-8")
    except UnicodeEncodeError:
        base = base.encode("utf-8", "replace").decode("utf-8")
    if len(base) > 255:
        stem, dot, ext = base.rpartition(".")
        base = f"{stem[:254 - len(ext)]}.{ext}" if dot and stem and len(ext) <= 16 else base[:255]
    return base or None
