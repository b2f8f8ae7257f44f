"""Export a universal checkpoint for other tools: one safetensors model file, a torch file, or a
torch.distributed.checkpoint folder (dcp.py).

Exports are written for others to read; Elastune itself never loads them back (its own load path
reads manifests and safetensors payloads only, never a pickle).
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import save_file

from elastune.checkpoint.checkpointer import Checkpointer
from elastune.checkpoint.format import Manifest
from elastune.errors import ElastuneError

FORMATS = ("safetensors", "torch", "dcp")


def export(ckpt: Checkpointer, manifest: Manifest, fmt: str, out: str, folder: str | None = None) -> dict[str, int]:
    """Write `out` (every byte verified as it is read); returns counts of model and optimizer tensors written."""
    if fmt not in FORMATS:
        raise ElastuneError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    tensors = ckpt.load(manifest, folder=folder)
    if fmt == "dcp":
        from elastune.checkpoint.dcp import export_dcp

        export_dcp(tensors, manifest, out)
        return {"model": sum(k.startswith("model/") for k in tensors), "optimizer": sum(k.startswith("optim/") for k in tensors)}
    model = {k[len("model/") :]: v for k, v in tensors.items() if k.startswith("model/")}
    optim = {k[len("optim/") :]: v for k, v in tensors.items() if k.startswith("optim/")}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    if fmt == "safetensors":
        # The model alone, as inference and hub tools expect; progress goes into the header metadata.
        save_file(model, out, metadata={"elastune_step": str(manifest.step), "elastune_samples_seen": str(manifest.samples_seen)})
        return {"model": len(model), "optimizer": 0}
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in optim.items():
        param, _, name = key.rpartition("/")
        state.setdefault(param, {})[name] = value
    torch.save({"model": model, "optimizer_state": state, "step": manifest.step, "samples_seen": manifest.samples_seen}, out)
    return {"model": len(model), "optimizer": len(optim)}
