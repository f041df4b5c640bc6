"""Instruction data mined from code: a function's docstring (+ signature) asks, its code answers.

A stand-in for Code Llama's self-instruct set (RECIPE.md §1.7) that needs no teacher model: every
function in the corpus whose docstring says what it does becomes one [INST] dialog.
"""

from __future__ import annotations

import ast
import textwrap

MIN_WORDS = 3  # a first docstring line shorter than this rarely says what the function does
MAX_LINES = 80  # longer functions would not fit a training row anyway


def docstring_dialogs(source: str) -> list[list[dict]]:
    """[user, assistant] dialogs for the documented functions of a Python file, in source order."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):  # not Python 3, or NUL bytes
        return []
    lines = source.splitlines(keepends=True)
    dialogs = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            pair = _pair(node, lines)
            if pair is not None:
                dialogs.append([{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}])
    return dialogs


def _pair(node: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str]) -> tuple[str, str] | None:
    """(instruction, code without the docstring), or None if the function is not a good example."""
    doc = ast.get_docstring(node)
    if not doc or len(node.body) < 2 or node.name.startswith(("test", "__")):
        return None
    if len(doc.splitlines()[0].split()) < MIN_WORDS or node.end_lineno - node.lineno >= MAX_LINES:
        return None
    doc_node, first_stmt = node.body[0], node.body[1]
    if doc_node.lineno == node.lineno or first_stmt.lineno <= doc_node.end_lineno:
        return None  # docstring shares a line with code: cannot cut it out by lines
    start = min([node.lineno] + [d.lineno for d in node.decorator_list])
    header = textwrap.dedent("".join(lines[node.lineno - 1 : doc_node.lineno - 1]))
    kept = lines[start - 1 : doc_node.lineno - 1] + lines[doc_node.end_lineno : node.end_lineno]
    code = textwrap.dedent("".join(kept))
    try:
        ast.parse(code)  # dedent fails on methods holding unindented multi-line strings
    except SyntaxError:
        return None
    signature = " ".join(header.split())
    return f"Write a Python function `{signature}` that does the following.\n\n{doc}", code.rstrip()
