"""Runs every ``python`` code block of a Markdown page, in order, in one namespace.

Usage: ``python tests/_docs_runner.py PAGE.md``. Blocks of MyST ``{include}``
directives are run where the directive stands (honouring its ``:start-after:`` and
``:end-before:`` options). A failing block's traceback names the file and the line in
it (each block is compiled at its own line numbers). Exit status 0 when every block
ran; the number of blocks run is printed last.
"""

from __future__ import annotations

import pathlib
import re
import sys

FENCE = re.compile(r"^(`{3,}|~{3,})\s*(\S*)\s*(.*)$")
OPTION = re.compile(r"^:([\w-]+):\s*(.*)$")


def _included(path: pathlib.Path, options: dict[str, str]) -> tuple[str, int]:
    """The text an include directive pulls in, and the line it starts at."""
    text = path.read_text()
    first_line = 1
    if "start-after" in options:
        cut = text.index(options["start-after"]) + len(options["start-after"])
        first_line += text[:cut].count("\n")
        text = text[cut:]
    if "end-before" in options:
        text = text[: text.index(options["end-before"])]
    return text, first_line


def python_blocks(
    path: pathlib.Path, text: str | None = None, first_line: int = 1
) -> list[tuple[pathlib.Path, int, str]]:
    """``(file, first line, source)`` of each ``python`` block, includes expanded."""
    blocks: list[tuple[pathlib.Path, int, str]] = []
    lines = (path.read_text() if text is None else text).splitlines()
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence, info, argument = match.groups()
        end = i + 1
        while end < len(lines) and not lines[end].startswith(fence):
            end += 1
        body = lines[i + 1 : end]
        if info == "python":
            blocks.append((path, first_line + i + 1, "\n".join(body)))
        elif info == "{include}":
            options = dict(m.groups() for m in map(OPTION.match, body) if m)
            target = (path.parent / argument.strip()).resolve()
            blocks.extend(python_blocks(target, *_included(target, options)))
        i = end + 1
    return blocks


def main(page: str) -> int:
    path = pathlib.Path(page).resolve()
    namespace: dict[str, object] = {"__name__": "__main__"}
    blocks = python_blocks(path)
    for file, line, source in blocks:
        code = compile("\n" * (line - 1) + source, str(file), "exec")
        exec(code, namespace)  # noqa: S102 - running the documentation is the point
    print(f"ran {len(blocks)} python blocks of {path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
