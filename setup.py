"""Build hook: generate the kubelet pod-resources gRPC stubs from our .proto at build time.

The generated modules are never committed; every build (wheel, sdist, editable install)
regenerates them with grpcio-tools so they always match the installed protobuf runtime.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PROTO_DIR = Path(__file__).parent / "exporter" / "podresources"


def generate_stubs() -> None:
    from grpc_tools import protoc

    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR.parent.parent}",
        f"--python_out={PROTO_DIR.parent.parent}",
        f"--grpc_python_out={PROTO_DIR.parent.parent}",
        f"--pyi_out={PROTO_DIR.parent.parent}",
        str(PROTO_DIR / "api.proto"),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed to generate the pod-resources stubs")


class BuildWithStubs(build_py):
    def run(self) -> None:
        generate_stubs()
        super().run()


setup(cmdclass={"build_py": BuildWithStubs})
