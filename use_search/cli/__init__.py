"""``use-search`` command line: parses flags, calls the library, prints. No logic of its own.

One module per command group; importing them registers their commands on the app (``shell.app``), in
the order ``--help`` lists them. Shared options live in ``cli/options.py``, the app, consoles, global
options and store opening in ``cli/shell.py``.
"""

from __future__ import annotations

import sys

from use_search.cli import index_query, query, serve, segment, weights, train, curate, eval, store_cmds, prune  # noqa: F401,I001 - registers the commands, in this order
from use_search.cli.index_query import RateColumn  # noqa: F401 - the progress column, importable from the CLI
from use_search.cli.shell import app, err
from use_search.weights import ChecksumError, MissingWeightsError, UnreadableCheckpointError

# User-facing failures: printed as one clear message, exit code 2, no traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    MissingWeightsError, ChecksumError, UnreadableCheckpointError, ValueError,
    OSError,  # the machine said no (permissions, disk full, output closed): its message says what
)
# The same, from modules a command may not have imported (importing them just to name their errors
# would cost every command their imports: the store's clients, torch).
LAZY_USER_ERRORS = (
    ("use_search.store.base", "StoreError"),
    ("use_search.model.checkpoint", "BackboneMismatchError"),
)


def is_user_error(e: BaseException) -> bool:
    lazy = tuple(getattr(sys.modules[m], n) for m, n in LAZY_USER_ERRORS if m in sys.modules)
    return isinstance(e, USER_ERRORS + lazy)


def error_text(e: BaseException) -> str:
    """The message of a user error; a settings error names each bad setting and the value given."""
    pydantic = sys.modules.get("pydantic")
    if pydantic is None or not isinstance(e, pydantic.ValidationError):
        return str(e)
    return "; ".join(
        f"invalid setting {'.'.join(map(str, x['loc'])) or 'value'}: {x['msg']} (got {x['input']!r})"
        for x in e.errors(include_url=False)
    ) + " (check the command line options, USE_SEARCH_* variables and the settings file)"




def main() -> None:
    try:
        app()
    except Exception as e:
        if not is_user_error(e):
            raise
        err.print(f"[bold red]error:[/] {error_text(e)}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]: completed images are saved; rerun the same command to finish.")
        sys.exit(130)
