"""The format version every file that outlives a process records: one check for all of them.

A leaf module (standard library only). A document (volume.json, cluster.json) holds `"format": N`;
a document without the field was written before formats existed (format 0, otherwise the same).
"""

from __future__ import annotations


def format_of(doc: dict, current: int, path: str, written_by: str, error: type[Exception]) -> int:
    """The document's format, 0..current; `error` naming it and what reads it otherwise.
    `written_by` finishes "The ... was written by a newer Sixfold release" (e.g. "volume")."""
    fmt = doc.get("format", 0)
    if type(fmt) is not int or fmt < 0:
        raise error(f"{path} names format {fmt!r}, which no Sixfold release writes")
    if fmt > current:
        raise error(
            f"{path} has format {fmt}; this release reads format {current} (and upgrades older ones). "
            f"The {written_by} by a newer Sixfold release: open it with that release or a later one."
        )
    return fmt
