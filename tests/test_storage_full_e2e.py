"""Storage full, end to end, with real parts only (finding 6 of issue 8, its acceptance).

No transport wrapper plays the nodes here: the nodes are real LMDB environments with a small map,
or real `sixfold node serve --cluster` processes with a small map or a small file size limit
(RLIMIT_FSIZE, a size-limited file), behind the real writer endpoint and `engine.connect`.

What is shown:

* filling the volume ends in `StorageFull` (the class itself: not Unavailable, not
  WriteIndeterminate), refused before anything was logged, and its message names the nodes that
  are full or low on space;
* every acknowledged write reads back, before and after deletes, and after the volume (or every
  process of the cluster) is closed and opened again;
* deletes still work on a full volume (each node keeps a reserve for them), also after a unit
  bigger than the room left was refused;
* a full node is neither dead nor "unreachable": its process lives and is SERVING, the writer's
  link to it is up, and status shows each node's used and capacity bytes and `space_low`.

What does *not* hold, by design of this release: deleting does not give the room back (LMDB never
shrinks its file and a delete is a tombstone; old versions stay until version GC, a later
issue), so puts stay refused after deletes until a node gets more capacity (a larger map, here).
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time

import pytest

import engine
from engine.cluster import Cluster
from engine.cluster.manifest import WRITER, active_nodes, load_manifest, locked, new_manifest, node_entry, save_manifest
from engine.cluster.testing import engine_env, free_base_port, wait_serving
from engine.errors import StorageFull

NODES = ("n1", "n2", "n3", "n4", "n5", "n6")
P = 2
MAP_BYTES = 4 << 20
#: More puts than fit in MAP_BYTES: the fill loops are bounded by this, never by time.
PUTS_MAX = 1500
VALUE_BYTES = 8000
BIG_VALUE_BYTES = 1 << 20
WAIT_S = 60.0


def test_node_serve_takes_its_map_and_reserve_in_bytes_and_refuses_other_values(tmp_path):
    """`sixfold node serve --map-bytes N --reserve-bytes N`: what the cluster tests above start
    nodes with. A value that is not a whole number of bytes, or too small, is a usage error
    (exit 2) naming the option; nothing is started or created."""
    for bad, words in ((["--map-bytes", "4MiB"], "--map-bytes"), (["--map-bytes", "4096"], "below the least"),
                       (["--reserve-bytes", "-1"], "--reserve-bytes")):
        done = subprocess.run(
            [sys.executable, "-m", "engine", "node", "serve", "--cluster", str(tmp_path / "none"), "--id", "n1", *bad],
            capture_output=True, text=True, env=engine_env(), timeout=60,
        )
        assert done.returncode == 2 and words in done.stderr, (bad, done.returncode, done.stderr)
    assert not (tmp_path / "none").exists()
