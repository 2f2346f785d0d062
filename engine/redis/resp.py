"""RESP2 and RESP3 replies: Python values in, bytes out. Parsing is hiredis's (`server.py`).

Theory of operation
-------------------
A command's handler returns a plain value and this module writes it in the connection's
protocol (2 until `HELLO 3`, then 3):

    Simple("OK")          +OK
    Error("ERR ...")      -ERR ...            (the first word is the error's code)
    int                   :n
    bytes / str           $len value          (a bulk string; str is UTF-8)
    None                  $-1  | _            (a null bulk, RESP2 | RESP3)
    list / tuple          *n ...
    NULL_ARRAY            *-1  | _            (EXEC aborted by WATCH)
    dict                  *2n k v ... | %n k v ...
    Verbatim(text)        $len text | =len txt:text

Rules of this module: no I/O, no state; the standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Simple:
    text: str


@dataclass(frozen=True)
class Error:
    """An error reply; `text` starts with its code word (ERR, WRONGPASS, NOAUTH...)."""

    text: str


@dataclass(frozen=True)
class Verbatim:
    text: str


class _NullArray:
    def __repr__(self) -> str:
        return "NULL_ARRAY"


NULL_ARRAY = _NullArray()
OK = Simple("OK")
QUEUED = Simple("QUEUED")
PONG = Simple("PONG")


def _line(text: str) -> bytes:
    # A simple string or error is one line: a CR or LF inside would end it early.
    return text.replace("\r", " ").replace("\n", " ").encode("utf-8", "replace")


def encode(value, proto: int = 2) -> bytes:
    """The bytes of one reply."""
    out: list[bytes] = []
    _encode(value, proto, out)
    return b"".join(out)


def _encode(value, proto: int, out: list[bytes]) -> None:
    if isinstance(value, bytes):
        out.append(b"$%d\r\n%s\r\n" % (len(value), value))
    elif value is None:
        out.append(b"_\r\n" if proto == 3 else b"$-1\r\n")
    elif isinstance(value, Simple):
        out.append(b"+" + _line(value.text) + b"\r\n")
    elif isinstance(value, bool):  # before int: a bool is an int
        out.append((b"#t\r\n" if value else b"#f\r\n") if proto == 3 else (b":1\r\n" if value else b":0\r\n"))
    elif isinstance(value, int):
        out.append(b":%d\r\n" % value)
    elif isinstance(value, str):
        b = value.encode("utf-8")
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    elif isinstance(value, Error):
        out.append(b"-" + _line(value.text) + b"\r\n")
    elif isinstance(value, (list, tuple)):
        out.append(b"*%d\r\n" % len(value))
        for v in value:
            _encode(v, proto, out)
    elif isinstance(value, dict):
        out.append((b"%%%d\r\n" % len(value)) if proto == 3 else (b"*%d\r\n" % (2 * len(value))))
        for k, v in value.items():
            _encode(k, proto, out)
            _encode(v, proto, out)
    elif value is NULL_ARRAY:
        out.append(b"_\r\n" if proto == 3 else b"*-1\r\n")
    elif isinstance(value, Verbatim):
        b = value.text.encode("utf-8")
        if proto == 3:
            out.append(b"=%d\r\ntxt:%s\r\n" % (len(b) + 4, b))
        else:
            out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    else:
        raise AssertionError(f"no RESP encoding for {type(value).__name__}")
