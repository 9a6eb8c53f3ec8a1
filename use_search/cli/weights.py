"""``use-search weights list | fetch | verify``: the model checkpoints' cache."""

from __future__ import annotations

from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from use_search.cli.shell import app, err, out, state
from use_search.presets import PRESETS, get_preset, resolve
from use_search.weights import REGISTRY, MissingWeightsError, cache_path, download_size, fetch, missing_message, verify

weights_app = typer.Typer(no_args_is_help=True, help="List, fetch and verify model checkpoints.")
app.add_typer(weights_app, name="weights")


@weights_app.command("list")
def weights_list() -> None:
    """Known checkpoints, where they are cached, and whether they are present."""
    t = Table()
    for col in ("name", "kind", "arch", "size", "cached at", "present"):
        t.add_column(col)
    for spec in REGISTRY.values():
        path = state.settings.weights_path / spec.filename
        t.add_row(spec.name, spec.kind, spec.arch, f"{spec.size_mb} MB", escape(str(path)), "yes" if path.is_file() else "no")
    out.print(t)
    for p in PRESETS.values():
        out.print(f"preset [bold]{p.name}[/]: sam={p.sam} clip={p.clip} dinov2={p.dinov2}" + ("  (random init, untrained)" if p.untrained else ""))


def _names(names: list[str], preset: Optional[str]) -> list[str]:
    if preset:
        from use_search.model.registry import random_init

        p = get_preset(resolve(state.settings.model_copy(update={"preset": preset})))
        names = names + [n for k, n in (("sam", p.sam), ("clip", p.clip), ("dinov2", p.dinov2)) if not random_init(k, n)]
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise ValueError(f"unknown checkpoint(s): {', '.join(unknown)}; see `use-search weights list`")
    if not names:
        raise ValueError("name checkpoints or a --preset")
    return names


@weights_app.command("fetch")
def weights_fetch(
    names: list[str] = typer.Argument(None, help="Checkpoint names (see `weights list`)."),
    preset: Optional[str] = typer.Option(None, "--preset", help="Every checkpoint a preset needs."),
) -> None:
    """Download checkpoints into the cache, verifying their size and sha256. With --offline it only
    checks what is cached and never touches the network. The total download size is printed first."""
    s = state.settings
    checked = [(REGISTRY[name], *verify(REGISTRY[name], s)) for name in _names(names or [], preset)]
    todo = [spec for spec, ok, _ in checked if not ok]
    if todo and not s.is_offline:
        err.print(f"downloading {len(todo)} checkpoint(s), {download_size(todo)} in total: "
                  f"{', '.join(f'{t.name} ({t.size_mb} MB)' for t in todo)}", highlight=False, soft_wrap=True)
    problems: list[str] = []
    for spec, ok, msg in checked:
        if ok:
            out.print(f"{spec.name}: already cached")
            continue
        if cache_path(spec, s).is_file():  # there, but not the published file
            if s.is_offline:
                problems.append(f"{spec.name}: {msg} (offline: not downloading it again)")
                continue
            err.print(f"[yellow]{spec.name}[/]: {msg}; downloading it again")
        elif s.is_offline:
            problems.append(missing_message(spec, s, "offline mode: not downloading"))
            continue
        out.print(f"{spec.name}: {escape(str(fetch(spec, s)))}")
    if problems:
        raise MissingWeightsError("\n".join(problems))


@weights_app.command("verify", epilog="Exit codes: 0 every checkpoint named is cached and matches; 1 one or more "
                     "is missing or does not match (each is listed); 2 a usage error (unknown name).")
def weights_verify(
    names: list[str] = typer.Argument(None, help="Checkpoint names (default: all)."),
    preset: Optional[str] = typer.Option(None, "--preset", help="Every checkpoint a preset needs."),
) -> None:
    """Check cached checkpoints against their published sha256."""
    chosen = _names(names or [], preset) if (names or preset) else list(REGISTRY)
    bad = 0
    for name in chosen:
        ok, msg = verify(REGISTRY[name], state.settings)
        bad += not ok
        out.print(f"[{'green' if ok else 'red'}]{name}[/]: {msg}")
    raise typer.Exit(1 if bad else 0)

