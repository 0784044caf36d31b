"""Build hook: generate the kubelet pod-resources gRPC stubs from our .proto at build time.

The generated modules are never committed. The generator is pinned in pyproject.toml
(grpcio-tools 1.62.3: the newest whose output imports on the oldest runtime setup.cfg allows,
grpcio 1.60 and protobuf 4.25, and on today's). A wheel gets the stubs in the build directory,
so building one leaves the source tree as it was; an editable install gets them next to
api.proto, as setuptools asks of build steps in editable mode, because the checkout itself is
what is imported there (and by ``python -m exporter`` run from the tree, as the tests do).
"""

from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PROTO = Path("exporter", "sources", "podresources", "api.proto")
GENERATED = ("api_pb2.py", "api_pb2_grpc.py", "api_pb2.pyi")


def generate_stubs(out_dir: Path) -> None:
    """api_pb2.py, api_pb2_grpc.py and api_pb2.pyi for ``exporter.sources.podresources`` under ``out_dir``."""
    from grpc_tools import protoc

    (out_dir / PROTO.parent).mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{ROOT}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--pyi_out={out_dir}",
        str(ROOT / PROTO),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed to generate the pod-resources stubs")


class BuildWithStubs(build_py):
    def run(self) -> None:
        super().run()
        generate_stubs(ROOT if self.editable_mode else Path(self.build_lib))

    def _generated(self) -> dict[str, str]:
        """Each generated module in the build directory -> where it is, relative to the project."""
        return {str(Path(self.build_lib, PROTO.parent, name)): str(PROTO.parent / name) for name in GENERATED}

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:  # type: ignore[override]
        return sorted({*super().get_outputs(include_bytecode), *self._generated()})

    def get_output_mapping(self) -> dict[str, str]:
        mapping = super().get_output_mapping()
        if self.editable_mode:
            mapping.update(self._generated())
        return mapping


setup(cmdclass={"build_py": BuildWithStubs})
