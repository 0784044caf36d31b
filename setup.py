"""Build hook: generate the gRPC stubs (the kubelet's pod-resources API, KEDA's external scaler) from
our .proto files at build time.

The generated modules are never committed. The generator is pinned in pyproject.toml
(grpcio-tools 1.62.3: the newest whose output imports on the oldest runtime setup.cfg allows,
grpcio 1.60 and protobuf 4.25, and on today's). A wheel gets the stubs in the build directory,
so building one leaves the source tree as it was; an editable install gets them next to
each .proto, as setuptools asks of build steps in editable mode, because the checkout itself is
what is imported there (and by ``python -m exporter`` run from the tree, as the tests do).
"""

from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PROTOS = (
    Path("exporter", "sources", "podresources", "api.proto"),
    Path("exporter", "adapter", "keda", "externalscaler.proto"),
)


def generated(proto: Path) -> tuple[Path, ...]:
    """The modules protoc makes from ``proto``, beside it: NAME_pb2.py, NAME_pb2_grpc.py, NAME_pb2.pyi."""
    return tuple(proto.with_name(proto.stem + suffix) for suffix in ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi"))


def generate_stubs(out_dir: Path) -> None:
    """Every proto's modules, in its package's directory under ``out_dir``."""
    from grpc_tools import protoc

    for proto in PROTOS:
        (out_dir / proto.parent).mkdir(parents=True, exist_ok=True)
        args = [
            "grpc_tools.protoc",
            f"-I{ROOT}",
            f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            f"--pyi_out={out_dir}",
            str(ROOT / proto),
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed to generate the stubs of {proto}")


class BuildWithStubs(build_py):
    def run(self) -> None:
        super().run()
        generate_stubs(ROOT if self.editable_mode else Path(self.build_lib))

    def _generated(self) -> dict[str, str]:
        """Each generated module in the build directory -> where it is, relative to the project."""
        return {str(Path(self.build_lib, module)): str(module) for proto in PROTOS for module in generated(proto)}

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:  # type: ignore[override]
        return sorted({*super().get_outputs(include_bytecode), *self._generated()})

    def get_output_mapping(self) -> dict[str, str]:
        mapping = super().get_output_mapping()
        if self.editable_mode:
            mapping.update(self._generated())
        return mapping


setup(cmdclass={"build_py": BuildWithStubs})
