"""Optimizers from the spec, with parameters grouped by name so checkpoints address state by name."""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from elastune.spec.models import AdamWSpec, SGDSpec


def named_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Trainable parameters by name, each once (tied weights appear under their first name)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def build_optimizer(model: nn.Module, spec: AdamWSpec | SGDSpec) -> torch.optim.Optimizer:
    return optimizer_for(spec, [(p, p.ndim >= 2) for _, p in named_params(model)])


def optimizer_for(spec: AdamWSpec | SGDSpec, params: list[tuple[torch.Tensor, bool]]) -> torch.optim.Optimizer:
    """The spec's optimizer over (tensor, decays) pairs.

    Weight decay applies to matrices and embeddings only, not to biases and norm gains; the caller
    says which is which, because a ZeRO-1 slice is flat whatever its parameter's shape.
    """
    groups = [
        {"params": [t for t, decays in params if decays], "weight_decay": spec.weight_decay, "decays": True},
        {"params": [t for t, decays in params if not decays], "weight_decay": 0.0, "decays": False},
    ]
    if isinstance(spec, AdamWSpec):
        # foreach: one fused kernel per group on CPU and GPU alike.
        return torch.optim.AdamW(groups, lr=spec.lr, betas=spec.betas, eps=spec.eps, foreach=True)
    return torch.optim.SGD(groups, lr=spec.lr, momentum=spec.momentum, nesterov=spec.nesterov, foreach=True)


class HasParamGroups(Protocol):
    """An optimizer as set_hyper sees it: torch's, or a layout's wrapper of one (train.zero)."""

    @property
    def param_groups(self) -> list[dict[str, Any]]: ...


def set_hyper(optimizer: HasParamGroups, lr: float, weight_decay: float) -> None:
    """This step's learning rate, and weight decay for the groups that decay."""
    for group in optimizer.param_groups:
        group["lr"] = lr
        if group["decays"]:
            group["weight_decay"] = weight_decay


def by_dtype(params: list[tuple[str, nn.Parameter]]) -> list[list[tuple[str, nn.Parameter]]]:
    """Parameters grouped by dtype, in order of first appearance (one flat buffer per group)."""
    groups: dict[torch.dtype, list[tuple[str, nn.Parameter]]] = {}
    for name, p in params:
        groups.setdefault(p.dtype, []).append((name, p))
    return list(groups.values())
