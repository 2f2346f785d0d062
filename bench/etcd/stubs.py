"""Compile bench/etcd/rpc.proto into gRPC stubs at run time (nothing generated is checked in).

The proto is copied under a folder named after its package (`etcdserverpb/rpc.proto`), so the
generated `rpc_pb2_grpc.py` imports `etcdserverpb.rpc_pb2` and works from the output folder on
`sys.path` without editing generated code.
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
from types import SimpleNamespace

PROTO_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rpc.proto")
PACKAGE = "etcdserverpb"


def compile_stubs(work_dir: str) -> SimpleNamespace:
    """Compile into `work_dir` and import; returns `pb2` (messages) and `grpc` (KVStub)."""
    from grpc_tools import protoc

    src = os.path.join(work_dir, "src")
    out = os.path.join(work_dir, "out")
    os.makedirs(os.path.join(src, PACKAGE), exist_ok=True)
    os.makedirs(os.path.join(out, PACKAGE), exist_ok=True)
    shutil.copyfile(PROTO_PATH, os.path.join(src, PACKAGE, "rpc.proto"))
    code = protoc.main(["grpc_tools.protoc", f"-I{src}", f"--python_out={out}", f"--grpc_python_out={out}",
                        os.path.join(src, PACKAGE, "rpc.proto")])
    if code != 0:
        raise RuntimeError(f"protoc failed on {PROTO_PATH} (exit {code})")
    if PACKAGE in sys.modules:  # a second compile in one process: import the fresh files
        for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
            del sys.modules[name]
    sys.path.insert(0, out)
    try:
        pb2 = importlib.import_module(f"{PACKAGE}.rpc_pb2")
        pb2_grpc = importlib.import_module(f"{PACKAGE}.rpc_pb2_grpc")
    finally:
        sys.path.remove(out)
    return SimpleNamespace(pb2=pb2, grpc=pb2_grpc)
