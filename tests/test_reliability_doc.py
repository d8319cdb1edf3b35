"""docs/reliability.md names the test behind each guarantee: every row of a table with a "test" column
names at least one ``tests/test_x.py::test_name`` or says "untested", and every test the page names
exists (a function of that file, found by parsing it, so a renamed or deleted test turns this red)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "reliability.md"
NAMED = re.compile(r"(tests/[\w/]+\.py)::(\w+)")


def _tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """(header cells, body rows' cells) of every Markdown table of ``text``."""
    tables, block = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            block.append([c.strip() for c in line.strip().strip("|").split("|")])
            continue
        if len(block) >= 2 and set("".join(block[1])) <= set("-: "):
            tables.append((block[0], block[2:]))
        block = []
    return tables


def _tests_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and node.name.startswith("test")}


def test_every_guarantee_row_names_its_test_or_says_untested():
    rows = [(header[0], row) for header, body in _tables(DOC.read_text())
            if any(h.lower().startswith("test") for h in header) for row in body]
    assert len(rows) >= 30, len(rows)  # the tables were found
    unproven = [row[0] for _, row in rows if not NAMED.search(" ".join(row)) and "untested" not in " ".join(row)]
    assert unproven == [], f"rows naming no tests/test_x.py::test_name and not marked untested: {unproven}"


def test_every_test_the_page_names_exists():
    named = set(NAMED.findall(DOC.read_text()))
    assert len(named) >= 30, len(named)
    missing = sorted(f"{file}::{name}" for file, name in named
                     if not (REPO / file).exists() or name not in _tests_in(REPO / file))
    assert missing == [], f"docs/reliability.md names tests that do not exist: {missing}"
