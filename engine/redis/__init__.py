"""A Redis-compatible endpoint over Sixfold (issue 14): `RedisServer` speaks RESP2/RESP3, parsed by
hiredis, over any `engine.Database` (embedded, or a cluster's writer or reader endpoint).

`resp.py` writes replies; `commands.py` says what each command means here (atomic
read-modify-writes on conditional writes, MULTI/EXEC/WATCH); `server.py` holds the sockets,
pipelines and sessions. `sixfold redis serve` and `sixfold cluster up --redis-port` run one.
"""

from __future__ import annotations

from engine.redis.server import RedisServer

__all__ = ["RedisServer"]
