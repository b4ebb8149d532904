"""Reading a DCP checkpoint's ``.metadata`` safely, and comparing the shapes it records with a model's.

DCP's ``.metadata`` is a pickle that torch reads with ``pickle.load``; ``reader`` returns DCP's readers with
an allow-list unpickler instead. ``check_shapes`` names the parameters whose saved shape differs from the
model's before DCP's own "Size mismatch" traceback (a run resumed, evaluated or exported with other model
settings).
"""

from __future__ import annotations

import pickle
from typing import Any

import fsspec
import torch
import torch.distributed.checkpoint as dcp
from fsspec.implementations.local import LocalFileSystem
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.storage import StorageReader

from recsys.config import UserError


class CheckpointMismatch(UserError):
    """A checkpoint that cannot continue this run as configured."""


class CheckpointError(UserError):
    """A checkpoint that is missing, damaged, or not a checkpoint at all."""


# DCP's .metadata is a pickle, and torch unpickles it with pickle.load: a crafted file in a run_dir (which may
# be a bucket) would run code on `recsys train/eval/export`. Only the classes DCP's metadata is made of, and
# the torch values they hold, may be loaded; anything else is refused before it is called.
_DCP = "torch.distributed.checkpoint."
_METADATA_GLOBALS = {
    *((_DCP + "metadata", name) for name in (
        "Metadata", "MetadataIndex", "ChunkStorageMetadata", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "StorageMeta", "_MEM_FORMAT_ENCODING",
    )),
    (_DCP + "filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # maps a layout's name to torch's layout object
    ("pathlib", "PosixPath"),
    ("collections", "OrderedDict"),
}  # fmt: skip


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if not dtype and (module, name) not in _METADATA_GLOBALS:
            raise pickle.UnpicklingError(f"it references {module}.{name}, which DCP checkpoint metadata never holds")
        return super().find_class(module, name)


def _load_metadata(fh: Any, where: str) -> Metadata:
    """Unpickles a DCP ``.metadata`` stream with ``_MetadataUnpickler``; CheckpointError naming ``where``."""
    try:
        metadata = _MetadataUnpickler(fh).load()
    except Exception as e:  # a damaged pickle fails in many ways (EOFError, UnpicklingError, ValueError, ...)
        raise CheckpointError(f"{where}: refused: not valid DCP checkpoint metadata ({e})") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{where}: refused: holds a {type(metadata).__name__}, not DCP checkpoint metadata")
    return metadata


class _SafeMetadata:
    """Mixin for DCP's readers: ``read_metadata`` through ``_load_metadata`` instead of ``pickle.load``."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))  # type: ignore[attr-defined]
        try:
            with self.fs.create_stream(path, "rb") as fh:  # type: ignore[attr-defined]
                metadata = _load_metadata(fh, str(path))
        except FileNotFoundError:
            raise CheckpointError(f"{path} is missing: not a complete checkpoint") from None
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id  # type: ignore[attr-defined]
        return metadata


class _SafeFileSystemReader(_SafeMetadata, dcp.FileSystemReader):
    pass


class _SafeFsspecReader(_SafeMetadata, FsspecReader):
    pass


def reader(path: str) -> StorageReader:
    """DCP's reader for a local path or fsspec URL, reading ``.metadata`` through the allow-list."""
    fs, local = fsspec.core.url_to_fs(path)
    return _SafeFileSystemReader(local) if isinstance(fs, LocalFileSystem) else _SafeFsspecReader(path)


def check_shapes(path: str, shapes: dict[str, torch.Size], prefix: str = "model.") -> None:
    """CheckpointMismatch naming what differs when the tensors saved under ``prefix`` are not ``shapes``
    ({name: global shape} of the model to load into; a sharded table's whole shape)."""
    saved = {key[len(prefix) :]: meta.size for key, meta in reader(path).read_metadata().state_dict_metadata.items()
             if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)}
    differ = [f"{name} {list(saved[name])} saved vs {list(shape)} now" for name, shape in shapes.items()
              if name in saved and tuple(saved[name]) != tuple(shape)]
    differ += [f"{name} only in this config" for name in shapes if name not in saved]
    differ += [f"{name} only in the checkpoint" for name in saved if name not in shapes]
    if differ:
        shown = "; ".join(differ[:4]) + (f"; and {len(differ) - 4} more" if len(differ) > 4 else "")
        raise CheckpointMismatch(
            f"{path} holds a model of another shape than this config builds ({len(differ)} parameter(s) differ: "
            f"{shown}): use the model settings it was trained with (its run_dir's config.yaml) or a new "
            "training.run_dir"
        )
