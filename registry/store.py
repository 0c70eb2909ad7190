"""Model registry in Cassandra: versioned .mar archives stored in checked chunks, plus aliases."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import uuid
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from cassandra.cluster import Session

from registry import db
from registry.model_archive import (
    MANIFEST,
    FailsCRC,
    ManifestNotJSON,
    NoManifest,
    NotAZip,
    checked_manifest,
    manifest_of,
)
from registry.names import ALIAS_NAME, VERSION_NAME

CHUNK_SIZE = 1 << 20  # 1 MiB: far below Cassandra's cell-size guidance and the 16 MiB mutation limit
WRITE_WINDOW = 4  # chunks in flight while publishing: 4 MiB of memory
REQUIRED_METRICS = (
    "test_accuracy",
    "test_loss",
    "epochs",
    "parameters",
    "data_fingerprint",
    "git_commit",
    "torch_version",
)
# Hex digits of a sha256 shown to people; the handler's SHA256_SHOWN, which TorchServe's workers import without
# registry/, is the same number (tests/test_handler.py holds them equal).
SHA256_SHOWN = 12


class RegistryError(Exception):
    """Something a user asked of the registry cannot be done; the message says why."""


class VersionNotFound(RegistryError):
    pass


class DuplicateVersion(RegistryError):
    pass


class MissingChunk(RegistryError):
    pass


class CorruptArchive(RegistryError):
    pass


class AliasInUse(RegistryError):
    pass


class BadInput(RegistryError):
    """The archive, metrics file or a name given to the registry is unusable."""


@dataclass
class ModelVersion:
    version: str
    created_at: datetime
    archive_name: str
    size: int
    sha256: str
    chunk_size: int
    chunk_count: int
    upload: uuid.UUID
    test_accuracy: float | None
    test_loss: float | None
    epochs: int | None
    parameters: dict
    data_fingerprint: str | None
    git_commit: str | None
    torch_version: str | None
    metrics: dict
    aliases: list[str] = field(default_factory=list)

    @property
    def short_sha256(self) -> str:
        return short_sha256(self.sha256)


TABLES = ("model_versions", "archive_chunks", "model_aliases")
COLUMNS = (
    "version",
    "created_at",
    "archive_name",
    "size",
    "sha256",
    "chunk_size",
    "chunk_count",
    "upload",
    *REQUIRED_METRICS,  # a column each, so a version lists and compares without parsing its metrics
    "metrics",
)


def row_to_version(row: tuple) -> ModelVersion:
    values = dict(zip(COLUMNS, row, strict=True))
    values["parameters"] = json.loads(values["parameters"] or "{}")
    values["metrics"] = json.loads(values["metrics"] or "{}")
    values["created_at"] = values["created_at"].replace(tzinfo=UTC)  # the driver returns naive UTC
    return ModelVersion(**values)


# --- pure helpers ----------------------------------------------------------------------------


def chunk_count(size: int, chunk_size: int = CHUNK_SIZE) -> int:
    """Chunks an archive of `size` bytes takes; an empty archive is still one (empty) chunk."""
    return max(1, -(-size // chunk_size))


def read_chunks(handle: BinaryIO, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
    """The file's bytes in pieces of chunk_size (the last one shorter); one empty piece for an empty file."""
    piece = handle.read(chunk_size)
    yield piece
    while len(piece) == chunk_size:
        piece = handle.read(chunk_size)
        if piece:
            yield piece


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def short_sha256(digest: str) -> str:
    """The first hex digits of a sha256, as messages, `mnist-registry list` and the served model show it."""
    return digest[:SHA256_SHOWN]


def read_metrics(path: Path) -> dict:
    """metrics.json as training/job.py writes it, with the keys the registry records."""
    try:
        metrics = json.loads(path.read_text())
    except FileNotFoundError:
        raise BadInput(
            f"--metrics {path}: no such file; pass the metrics.json written by `python -m training train`"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BadInput(f"--metrics {path}: not readable JSON ({error})") from None
    if not isinstance(metrics, dict):
        raise BadInput(f"--metrics {path}: expected a JSON object, found {type(metrics).__name__}")
    missing = [key for key in REQUIRED_METRICS if key not in metrics]
    if missing:
        raise BadInput(
            f"--metrics {path}: lacks {', '.join(missing)}; pass the metrics.json that training wrote with the model"
        )
    return metrics


def check_archive(path: Path) -> None:
    """A .mar as registry.model_archive defines it; refuse anything else before writing a byte."""
    if not path.is_file():
        raise BadInput(f"{path}: no such archive file")
    try:
        checked_manifest(path, require_model_file=False)
    except NoManifest:
        raise BadInput(f"{path}: a zip without {MANIFEST}; build the archive with torch-model-archiver") from None
    except (NotAZip, OSError) as error:
        raise BadInput(f"{path}: not a model archive (.mar is a zip file: {error})") from None
    except FailsCRC as damaged:
        raise BadInput(f"{path}: damaged, {damaged} fails its CRC check; build the archive again") from None
    except ManifestNotJSON as error:
        raise BadInput(f"{path}: its {MANIFEST} is not the JSON object torch-model-archiver writes ({error})") from None


def serialized_file(archive: bytes) -> tuple[str, bytes]:
    """The model file (manifest's serializedFile, model.pt for ours) and its bytes, from a .mar."""
    with zipfile.ZipFile(io.BytesIO(archive)) as mar:
        manifest = manifest_of(mar)
        name = manifest.get("model", {}).get("serializedFile") or "model.pt"
        try:
            return name, mar.read(name)
        except KeyError:
            raise BadInput(f"the archive's manifest names {name}, which is not in the archive") from None


# --- the registry ----------------------------------------------------------------------------


class Registry:
    """Versions, their chunks and aliases in the tables of schema.cql."""

    def __init__(self, session: Session, chunk_size: int = CHUNK_SIZE):
        tables = session.cluster.metadata.keyspaces[session.keyspace].tables
        missing = [table for table in TABLES if table not in tables]
        if missing:  # a read-only role made no tables: say so instead of the driver's "table ... does not exist"
            raise RegistryError(
                f"keyspace {session.keyspace} holds no model registry (no {missing[0]} table); "
                "publish a version into it first (mnist-registry publish)"
            )
        self.session = session
        self.chunk_size = chunk_size
        prepare = session.prepare
        self.insert_chunk = prepare(
            "INSERT INTO archive_chunks (version, upload, chunk, data, sha256) VALUES (?, ?, ?, ?, ?)"
        )
        self.insert_version = prepare(
            f"INSERT INTO model_versions ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))}) IF NOT EXISTS"
        )
        self.select_version = prepare(f"SELECT {', '.join(COLUMNS)} FROM model_versions WHERE version = ?")
        self.select_versions = prepare(f"SELECT {', '.join(COLUMNS)} FROM model_versions")
        self.select_chunks = prepare("SELECT chunk, data, sha256 FROM archive_chunks WHERE version = ? AND upload = ?")
        self.select_chunks.fetch_size = 4  # pages of 4 chunks: memory stays flat for any archive size
        self.select_uploads = prepare("SELECT upload FROM archive_chunks WHERE version = ? GROUP BY upload")
        self.delete_upload = prepare("DELETE FROM archive_chunks WHERE version = ? AND upload = ?")
        self.delete_chunks = prepare("DELETE FROM archive_chunks WHERE version = ?")
        self.delete_version = prepare("DELETE FROM model_versions WHERE version = ? IF EXISTS")
        self.select_alias = prepare("SELECT version FROM model_aliases WHERE alias = ?")
        self.select_aliases = prepare("SELECT alias, version FROM model_aliases")
        self.insert_alias = prepare("INSERT INTO model_aliases (alias, version, updated_at) VALUES (?, ?, ?)")
        self.delete_alias = prepare("DELETE FROM model_aliases WHERE alias = ?")

    # reading

    def aliases(self) -> dict[str, str]:
        """alias -> version."""
        return dict(self.session.execute(self.select_aliases))

    def versions(self) -> list[ModelVersion]:
        """Every complete version, oldest first, each with the aliases that point at it."""
        aliases = self.aliases()
        found = [row_to_version(row) for row in self.session.execute(self.select_versions)]
        for version in found:
            version.aliases = sorted(alias for alias, target in aliases.items() if target == version.version)
        return sorted(found, key=lambda v: (v.created_at, v.version))

    def find(self, version: str) -> ModelVersion | None:
        row = self.session.execute(self.select_version, (version,)).one()
        return row_to_version(row) if row else None

    def get(self, name: str) -> ModelVersion:
        """A version by its name, or the version an alias points at."""
        found = self.find(name)
        if found is None:
            alias = self.session.execute(self.select_alias, (name,)).one()
            if alias is None:
                raise VersionNotFound(
                    f"no version or alias {name!r} in the registry; `mnist-registry list` shows what there is"
                )
            found = self.find(alias[0])
            if found is None:
                raise VersionNotFound(
                    f"alias {name} points at version {alias[0]}, which no longer exists; promote another version"
                )
        found.aliases = sorted(alias for alias, target in self.aliases().items() if target == found.version)
        return found

    def next_version(self) -> str:
        """One more than the highest whole-number version: 1, 2, 3..."""
        numbers = [
            int(row[0]) for row in self.session.execute("SELECT version FROM model_versions") if row[0].isdigit()
        ]
        return str(max(numbers, default=0) + 1)

    def copy_archive(self, version: ModelVersion, sink: BinaryIO) -> None:
        """Stream a version's chunks into `sink`, checking each chunk, the count, size and sha256."""
        whole = hashlib.sha256()
        size = 0
        expected = 0
        for chunk, data, digest in self.session.execute(self.select_chunks, (version.version, version.upload)):
            if chunk != expected or expected == version.chunk_count:
                break  # chunk `expected` is not there (reported below), or all are read
            if sha256(data) != digest:
                raise CorruptArchive(
                    f"version {version.version}: chunk {chunk} of {version.chunk_count} does not match its sha256 "
                    "(altered in the database); the archive was not written; publish the version again"
                )
            whole.update(data)
            size += len(data)
            sink.write(data)
            expected += 1
        if expected != version.chunk_count:
            raise MissingChunk(
                f"version {version.version}: chunk {expected} of {version.chunk_count} is missing from the database; "
                "the archive was not written; publish the version again"
            )
        if size != version.size or whole.hexdigest() != version.sha256:
            raise CorruptArchive(
                f"version {version.version}: the chunks add up to {size:,} bytes with sha256 "
                f"{short_sha256(whole.hexdigest())}, the version records {version.size:,} bytes with "
                f"{version.short_sha256}; the archive was not written"
            )

    def archive(self, name: str) -> tuple[ModelVersion, bytes]:
        """A version's archive bytes, checked."""
        version = self.get(name)
        buffer = io.BytesIO()
        self.copy_archive(version, buffer)
        return version, buffer.getvalue()

    def download(self, name: str, out: Path) -> tuple[ModelVersion, Path]:
        """Write the archive into directory `out` under its published file name, all or nothing."""
        version = self.get(name)
        out.mkdir(parents=True, exist_ok=True)
        target = out / version.archive_name
        fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{version.archive_name}.")
        try:
            with os.fdopen(fd, "wb") as handle:
                self.copy_archive(version, handle)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return version, target

    # writing

    def publish(
        self, archive: Path, metrics: dict, version: str | None = None, on_bytes: Callable[[int], None] = lambda n: None
    ) -> ModelVersion:
        """Store the archive's chunks, then the version row: until that row exists nobody sees the version."""
        check_archive(archive)
        if version is None:
            version = self.next_version()
        elif not VERSION_NAME.fullmatch(version):
            raise BadInput(
                f"--version {version!r}: use letters, digits, '.', '_' or '-' (64 at most), starting with a letter "
                f"or digit"
            )
        if self.find(version) is not None:
            raise DuplicateVersion(
                f"version {version} is already published; choose another --version (or leave it out for the next "
                f"number)"
            )
        if self.session.execute(self.select_alias, (version,)).one():
            raise BadInput(f"--version {version}: that is the name of an alias; choose another version name")

        upload = uuid.uuid4()  # these chunks belong to this attempt only, never to a version someone else publishes
        whole = hashlib.sha256()
        counted = {"size": 0, "chunks": 0}

        def chunk_writes(handle: BinaryIO):
            for index, data in enumerate(read_chunks(handle, self.chunk_size)):
                whole.update(data)
                counted["size"] += len(data)
                counted["chunks"] += 1
                yield self.insert_chunk, (version, upload, index, data, sha256(data)), len(data)

        with archive.open("rb") as handle:
            db.execute_windowed(self.session, chunk_writes(handle), WRITE_WINDOW, on_done=on_bytes)

        record = ModelVersion(
            version=version,
            created_at=datetime.now(UTC),
            archive_name=archive.name,
            size=counted["size"],
            sha256=whole.hexdigest(),
            chunk_size=self.chunk_size,
            chunk_count=counted["chunks"],
            upload=upload,
            test_accuracy=metrics.get("test_accuracy"),
            test_loss=metrics.get("test_loss"),
            epochs=metrics.get("epochs"),
            parameters=metrics.get("parameters") or {},
            data_fingerprint=metrics.get("data_fingerprint"),
            git_commit=metrics.get("git_commit"),
            torch_version=metrics.get("torch_version"),
            metrics=metrics,
        )
        values = [getattr(record, column) for column in COLUMNS]
        values[COLUMNS.index("parameters")] = json.dumps(record.parameters)
        values[COLUMNS.index("metrics")] = json.dumps(metrics)
        # IF NOT EXISTS (a lightweight transaction): of two publishes of one version, exactly one wins.
        if not self.session.execute(self.insert_version, values).was_applied:
            self.session.execute(self.delete_upload, (version, upload))
            raise DuplicateVersion(f"version {version} was published by someone else meanwhile; publish again")
        # Only now are other uploads of this version certainly orphans (a killed earlier attempt).
        for (other,) in self.session.execute(self.select_uploads, (version,)):
            if other != upload:
                self.session.execute(self.delete_upload, (version, other))
        return record

    def promote(self, name: str, alias: str) -> tuple[ModelVersion, str | None]:
        """Point `alias` at a version (given by name or by another alias); returns it and the previous target."""
        if not ALIAS_NAME.fullmatch(alias):
            raise BadInput(f"--alias {alias!r}: start with a letter, then letters, digits, '.', '_' or '-'")
        if self.find(alias) is not None:
            raise BadInput(f"--alias {alias}: a version has that name; choose another alias")
        version = self.get(name)
        previous = self.session.execute(self.select_alias, (alias,)).one()
        self.session.execute(self.insert_alias, (alias, version.version, datetime.now(UTC)))
        return version, previous[0] if previous else None

    def drop_alias(self, alias: str) -> None:
        """Remove an alias (a rollout undoing the promote of an alias that did not exist before)."""
        self.session.execute(self.delete_alias, (alias,))

    def delete(self, name: str, force: bool = False) -> list[str]:
        """Remove a version and its chunks. Refused while an alias points at it, unless `force`, which
        removes those aliases too (an alias never points at nothing). Returns the aliases removed."""
        version = self.find(name)
        if version is None:
            raise VersionNotFound(f"no version {name!r} in the registry (delete takes a version, not an alias)")
        pointing = sorted(alias for alias, target in self.aliases().items() if target == name)
        if pointing and not force:
            raise AliasInUse(
                f"version {name} is what {', '.join(pointing)} point{'s' if len(pointing) == 1 else ''} at; "
                "promote another version first, or pass --force to delete the alias too"
            )
        for alias in pointing:
            self.session.execute(self.delete_alias, (alias,))
        self.session.execute(self.delete_version, (name,))  # invisible from here on
        self.session.execute(self.delete_chunks, (name,))
        return pointing
