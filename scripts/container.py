"""The serving image run as the Helm chart runs it, and measured: `make bench-image`.

The `docker run` flags come from the pod the chart renders (helm template): read-only root filesystem,
the pod's uid/gid, every capability dropped, no privilege escalation, writable tmpfs only where the
chart mounts an emptyDir (owned by the pod's fsGroup, as an emptyDir is), the chart's config.properties
mounted where its ConfigMap goes, and its environment. tests/test_container.py starts every container
it checks this way; the benchmark below prints the image's size, its start-up and stop times.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from handler.server import Ports, config_with_ports
from training.config import cache_dir

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "mnist-serve"
KUBE_VERSION = "1.36.0"
TEST_DIGIT = CHART / "files" / "digit-7.json"  # the helm test's digit, as the API takes it
TEST_DIGIT_LABEL = 7
FIRST_ANSWER_TARGET_S = 10.0  # issue: first answered prediction <= 10 s after start on 2 cores
ANSWER_AFTER_PROBE_S = 1.0  # once the startup probe passes, a prediction is answered within this
POLL_S = 0.1


def docker(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args[:3])} ... failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return done


# --- the pod the chart renders -----------------------------------------------------------------------


@dataclass(frozen=True)
class ChartPod:
    """The server pod and container of `helm template`, and the config.properties its ConfigMap holds."""

    pod: dict
    container: dict
    config_properties: str

    @classmethod
    def render(cls, helm: Path, *helm_args: str) -> ChartPod:
        done = subprocess.run(
            [str(helm), "template", "mnist-serve", str(CHART), "--kube-version", KUBE_VERSION, *helm_args],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0:
            raise RuntimeError(f"helm template failed: {done.stderr.strip()}")
        objects = [o for o in yaml.safe_load_all(done.stdout) if o]
        (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
        (config_map,) = [o for o in objects if o["kind"] == "ConfigMap" and "config.properties" in o.get("data", {})]
        pod = deployment["spec"]["template"]
        (container,) = pod["spec"]["containers"]
        return cls(pod, container, config_map["data"]["config.properties"])

    def env(self) -> dict[str, str]:
        return {item["name"]: item["value"] for item in self.container.get("env", []) if "value" in item}

    def startup_command(self) -> list[str]:
        return self.container["startupProbe"]["exec"]["command"]

    def grace_seconds(self) -> int:
        return self.pod["spec"]["terminationGracePeriodSeconds"]

    def run_flags(
        self, config_file: Path, tmpfs_options: dict[str, str] | None = None, secrets: dict[str, Path] | None = None
    ) -> list[str]:
        """`docker run` flags for what the chart asks of the runtime; TMPFS_OPTIONS replaces the options of
        an emptyDir's tmpfs (by mount path), to make one unlike the chart's on purpose. SECRETS: for each Secret
        the pod mounts, by name, a folder holding its keys as files, mounted read-only as Kubernetes does."""
        pod_context = self.pod["spec"].get("securityContext", {})
        context = {**pod_context, **self.container.get("securityContext", {})}
        uid, gid = context["runAsUser"], context.get("runAsGroup", context["runAsUser"])
        flags = ["--user", f"{uid}:{gid}"]
        if context.get("readOnlyRootFilesystem"):
            flags.append("--read-only")
        flags += [f"--cap-drop={cap}" for cap in context.get("capabilities", {}).get("drop", [])]
        if context.get("allowPrivilegeEscalation") is False:
            flags += ["--security-opt", "no-new-privileges"]
        volumes = {v["name"]: v for v in self.pod["spec"].get("volumes", [])}
        for mount in self.container.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            if "emptyDir" in volume:
                # An emptyDir is writable by the fsGroup and not noexec (Docker's --tmpfs is root's and noexec).
                options = f"uid={uid},gid={pod_context.get('fsGroup', gid)},mode=1777,exec"
                flags += ["--tmpfs", f"{mount['mountPath']}:{(tmpfs_options or {}).get(mount['mountPath'], options)}"]
            elif "configMap" in volume:
                flags += ["-v", f"{config_file}:{mount['mountPath']}/config.properties:ro"]
            elif "secret" in volume and volume["secret"]["secretName"] in (secrets or {}):
                # A Secret not given is left out: a container that needs no database (the model from the
                # image) starts without it.
                flags += ["-v", f"{secrets[volume['secret']['secretName']]}:{mount['mountPath']}:ro"]
        memory = self.container.get("resources", {}).get("limits", {}).get("memory")
        if memory:  # the container is killed past it, as the kubelet's cgroup does
            flags += [f"--memory={quantity_bytes(memory)}", "--memory-swap", str(quantity_bytes(memory))]
        for name, value in self.env().items():
            flags += ["-e", f"{name}={value}"]
        return flags


def quantity_bytes(quantity: str) -> int:
    """Bytes of a Kubernetes memory quantity: 2Gi, 512Mi, 1G, 1000000."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 10**3, "M": 10**6, "G": 10**9}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return int(float(quantity[: -len(suffix)]) * factor)
    return int(quantity)


# --- a container started that way --------------------------------------------------------------------

LABEL = "mnist-serve.container=1"  # on every container started here, so a later run can remove leftovers


@dataclass
class Container:
    id: str
    started: float  # time.monotonic() just before `docker run`
    scratch: tempfile.TemporaryDirectory = field(repr=False)
    host_ports: Ports | None = None  # with the host's network: the ports it listens on

    @classmethod
    def start(
        cls,
        image: str,
        chart: ChartPod,
        *extra: str,
        env: dict[str, str] | None = None,
        host_network: Ports | None = None,
        tmpfs_options: dict[str, str] | None = None,
        secrets: dict[str, Path] | None = None,
    ) -> Container:
        """Detached, the chart's flags first, then EXTRA flags (mounts) and ENV settings. HOST_NETWORK runs
        it in the host's network (so it reaches services on the host's loopback) with the chart's config
        moved to those ports; otherwise 8080 and 8082 are published on the host's loopback."""
        scratch = tempfile.TemporaryDirectory(prefix="mnist-serve-container-")
        config = Path(scratch.name) / "config.properties"
        config.write_text(chart.config_properties)
        if host_network:
            config.write_text(config_with_ports(host_network, config))
        config.chmod(0o644)
        flags = chart.run_flags(config, tmpfs_options, secrets)
        flags += ["--network=host"] if host_network else ["-p", "127.0.0.1::8080", "-p", "127.0.0.1::8082"]
        for name, value in (env or {}).items():
            flags += ["-e", f"{name}={value}"]
        started = time.monotonic()
        done = docker("run", "--detach", "--label", LABEL, *flags, *extra, image)
        return cls(done.stdout.strip(), started, scratch, host_network)

    def url(self, path: str = "/predictions/mnist", port: int = 8080) -> str:
        if self.host_ports:
            moved = {8080: self.host_ports.inference, 8081: self.host_ports.management, 8082: self.host_ports.metrics}
            return f"http://127.0.0.1:{moved[port]}{path}"
        host_port = docker("port", self.id, f"{port}/tcp").stdout.split()[0].rsplit(":", 1)[1]
        return f"http://127.0.0.1:{host_port}{path}"

    def ip(self) -> str:
        return docker(
            "inspect", "--format", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", self.id
        ).stdout.strip()

    def exec(self, *command: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return docker("exec", self.id, *command, timeout=timeout, check=False)

    def logs(self) -> str:
        done = docker("logs", self.id, check=False)
        return done.stdout + done.stderr

    def running(self) -> bool:
        return docker("inspect", "--format", "{{.State.Running}}", self.id, check=False).stdout.strip() == "true"

    def wait(self, timeout: float) -> int:
        """The exit code, once the container has stopped."""
        return int(docker("wait", self.id, timeout=timeout).stdout.strip())

    def stop(self, timeout: float) -> tuple[int, float]:
        """SIGTERM, as the kubelet sends it; (exit code, seconds until it exited)."""
        sent = time.monotonic()
        docker("kill", "--signal", "TERM", self.id)
        return self.wait(timeout), time.monotonic() - sent

    def remove(self) -> None:
        docker("rm", "--force", self.id, check=False)
        self.scratch.cleanup()


def predict(url: str, timeout: float) -> tuple[int, dict]:
    """(HTTP status, JSON answer) of the chart's test digit; status 0 when nothing answered in time."""
    request = urllib.request.Request(url, data=TEST_DIGIT.read_bytes(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, json.load(answer)
    except urllib.error.HTTPError as error:
        with error:
            return error.code, {}
    except (OSError, ValueError):
        return 0, {}


@dataclass
class StartUp:
    """Seconds from `docker run`: when /ping first said Healthy, when the startup probe first passed, and
    how long a prediction sent at that moment took (None: not answered within ANSWER_AFTER_PROBE_S)."""

    ping_healthy: float | None
    probe_passed: float
    answer_after_probe: float | None
    answer: dict


def watch_start_up(container: Container, chart: ChartPod, deadline_s: float) -> StartUp:
    """Poll the chart's startup probe (in the container, as the kubelet runs it) and /ping from the start."""
    ping_healthy = None
    ping_url = container.url("/ping")
    while time.monotonic() - container.started < deadline_s:
        if not container.running():
            raise RuntimeError(f"the container exited while starting:\n{container.logs()[-3000:]}")
        if ping_healthy is None and ping_says_healthy(ping_url):
            ping_healthy = time.monotonic() - container.started
        if container.exec(*chart.startup_command()).returncode == 0:
            passed = time.monotonic()
            status, answer = predict(container.url(), ANSWER_AFTER_PROBE_S)
            took = time.monotonic() - passed
            return StartUp(ping_healthy, passed - container.started, took if status == 200 else None, answer)
        time.sleep(POLL_S)
    raise RuntimeError(f"the startup probe did not pass within {deadline_s:.0f} s:\n{container.logs()[-3000:]}")


def ping_says_healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as answer:
            return answer.status == 200 and json.load(answer).get("status") == "Healthy"
    except (OSError, ValueError):
        return False


# --- make bench-image ---------------------------------------------------------------------------------


def image_size(tag: str) -> tuple[int, list[tuple[int, str]]]:
    """(bytes, the five largest layers as (bytes, the instruction that made it))."""
    size = int(docker("image", "inspect", "--format", "{{.Size}}", tag).stdout)
    layers = []
    for line in docker(
        "history", "--no-trunc", "--human=false", "--format", "{{.Size}}\t{{.CreatedBy}}", tag
    ).stdout.splitlines():
        layer_size, created_by = line.split("\t", 1)
        layers.append((int(layer_size), " ".join(created_by.split())[:110] or "(the base image)"))
    return size, sorted(layers, reverse=True)[:5]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Builds nothing: run make image-with-model first (make bench-image does).",
    )
    parser.add_argument(
        "--image",
        default="mnist-serve:0.1.0-cpu-model",
        help="the image to start (MODEL_SOURCE=image; default %(default)s)",
    )
    parser.add_argument(
        "--sizes",
        nargs="*",
        default=["mnist-serve:0.1.0-cpu", "mnist-serve:0.1.0-gpu", "mnist-serve:0.1.0-gpu-train"],
        help="further images whose size to print, where they exist",
    )
    parser.add_argument("--runs", type=int, default=3, help="container starts to measure (default %(default)s)")
    parser.add_argument(
        "--helm", type=Path, default=cache_dir() / "bin" / "helm", help="helm binary (default %(default)s)"
    )
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")

    print("image sizes (largest layers below each)")
    for tag in [args.image, *args.sizes]:
        if docker("image", "inspect", tag, check=False).returncode != 0:
            print(f"  {tag}: not built")
            continue
        size, layers = image_size(tag)
        print(f"  {tag}: {size / 1e9:.2f} GB")
        for layer_size, created_by in layers:
            print(f"      {layer_size / 1e6:8.1f} MB  {created_by}")

    chart = ChartPod.render(args.helm, "--set", "model.source=image")
    print(f"\nstart-up, {args.runs} runs, run as the chart runs it (probe: {' '.join(chart.startup_command())})")
    print(
        f"  {'run':>3}  {'/ping Healthy':>13}  {'probe passed':>12}  {'answer after probe':>18}  "
        f"{'SIGTERM to exit':>15}  exit"
    )
    worst_probe, worst_stop, early, codes = 0.0, 0.0, 0, set()
    for run in range(1, args.runs + 1):
        container = Container.start(args.image, chart)
        try:
            start = watch_start_up(container, chart, deadline_s=300)
            code, stop_s = container.stop(timeout=chart.grace_seconds() + 10)
        finally:
            container.remove()
        worst_probe, worst_stop = max(worst_probe, start.probe_passed), max(worst_stop, stop_s)
        codes.add(code)
        early += start.answer_after_probe is None
        after = f"{start.answer_after_probe * 1000:.0f} ms" if start.answer_after_probe is not None else "NOT ANSWERED"
        ping = f"{start.ping_healthy:.1f} s" if start.ping_healthy is not None else "-"
        print(f"  {run:>3}  {ping:>13}  {start.probe_passed:>10.1f} s  {after:>18}  {stop_s:>13.1f} s  {code}")
    print("\ntargets")
    print(f"  probe passed before the model answered: {early} of {args.runs} runs (target 0)")
    print(
        f"  first answered prediction after docker run, worst run: {worst_probe:.1f} s (target <= "
        f"{FIRST_ANSWER_TARGET_S:.0f} s)"
    )
    print(
        f"  SIGTERM to exit, worst run: {worst_stop:.1f} s, exit {'/'.join(map(str, sorted(codes)))} "
        f"(target < {chart.grace_seconds()} s, the chart's grace period; exit 143)"
    )
    return 0 if early == 0 and codes == {143} else 1


if __name__ == "__main__":
    sys.exit(main())
