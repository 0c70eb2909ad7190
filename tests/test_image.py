"""The container image without a Docker engine: its install script run for real on this machine, its pins
resolved against the package index, and the Dockerfile checked against the files and settings it relies on.
tests/test_container.py builds it with a real engine and runs it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from image_env import ROOT, image_venv, install_environment

pytestmark = pytest.mark.slow

INSTALL = ROOT / "docker" / "install.sh"


# --- docker/install.sh ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def venv() -> Path:
    return image_venv()


def test_the_install_script_makes_the_images_python_environment(venv):
    python = venv / "bin" / "python"
    versions = subprocess.run(
        [
            str(python),
            "-I",
            "-c",
            "import json, torch, ts, cassandra, numpy, PIL; "
            "print(json.dumps([torch.__version__, ts.__version__, cassandra.__version__, numpy.__version__, "
            "PIL.__version__]))",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert versions.returncode == 0, versions.stderr
    torch_version, torchserve, driver, numpy_version, pillow = json.loads(versions.stdout)
    pins = dict(
        line.strip().split("==")
        for line in (ROOT / "docker" / "requirements.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    assert torch_version.split("+")[0] == "2.14.1" and torchserve == pins["torchserve"] == "0.12.0"
    assert (driver, numpy_version, pillow) == (pins["cassandra-driver"], pins["numpy"], pins["pillow"])
    # --without-pip: the image has no installer.
    assert not list((venv / "lib").glob("python3*/site-packages/pip"))
    # torch's CUDA build (the one this machine gets) without triton, which torch.compile alone would load.
    assert not list((venv / "lib").glob("python3*/site-packages/triton"))
    assert (
        "pip check: no broken requirements (torch's triton is left out on purpose)"
        in (venv / ".install.log").read_text()
    )


def test_the_pins_of_every_variant_resolve_against_the_index(tmp_path):
    """The GPU image and the training image install what the CPU test environment does not."""
    done = subprocess.run(
        [str(INSTALL), "python", "gpu", str(tmp_path / "venv"), "--dry-run", "--with-training"],
        env=install_environment(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "dry run: the gpu pins resolve" in done.stderr
    assert not (tmp_path / "venv").exists()


def test_an_unpinned_package_is_refused(tmp_path):
    """A requirement with a range instead of a pin would float between builds: the script rejects the result."""
    docker = tmp_path / "docker"
    docker.mkdir()
    for name in ("install.sh", "requirements-cuda.txt", "requirements-train.txt"):
        shutil.copy2(ROOT / "docker" / name, docker / name)
    (docker / "requirements.txt").write_text((ROOT / "docker" / "requirements.txt").read_text() + "six\n")
    done = subprocess.run(
        [str(docker / "install.sh"), "python", "cpu", str(tmp_path / "venv")],
        env=install_environment(),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert done.returncode != 0
    assert "resolved but not pinned in docker/requirements*.txt: six" in done.stderr
    assert not list((tmp_path / "venv").glob("lib/python3*/site-packages/torch"))  # refused before installing


def test_the_training_additions_install_beside_the_image_venv(venv, tmp_path):
    """What the training image's builder runs: matplotlib and the archiver in a folder of their own, which
    the image venv's Python imports from its path (the training image's PYTHONPATH)."""
    done = subprocess.run(
        [str(INSTALL), "training", str(venv), str(tmp_path / "training")],
        env=install_environment(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "install.sh: training additions: matplotlib 3.11.2" in done.stdout
    assert (tmp_path / "training" / "model_archiver").is_dir() and (tmp_path / "training" / "matplotlib").is_dir()
    assert (
        not (tmp_path / "training" / "torch").exists() and not (tmp_path / "training" / "numpy").exists()
    )  # the venv's


def test_usage_errors_exit_2(tmp_path):
    for args in (
        [],
        ["python", "arm", str(tmp_path)],
        ["python", "cpu"],
        ["system", "--now"],
        ["training", str(tmp_path)],
    ):
        done = subprocess.run([str(INSTALL), *args], capture_output=True, text=True)
        assert done.returncode == 2 and "docker/install.sh python cpu|gpu PREFIX" in done.stderr, args


def test_the_system_step_resolves_the_java_runtime_and_nginx_on_debian_12():
    """The image's base is Debian 12 (bookworm), like this machine: the pinned JRE must be installable."""
    release = Path("/etc/os-release").read_text()
    if "VERSION_CODENAME=bookworm" not in release or not shutil.which("apt-get"):
        pytest.skip("needs Debian 12's apt (the image's base); the Docker build runs this step where Docker runs")
    if (
        "Candidate: (none)"
        in subprocess.run(["apt-cache", "policy", "openjdk-17-jre-headless"], capture_output=True, text=True).stdout
    ):
        subprocess.run(
            ["apt-get", "update"], capture_output=True, timeout=600
        )  # a fresh machine has no package lists yet
    done = subprocess.run([str(INSTALL), "system", "--dry-run"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "openjdk-17-jre-headless=17.0.* and nginx=1.22.1-9+deb12u* resolve" in done.stderr


# --- the Dockerfile ------------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped, as docker reads them."""
    lines = [line for line in (ROOT / "Dockerfile").read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [
        (m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", joined, re.MULTILINE)
    ]


def stages() -> dict[str, list[tuple[str, str]]]:
    found: dict[str, list] = {}
    current = None
    for instruction, arguments in dockerfile_instructions():
        if instruction == "FROM":
            words = arguments.split()
            current = words[2] if len(words) > 2 and words[1].upper() == "AS" else f"(unnamed {len(found)})"
            found[current] = [(instruction, arguments)]
        elif current:
            found[current].append((instruction, arguments))
    return found


def dockerignore_allows(path: str) -> bool:
    """.dockerignore's verdict for a context path (the patterns this project uses: *, !path/, **/x)."""
    allowed = True
    for pattern in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = pattern.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*")
        if re.fullmatch(regex + "(/.*)?", path):
            allowed = negate
    return allowed


def test_every_file_the_dockerfile_copies_is_in_the_build_context():
    args = {"MODEL_ARCHIVE": "artifacts/model-store/mnist.mar"}
    for name, instructions in stages().items():
        for instruction, arguments in instructions:
            if instruction != "COPY" or "--from=" in arguments:
                continue
            *sources, _ = [word for word in arguments.split() if not word.startswith("--")]
            for source in sources:
                source = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], source).rstrip("/")
                assert dockerignore_allows(source), f"{name}: COPY {source} is excluded by .dockerignore"
                if source != args["MODEL_ARCHIVE"]:  # built by make archive before docker/build.sh --with-model
                    assert (ROOT / source).exists(), f"{name}: COPY {source}: no such file"
    assert dockerignore_allows("artifacts/.image-model/mnist.mar")  # where docker/build.sh --with-model stages it
    assert not dockerignore_allows(".venv/bin/python") and not dockerignore_allows(".git/config")
    assert not dockerignore_allows("training/__pycache__/db.cpython-311.pyc")


def test_the_server_stage_is_locked_down():
    serve = dict((i, a) for i, a in stages()["runtime"] + stages()["serve"] if i in ("USER", "EXPOSE", "ENTRYPOINT"))
    assert serve["USER"] == "1000:1000"  # numeric, so runAsNonRoot can verify it
    assert serve["EXPOSE"].split() == ["8080", "8082"]
    entrypoint = json.loads(serve["ENTRYPOINT"])
    assert entrypoint == ["/opt/venv/bin/python", "/opt/mnist-serve/docker/entrypoint.py"]
    runs = [a for name in ("runtime", "runtime-venv", "serve", "train") for i, a in stages()[name] if i == "RUN"]
    assert runs == ["/opt/mnist-serve/docker/install.sh system"]  # the install steps are the tested script
    # Server and training job stand on one stage with the venv, so its 6 GB layer is stored once.
    assert stages()["serve"][0] == ("FROM", "runtime-venv AS serve") and stages()["train"][0] == (
        "FROM",
        "runtime-venv AS train",
    )
    # No installer or compiler reaches the final stages: pip is removed from the venv (--without-pip) and
    # from the base Python (install.sh system); only the builder stages run pip.
    for name in ("runtime", "runtime-venv", "serve", "train", "with-model"):
        assert not any("pip install" in a or "gcc" in a or "build-essential" in a for _, a in stages()[name]), name
    (builder,) = [a for i, a in stages()["builder"] if i == "RUN"]
    assert "/src/docker/install.sh python" in builder and "--without-pip" in builder
    (training,) = [a for i, a in stages()["builder-train"] if i == "RUN"]
    assert "/src/docker/install.sh training /opt/venv /opt/training" in training


def test_the_serving_image_copies_no_training_code():
    """The server needs the registry client, not the training loop, its data loaders and plots."""

    def copied(name):
        return [a.split()[0] for i, a in stages()[name] if i == "COPY" and not a.startswith("--from")]

    assert [source for name in ("runtime", "runtime-venv", "serve") for source in copied(name)] == [
        "docker/install.sh",
        "handler/",
        "registry/",
        "docker/entrypoint.py",
        "docker/startup/",
    ]
    assert "training/" in copied("train")


def test_the_serving_image_holds_no_benchmark_code():
    """The load tests (bench/: the benchmark, the soak, their KServe peer and wrk scripts) run from the checkout only:
    the build context leaves bench/ out, and no file the image takes from handler/ is a wrk script or imports bench or
    KServe."""
    assert not dockerignore_allows("bench/serve.py") and not dockerignore_allows("bench/wrk_post.lua")
    shipped = [
        path
        for path in (ROOT / "handler").rglob("*")
        if path.is_file() and dockerignore_allows(path.relative_to(ROOT).as_posix())
    ]
    assert any(path.name == "mnist_handler.py" for path in shipped)
    load_test_import = re.compile(r"^\s*(from|import)\s+(bench|kserve)\b", re.MULTILINE)
    assert [
        path.name
        for path in shipped
        if path.suffix == ".lua" or load_test_import.search(path.read_text(errors="replace"))
    ] == []


def test_base_images_are_pinned_to_exact_versions():
    defaults = dict(re.findall(r"^ARG (\w+_IMAGE)=(\S+)", (ROOT / "Dockerfile").read_text(), re.MULTILINE))
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", defaults["PYTHON_IMAGE"])
    assert re.fullmatch(r"nvidia/cuda:13\.0\.\d+-base-ubuntu24\.04(@sha256:[0-9a-f]{64})?", defaults["CUDA_IMAGE"])
    # The CUDA major of the image's forward-compat libraries is the CUDA major torch was built for.
    assert "cuda-toolkit==13." in (ROOT / "docker" / "requirements-cuda.txt").read_text()


# --- building -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        ["docker/build.sh", "cpu"],
        ["make", "--no-print-directory", "image"],
        ["make", "--no-print-directory", "image-gpu"],
    ],
)
def test_without_docker_the_build_says_so_plainly(command, tmp_path):
    """The branch is arranged, whatever this machine has: the client is pointed at an engine that is not there."""
    nowhere = {**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock"}
    done = subprocess.run(command, cwd=ROOT, env=nowhere, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    message = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert message == [f"error: no Docker engine answers at DOCKER_HOST={nowhere['DOCKER_HOST']} ('docker info' fails)"]
