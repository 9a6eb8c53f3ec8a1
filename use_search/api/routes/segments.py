"""One indexed segment: its record and its mask."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from use_search.api.errors import DATA, PNG, errors
from use_search.api.forms import StrictJSONRoute
from use_search.api.routes.search import hit_json
from use_search.api.schemas import HitOut
from use_search.api.state import State
from use_search.query.render import mask_png

router = APIRouter(route_class=StrictJSONRoute)


@router.get("/segments/{seg_id}", response_model=HitOut, responses=errors(*DATA, 404), operation_id="get_segment")
def get_segment(seg_id: uuid.UUID, st: State) -> dict[str, Any]:
    hit = st.segment(seg_id)
    return hit_json(hit, st.filenames({hit.path})[hit.path])


@router.get("/segments/{seg_id}/mask.png", response_class=Response, responses={**PNG, **errors(*DATA, 404)},
            operation_id="get_mask")
async def get_mask(seg_id: uuid.UUID, st: State) -> Response:
    hit = await run_in_threadpool(st.segment, seg_id)
    async with st.render_slots:
        return Response(await run_in_threadpool(lambda: mask_png(hit.mask())), media_type="image/png")
