"""What a terminal shows for what a program wrote to it (for tests of displays that redraw a line)."""

from __future__ import annotations


def screen(raw: str) -> list[str]:
    """The lines a terminal shows after `raw`: \\r returns to the line's start, ESC[K erases to its end, other
    characters overwrite what is under the cursor."""
    lines, line, cursor, i = [], "", 0, 0
    while i < len(raw):
        if raw.startswith("\x1b[K", i):
            line, i = line[:cursor], i + 3
            continue
        char = raw[i]
        if char == "\r":
            cursor = 0
        elif char == "\n":
            lines.append(line)
            line, cursor = "", 0
        else:
            line = line[:cursor] + char + line[cursor + 1 :]
            cursor += 1
        i += 1
    return [*lines, line]
