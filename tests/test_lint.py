"""make lint (scripts/lint.sh) fails on a Python mistake, a file ruff would format otherwise and a shell
mistake, each named by file; `make test` runs it on the whole tree first."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLEAN_PYTHON = 'def greeting(name: str) -> str:\n    return f"hello {name}"\n'
CLEAN_SHELL = '#!/usr/bin/env bash\nset -o errexit\necho "hello $1"\n'


def a_project(tmp_path: Path, python: str = CLEAN_PYTHON, shell: str = CLEAN_SHELL) -> Path:
    """A git checkout with the project's lint settings and script, one Python file and one extensionless script."""
    project = tmp_path / "project"
    (project / "scripts").mkdir(parents=True)
    for name in ("pyproject.toml", ".shellcheckrc", "scripts/lint.sh", "scripts/apt-install.sh"):
        shutil.copy2(ROOT / name, project / name)
    (project / "module.py").write_text(python)
    (project / "scripts" / "greet").write_text(shell)
    subprocess.run(["git", "init", "-q", str(project)], check=True)
    return project


def lint(project: Path) -> subprocess.CompletedProcess:
    ruff = Path(sys.executable).with_name("ruff")
    env = {**os.environ, "RUFF": str(ruff)}
    return subprocess.run([str(project / "scripts" / "lint.sh")], capture_output=True, text=True, env=env, timeout=600)


def test_a_clean_project_passes(tmp_path):
    done = lint(a_project(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "shellcheck: 3 scripts clean" in done.stdout  # the two copied and the extensionless one


@pytest.mark.parametrize(
    ("python", "shell", "named"),
    [
        ("import os\n" + CLEAN_PYTHON, CLEAN_SHELL, "F401"),  # an unused import
        ("def greeting(name: str)->str:\n    return 'hello '+name\n", CLEAN_SHELL, "module.py"),  # not formatted
        (CLEAN_PYTHON, '#!/usr/bin/env bash\ncd "$1"\necho hello $2\n', "SC2086"),  # an unquoted expansion
    ],
    ids=["lint", "format", "shellcheck"],
)
def test_a_mistake_fails_and_is_named(tmp_path, python, shell, named):
    done = lint(a_project(tmp_path, python, shell))
    assert done.returncode != 0
    assert named in done.stdout + done.stderr
