"""An export folder's ``manifest.json``: written last by ``recsys export`` (:func:`seal`), checked by every
load (:func:`read_manifest`, :func:`verify_export`) as checkpoints are (``recsys.integrity``).

What is checked, and when:

- the manifest itself, always: valid JSON, every field the scorer reads present with its type (a missing
  key or a wrong type names the field);
- what decides a score (``features``, ``preprocessing``, ``negative_sampling_rate``, ``model``), always: its
  sha256 as sealed (``scoring_sha256``), so a hand edit (schema columns swapped, dense transform changed)
  fails instead of scoring every row differently;
- every file the export wrote (model.pt, vocabulary lookups, config.yaml, model.onnx), always by size and
  by sha256 with ``verify=True``, or by default when the files total at most ``VERIFY_BELOW_BYTES`` (hashing
  that much takes well under a second, about what loading the model takes anyway).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import fsspec

from recsys import integrity
from recsys.config import ConfigError
from recsys.data.schema import schema_from_dict
from recsys.serving.transform import ServingInputError

MANIFEST = "manifest.json"
FORMAT = "recsys-export/2"  # /2: files with sizes and sha256, scoring_sha256
VERIFY_BELOW_BYTES = 256 << 20
# Sections of the manifest a score depends on (sealed by scoring_sha256).
SCORING_SECTIONS = ("features", "preprocessing", "negative_sampling_rate", "model")

# Field (dotted path) -> the types it may hold. Only what loading and scoring read; the rest (versions,
# metrics, reports) is information and may change between recsys versions.
FIELDS: dict[str, tuple[type, ...]] = {
    "format": (str,),
    "features": (dict,),
    "features.dense": (list,),
    "features.sparse": (list,),
    "preprocessing": (dict,),
    "preprocessing.schema": (dict,),
    "preprocessing.vocab_dir": (str, type(None)),
    "preprocessing.ids": (dict,),
    "preprocessing.ids.table_rows": (dict,),
    "preprocessing.ids.oov_rows": (list,),
    "negative_sampling_rate": (int, float),
    "model": (dict,),
    "model.file": (str,),
    "model.bytes": (int,),
    "versions": (dict,),
    "versions.polars": (str,),
    "files": (dict,),
    "scoring_sha256": (str,),
}
_SHA256 = re.compile(r"[0-9a-f]{64}")


class DamagedExport(ServingInputError):
    """An export folder whose manifest or files differ from what ``recsys export`` wrote."""


def scoring_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's sections a score depends on (``SCORING_SECTIONS``), canonical JSON."""
    sections = {key: manifest.get(key) for key in SCORING_SECTIONS}
    return hashlib.sha256(json.dumps(sections, sort_keys=True).encode()).hexdigest()


def seal(folder: Path, manifest: dict[str, Any]) -> None:
    """Records every file of ``folder`` (size, sha256) and the scoring digest in ``manifest``, then writes it
    as ``folder/manifest.json`` (the folder is the export's temporary folder: nothing else writes it)."""
    manifest["files"] = integrity.file_records(fsspec.filesystem("file"), str(folder.resolve()), skip=MANIFEST)
    manifest["scoring_sha256"] = scoring_digest(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))


def _field(manifest: dict, dotted: str) -> Any:
    value: Any = manifest
    for key in dotted.split("."):
        value = value[key]
    return value


def _check_fields(manifest: Any, path: Path) -> None:
    if not isinstance(manifest, dict):
        raise DamagedExport(f"{path}: holds a JSON {type(manifest).__name__}, not an object")
    if manifest.get("format") != FORMAT:
        raise DamagedExport(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r} (an export of "
                            "another recsys version, or not an export): re-run `recsys export`")
    for dotted, types in FIELDS.items():
        try:
            value = _field(manifest, dotted)
        except (KeyError, TypeError):
            raise DamagedExport(f"{path}: field {dotted!r} is missing") from None
        if not isinstance(value, types) or isinstance(value, bool):
            wanted = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise DamagedExport(f"{path}: field {dotted!r} is a {type(value).__name__}, expected {wanted}")
    for dotted in ("features.dense", "features.sparse"):
        if not all(isinstance(name, str) for name in _field(manifest, dotted)):
            raise DamagedExport(f"{path}: field {dotted!r} must list feature names (strings)")
    for name, record in manifest["files"].items():
        parts = Path(name).parts
        if not parts or Path(name).is_absolute() or ".." in parts:
            raise DamagedExport(f"{path}: field 'files' names {name!r}, which is not a path inside the export")
        if not (isinstance(record, dict) and type(record.get("bytes")) is int
                and isinstance(record.get("sha256"), str) and _SHA256.fullmatch(record["sha256"])):  # fmt: skip
            raise DamagedExport(f"{path}: field 'files.{name}' must be {{\"bytes\": int, \"sha256\": 64 hex digits}}")
    if manifest["model"]["file"] not in manifest["files"]:
        raise DamagedExport(f"{path}: field 'model.file' names {manifest['model']['file']!r}, which 'files' does not list")


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of an export folder, its fields and scoring digest checked; DamagedExport naming the
    field otherwise (ServingInputError when there is no manifest at all)."""
    path = folder / MANIFEST
    if not path.is_file():
        raise ServingInputError(f"{folder}: no {MANIFEST}; not a `recsys export` folder")
    try:
        manifest = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise DamagedExport(f"{path}: not valid JSON ({e})") from None
    _check_fields(manifest, path)
    if scoring_digest(manifest) != manifest["scoring_sha256"]:
        raise DamagedExport(f"{path}: the features, preprocessing, negative_sampling_rate or model fields differ "
                            "from what `recsys export` wrote (scoring_sha256): edited by hand? re-export instead")
    try:
        schema_from_dict(manifest["preprocessing"]["schema"])
    except ConfigError as e:
        raise DamagedExport(f"{path}: field 'preprocessing.schema': {e}") from None
    return manifest


def verify_export(folder: Path, manifest: dict[str, Any], verify: bool | None = None) -> bool:
    """Checks every file the manifest lists: sizes always; sha256 with ``verify``, or (None) when the files
    total at most ``VERIFY_BELOW_BYTES``. Returns whether checksums were compared; DamagedExport otherwise."""
    files = {name: (record["bytes"], record["sha256"]) for name, record in manifest["files"].items()}
    checksums = verify if verify is not None else sum(size for size, _ in files.values()) <= VERIFY_BELOW_BYTES
    integrity.check_files(fsspec.filesystem("file"), str(folder.resolve()), files, checksums, str(folder),
                          str(folder / MANIFEST), DamagedExport)  # fmt: skip
    return checksums
