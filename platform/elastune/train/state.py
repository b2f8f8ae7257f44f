"""Training state as named tensors: what a checkpoint holds and how it goes back in.

Names are universal (independent of world size and parameter order):
  model/<parameter or buffer name>
  optim/<parameter name>/<state key>      e.g. optim/blocks.0.qkv.weight/exp_avg
Progress (step, samples_seen) lives in the manifest. Randomness has no state to save: every
micro-batch reseeds from (seed, step, micro-batch index).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from elastune.errors import CheckpointError
from elastune.train.optim import named_params


@dataclass(frozen=True)
class Progress:
    step: int = 0
    samples_seen: int = 0

    def advance(self, global_batch_size: int) -> "Progress":
        return Progress(self.step + 1, self.samples_seen + global_batch_size)


def state_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    aliases = tied_aliases(model)
    out = {f"model/{n}": t for n, t in model.state_dict().items() if n not in aliases}
    for name, p in named_params(model):
        for key, value in optimizer.state.get(p, {}).items():
            if isinstance(value, torch.Tensor):
                out[f"optim/{name}/{key}"] = value
    return out


def tied_aliases(model: nn.Module) -> set[str]:
    """state_dict keys that alias a parameter saved under another name (tied weights)."""
    every = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    return every - {n for n, _ in model.named_parameters()}


def load_state(model: nn.Module, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], where: str) -> None:
    device = next(model.parameters()).device
    model_part = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    own = set(model.state_dict()) - tied_aliases(model)
    if set(model_part) != own:
        missing, extra = sorted(own - set(model_part)), sorted(set(model_part) - own)
        raise CheckpointError(
            f"{where} was saved from a different model (missing {missing[:3]}, unexpected {extra[:3]}); "
            f"point checkpoint.path elsewhere or run with --fresh"
        )
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            if name in model_part:
                if t.shape != model_part[name].shape:
                    raise CheckpointError(
                        f"{where}: {name} has shape {list(model_part[name].shape)} but the model's is {list(t.shape)}; "
                        f"the model changed since the checkpoint; run with --fresh or restore the model options"
                    )
                t.copy_(model_part[name])
    for name, p in named_params(model):
        prefix = f"optim/{name}/"
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if state:
            # Optimizer step counters stay on CPU (torch keeps `step` there unless capturable).
            optimizer.state[p] = {k: (v if k == "step" else v.to(device)) for k, v in state.items()}
