"""The package's shape: no module over 500 lines, no function over 80 (unless a comment on the line
above its ``def`` starts with ``# long:`` and says why), no run of 6 lines written twice."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "use_search"
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 80
RUN = 6


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_no_module_over_500_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in modules() if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES}
    assert long == {}


def long_functions(path: Path) -> dict[str, int]:
    source = path.read_text()
    lines = source.splitlines()
    out = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            n = node.end_lineno - node.lineno + 1
            why = first >= 2 and lines[first - 2].strip().startswith("# long:")
            if n > MAX_FUNCTION_LINES and not why:
                out[f"{path.relative_to(PACKAGE)}:{node.name}"] = n
    return out


def test_no_function_over_80_lines_without_a_reason():
    found = {}
    for p in modules():
        found.update(long_functions(p))
    assert found == {}


def code_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, folded text) of the lines that carry code: no blanks, comments, docstring quotes,
    import statements or lone punctuation; white space folded (as the duplicates tool reads code)."""
    source = path.read_text()
    imports = {
        i
        for node in ast.walk(ast.parse(source))
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for i in range(node.lineno, node.end_lineno + 1)
    }
    out = []
    for i, raw in enumerate(source.splitlines(), 1):
        s = re.sub(r"\s+", " ", raw.split(" #")[0]).strip()
        if i in imports or not s or s.startswith(("#", '"' * 3, "'" * 3)) or re.fullmatch(r"[\[\](){},:]+", s):
            continue
        out.append((i, s))
    return out


def test_no_run_of_six_lines_written_twice():
    seen: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for p in modules():
        lines = code_lines(p)
        for k in range(len(lines) - RUN + 1):
            window = tuple(s for _, s in lines[k:k + RUN])
            seen[window].append(f"{p.relative_to(PACKAGE)}:{lines[k][0]}")
    repeated = {" | ".join(w[:2]): places for w, places in seen.items() if len(places) > 1}
    assert repeated == {}
