"""Build hook: generate the gRPC/protobuf modules from protos/ into the package.

The generated files are never committed; they are written next to the package
sources (core/ maps to the ``pretag`` import package) before the normal build
copies them, so wheels, sdists and editable installs all carry them.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent.resolve()
PROTO_ROOT = ROOT / "protos"
PACKAGE_SRC = ROOT / "core"  # the directory installed as the ``pretag`` package


def generate_protos() -> None:
    from grpc_tools import protoc  # build requirement, see pyproject.toml

    protos = sorted(PROTO_ROOT.rglob("*.proto"))
    if not protos:
        raise RuntimeError(f"no .proto files under {PROTO_ROOT}")
    include = Path(protoc.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *(str(p.relative_to(PROTO_ROOT)) for p in protos),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed on " + " ".join(args[5:]))
        generated = Path(tmp) / "pretag"
        for src in generated.rglob("*"):
            if src.is_dir():
                continue
            dest = PACKAGE_SRC / src.relative_to(generated)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest)
        for pkg_dir in {p.parent for p in generated.rglob("*.py")}:
            target = PACKAGE_SRC / pkg_dir.relative_to(generated)
            (target / "__init__.py").touch()
            (target / "py.typed").touch()


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        generate_protos()  # again, in case the protos changed since setup.py was loaded
        super().run()


# setuptools checks that every listed package directory exists before build_py
# runs, so the generated package must already be there when setup() is called.
generate_protos()
setup(cmdclass={"build_py": BuildPyWithProtos})
