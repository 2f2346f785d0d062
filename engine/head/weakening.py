"""TEST ONLY: weakened protocols, to prove the chaos checkers catch a broken one.

A `Weakening` is never an option of `engine.open` or of any server: the only ways in are
`engine.chaos.weakened.open_weakened` (tests, and `sixfold chaos --weaken`, whose runs must come
out *invalid*) and the simulator. `SAFE` (the default everywhere) weakens nothing.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Weakening:
    #: acknowledge writes at this many segments instead of the write quorum ...
    write_quorum: int | None = None
    #: ... or read from any reachable segment, complete or not.
    read_any: bool = False

    @property
    def weakened(self) -> bool:
        return self.write_quorum is not None or self.read_any


SAFE = Weakening()

#: The weakenings `sixfold chaos --weaken NAME` knows.
NAMED = {"read-any": Weakening(read_any=True), "write-quorum-2": Weakening(write_quorum=2)}


def named(name: str | None) -> Weakening:
    """The weakening called `name` (None: SAFE)."""
    return SAFE if name is None else NAMED[name]
