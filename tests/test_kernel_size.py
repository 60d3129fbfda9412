"""The kernel stays readable in one sitting: no file in app/ over 300 lines, no class over 200, and
no measured figures in its comments (a comment says why; BENCHMARKS.md says how much, with the
command that measured it)."""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

APP = Path(__file__).resolve().parent.parent / "app"
FIGURE = re.compile(r"\d[\d,.]*\s*(µs|us\b|ms\b|req/s|rows/s|events/s|jobs/s|commits/s)|measured:", re.IGNORECASE)


def kernel_files() -> list[Path]:
    return sorted(APP.rglob("*.py"))


def test_no_kernel_file_is_over_300_lines():
    long = {str(p.relative_to(APP)): n for p in kernel_files() if (n := len(p.read_text().splitlines())) > 300}
    assert long == {}


def test_no_kernel_class_is_over_200_lines():
    long = {}
    for path in kernel_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 200:
                long[f"{path.relative_to(APP)}:{node.name}"] = node.end_lineno - node.lineno + 1
    assert long == {}


def comments_and_docstrings(source: str) -> list[str]:
    texts = [t.string for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            texts.append(ast.get_docstring(node) or "")
    return texts


def test_no_measured_figures_in_kernel_comments():
    found = [
        f"{path.relative_to(APP)}: {match.group(0)!r}"
        for path in kernel_files()
        for text in comments_and_docstrings(path.read_text())
        for match in FIGURE.finditer(text)
    ]
    assert found == []


def test_the_figure_check_sees_a_figure_in_a_comment():
    assert [m.group(0) for t in comments_and_docstrings("x = 1  # costs 3 µs a call\n") for m in FIGURE.finditer(t)]
