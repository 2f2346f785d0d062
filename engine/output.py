"""Terminal output shared by every command module (`sixfold ...`): aligned tables and JSON.

A leaf module (standard library only), so that command modules of any layer share it without
importing the `sixfold` command itself.
"""

from __future__ import annotations

import json
from collections.abc import Sequence


def table(rows: Sequence[Sequence[object]], headers: Sequence[str]) -> str:
    """Rows as aligned columns under headers."""
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def print_json(obj) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))
