"""requirements.lock: the project venv holds exactly its packages, it satisfies pyproject.toml, the image's
pins agree with it, and scripts/lock.sh (make lock) makes a complete one."""

from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "mnist-serve"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(path: Path) -> dict[str, str]:
    """{canonical name: version} of a requirements file's `name==version` lines."""
    found = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            found[canonical(name)] = version.strip()
    return found


@pytest.mark.parametrize("lock", ["requirements.lock", "scripts/kserve.lock"])
def test_every_line_of_the_lock_is_one_exact_pin(lock):
    for line in (ROOT / lock).read_text().splitlines():
        assert line.startswith("#") or re.fullmatch(r"[A-Za-z0-9._-]+==[A-Za-z0-9.+!]+", line), line


def test_the_benchmark_peer_decodes_with_our_libraries_at_the_version_it_names():
    from bench.serve import KSERVE_VERSION

    peer, ours = pins(ROOT / "scripts" / "kserve.lock"), pins(ROOT / "requirements.lock")
    assert peer["kserve"] == KSERVE_VERSION
    assert (peer["numpy"], peer["pillow"]) == (ours["numpy"], ours["pillow"])
    assert "torch" not in peer  # taken from the project venv (scripts/kserve-venv.sh)


def test_the_venv_holds_exactly_the_locked_packages():
    installed = {canonical(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}
    assert installed.pop(PROJECT) == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    locked = pins(ROOT / "requirements.lock")
    assert {n: v for n, v in installed.items() if locked.get(n) != v} == {}, "installed but not locked at that version"
    assert sorted(set(locked) - set(installed)) == [], "locked but not installed"


def test_the_lock_satisfies_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    locked = pins(ROOT / "requirements.lock")
    wanted = (
        project["project"]["dependencies"]
        + project["project"]["optional-dependencies"]["dev"]
        + project["build-system"]["requires"]
    )
    for requirement in map(Requirement, wanted):
        name = canonical(requirement.name)
        assert name in locked and requirement.specifier.contains(locked[name], prereleases=True), (
            str(requirement),
            locked.get(name),
        )


def test_the_images_pins_are_the_locks_versions():
    """The image runs what the tests ran against; docker/install.sh refuses anything unpinned there."""
    locked = pins(ROOT / "requirements.lock")
    for path in sorted((ROOT / "docker").glob("requirements*.txt")):
        differing = {
            name: (version, locked.get(name)) for name, version in pins(path).items() if locked.get(name) != version
        }
        assert differing == {}, f"{path.name}: (image pin, lock)"


@pytest.mark.slow
def test_make_lock_writes_a_complete_lock_and_moves_the_image_pins(tmp_path):
    """Run for real against the index, on a copy of the project with one image pin set back."""
    copy = tmp_path / "project"
    copy.mkdir()
    for name in ("pyproject.toml", "README.md", "scripts", "docker", "registry", "training", "handler"):
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy2)(ROOT / name, copy / name)
    requirements = copy / "docker" / "requirements.txt"
    requirements.write_text(requirements.read_text().replace("cassandra-driver==3.30.1", "cassandra-driver==3.29.0"))
    done = subprocess.run([str(copy / "scripts" / "lock.sh")], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "moved pins in docker/requirements.txt" in done.stdout
    written = pins(copy / "requirements.lock")
    # Every direct dependency at its pyproject pin, and the installer and build backend the venv needs.
    for name, version in {
        "torch": "2.14.1",
        "torchserve": "0.12.0",
        "cassandra-driver": "3.30.1",
        "pytest": "9.2.0",
    }.items():
        assert written[name] == version
    assert {"pip", "setuptools", "numpy", "nvidia-cublas", "urllib3"} <= set(written)
    # Complete: resolving the project with the new lock as constraints needs no package outside it.
    check = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--quiet",
            "--ignore-installed",
            "--report",
            str(tmp_path / "report.json"),
            "--constraint",
            str(copy / "requirements.lock"),
            "-e",
            f"{copy}[dev]",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert check.returncode == 0, check.stderr[-3000:]
    resolved = {
        canonical(item["metadata"]["name"]) for item in json.loads((tmp_path / "report.json").read_text())["install"]
    }
    assert sorted(resolved - set(written) - {PROJECT}) == []
    assert pins(requirements)["cassandra-driver"] == "3.30.1"
    assert pins(copy / "scripts" / "kserve.lock")["kserve"] == "0.21.0"
