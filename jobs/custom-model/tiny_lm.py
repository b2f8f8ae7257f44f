"""A worked example of the model contract: a factory returning an elastune Recipe.

`build(**options)` receives `model.options` from the job spec and returns a Recipe:
  build_model()               -> a fresh nn.Module (Elastune seeds torch first, so every rank builds
                                 the same parameters)
  sample_losses(model, batch) -> one loss per sample, shape [batch]; Elastune sums and divides by the
                                 global batch size, so do not average here
  dataset(data_spec)          -> optional; an object with __len__ and take(indices) -> tensor or dict
                                 of tensors. Left out here, so the job's prepared token windows are used:
                                 take() returns int64 tokens of shape [batch, data.window].
"""

import torch
import torch.nn.functional as F
from torch import nn

from elastune.recipes import Recipe


class BagOfBytes(nn.Module):
    """Predict each next byte from the mean embedding of the bytes before it (a causal bag of words)."""

    def __init__(self, context: int, width: int):
        super().__init__()
        self.embed = nn.Embedding(256, width)
        self.out = nn.Linear(width, 256)
        self.context = context

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        e = self.embed(tokens)  # [B, T, W]
        counts = torch.arange(1, tokens.shape[1] + 1, device=tokens.device).view(1, -1, 1)
        return self.out(e.cumsum(dim=1) / counts)


def sample_losses(model: nn.Module, windows: torch.Tensor) -> torch.Tensor:
    logits = model(windows[:, :-1])
    per_token = F.cross_entropy(logits.reshape(-1, 256), windows[:, 1:].reshape(-1), reduction="none")
    return per_token.view(windows.shape[0], -1).mean(dim=1)


def build(context: int = 16, width: int = 32) -> Recipe:
    return Recipe(build_model=lambda: BagOfBytes(context, width), sample_losses=sample_losses)
