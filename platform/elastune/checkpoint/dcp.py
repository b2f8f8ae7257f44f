"""Interop with torch.distributed.checkpoint (DCP) folders, both ways.

Export writes `{"model": {fqn: tensor}, "optimizer": {"state": {fqn: {key: tensor}}},
"progress": {"step", "samples_seen"}}`, the layout torch's `get_state_dict` uses, tensors only
(no pickled Python objects: param_groups are the spec's business, not the checkpoint's).

Import reads a DCP folder into a universal checkpoint. DCP's own `.metadata` is a pickle, and
Elastune never runs an unrestricted unpickler: the metadata is read by an unpickler that only
builds DCP's metadata dataclasses, torch dtypes and sizes, and refuses anything else. Tensor data
is read by DCP's reader, which loads each tensor with torch's `weights_only` unpickler. Entries
DCP stored as pickled bytes (non-tensor values) are skipped and counted.

Key mapping on import: `model.<fqn>` -> `model/<fqn>`; `optimizer.state.<fqn>.<key>` ->
`optim/<fqn>/<key>`; `progress.step` / `progress.samples_seen` -> the manifest; any other tensor
key (a bare model state dict) -> `model/<key>`.
"""

from __future__ import annotations

import io
import os
import pickle
import warnings
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from elastune.checkpoint.checkpointer import Checkpointer
from elastune.checkpoint.format import MANIFEST, STORED_DTYPES, Manifest, step_dir
from elastune.errors import ElastuneError

_SAFE_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise ElastuneError(f"DCP metadata refers to {module}.{name}, which is not part of DCP's metadata; refusing to load it")


class _SafeReader(dcp.FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = os.path.join(str(self.path), ".metadata")
        try:
            with open(path, "rb") as f:
                metadata = _MetadataUnpickler(io.BytesIO(f.read())).load()
        except FileNotFoundError:
            raise ElastuneError(f"{self.path} is not a DCP checkpoint (no .metadata)") from None
        except ElastuneError:
            raise
        except Exception as exc:
            raise ElastuneError(f"{path}: unreadable DCP metadata ({type(exc).__name__}: {str(exc)[:200]})") from None
        if not isinstance(metadata, Metadata):
            raise ElastuneError(f"{path}: holds a {type(metadata).__name__}, not DCP metadata")
        _check_storage(metadata, str(self.path))
        metadata.storage_meta = metadata.storage_meta or dcp.metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _check_storage(metadata: Metadata, folder: str) -> None:
    """Every tensor file DCP's metadata names is a plain file inside the DCP folder itself."""
    if not isinstance(metadata.state_dict_metadata, dict) or not isinstance(metadata.storage_data or {}, dict):
        raise ElastuneError(f"{folder}/.metadata: state_dict_metadata and storage_data must be mappings")
    real = os.path.realpath(folder)
    for info in (metadata.storage_data or {}).values():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
            raise ElastuneError(
                f"{folder}/.metadata names the tensor file {str(name)[:120]!r}, which is not a file name in the DCP "
                f"folder; refusing to read outside it"
            )
        if os.path.dirname(os.path.realpath(os.path.join(folder, name))) != real:
            raise ElastuneError(f"{folder}/{name} leads out of the DCP folder (a symlink); refusing to read it")


def export_dcp(tensors: dict[str, torch.Tensor], manifest: Manifest, out: str) -> None:
    state: dict[str, Any] = {
        "model": {},
        "optimizer": {"state": {}},
        "progress": {"step": torch.tensor(manifest.step), "samples_seen": torch.tensor(manifest.samples_seen)},
    }
    for name, t in tensors.items():
        kind, _, rest = name.partition("/")
        if kind == "model":
            state["model"][rest] = t
        else:
            param, _, key = rest.rpartition("/")
            state["optimizer"]["state"].setdefault(param, {})[key] = t
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, checkpoint_id=out, no_dist=True)


def import_dcp(src: str, out: Checkpointer, spec_hash: str = "imported") -> tuple[Manifest, int]:
    """A universal checkpoint in `out` from the DCP folder `src`; returns it and the number of
    non-tensor entries skipped. Anything malformed in `src` is an ElastuneError (exit 2)."""
    try:
        flat, skipped = _read_dcp(src)
    except ElastuneError:
        raise
    except Exception as exc:
        raise ElastuneError(f"{src}: not a DCP checkpoint Elastune can read ({type(exc).__name__}: {str(exc)[:300]})") from None
    progress = {}
    for k in ("step", "samples_seen"):
        value = flat.pop(f"progress.{k}", None)
        if value is not None and (value.numel() != 1 or value.is_floating_point() or int(value) < 0):
            raise ElastuneError(
                f"{src}: progress.{k} must be one non-negative integer, not a tensor of shape {list(value.shape)}"
            )
        progress[k] = 0 if value is None else int(value)
    tensors = {}
    for key, t in flat.items():
        if key.startswith("model."):
            tensors[f"model/{key[len('model.') :]}"] = t
        elif key.startswith("optimizer.state."):
            param, _, state_key = key[len("optimizer.state.") :].rpartition(".")
            tensors[f"optim/{param}/{state_key}"] = t
        else:
            tensors[f"model/{key}"] = t
    if not tensors:
        raise ElastuneError(f"{src}: the DCP checkpoint holds no tensors")
    if out.storage.exists(f"{step_dir(progress['step'])}/{MANIFEST}"):
        raise ElastuneError(f"{out.uri} already holds a checkpoint of step {progress['step']}; import into another root")
    manifest = Manifest(
        progress["step"],
        progress["samples_seen"],
        spec_hash,
        {"kind": "replicated"},
        {},
        meta={"imported_from": {"format": "dcp", "path": os.path.abspath(src)}},
    )
    out.save(manifest, tensors)
    return manifest, skipped


def _read_dcp(src: str) -> tuple[dict[str, torch.Tensor], int]:
    reader = _SafeReader(src)
    metadata = reader.read_metadata()
    flat: dict[str, torch.Tensor] = {}
    skipped = 0
    for key, md in metadata.state_dict_metadata.items():
        if isinstance(md, TensorStorageMetadata):
            if md.properties.dtype not in STORED_DTYPES:
                raise ElastuneError(
                    f"{src}: tensor {key!r} has dtype {md.properties.dtype}, which the universal format does not hold"
                )
            flat[key] = torch.empty(md.size, dtype=md.properties.dtype)
        else:
            skipped += 1
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(flat, storage_reader=_SafeReader(src), no_dist=True)
    return flat, skipped
