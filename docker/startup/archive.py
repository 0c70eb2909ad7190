"""The model archive TorchServe serves: from the registry (MODEL_SOURCE=registry) or built into the image
(MODEL_SOURCE=image), put into the model store under one name, and checked before TorchServe starts."""

from __future__ import annotations

import shutil
from pathlib import Path

from handler.server import MODEL_NAME
from registry.model_archive import (
    MANIFEST,
    FailsCRC,
    ManifestNotJSON,
    ModelFileMissing,
    NoManifest,
    NotAZip,
    checked_manifest,
)
from startup.report import StartupError, say
from startup.settings import Settings

ARCHIVE_FILE = f"{MODEL_NAME}.mar"  # the name in the model store, whatever the registry called it


def fetch_archive(settings: Settings) -> tuple[Path, str, str | None]:
    """The archive in the model store, where it came from (for the log), and its registry version (None from the
    image, whose archive's version is its own)."""
    from_registry = settings.source == "registry"
    say(f"getting model {f'{settings.version} from the registry' if from_registry else f'from {settings.archive}'}")
    return fetch_from_registry(settings) if from_registry else fetch_from_image(settings)


def fetch_from_registry(settings: Settings) -> tuple[Path, str, str]:
    """Download MODEL_VERSION into the model store; the registry checks every chunk and the whole sha256."""
    # Imported here: the database driver is needed only with MODEL_SOURCE=registry.
    from registry import db
    from registry.settings import SettingsError, cassandra_settings
    from registry.store import Registry, RegistryError

    try:
        connection = cassandra_settings()
    except SettingsError as error:
        raise StartupError(f"registry settings: {error}") from None
    try:
        with db.connect(connection, create_schema=False) as session:  # a read-only role is enough to serve
            version, path = Registry(session).download(settings.version, settings.model_store)
    except db.DatabaseError as error:
        raise StartupError(f"cannot reach the model registry: {error}") from None
    except RegistryError as error:
        raise StartupError(
            f"cannot get model {settings.version!r} from the registry ({connection.where()}): {error}"
        ) from None
    target = settings.model_store / ARCHIVE_FILE
    if path != target:
        path.replace(target)
    named = f" ({settings.version})" if settings.version != version.version else ""
    return target, f"registry version {version.version}{named}, sha256 {version.short_sha256} checked", version.version


def fetch_from_image(settings: Settings) -> tuple[Path, str, None]:
    """Copy the archive built into the image into the (writable) model store."""
    if not settings.archive.is_file():
        raise StartupError(
            f"MODEL_SOURCE=image but {settings.archive} does not exist: this image was built without a model "
            "(build the with-model target: make image-with-model), or set MODEL_SOURCE=registry"
        )
    target = settings.model_store / ARCHIVE_FILE
    staging = target.with_name(f".{ARCHIVE_FILE}.copy")
    shutil.copyfile(settings.archive, staging)
    staging.replace(target)
    return target, f"built into the image ({settings.archive})", None


def check_archive(path: Path) -> str:
    """The archive's model version, once registry.model_archive's rule passes; StartupError saying what to do."""
    damaged, rebuild = f"model archive {path} is damaged", "publish or build it again"
    try:
        manifest = checked_manifest(path)
    except NotAZip as error:
        raise StartupError(f"{damaged}, not a readable zip ({error}); {rebuild}") from None
    except FailsCRC as member:
        raise StartupError(f"{damaged}: {member} fails its CRC check; {rebuild}") from None
    except NoManifest:
        raise StartupError(
            f"model archive {path} has no {MANIFEST}; build it with torch-model-archiver (make archive)"
        ) from None
    except ManifestNotJSON as error:
        raise StartupError(
            f"model archive {path}: its {MANIFEST} is not the JSON object torch-model-archiver writes ({error})"
        ) from None
    except ModelFileMissing as model_file:
        raise StartupError(
            f"model archive {path} lacks {model_file}, the model file its manifest names; build it again (make archive)"
        ) from None
    return str(manifest.get("model", {}).get("modelVersion", "?"))
