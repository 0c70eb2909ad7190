"""mnist-registry: publish, list, show, download, promote and delete model archives in Cassandra; roll a
Kubernetes Deployment to a version (promote --deployment) and run canaries (canary)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm

from registry import db
from registry.settings import SETTINGS_HELP, SettingsError, cassandra_settings
from registry.store import ModelVersion, Registry, RegistryError, read_metrics


def size_text(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    if size < 1 << 20:
        return f"{size / 1024:.1f} KiB"
    return f"{size / (1 << 20):,.1f} MiB"


def accuracy_text(version: ModelVersion) -> str:
    return "-" if version.test_accuracy is None else f"{version.test_accuracy:.2%}"


def publish(registry: Registry, args: argparse.Namespace) -> None:
    metrics = read_metrics(args.metrics)  # before any byte is written
    size = args.archive.stat().st_size if args.archive.is_file() else 0
    with tqdm(
        total=size, unit="B", unit_scale=True, desc="publishing", file=sys.stderr, disable=None, leave=False
    ) as bar:
        version = registry.publish(args.archive, metrics, args.version, on_bytes=bar.update)
    print(
        f"published version {version.version}: {version.archive_name}, {size_text(version.size)} in "
        f"{version.chunk_count} "
        f"chunk{'s' if version.chunk_count != 1 else ''}, sha256 {version.sha256}, test accuracy "
        f"{accuracy_text(version)}"
    )


def run_text(version: ModelVersion) -> str:
    """How the version was trained, from its metrics' lineage: "2 ranks, Job mnist-train, image ..." or "-"."""
    ranks = version.metrics.get("world_size")
    parts = [f"{ranks} rank{'s' if ranks != 1 else ''}"] if ranks else []
    parts += [
        f"{label} {version.metrics[key]}"
        for key, label in (("job", "Job"), ("image", "image"))
        if version.metrics.get(key)
    ]
    return ", ".join(parts) or "-"


def record(version: ModelVersion) -> dict:
    """What `list --json` and `show --json` print of a version: the fields show prints, as JSON values."""
    return {
        "version": version.version,
        "aliases": version.aliases,
        "created": version.created_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "archive": version.archive_name,
        "size": version.size,
        "chunk_count": version.chunk_count,
        "sha256": version.sha256,
        "test_accuracy": version.test_accuracy,
        "test_loss": version.test_loss,
        "epochs": version.epochs,
        "parameters": version.parameters,
        "data_fingerprint": version.data_fingerprint,
        "git_commit": version.git_commit,
        "torch_version": version.torch_version,
        "run": {key: version.metrics[key] for key in ("world_size", "job", "image") if key in version.metrics},
    }


def list_versions(registry: Registry, args: argparse.Namespace) -> None:
    versions = registry.versions()
    if args.json:
        print(json.dumps([record(v) for v in versions], indent=2))
        return
    if not versions:
        print("no versions yet; publish one with: mnist-registry publish ARCHIVE.mar --metrics metrics.json")
        return
    header = (
        f"{'VERSION':<10} {'CREATED (UTC)':<19}  {'TEST ACC':>8}  {'SIZE':>10}  {'SHA256':<12}  {'EPOCHS':>6}  ALIASES"
    )
    print(header)
    for v in versions:
        print(
            f"{v.version:<10} {v.created_at:%Y-%m-%d %H:%M:%S}  {accuracy_text(v):>8}  {size_text(v.size):>10}  "
            f"{v.short_sha256:<12}  {v.epochs if v.epochs is not None else '-':>6}  {', '.join(v.aliases)}"
        )


def show(registry: Registry, args: argparse.Namespace) -> None:
    v = registry.get(args.version)
    if args.json:
        print(json.dumps(record(v), indent=2))
        return
    details = {
        "version": v.version,
        "aliases": ", ".join(v.aliases) or "-",
        "created": f"{v.created_at:%Y-%m-%d %H:%M:%S} UTC",
        "archive": v.archive_name,
        "size": f"{v.size:,} bytes in {v.chunk_count} chunk(s) of up to {v.chunk_size:,}",
        "sha256": v.sha256,
        "test accuracy": accuracy_text(v),
        "test loss": "-" if v.test_loss is None else f"{v.test_loss:.4f}",
        "epochs": v.epochs,
        "parameters": json.dumps(v.parameters, sort_keys=True),
        "data fingerprint": v.data_fingerprint,
        "git commit": v.git_commit,
        "torch version": v.torch_version,
        "run": run_text(v),
    }
    width = max(map(len, details))
    for key, value in details.items():
        print(f"{key + ':':<{width + 1}} {value}")


def download(registry: Registry, args: argparse.Namespace) -> None:
    version, path = registry.download(args.version, args.out)
    print(f"wrote {path} (version {version.version}, {size_text(version.size)}, sha256 checked)")


def promote(registry: Registry, args: argparse.Namespace) -> None:
    if args.deployment:
        from registry.rollout import roll

        version = roll.promote(registry, args.version, args.alias, place(args), args.timeout, say)
        print(f"{args.alias} -> version {version.version}, served by every pod of {place(args)}")
        return
    version, previous = registry.promote(args.version, args.alias)
    moved = f" (was {previous})" if previous and previous != version.version else ""
    print(f"{args.alias} -> version {version.version}{moved}")


def canary(registry: Registry | None, args: argparse.Namespace) -> None:
    from registry.rollout.canary import canary_abort, canary_promote, canary_start
    from registry.rollout.traffic import canary_status

    if args.action == "start":
        canary_start(registry, args.version, place(args), args.replicas, args.timeout, say)
    elif args.action == "promote":
        version = canary_promote(registry, args.alias, place(args), args.timeout, say)
        print(f"{args.alias} -> version {version.version}, served by every pod of {place(args)}; the canary is removed")
    elif args.action == "abort":
        canary_abort(place(args), args.timeout, say)
    else:
        canary_status(place(args), say)


def deployment_name(args: argparse.Namespace) -> str | None:
    """NAME of --deployment (deployment/NAME or NAME); None without one."""
    given = getattr(args, "deployment", None)
    if not given:
        return None
    kind, _, name = given.rpartition("/")
    if kind not in ("", "deployment", "deploy", "deployments") or not name:
        raise RegistryError(f"{given}: only a Deployment can be rolled out (deployment/NAME)")
    return name


def place(args: argparse.Namespace):
    """The Deployment of --deployment in --namespace."""
    from registry.rollout.deployment import Place
    from registry.rollout.kube import default_namespace

    return Place(deployment_name(args), args.namespace or default_namespace())


def check_arguments(args: argparse.Namespace) -> None:
    """What the command line alone can tell, before a database or a cluster is reached."""
    if args.command in ("promote", "canary"):
        deployment_name(args)
    if args.command == "canary" and args.action == "start" and not args.version:
        raise RegistryError("canary start needs the VERSION to try")


def say(line: str) -> None:
    print(line, flush=True)


def delete(registry: Registry, args: argparse.Namespace) -> None:
    removed = registry.delete(args.version, force=args.force)
    also = f" and alias{'es' if len(removed) > 1 else ''} {', '.join(removed)}" if removed else ""
    print(f"deleted version {args.version}{also}")


WRITERS = (publish, promote, delete, canary)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="mnist-registry", description=__doc__, epilog=SETTINGS_HELP)
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, function, help: str, description: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=description, epilog=SETTINGS_HELP)
        sub.set_defaults(run=function)
        return sub

    p = command(
        "publish",
        publish,
        "record a .mar with its metrics as a new version",
        "Store a model archive (.mar) in 1 MiB chunks, then its version row with the metrics, training parameters, "
        "data fingerprint and git commit from metrics.json, its size and sha256. The version becomes visible only "
        "once every chunk is stored, so an interrupted publish leaves no version behind.",
    )
    p.add_argument("archive", type=Path, metavar="ARCHIVE.mar", help="model archive built by torch-model-archiver")
    p.add_argument("--metrics", type=Path, required=True, help="metrics.json written by `python -m training train`")
    p.add_argument("--version", help="version name (default: the next whole number, 1, 2, 3...)")

    p = command(
        "list",
        list_versions,
        "list the versions, oldest first",
        "List every complete version with its test accuracy, size, sha256 and aliases.",
    )
    p.add_argument("--json", action="store_true", help="one JSON list of what show prints of each version, for scripts")

    p = command(
        "show",
        show,
        "everything recorded about a version",
        "Show what publish recorded about a version (or the version an alias points at), with the run that trained "
        "it: its ranks, and the Job and image where the training chart ran it.",
    )
    p.add_argument("version", metavar="VERSION|ALIAS")
    p.add_argument("--json", action="store_true", help="the same as one JSON object, for scripts")

    p = command(
        "download",
        download,
        "write a version's .mar into a directory, sha256 checked",
        "Reassemble the archive from its chunks, checking every chunk's sha256, the chunk count, size and the "
        "archive's sha256; a damaged archive is refused. Written through a temporary file, so DIR never holds a half "
        "archive.",
    )
    p.add_argument("version", metavar="VERSION|ALIAS")
    p.add_argument(
        "--out", type=Path, default=Path("."), metavar="DIR", help="directory to write ARCHIVE.mar into (default: .)"
    )
    p.add_argument(
        "--retry-seconds",
        type=float,
        default=30.0,
        metavar="S",
        help="while the database cannot be reached (a node restarting), try again for up to S seconds (default: 30; "
        "0: once)",
    )

    p = command(
        "promote",
        promote,
        "point an alias (e.g. production) at a version, and roll a Deployment to it",
        "Point an alias at a version; download and predict-table accept the alias. With --deployment, also pin the "
        "Deployment's pods to that version, follow the rollout a line per pod, and check every new pod with real test "
        "digits (the answers must name the version; accuracy at least the version's test accuracy less 2 points). "
        "A pod that fails, the deadline or a failed check puts the Deployment and the alias back on the version served "
        "before and exits 1 with one line saying why.",
    )
    p.add_argument("version", metavar="VERSION|ALIAS")
    p.add_argument("--alias", default="production", help="alias name (default: production)")
    add_cluster_options(p, "deployment/NAME: also roll this Deployment of the chart to the version")

    p = command(
        "canary",
        canary,
        "run a version beside a Deployment on a share of the traffic, then promote or abort it",
        "start VERSION: a second Deployment, NAME-canary, with REPLICAS pods of VERSION behind the same Service "
        "(checked "
        "like a rollout; the traffic splits by pod count). status: per version, its pods and the requests they "
        "answered "
        "(each pod's Prometheus counter). promote: roll NAME to the canary's version (as promote --deployment), then "
        "remove "
        "the canary. abort: remove the canary.",
    )
    p.add_argument("action", choices=("start", "status", "promote", "abort"))
    p.add_argument("version", nargs="?", metavar="VERSION|ALIAS", help="with start: the version to try")
    p.add_argument("--alias", default="production", help="with promote: the alias to move (default: production)")
    p.add_argument("--replicas", type=int, default=1, help="with start: canary pods (default: 1)")
    add_cluster_options(p, "deployment/NAME of the chart (the stable one)", required=True)

    p = command(
        "delete",
        delete,
        "remove a version and its chunks",
        "Remove a version and its chunks. A version an alias points at is refused unless --force, which removes the "
        "alias as well.",
    )
    p.add_argument("version", metavar="VERSION")
    p.add_argument("--force", action="store_true", help="also delete the aliases that point at it")
    return top


def add_cluster_options(p: argparse.ArgumentParser, help: str, required: bool = False) -> None:
    p.add_argument("--deployment", metavar="deployment/NAME", required=required, help=help)
    p.add_argument("-n", "--namespace", help="its namespace (default: the kubeconfig context's, or the pod's own)")
    p.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        metavar="S",
        help="seconds for the new pods to be ready (default: 600; a pod that fails ends it sooner)",
    )


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def attempt() -> None:
        if args.run is canary and args.action in ("status", "abort"):
            args.run(None, args)  # the cluster only
            return
        # Only the commands that write create missing tables: list, show and download work with a read-only role.
        with db.connect(cassandra_settings(), create_schema=args.run in WRITERS) as session:
            args.run(Registry(session), args)

    try:
        check_arguments(args)
        # Only download is retried: it writes through a temporary file, so a repeat is harmless.
        db.retrying(
            attempt, getattr(args, "retry_seconds", 0), lambda line: print(f"mnist-registry: {line}", file=sys.stderr)
        )
    except (RegistryError, db.DatabaseError, SettingsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # e.g. --out not writable
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; an unfinished publish leaves no version, an unfinished download no file", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
