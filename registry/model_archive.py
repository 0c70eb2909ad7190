"""What a TorchServe model archive (.mar) must hold: the registry checks it before publishing, the serving
container before starting TorchServe, with the same rule. Standard library only, so the entrypoint and the
handler's launcher can import it without torch or the database driver."""

from __future__ import annotations

import json
import zipfile
import zlib
from pathlib import Path

MANIFEST = "MAR-INF/MANIFEST.json"


class BadArchive(Exception):
    """The archive is unusable; the subclass says how, so each caller can say what to do about it."""


class NotAZip(BadArchive):
    """Not a readable zip (truncated, or not an archive at all); the message is the zip reader's."""


class FailsCRC(BadArchive):
    """A member's bytes were altered; the message is the member's name."""


class NoManifest(BadArchive):
    pass


class ManifestNotJSON(BadArchive):
    """The manifest is not the JSON object torch-model-archiver writes; the message is the parser's."""


class ModelFileMissing(BadArchive):
    """The manifest's serializedFile is not in the archive; the message is its name."""


def manifest_of(archive: zipfile.ZipFile) -> dict:
    return json.loads(archive.read(MANIFEST))


def checked_manifest(path: Path, require_model_file: bool = True) -> dict:
    """The manifest of a usable .mar: a zip whose every member passes its CRC check, with a manifest that names a
    model file that is there. TorchServe itself would start without a model it cannot load.
    require_model_file=False takes an archive whose model file is missing: the registry stores it, and whatever
    reads the model out of it (the serving container, predict-table) refuses it with its own message."""
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
            if damaged:
                raise FailsCRC(damaged)
            names = set(archive.namelist())
            if MANIFEST not in names:
                raise NoManifest(MANIFEST)
            try:
                manifest = manifest_of(archive)
                serialized = manifest.get("model", {}).get("serializedFile")
            except (ValueError, AttributeError) as error:
                raise ManifestNotJSON(str(error)) from None
            if require_model_file and serialized and serialized not in names:
                raise ModelFileMissing(serialized)
            return manifest
    except (zipfile.BadZipFile, EOFError, zlib.error) as error:
        raise NotAZip(str(error)) from None
