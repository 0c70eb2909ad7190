"""Every download names its exact version: the Go tools' resolution is checked against scripts/versions.env,
and no script asks go, Maven or apt for whatever is newest."""

from __future__ import annotations

import itertools
import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INSTALL = ROOT / "scripts" / "install-k8s-tools.sh"
SCRIPTS = sorted([*ROOT.glob("scripts/*.sh"), *ROOT.glob("k8s/**/*.sh"), *ROOT.glob("docker/*.sh")])


def versions() -> dict[str, str]:
    return dict(re.findall(r"^(\w+_VERSION)=(\S+)$", (ROOT / "scripts" / "versions.env").read_text(), re.MULTILINE))


def with_functions(command: str, cwd: Path, cache: Path) -> subprocess.CompletedProcess:
    """Run COMMAND with install-k8s-tools.sh's functions loaded (it only defines them when sourced)."""
    env = {**os.environ, "MNIST_SERVE_CACHE": str(cache)}
    return subprocess.run(
        ["bash", "-c", f'source "{INSTALL}"; {command}'], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_a_binary_built_from_another_version_is_refused_in_one_line(helm, tmp_path):
    pinned = versions()["HELM_VERSION"]
    same = with_functions(f'check_module "{helm}" helm.sh/helm/v3 {pinned}', tmp_path, tmp_path / "cache")
    assert same.returncode == 0, same.stderr
    other = with_functions(f'check_module "{helm}" helm.sh/helm/v3 v3.20.0', tmp_path, tmp_path / "cache")
    assert other.returncode != 0
    assert other.stderr.splitlines() == [
        f"error: helm.sh/helm/v3 resolved to {pinned}, pinned v3.20.0 (scripts/versions.env)"
    ]


def test_a_wrapper_module_resolved_to_another_version_is_refused_in_one_line(tmp_path):
    """What a versionless `go get` did to k8s.io/kubernetes: the wrapper now names the version it resolved."""
    (tmp_path / "go.mod").write_text("module example.local/wrapper\n\ngo 1.24\n\nrequire k8s.io/kubernetes v1.37.2\n")
    done = with_functions(
        f"check_resolved k8s.io/kubernetes {versions()['KUBE_VERSION']}", tmp_path, tmp_path / "cache"
    )
    assert done.returncode != 0
    assert done.stderr.splitlines() == [
        f"error: k8s.io/kubernetes resolved to v1.37.2, pinned {versions()['KUBE_VERSION']} (scripts/versions.env)"
    ]


def test_every_go_get_and_install_names_its_version():
    for script in SCRIPTS:
        for number, line in enumerate(script.read_text().splitlines(), 1):
            words = line.split()
            for i, (a, b) in enumerate(itertools.pairwise(words)):
                if a in ("go", "go_nice") and b in ("get", "install"):
                    arguments = words[i + 2 :]
                    unversioned = [w for w in arguments if re.match(r'"?[a-z0-9.-]+\.[a-z]+/', w) and "@" not in w]
                    # An array of packages must be the one built with "@$VERSION" appended.
                    arrays = [
                        w
                        for w in arguments
                        if w.startswith('"${') and "[@]}" in w and not w.startswith(('"${versioned', '"${BUILD_FLAGS'))
                    ]
                    assert not unversioned and not arrays, f"{script.name}:{number}: {line.strip()}"


def test_maven_plugins_and_apt_packages_are_pinned():
    pom = (ROOT / "scripts" / "cassandra" / "pom.xml").read_text()
    assert re.search(r"<artifactId>maven-dependency-plugin</artifactId>\s*<version>\d+\.\d+\.\d+</version>", pom)
    calls = 0
    for script in SCRIPTS:
        text = script.read_text()
        if script.name == "apt-install.sh":
            continue
        for line in text.splitlines():
            if "apt-get install" in line:  # only the image's own install script, inside the build, has apt-get
                assert script.name == "install.sh" and re.search(r'"\$\w+_PACKAGE"', line), (
                    f"{script.name}: {line.strip()}"
                )
        for line in text.splitlines():
            if "apt-install.sh" in line and not line.lstrip().startswith("#"):
                calls += 1
                package = re.search(r'apt-install\.sh"? +\S+ +"?([^"\s]+)', line).group(1)
                if package.startswith("$"):  # a variable of the script: its value must pin the version
                    package = re.search(rf"^{package[1:]}=\"?(\S+?)\"?$", text, re.MULTILINE).group(1)
                assert re.fullmatch(r"[a-z0-9.+-]+=\d[\w.+~:-]*\*?", package), f"{script.name}: {line.strip()}"
    assert calls >= 5  # debootstrap (twice), dockerd, socat, wrk
    # And the one Python caller: the Astra stand-in's HAProxy.
    text = (ROOT / "scripts" / "astra_local.py").read_text()
    assert '"apt-install.sh"), "haproxy", HAPROXY_PACKAGE]' in text
    assert re.search(r'^HAPROXY_PACKAGE = "haproxy=2\.6\.\d+-\d+\+deb12u\*"', text, re.MULTILINE)


def test_apt_install_refuses_a_package_without_its_version():
    done = subprocess.run(
        [str(ROOT / "scripts" / "apt-install.sh"), "no-such-command", "socat"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "error: socat names no version (usage: scripts/apt-install.sh COMMAND PACKAGE=VERSION)"
    ]
