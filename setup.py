"""Build steps that pyproject.toml cannot declare: the Cython twin of the codec and the gRPC stubs.

Metadata and dependencies live in pyproject.toml. This file adds two things to every build
(`pip install .`, `pip install -e .`, `python -m build`, `python setup.py build_ext --inplace`):

- the extension `engine.codec._cython`, compiled from `ext/_codec.pyx` with Cython;
- the protobuf and gRPC modules of every `proto/engine/proto/*.proto`, generated with
  `grpc_tools.protoc` into `engine/proto/` so that they import as `engine.proto.xxx_pb2`. The
  `.proto` files sit under a path that mirrors the Python package, so the imports protoc writes
  between generated modules (`from engine.proto import a_pb2`) work as they are.

Stubs are generated in the source tree (they are git-ignored) before `build_py` collects the
package, which serves the editable install (the tree is the package) and a normal build (the
tree is copied) alike. They are regenerated only when an output is missing or older than a
`.proto`, so a repeated build is quick.
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
PROTO_ROOT = os.path.join(ROOT, "proto")
PROTO_PACKAGE_DIR = os.path.join(PROTO_ROOT, "engine", "proto")
STUB_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def _stub_paths(proto: str) -> list[str]:
    """Where protoc writes the modules of one .proto."""
    relative = os.path.relpath(proto, PROTO_ROOT)[: -len(".proto")]
    return [os.path.join(ROOT, relative + suffix) for suffix in STUB_SUFFIXES]


def generate_protos() -> None:
    """Run grpc_tools.protoc on every proto/engine/proto/*.proto whose stubs are missing or stale."""
    protos = sorted(glob.glob(os.path.join(PROTO_PACKAGE_DIR, "*.proto")))
    package_init = os.path.join(ROOT, "engine", "proto", "__init__.py")
    if not os.path.exists(package_init):
        raise SystemExit(f"{package_init} is missing: engine.proto must be a package for the stubs")
    if not protos:
        return
    newest_proto = max(os.path.getmtime(p) for p in protos)
    stubs = [stub for proto in protos for stub in _stub_paths(proto)]
    if all(os.path.exists(s) and os.path.getmtime(s) >= newest_proto for s in stubs):
        return
    try:
        import grpc_tools
        from grpc_tools import protoc
    except ImportError:
        raise SystemExit("grpcio-tools is needed to build the gRPC stubs: pip install grpcio-tools") from None
    # grpc_tools ships the well-known types (google/protobuf/*.proto); protoc needs them on its path.
    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={ROOT}",
        f"--grpc_python_out={ROOT}",
        f"--pyi_out={ROOT}",
        *protos,
    ]
    print("generating gRPC stubs:", " ".join(os.path.relpath(p, ROOT) for p in protos))
    if protoc.main(args) != 0:
        raise SystemExit("grpc_tools.protoc failed on " + " ".join(protos))
    missing = [s for s in stubs if not os.path.exists(s)]
    if missing:
        raise SystemExit(f"grpc_tools.protoc did not write {missing}")
    for stub in stubs:  # protoc leaves a file untouched when its content is unchanged
        os.utime(stub)


class BuildPy(build_py):
    """build_py that generates the gRPC stubs first, so that they are part of the package."""

    def run(self) -> None:
        generate_protos()
        super().run()


class BuildExt(build_ext):
    """build_ext that also generates the stubs: `setup.py build_ext --inplace` alone is a build."""

    def run(self) -> None:
        generate_protos()
        super().run()


def _extensions() -> list[Extension]:
    from Cython.Build import cythonize

    # -O3 lets the compiler unroll and vectorise the byte loops; MSVC spells its flags differently.
    compile_args = [] if sys.platform == "win32" else ["-O3"]
    extension = Extension(
        "engine.codec._cython",
        sources=["ext/_codec.pyx"],
        extra_compile_args=compile_args,
    )
    return cythonize(
        [extension],
        compiler_directives={
            "language_level": 3,
            # The codec checks every length against the buffer itself before reading.
            "boundscheck": False,
            "wraparound": False,
            "initializedcheck": False,
            "cdivision": True,
            # help() and inspect show the same signatures as the reference.
            "embedsignature": True,
        },
        quiet=True,
        # Cython compares file times to decide whether the C file is stale, which a copied or
        # restored tree can fool; builds are rare (make re-runs one only when ext/ changes), so
        # always regenerate rather than ever compile an old C file.
        force=True,
    )


setup(
    ext_modules=_extensions(),
    cmdclass={"build_py": BuildPy, "build_ext": BuildExt},
)
