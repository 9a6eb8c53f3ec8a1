"""Indexing stages (read → segment → embed → write) and the runner that chains them."""

from use_search.indexer.read import ImageReadError, LoadedImage, find_images, read_image
from use_search.indexer.runner import ImageEvent, Indexer, IndexReport, segment_points

__all__ = [
    "ImageEvent", "ImageReadError", "Indexer", "IndexReport", "LoadedImage",
    "find_images", "read_image", "segment_points",
]
