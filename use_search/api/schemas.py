"""Request and response bodies of the HTTP API: what /openapi.json documents is what the routes send.

Requests are strict: no coercion (``"k": "5"`` and ``"dedup": 0`` are 422), no unknown fields, only
finite numbers, and text that is real Unicode with something visible in it.
"""

from __future__ import annotations

import posixpath
import unicodedata
import uuid
from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_CLASSES = 255  # label PNGs are 8-bit with 255 = unlabeled
MAX_CLASS_CHARS = 200


VISIBLE_CATEGORIES = ("L", "N", "P", "S")  # Unicode letters, numbers, punctuation, symbols


def checked_text(value: str, what: str) -> str:
    """Text that can be encoded (no lone surrogates) and has a visible character: a letter, number,
    punctuation mark or symbol. Whitespace, control and format characters (NUL, zero-width space),
    lone combining marks, private-use and unassigned code points show nothing."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} is not valid Unicode (it holds a lone surrogate)") from None
    if not any(unicodedata.category(c).startswith(VISIBLE_CATEGORIES) for c in value):
        raise ValueError(
            f"{what} must contain a visible character, not only whitespace, control, zero-width or combining characters"
        )
    return value


def checked_path(value: str, what: str) -> str:
    """An absolute path as the store holds them: '/photos/../photos/' → '/photos'."""
    checked_text(value, what)
    if "\x00" in value:
        raise ValueError(f"{what} must not contain NUL characters")
    if not value.startswith("/"):
        raise ValueError(f"{what} must be an absolute path (stored paths look like /photos/2024/a.jpg)")
    norm = posixpath.normpath(value)
    return "/" + norm.lstrip("/")  # normpath keeps a leading '//'


# Documented patterns (the validators below say what is wrong in words): an absolute path; a character
# that is not whitespace, control, format (zero-width), combining or private use. JSON Schema's regex
# has no Unicode categories: the common invisible blocks stand for what ``checked_text`` checks.
ABSOLUTE = {"pattern": "^/"}
VISIBLE = {"pattern": (r"[^\s\x00-\x1f\x7f-\x9f\u00ad\u0300-\u036f\u0483-\u0489\u1ab0-\u1aff\u1dc0-\u1dff"
                       r"\u200b-\u200f\u202a-\u202e\u2060-\u206f\u20d0-\u20ff\ue000-\uf8ff\ufe00-\ufe0f"
                       r"\ufe20-\ufe2f\ufeff]")}


# One /segment "classes" form value: a name, or several separated by commas.
ClassNames = Annotated[str, Field(min_length=1, max_length=MAX_CLASSES * (MAX_CLASS_CHARS + 1), json_schema_extra=VISIBLE)]


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class Filters(Strict):
    path: Optional[str] = Field(None, min_length=1, max_length=4096, json_schema_extra=ABSOLUTE,
                                description="Only segments of this image (absolute path).")
    under: Optional[str] = Field(None, min_length=1, max_length=4096, json_schema_extra=ABSOLUTE,
                                 description="Only images under this folder (absolute path).")

    @field_validator("path", "under")
    @classmethod
    def _path(cls, v: Optional[str], info: Any) -> Optional[str]:
        return None if v is None else checked_path(v, f"filters.{info.field_name}")


MAX_PHRASES = 8  # settings.query.max_phrases' default: the schema states the bound a request may use
Phrase = Annotated[str, Field(min_length=1, max_length=1000, json_schema_extra=VISIBLE)]


class LikeRef(Strict):
    segment_id: uuid.UUID = Field(..., strict=False, description="A stored segment (a hit's id): find segments like it.")


class SearchRequest(Strict):
    """One form at a time: ``text`` and/or ``like`` (segments), with ``not`` as negatives; or ``all``
    (images showing every phrase), with ``none`` to drop images. ``group: "image"`` gives one row per
    image for the text / like form. Scores: see the README's "Queries" section.

    Which fields go together is checked by the server (422 naming the rule): one of text, like or all;
    all without text, like, not or group; none only with all and min_score."""

    # The rules above stay out of the JSON Schema: a schema-level anyOf/allOf beside the properties
    # makes client generators (openapi-python-client) drop the whole /search operation.
    model_config = ConfigDict(strict=True, extra="forbid")

    text: Optional[str] = Field(None, min_length=1, max_length=1000, json_schema_extra=VISIBLE,
                                description="What to look for, e.g. \"car's license plate\".")
    like: Optional[list[LikeRef]] = Field(None, min_length=1, max_length=MAX_PHRASES,
                                          description="More like these stored segments (they are left out of the hits).")
    other_images: bool = Field(False, description="With like: also leave out the other segments of their images.")
    not_: Optional[list[Phrase]] = Field(None, alias="not", min_length=1, max_length=MAX_PHRASES,
                                         description="Negatives: each subtracts its cosine from the score.")
    all: Optional[list[Phrase]] = Field(None, min_length=1, max_length=MAX_PHRASES,
                                        description="Images with a segment for every phrase (answered in images).")
    none: Optional[list[Phrase]] = Field(None, min_length=1, max_length=MAX_PHRASES,
                                         description="With all: drop images having a segment scoring min_score or more for one of these.")
    group: Optional[Literal["image"]] = Field(None, description="image: one row per image with its best segments (answered in images).")
    per_image: int = Field(3, ge=1, le=20, description="With group: the best segments listed per image.")
    k: int = Field(10, ge=1, le=200, description="Number of hits (of images for all / group).")
    filters: Optional[Filters] = None
    min_score: Optional[float] = Field(
        None, ge=-1.0, le=1.0, allow_inf_nan=False, description="Drop hits below this score (a cosine for one text or one example)."
    )
    dedup: bool = Field(False, description="One hit per group of overlapping masks on an image.")
    masks: bool = Field(True, description="Each hit carries its mask (rle). False: hits without it, a lighter "
                        "answer; mask_url and overlay_url still draw it.")

    @field_validator("text")
    @classmethod
    def _text(cls, v: Optional[str]) -> Optional[str]:
        return None if v is None else checked_text(v, "text")

    @field_validator("not_", "all", "none")
    @classmethod
    def _phrases(cls, v: Optional[list[str]], info: Any) -> Optional[list[str]]:
        return None if v is None else [checked_text(t, info.field_name.rstrip("_")) for t in v]

    @field_validator("k", "per_image", mode="before")
    @classmethod
    def _whole(cls, v: Any) -> Any:
        """JSON Schema's integer includes 5.0; strings and booleans stay refused."""
        return int(v) if isinstance(v, float) and v.is_integer() else v

    @model_validator(mode="after")
    def _one_form(self) -> "SearchRequest":
        if self.all is not None:
            if self.text is not None or self.like is not None or self.not_ is not None or self.group is not None:
                raise ValueError("all cannot be combined with text, like, not or group")
        elif self.text is None and self.like is None:
            raise ValueError("give text, like (a list of segment ids) or all (a list of phrases)")
        if self.none is not None and (self.all is None or self.min_score is None):
            raise ValueError("none needs all and min_score")
        return self


# Responses ---------------------------------------------------------------------------------------
class ErrorOut(BaseModel):
    detail: str = Field(..., description="What went wrong, for a person to read.")
    errors: Optional[list[dict[str, Any]]] = Field(None, description="422 only: every failed field (pydantic's list).")


class RLE(BaseModel):
    size: list[int] = Field(..., min_length=2, max_length=2, description="[height, width]")
    counts: str = Field(..., description="COCO compressed RLE counts")


class HitOut(BaseModel):
    id: uuid.UUID
    score: float
    path: str
    filename: str = Field(..., description="The upload's original file name, else the file's name.")
    image_id: uuid.UUID
    sha256: str
    segment_index: int
    bbox: list[int] = Field(..., min_length=4, max_length=4, description="x, y, width, height (pixels)")
    area: int
    width: int
    height: int
    rle: Optional[RLE] = Field(None, description="The mask; left out when the search asked for masks=false.")
    model: str
    mask_url: str
    overlay_url: str


class ImageMatchOut(BaseModel):
    image_id: uuid.UUID
    path: str
    filename: str
    sha256: str
    score: float = Field(..., description="group: the best segment's score; all: the weakest phrase's best segment's score.")
    segments: list[HitOut] = Field(..., description="group: the image's best segments; all: the best segment for each phrase, in order.")
    phrases: Optional[list[str]] = Field(None, description="all: the phrase each segment matched.")


class SearchOut(BaseModel):
    hits: list[HitOut]
    count: int
    images: Optional[list[ImageMatchOut]] = Field(None, description="all / group: one row per image (hits is then empty).")


class ImageSegmentOut(BaseModel):
    id: uuid.UUID
    segment_index: int
    bbox: list[int] = Field(..., min_length=4, max_length=4)
    area: int


class ImageOut(BaseModel):
    id: uuid.UUID
    path: str
    filename: str
    sha256: str = Field(..., description="SHA-256 of the file's bytes: its content, shared by its copies.")
    width: int = Field(..., description="Pixels, as stored (segment geometry is at this size).")
    height: int
    n_segments: int
    model: str = Field(..., description="The model that embedded its segments.")
    indexed_at: str = Field(..., description="When it was indexed (ISO 8601, UTC).")
    overlay_url: str
    segments: list[ImageSegmentOut]


class UploadOut(BaseModel):
    id: uuid.UUID
    path: str = Field(..., description="Where the server keeps the upload (named by its sha256).")
    filename: Optional[str] = Field(None, description="The name it was uploaded under.")
    sha256: str
    width: int
    height: int
    status: Literal["indexed", "exists"]
    n_segments: int


class ClassMaskOut(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    class_: str = Field(..., alias="class")
    index: int
    area: int
    rle: RLE


class SegmentationOut(BaseModel):
    filename: Optional[str] = None
    image_id: Optional[uuid.UUID] = None
    path: Optional[str] = None
    width: int = Field(..., description="Label map width: the image at the working size (long side ≤ SAM's input).")
    height: int
    image_width: int = Field(..., description="The image's own size; masks are at width × height.")
    image_height: int
    classes: list[str]
    unlabeled_value: int = Field(255, description="Label PNG value of pixels no segment covers.")
    unlabeled_pixels: int
    fallback: Literal["nearest", "image", "none"] = Field(
        ..., description="What labelled the pixels no segment covers: the nearest labelled pixel's class, "
        "the whole image's class, or none (they stay unlabeled).",
    )
    masks: list[ClassMaskOut]
    labels_png: Optional[str] = Field(None, description="Base64 PNG: pixel = class index, 255 = unlabeled.")


class HealthOut(BaseModel):
    status: Literal["ok"]
    preset: str
    untrained: bool = Field(..., description="True when the models are random-init (tiny preset): results are meaningless.")
    store: Literal["open", "read-only", "closed"] = Field(
        ..., description="read-only: the server cannot write the store's folder; it searches, uploads are refused (503).")
    auth: bool
    worker: Literal["running", "stopped"]
    worker_jobs: int = Field(..., description="Heavy jobs running or waiting.")


# POST /label: §4.3 voting over the stored masks and vectors -----------------------------------------
ClassName = Annotated[str, Field(min_length=1, max_length=MAX_CLASS_CHARS, json_schema_extra=VISIBLE)]


class LabelRequest(Strict):
    classes: list[ClassName] = Field(..., min_length=1, max_length=MAX_CLASSES, json_schema_extra={"uniqueItems": True},
                                     description="Class names, distinct; a label map's class index is the position here.")
    under: Optional[str] = Field(None, min_length=1, max_length=4096, json_schema_extra=ABSOLUTE,
                                 description="Only images under this folder (absolute path).")
    fallback: Literal["none", "nearest"] = Field(
        "none", description="Pixels no stored segment covers: none (unlabeled) or the nearest labelled pixel's class.")
    offset: int = Field(0, ge=0, le=2**53, description="Image records (paths) to skip: a previous page's next_offset.")
    limit: int = Field(20, ge=1, le=200, description="Image records (paths) read for this page.")

    @field_validator("classes")
    @classmethod
    def _classes(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("class names must be distinct")
        return [checked_text(n, "class name") for n in v]

    @field_validator("under")
    @classmethod
    def _path(cls, v: Optional[str]) -> Optional[str]:
        return None if v is None else checked_path(v, "under")


class LabelSegmentOut(BaseModel):
    id: uuid.UUID
    segment_index: int
    pixels: int = Field(..., description="Pixels of this segment labelled with the class.")


class LabelClassOut(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    name: str = Field(..., alias="class")
    index: int = Field(..., description="The class's index in the request's list.")
    pixels: int = Field(..., description="Pixels labelled with the class (at the image's own size).")
    segments: list[LabelSegmentOut]


class LabelImageOut(BaseModel):
    sha256: str
    paths: list[str] = Field(..., description="The image's indexed paths (under the folder asked for).")
    width: int
    height: int
    segments: int = Field(..., description="Stored segments that voted.")
    uncovered_pixels: int = Field(..., description="Pixels no stored segment covers.")
    unlabeled_pixels: int = Field(..., description="Pixels without a class after the fallback.")
    classes: list[LabelClassOut] = Field(..., description="The classes present, by index.")


class LabelOut(BaseModel):
    classes: list[str]
    fallback: Literal["none", "nearest"]
    images: list[LabelImageOut] = Field(
        ..., description="One per content: an image indexed under several paths comes once, at its first path.")
    next_offset: Optional[int] = Field(..., description="The offset of the next page; null after the last.")
