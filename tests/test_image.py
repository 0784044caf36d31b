"""The container image, tested without a Docker engine (none runs on these machines).

The Dockerfile is read by ``dockerfile``, a binding to the parser ``docker build`` itself uses
(BuildKit's), so each instruction is seen as Docker sees it: exec or shell form, flags, arguments.
What is checked is what users rely on: the manifests' ports, user and commands match the image, the
bases are pinned, and the build stage's own command, run on exactly the files it copies, makes a
wheel whose two console scripts start in a fresh virtualenv."""

from __future__ import annotations

import configparser
import json
import re
import shlex
import shutil
import site
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path
from typing import Any

import dockerfile
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
AGENT_MANIFEST = ROOT / "daemonset" / "base" / "daemonset.yaml"
ADAPTER_MANIFEST = ROOT / "daemonset" / "adapter" / "deployment.yaml"


def stages() -> list[list[dockerfile.Command]]:
    """The Dockerfile's instructions, one list per FROM."""
    result: list[list[dockerfile.Command]] = []
    for command in dockerfile.parse_file(str(ROOT / "Dockerfile")):
        if command.cmd == "FROM":
            result.append([])
        result[-1].append(command)
    return result


def final_stage() -> list[dockerfile.Command]:
    return stages()[-1]


def each(stage: list[dockerfile.Command], instruction: str) -> list[dockerfile.Command]:
    return [command for command in stage if command.cmd == instruction]


def pairs(command: dockerfile.Command) -> dict[str, str]:
    """ENV and LABEL arguments (key, value, key, value...) with the values' quotes removed."""
    values = [shlex.split(value)[0] if value else value for value in command.value]
    return dict(zip(values[::2], values[1::2], strict=True))


def shell_commands(stage: list[dockerfile.Command]) -> list[list[str]]:
    """Each command of the stage's shell-form RUNs, split at && as the shell would run them."""
    found = []
    for run in each(stage, "RUN"):
        assert not run.json, "a RUN in exec form"
        for part in run.value[0].split("&&"):
            found.append(shlex.split(part))
    return found


def setup_cfg() -> configparser.ConfigParser:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    return parser


def pod_spec(manifest: Path) -> dict[str, Any]:
    spec: dict[str, Any] = yaml.safe_load(manifest.read_text())["spec"]["template"]["spec"]
    return spec


def test_two_stages_on_the_same_pinned_slim_base() -> None:
    build, final = stages()
    images = {stage[0].value[0] for stage in (build, final)}
    (image,) = images  # the wheel is built on the interpreter it runs on
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-[a-z]+(@sha256:[0-9a-f]{64})?", image), image
    assert build[0].value[1:] == ("AS", "build")
    (copy,) = each(final, "COPY")
    assert copy.flags == ("--from=build",)  # only the wheels cross over, no compiler or source


def test_the_daemonset_runs_the_agent_by_the_images_entrypoint_in_exec_form() -> None:
    (entrypoint,) = each(final_stage(), "ENTRYPOINT")
    assert entrypoint.json, "shell form: /bin/sh would get SIGTERM, not the agent"
    assert entrypoint.value == ("gpu-pod-exporter",)
    assert "gpu-pod-exporter = exporter.agent:main" in setup_cfg()["options.entry_points"]["console_scripts"]
    (agent,) = pod_spec(AGENT_MANIFEST)["containers"]
    assert "command" not in agent  # the DaemonSet passes only args to the entrypoint
    assert not each(final_stage(), "USER")  # root: it reads the kubelet's root-owned socket
    assert agent["securityContext"]["runAsUser"] == 0


def test_the_adapter_deployments_non_root_user_exists_in_the_image() -> None:
    spec = pod_spec(ADAPTER_MANIFEST)
    wanted = spec["securityContext"]["runAsUser"]
    assert spec["securityContext"]["runAsNonRoot"] and wanted != 0
    useradds = [argv for argv in shell_commands(final_stage()) if argv[0] == "useradd"]
    assert [int(argv[argv.index("--uid") + 1]) for argv in useradds] == [wanted]
    (adapter,) = spec["containers"]
    assert adapter["command"] == ["gpu-metrics-adapter"]
    assert "gpu-metrics-adapter = exporter.adapter.main:main" in setup_cfg()["options.entry_points"]["console_scripts"]


def test_exposed_ports_are_the_manifests_container_ports() -> None:
    (expose,) = each(final_stage(), "EXPOSE")
    declared = {
        port["containerPort"]
        for manifest in (AGENT_MANIFEST, ADAPTER_MANIFEST)
        for container in pod_spec(manifest)["containers"]
        for port in container["ports"]
    }
    assert {int(port) for port in expose.value} == declared


def test_runtime_settings_labels_and_version_match_the_package() -> None:
    final = final_stage()
    env = {k: v for command in each(final, "ENV") for k, v in pairs(command).items()}
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all"  # the NVIDIA runtime mounts libnvidia-ml.so.1 ...
    assert "utility" in env["NVIDIA_DRIVER_CAPABILITIES"].split(",")  # ... with the utility capability
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"  # the manifests make the root filesystem read-only
    labels = {k: v for command in each(final, "LABEL") for k, v in pairs(command).items()}
    metadata = setup_cfg()["metadata"]
    assert labels["org.opencontainers.image.version"] == metadata["version"]
    assert labels["org.opencontainers.image.licenses"] == metadata["license"]
    assert labels["org.opencontainers.image.title"] == metadata["name"]
    for manifest in (AGENT_MANIFEST, ADAPTER_MANIFEST):
        for container in pod_spec(manifest)["containers"]:
            assert container["image"] == f"{metadata['name']}:{metadata['version']}", manifest


def test_final_stage_has_no_compiler_no_pip_cache_and_no_healthcheck() -> None:
    final = final_stage()
    programs = {argv[0] for argv in shell_commands(final)}
    assert not programs & {"gcc", "cc", "g++", "clang", "apt-get", "apt"}
    installs = [argv for argv in shell_commands(final) if argv[:2] == ["pip", "install"]]
    assert installs and all("--no-cache-dir" in argv for argv in installs)
    assert not each(final, "HEALTHCHECK")  # Kubernetes probes do that


def build_stage_context(directory: Path) -> Path:
    """A copy of exactly what the build stage's COPY instructions take from the build context."""
    context = directory / "context"
    for copy in each(stages()[0], "COPY"):
        assert not copy.flags, copy.original
        *sources, destination = copy.value
        for source in sources:
            target = context / destination / (Path(source).name if destination.endswith("/") else "")
            target.parent.mkdir(parents=True, exist_ok=True)
            if (ROOT / source).is_dir():
                shutil.copytree(ROOT / source, target, ignore=shutil.ignore_patterns("__pycache__", "*_pb2*"))
            else:
                shutil.copy(ROOT / source, target)
    return context


def environment_site_dirs() -> list[str]:
    """Where this interpreter's installed packages are: a virtualenv's, or the system's."""
    found = [*site.getsitepackages(), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    if site.ENABLE_USER_SITE:
        found.append(site.getusersitepackages())
    return list(dict.fromkeys(found))


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new virtualenv with the wheel the build stage makes, by its own command, from only the
    files it copies. The dependencies come from the environment running the tests (a .pth file
    appends its site-packages: no network needed, and it works from a virtualenv or the system
    Python alike); the package itself comes only from the wheel, so a file missing from it fails."""
    directory = tmp_path_factory.mktemp("image")
    (run,) = each(stages()[0], "RUN")
    argv = shlex.split(run.value[0])
    assert argv[:2] == ["pip", "wheel"] and argv[-1] == "." and "--wheel-dir" in argv
    wheels = directory / "wheels"
    argv[argv.index("--wheel-dir") + 1] = str(wheels)
    subprocess.run(
        [sys.executable, "-m", *argv[:-1], "--no-deps", "."],
        cwd=build_stage_context(directory),
        check=True,
        capture_output=True,
    )
    environment = directory / "venv"
    venv.create(environment, with_pip=False)
    python = environment / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(purelib) / "_test_dependencies.pth").write_text("\n".join(environment_site_dirs()) + "\n")
    (wheel,) = wheels.glob("*.whl")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-cache-dir", str(wheel)],
        check=True,
        capture_output=True,
    )
    return environment


def test_the_wheel_carries_the_generated_stubs_and_both_scripts_start(fresh_venv: Path) -> None:
    for script in ("gpu-pod-exporter", "gpu-metrics-adapter"):
        result = subprocess.run(
            [str(fresh_venv / "bin" / script), "--help"], capture_output=True, text=True, cwd=fresh_venv
        )  # not the source tree: the wheel's own modules
        assert result.returncode == 0, result.stderr
        assert "usage:" in result.stdout
    check = subprocess.run(
        [
            str(fresh_venv / "bin" / "python"),
            "-c",
            "import exporter.sources.podresources.api_pb2_grpc as p, "
            "exporter.adapter.keda.externalscaler_pb2_grpc as k; print(p.__file__); print(k.__file__)",
        ],
        capture_output=True,
        text=True,
        cwd=fresh_venv,
        check=True,
    )
    assert all(line.startswith(str(fresh_venv)) for line in check.stdout.splitlines()), check.stdout


def test_the_wheel_carries_its_licence_description_and_type_marker(fresh_venv: Path) -> None:
    script = """
import importlib.metadata, importlib.resources, json
dist = importlib.metadata.distribution("gpu-pod-exporter")
print(json.dumps({
    "licences": [f.read_text() for f in dist.files or () if f.name == "LICENSE"],
    "typed": importlib.resources.files("exporter").joinpath("py.typed").is_file(),
    "description": dist.metadata.get_payload(),
}))
"""
    result = subprocess.run(
        [str(fresh_venv / "bin" / "python"), "-c", script], capture_output=True, text=True, cwd=fresh_venv, check=True
    )
    found = json.loads(result.stdout)
    assert found["licences"] == [(ROOT / "LICENSE").read_text()]  # the Apache-2.0 text the metadata names
    assert found["typed"]  # PEP 561: users' type checkers read the package's annotations
    assert found["description"].strip() == (ROOT / "README.md").read_text().strip()  # the project page
