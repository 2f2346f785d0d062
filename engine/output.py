"""Terminal output shared by every command module (`sixfold ...`): aligned tables and JSON.

A leaf module (standard library only), so that command modules of any layer share it without
importing the `sixfold` command itself.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence


def table(rows: Sequence[Sequence[object]], headers: Sequence[str]) -> str:
    """Rows as aligned columns under headers."""
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def print_json(obj) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


class ProgressLine:
    """Progress of long work on stderr (stdout stays for the result): one line redrawn in place
    on a terminal, else a line every `every_s` seconds (and the last one). Call it with a dict
    of what to show ({"phase": ..., "bytes": ..., ...}); `end()` finishes the line."""

    def __init__(self, what: str, quiet: bool = False, every_s: float = 5.0, stream=None) -> None:
        self.what = what
        self.quiet = quiet
        self.every_s = every_s
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.last = 0.0
        self.t0 = time.monotonic()
        self.shown = False

    def __call__(self, p: dict) -> None:
        if self.quiet:
            return
        now = time.monotonic()
        if not self.tty and now - self.last < self.every_s and p.get("phase") != "done":
            return
        self.last = now
        parts = [f"{k} {v}" for k, v in p.items() if k != "phase" and v is not None]
        size = p.get("bytes")
        rate = f"  {size / 1e6 / max(now - self.t0, 1e-9):.1f} MB/s" if isinstance(size, int) and size else ""
        line = f"{self.what}: {p.get('phase', '')}  {'  '.join(parts)}{rate}  {now - self.t0:.1f} s"
        if self.tty:
            self.stream.write("\r\x1b[K" + line)
            self.shown = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def end(self) -> None:
        if self.tty and self.shown:
            self.stream.write("\n")
            self.stream.flush()
