#!/usr/bin/env python3
"""The serving container's entrypoint: get the model archive, then run TorchServe in the foreground.

It runs as PID 1. It takes the archive from the model registry (MODEL_SOURCE=registry: the version or
alias MODEL_VERSION, checksum-verified by the registry code) or from the image (MODEL_SOURCE=image),
checks it, starts TorchServe's Java frontend as its own child with its inference API on a Unix socket in
TMPDIR/backend (a directory only this user can enter), and nginx in front of it where clients connect
(handler/front.py: bounded memory whatever the traffic), waits until a prediction is answered through nginx,
writes READY_FILE (the chart's startup probe checks it), and then waits until TorchServe exits. SIGTERM
and SIGINT are forwarded, so TorchServe stops its workers and exits; its exit code becomes the
container's. A failure exits non-zero with one message on stderr and in the termination log
(/dev/termination-log), which Kubernetes shows in the pod's status.

Settings, from the environment (the image sets the paths; the chart sets the rest):
  MODEL_SOURCE       registry | image (default registry)
  MODEL_VERSION      registry version or alias (default production)
  MODEL_ARCHIVE      the archive baked into the image (default /opt/mnist-serve/model/mnist.mar)
  MODEL_STORE        where the archive is put for TorchServe (writable; default /home/model-server/model-store)
  LOG_DIR            TorchServe's log files (writable; default /home/model-server/logs)
  TMPDIR             worker sockets, the unpacked archive, the run's config (writable; default /tmp)
  TORCHSERVE_CONFIG  config.properties to start from (default handler/config.properties of the repository)
  NUMBER_OF_GPU      GPUs TorchServe may give its workers (TorchServe's number_of_gpu; default 0: CPU)
  NGINX              the nginx binary (the image's /usr/sbin/nginx; default: scripts/nginx.sh's)
  READY_TIMEOUT      seconds for the model to answer its first prediction (default 300)
  READY_FILE         written once a prediction was answered, removed at start and stop
                     (default TMPDIR/mnist-serve-ready)
  STOP_TIMEOUT       seconds TorchServe gets to stop after SIGTERM before it is killed (default 25)
  TERMINATION_LOG    where the failure message goes (default /dev/termination-log)
  CASSANDRA_*, ASTRA_DB_*   the registry's connection, read by registry/settings.py

Each step is a module of the package startup/ beside this file: a package, so one name (startup) is added to
what imports find, not seven; not named docker, which would shadow the Docker SDK.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# startup/ beside this file, and registry/ and handler/ in the repository (or /opt/mnist-serve in the image),
# however this file is started: as a program, or loaded by a test.
sys.path[:0] = [str(HERE), str(HERE.parent)]

from startup.archive import check_archive, fetch_archive  # noqa: E402
from startup.java import java_command, java_environment  # noqa: E402
from startup.readiness import mark_ready, wait_until_ready  # noqa: E402
from startup.report import StartupError, report, report_exit, say, stopped_before_start  # noqa: E402
from startup.run_config import port_of, write_run_config  # noqa: E402
from startup.settings import require_writable, settings_from, termination_log_from  # noqa: E402
from startup.supervisor import Stopped, StopSignals, Supervisor  # noqa: E402

from handler import front  # noqa: E402 (needs the path above)
from handler.server import MODEL_NAME, served_model_environment  # noqa: E402


def main() -> int:
    signals = StopSignals()
    termination_log = termination_log_from(os.environ)
    try:
        settings = settings_from(os.environ)
        termination_log = settings.termination_log
        for directory in (settings.model_store, settings.log_dir, settings.tmp_dir):
            require_writable(directory)
        # A restarted container keeps its emptyDirs: an old marker would pass the startup probe at once.
        settings.ready_file.unlink(missing_ok=True)
        archive, origin, registry_version = fetch_archive(settings)
        model_version = check_archive(archive)
        backend = front.backend_socket(settings.tmp_dir / "backend")
        config, props, listen = write_run_config(settings, backend)
        front_config = front.write_config(
            settings.tmp_dir / "nginx", listen, backend, props.get("cors_allowed_origin", "")
        )
        command = java_command(props, config, settings)
        environment = java_environment(settings, served_model_environment(archive, registry_version))
        supervisor = signals.supervisor = Supervisor(settings)
        supervisor.start(command, environment)
        supervisor.start_front(front.nginx_command(front.nginx_binary(), front_config))
        say(
            f"TorchServe started (pid {supervisor.process.pid}): model {MODEL_NAME} {model_version}, {origin}; "
            f"number_of_gpu={settings.gpus}"
        )
        port = port_of(listen)  # nginx's: ready means answered the way clients are
        if wait_until_ready(supervisor, port):
            mark_ready(settings, model_version, port)
        code = supervisor.wait()
        if supervisor.front_failure:
            report(supervisor.front_failure, termination_log)
            return 1
        return report_exit(code, supervisor.stop_requested, settings.log_dir, termination_log)
    except (Stopped, StartupError, front.FrontError) as error:
        if signals.stopped_early is not None:
            return stopped_before_start(signals.stopped_early)
        report(str(error), termination_log)
        if signals.supervisor:
            signals.supervisor.stop()
        return 1
    except Exception:
        if signals.stopped_early is None:
            raise  # a bug: the traceback goes to the log, which Kubernetes shows (FallbackToLogsOnError)
        return stopped_before_start(signals.stopped_early)


if __name__ == "__main__":
    sys.exit(main())
