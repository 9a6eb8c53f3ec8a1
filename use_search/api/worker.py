"""Heavy work (semantic segmentation, upload indexing) in one child process, off the search path.

The server process keeps the store and the text tower: a search never waits for SAM. SAM and the
image embedder live in a child process started on the first heavy request, at a lower CPU priority
(``nice``), so a segmentation cannot take the cores a search needs, nor hold the server's GIL.
Jobs run one at a time and ``queue`` more may wait; past that a request is refused at once
(``WorkerBusy``). A job that runs past ``timeout_s`` kills the child (``WorkerTimeout``): its memory
goes with it and the next job starts a fresh one.

The jobs take the upload's bytes and do everything heavy in the child: decode at the working size,
segment, embed, map the kept masks back to the original geometry, encode RLEs and PNGs.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from use_search.config import Settings
from use_search.indexer.read import ImageReadError
from use_search.types import SegmentPoint

if TYPE_CHECKING:
    from use_search.voting.vote import Votes


class WorkerBusy(RuntimeError):
    """Every slot of the heavy-work queue is taken."""


class WorkerTimeout(RuntimeError):
    """A job ran past the time limit; the worker was stopped."""


class WorkerFailed(RuntimeError):
    """The worker could not start (missing weights...), died, or a job failed for a reason not the input's."""


class JobInputError(ValueError):
    """The job's input is unusable (not an image, over the pixel budget, bad class names)."""

    def __init__(self, message: str, kind: str = "input") -> None:
        super().__init__(message)
        self.kind = kind  # "image" (unusable image), "budget" (too many pixels), "input" (anything else)


@dataclass
class Indexed:
    """What an upload-index job hands back to the server, which writes the store."""

    points: list[SegmentPoint]
    width: int  # the original's upright size (the stored masks' geometry)
    height: int
    model: str
    dim: int


# The child ---------------------------------------------------------------------------------------
class Parts:
    """The models a job needs, loaded once in the child."""

    def __init__(self, settings: Settings) -> None:
        from use_search.factory import Runtime

        self.settings = settings
        self.segmenter, self.embedder, self.side = Runtime.from_settings(settings).engine_parts()
        self._ensemble: Any = None

    @property
    def ensemble(self) -> Any:
        """The voting models (``settings.voting.models``, paper A.2), loaded on the first /segment;
        with none listed, the one embedder that also indexes uploads."""
        if self._ensemble is None:
            from use_search.factory import load_ensemble

            self._ensemble = load_ensemble(self.settings, default=self.embedder)
        return self._ensemble


def classify(pixels: np.ndarray, names: Sequence[str], parts: Parts) -> Votes:
    """Semantic segmentation by voting (paper §4.3): the one call into the voting library (its ``Votes``)."""
    from use_search.voting.predict import segment_by_voting

    return segment_by_voting(pixels, names, parts.segmenter, parts.ensemble, parts.settings.voting)


def job_segment(parts: Parts, data: bytes, names: list[str], with_png: bool) -> dict[str, Any]:
    """Label every pixel of the image (at the working size) with one of ``names``."""
    from use_search.imaging import decode_work
    from use_search.masks import encode_rle
    from use_search.voting.png import label_png

    img = decode_work(data, parts.settings.api.max_pixels, parts.side)
    votes = classify(img.pixels, names, parts)
    labels = votes.labels
    h, w = labels.shape
    out: dict[str, Any] = {
        "width": w, "height": h, "image_width": img.width, "image_height": img.height,
        "unlabeled_pixels": votes.unlabeled_pixels, "fallback": votes.fallback,
        "masks": [
            {"class": n, "index": i, "area": int((labels == i).sum()), "rle": encode_rle(labels == i)}
            for i, n in enumerate(names)
        ],
    }
    if with_png:
        out["labels_png"] = label_png(labels)
    return out


def job_index(parts: Parts, data: bytes, path: str, sha256: str) -> Indexed:
    """Segment and embed an upload at the working size; its points carry masks at the original size."""
    from pathlib import Path

    from use_search.indexer.read import load_image
    from use_search.indexer.runner import index_image

    loaded = load_image(Path(path), data, parts.settings.api.max_pixels, sha256, parts.side)  # as the indexer
    points = index_image(parts.segmenter, parts.embedder, loaded)
    rec = loaded.record
    return Indexed(points, rec.width, rec.height, parts.embedder.model_id, parts.embedder.dim)


def job_like(parts: Parts, data: bytes, point: tuple[int, int] | None) -> list[float]:
    """The vector of an upload's segment under ``point`` (x, y in its own pixels), or of the whole
    image, segmented at the working size and embedded by the store's model (more like this)."""
    from use_search.query.forms import upload_vector

    s = parts.settings
    return upload_vector(data, parts.embedder, parts.segmenter, point, s.api.max_pixels, s.work_side).tolist()


JOBS: dict[str, Callable[..., Any]] = {"segment": job_segment, "index": job_index, "like": job_like}


def _child(settings: Settings, conn: Connection, nice: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the server stops us
    if nice:
        os.nice(nice)
    try:
        parts = Parts(settings)
    except BaseException as e:  # noqa: BLE001 - reported to the server, which answers 503
        conn.send(("failed", f"the segmentation worker could not load its models: {type(e).__name__}: {e}"))
        return
    conn.send(("ready", None))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        job, args = message
        try:
            conn.send(("ok", JOBS[job](parts, *args)))
        except (ImageReadError, ValueError) as e:
            from use_search.imaging import PixelBudgetError

            kind = "budget" if isinstance(e, PixelBudgetError) else "image" if isinstance(e, ImageReadError) else "input"
            conn.send(("input", (kind, str(e))))
        except Exception as e:  # noqa: BLE001
            conn.send(("failed", f"{job} failed: {type(e).__name__}: {e}"))


# The server side ---------------------------------------------------------------------------------
class HeavyWorker:
    """Runs jobs in the child, one at a time; call ``run`` from a worker thread (it blocks)."""

    def __init__(self, settings: Settings) -> None:
        api = settings.api
        self.settings = settings
        self.queue = api.worker_queue
        self.timeout_s = api.worker_timeout_s
        self.startup_timeout_s = api.worker_startup_timeout_s
        self.nice = api.worker_nice
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self._run_lock = threading.Lock()
        self._count_lock = threading.Lock()
        self._admitted = 0  # running + waiting
        self._closed = False

    @property
    def state(self) -> str:
        return "running" if self._proc is not None and self._proc.is_alive() else "stopped"

    @property
    def load(self) -> int:
        return self._admitted

    def run(self, job: str, *args: Any) -> Any:
        with self._count_lock:
            if self._admitted >= 1 + self.queue:
                raise WorkerBusy(
                    f"the server is busy: {self._admitted} segmentation/indexing job(s) running or waiting "
                    f"(limit {1 + self.queue}, api.worker_queue); retry later"
                )
            self._admitted += 1
        try:
            with self._run_lock:
                conn = self._start()
                try:
                    conn.send((job, args))
                    if not conn.poll(self.timeout_s):
                        self._stop(kill=True)
                        raise WorkerTimeout(
                            f"{job} took longer than {self.timeout_s:g} s (api.worker_timeout_s) and was "
                            "stopped; send a smaller image or fewer classes"
                        )
                    status, value = conn.recv()
                except (EOFError, OSError, BrokenPipeError):
                    proc = self._proc
                    self._stop(kill=True)  # reaps it: its exit code is known after this
                    code = proc.exitcode if proc is not None else None
                    why = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
                    raise WorkerFailed(
                        f"the segmentation worker died during {job} ({why}); the next request starts a new one"
                    ) from None
        finally:
            with self._count_lock:
                self._admitted -= 1
        if status == "ok":
            return value
        if status == "input":
            kind, message = value
            raise JobInputError(message, kind)
        raise WorkerFailed(value)

    def _start(self) -> Connection:
        if self._closed:
            raise WorkerFailed("the server is shutting down")
        if self._proc is not None and self._proc.is_alive() and self._conn is not None:
            return self._conn
        self._stop(kill=True)
        ctx = multiprocessing.get_context("spawn")  # no fork of a threaded server holding the store
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_child, args=(self.settings, child, self.nice), name="use-search-worker", daemon=True)
        proc.start()
        child.close()
        self._proc, self._conn = proc, parent
        try:
            ready = parent.poll(self.startup_timeout_s)
            status, value = parent.recv() if ready else ("failed", None)
        except (EOFError, OSError):
            status, value = "failed", None
        if status != "ready":
            self._stop(kill=True)
            raise WorkerFailed(value or f"the segmentation worker did not start within {self.startup_timeout_s:g} s")
        return parent

    def _stop(self, kill: bool) -> None:
        proc, conn = self._proc, self._conn
        self._proc = self._conn = None
        if conn is not None:
            try:
                if not kill:
                    conn.send(None)
            except (OSError, BrokenPipeError):
                pass
            conn.close()
        if proc is not None:
            if kill:
                proc.kill()
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)

    def close(self) -> None:
        self._closed = True
        if self._run_lock.acquire(timeout=1):
            try:
                self._stop(kill=False)
            finally:
                self._run_lock.release()
        else:  # a job is running: it would finish into a store that is closing
            self._stop(kill=True)
