"""Optimizers from the spec, with parameters grouped by name so checkpoints address state by name."""

from __future__ import annotations

import torch
from torch import nn

from elastune.spec.models import AdamWSpec, SGDSpec


def named_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Trainable parameters by name, each once (tied weights appear under their first name)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def build_optimizer(model: nn.Module, spec: AdamWSpec | SGDSpec) -> torch.optim.Optimizer:
    # Weight decay applies to matrices and embeddings only, not to biases and norm gains.
    params = named_params(model)
    decay = [p for _, p in params if p.ndim >= 2]
    no_decay = [p for _, p in params if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": spec.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if isinstance(spec, AdamWSpec):
        # foreach: one fused kernel per group on CPU and GPU alike.
        return torch.optim.AdamW(groups, lr=spec.lr, betas=spec.betas, eps=spec.eps, foreach=True)
    return torch.optim.SGD(groups, lr=spec.lr, momentum=spec.momentum, nesterov=spec.nesterov, foreach=True)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
