"""mnist-registry: publish, list, show, download, promote and delete model archives in Cassandra."""
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
    with tqdm(total=size, unit="B", unit_scale=True, desc="publishing", file=sys.stderr, disable=None, leave=False) as bar:
        version = registry.publish(args.archive, metrics, args.version, on_bytes=bar.update)
    print(
        f"published version {version.version}: {version.archive_name}, {size_text(version.size)} in {version.chunk_count} "
        f"chunk{'s' if version.chunk_count != 1 else ''}, sha256 {version.sha256}, test accuracy {accuracy_text(version)}"
    )


def list_versions(registry: Registry, args: argparse.Namespace) -> None:
    versions = registry.versions()
    if not versions:
        print("no versions yet; publish one with: mnist-registry publish ARCHIVE.mar --metrics metrics.json")
        return
    header = f"{'VERSION':<10} {'CREATED (UTC)':<19}  {'TEST ACC':>8}  {'SIZE':>10}  {'SHA256':<12}  {'EPOCHS':>6}  ALIASES"
    print(header)
    for v in versions:
        print(
            f"{v.version:<10} {v.created_at:%Y-%m-%d %H:%M:%S}  {accuracy_text(v):>8}  {size_text(v.size):>10}  "
            f"{v.sha256[:12]:<12}  {v.epochs if v.epochs is not None else '-':>6}  {', '.join(v.aliases)}"
        )


def show(registry: Registry, args: argparse.Namespace) -> None:
    v = registry.get(args.version)
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
    }
    width = max(map(len, details))
    for key, value in details.items():
        print(f"{key + ':':<{width + 1}} {value}")


def download(registry: Registry, args: argparse.Namespace) -> None:
    version, path = registry.download(args.version, args.out)
    print(f"wrote {path} (version {version.version}, {size_text(version.size)}, sha256 checked)")


def promote(registry: Registry, args: argparse.Namespace) -> None:
    version, previous = registry.promote(args.version, args.alias)
    moved = f" (was {previous})" if previous and previous != version.version else ""
    print(f"{args.alias} -> version {version.version}{moved}")


def delete(registry: Registry, args: argparse.Namespace) -> None:
    removed = registry.delete(args.version, force=args.force)
    also = f" and alias{'es' if len(removed) > 1 else ''} {', '.join(removed)}" if removed else ""
    print(f"deleted version {args.version}{also}")


WRITERS = (publish, promote, delete)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="mnist-registry", description=__doc__, epilog=SETTINGS_HELP)
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, function, help: str, description: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=description, epilog=SETTINGS_HELP)
        sub.set_defaults(run=function)
        return sub

    p = command(
        "publish", publish, "record a .mar with its metrics as a new version",
        "Store a model archive (.mar) in 1 MiB chunks, then its version row with the metrics, training parameters, "
        "data fingerprint and git commit from metrics.json, its size and sha256. The version becomes visible only "
        "once every chunk is stored, so an interrupted publish leaves no version behind.",
    )
    p.add_argument("archive", type=Path, metavar="ARCHIVE.mar", help="model archive built by torch-model-archiver")
    p.add_argument("--metrics", type=Path, required=True, help="metrics.json written by `python -m training train`")
    p.add_argument("--version", help="version name (default: the next whole number, 1, 2, 3...)")

    command("list", list_versions, "list the versions, oldest first", "List every complete version with its test accuracy, size, sha256 and aliases.")

    p = command("show", show, "everything recorded about a version", "Show what publish recorded about a version (or the version an alias points at).")
    p.add_argument("version", metavar="VERSION|ALIAS")

    p = command(
        "download", download, "write a version's .mar into a directory, sha256 checked",
        "Reassemble the archive from its chunks, checking every chunk's sha256, the chunk count, size and the "
        "archive's sha256; a damaged archive is refused. Written through a temporary file, so DIR never holds a half archive.",
    )
    p.add_argument("version", metavar="VERSION|ALIAS")
    p.add_argument("--out", type=Path, default=Path("."), metavar="DIR", help="directory to write ARCHIVE.mar into (default: .)")
    p.add_argument("--retry-seconds", type=float, default=30.0, metavar="S",
                   help="while the database cannot be reached (a node restarting), try again for up to S seconds (default: 30; 0: once)")

    p = command("promote", promote, "point an alias (e.g. production) at a version", "Point an alias at a version; download and predict-table accept the alias.")
    p.add_argument("version", metavar="VERSION|ALIAS")
    p.add_argument("--alias", default="production", help="alias name (default: production)")

    p = command(
        "delete", delete, "remove a version and its chunks",
        "Remove a version and its chunks. A version an alias points at is refused unless --force, which removes the alias as well.",
    )
    p.add_argument("version", metavar="VERSION")
    p.add_argument("--force", action="store_true", help="also delete the aliases that point at it")
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def attempt() -> None:
        # Only the commands that write create missing tables: list, show and download work with a read-only role.
        with db.connect(cassandra_settings(), create_schema=args.run in WRITERS) as session:
            args.run(Registry(session), args)

    try:
        # Only download is retried: it writes through a temporary file, so a repeat is harmless.
        db.retrying(attempt, getattr(args, "retry_seconds", 0), lambda line: print(f"mnist-registry: {line}", file=sys.stderr))
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
