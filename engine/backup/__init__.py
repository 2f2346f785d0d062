"""Backups and point-in-time restore (docs/ARCHITECTURE.md, "Backups and point-in-time restore").

    format      the archive's files: byte format, checks, the manifest (format 1)
    target      where an archive lives: the `BackupTarget` interface and `FolderTarget`
    archiver    the continuous archiver that runs beside the writer (embedded, endpoint)
    restore     `engine.restore(...)`: a new volume from an archive, to a time or an LSN
    cli         `sixfold backup now|list|verify` and `sixfold restore`

This package's `__init__` imports nothing: its modules sit in different layers (the archiver
below the head, which starts it; restore above the embedded engine, which it builds on).
"""
