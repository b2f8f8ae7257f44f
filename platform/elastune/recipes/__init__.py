"""Models and datasets a job trains: the Recipe contract, built-in recipes, user factories.

A user model is `model: {factory: "pkg.module:function", options: {...}}` in the job spec. The
function is called with `options` as keyword arguments and returns a `Recipe`. The spec's folder
is importable, so `my_model.py` beside `job.yaml` is found as `my_model:build`.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from elastune.errors import SpecError
from elastune.spec.models import RecipeModel

Batch = torch.Tensor | dict[str, torch.Tensor]


class SampleSource(Protocol):
    """Random access to samples by index; what a recipe's `dataset` hook returns."""

    def __len__(self) -> int: ...

    def take(self, indices: np.ndarray) -> Batch: ...


@dataclass(frozen=True)
class Recipe:
    """What a model factory returns.

    build_model: a fresh model; called after `torch.manual_seed(seed)`, so every rank builds the same.
    sample_losses: (model, batch) -> per-sample losses, shape [batch size]. Elastune sums them and
        divides by the global batch size, so the gradient is exact at any world size; do not average.
    dataset: optional (DataSpec) -> SampleSource; default: the prepared token windows at data.path.
    flops_per_token: optional () -> model FLOPs of one trained token (forward and backward), for
        utilisation figures; built-in recipes give it.
    """

    build_model: Callable[[], nn.Module]
    sample_losses: Callable[[nn.Module, Batch], torch.Tensor]
    dataset: Callable[[Any], SampleSource] | None = None
    flops_per_token: Callable[[], int] | None = None


def load_recipe(model_spec, spec_dir: str | None = None, data_path: str | None = None) -> Recipe:
    """The recipe of `model_spec`: a built-in one (`gpt` reads its vocabulary from the dataset at
    `data_path` when it builds a model), or what the user's factory returns."""
    if isinstance(model_spec, RecipeModel):
        from elastune.recipes.gpt import recipe

        if model_spec.recipe == "byte_gpt":
            return recipe(model_spec.options)
        if data_path is None:
            raise SpecError("model.recipe gpt takes its vocabulary from the dataset: give data.path")
        return recipe(model_spec.options, lambda: dataset_vocabulary(data_path))
    module_name, _, attr = model_spec.factory.partition(":")
    if spec_dir and spec_dir not in sys.path:
        sys.path.insert(0, spec_dir)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SpecError(
            f"model.factory {model_spec.factory!r}: cannot import module {module_name!r} ({exc}); "
            f"put {module_name.replace('.', '/')}.py beside the job spec or install its package"
        ) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise SpecError(f"model.factory {model_spec.factory!r}: module {module_name!r} has no function {attr!r}")
    try:
        recipe = fn(**model_spec.options)
    except TypeError as exc:
        raise SpecError(f"model.factory {model_spec.factory!r} rejected model.options {model_spec.options}: {exc}") from None
    if not isinstance(recipe, Recipe):
        raise SpecError(
            f"model.factory {model_spec.factory!r} returned {type(recipe).__name__}, not an elastune.recipes.Recipe; "
            f"return Recipe(build_model=..., sample_losses=..., dataset=...)"
        )
    return recipe


def dataset_vocabulary(data_path: str) -> int:
    from elastune.data.dataset import read_manifest

    return read_manifest(data_path).vocab_size


def to_device(batch: Batch, device: torch.device) -> Batch:
    if isinstance(batch, dict):
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    return batch.to(device, non_blocking=True)
