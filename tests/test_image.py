"""The container image, tested without a Docker engine (none runs on these machines): the
Dockerfile is parsed and checked, and the wheel it builds is installed in a fresh virtualenv
where both console scripts must start."""

from __future__ import annotations

import configparser
import re
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for keyword, rest in instructions():
        if keyword == "FROM":
            result.append([])
        result[-1].append((keyword, rest))
    return result


def console_scripts() -> dict[str, str]:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    lines = parser["options.entry_points"]["console_scripts"].strip().splitlines()
    return dict(line.split(" = ") for line in lines)


def test_multi_stage_on_a_pinned_slim_base() -> None:
    build, final = stages()
    for stage in (build, final):
        image = stage[0][1].split()[0]
        assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", image), image  # a pinned tag, never latest
    assert build[0][1].endswith("AS build")
    assert any(k == "COPY" and a.startswith("--from=build") for k, a in final)


def test_final_stage_has_no_compiler_cache_tests_or_healthcheck() -> None:
    final = stages()[-1]
    text = " ".join(a for _, a in final)
    assert not re.search(r"\b(gcc|build-essential|g\+\+|clang)\b", text)
    assert "--no-cache-dir" in text
    assert not any(k == "COPY" and "tests" in a for k, a in final)
    assert all(k != "HEALTHCHECK" for k, _ in instructions())  # Kubernetes probes do that


def test_entrypoint_is_the_agents_console_script_and_the_adapter_user_exists() -> None:
    final = stages()[-1]
    (entrypoint,) = [a for k, a in final if k == "ENTRYPOINT"]
    scripts = console_scripts()
    assert entrypoint == '["gpu-pod-exporter"]' and "gpu-pod-exporter" in scripts
    assert "gpu-metrics-adapter" in scripts
    assert "useradd --uid 65532" in " ".join(a for k, a in final if k == "RUN")


def test_nvidia_runtime_settings_labels_and_no_secrets() -> None:
    final = stages()[-1]
    env = " ".join(a for k, a in final if k == "ENV")
    assert "NVIDIA_VISIBLE_DEVICES=all" in env and "NVIDIA_DRIVER_CAPABILITIES=utility" in env
    labels = " ".join(a for k, a in final if k == "LABEL")
    for key in ("title", "description", "version", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels
    everything = " ".join(a for _, a in instructions())
    assert not re.search(r"(?i)(password|secret|token|api_key)\s*=", everything)
    assert not re.search(r"\.(pem|key|crt)\b|\.ssh|\.netrc", everything)


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtualenv with the wheel the Dockerfile's build stage makes (same command), installed.

    The venv sees this machine's site-packages for the dependencies (no network needed); the
    package itself comes only from the wheel, so a file missing from it fails here."""
    directory = tmp_path_factory.mktemp("image")
    wheels = directory / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "--wheel-dir", str(wheels), str(ROOT)],
        check=True,
        capture_output=True,
    )
    environment = directory / "venv"
    venv.create(environment, system_site_packages=True, with_pip=False)
    python = environment / "bin" / "python"
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
        [str(fresh_venv / "bin" / "python"), "-c", "import exporter.podresources.api_pb2_grpc as m; print(m.__file__)"],
        capture_output=True,
        text=True,
        cwd=fresh_venv,
        check=True,
    )
    assert str(fresh_venv) in check.stdout
