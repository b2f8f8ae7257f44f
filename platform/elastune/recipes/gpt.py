"""The built-in GPT recipes: pre-norm blocks, tied embeddings, dropout.

`byte_gpt` reads byte tokens (vocabulary 256); `gpt` takes its vocabulary from the prepared
dataset (a BPE's, docs/data.md) and offers presets up to GPT-2 small (`gpt2-124m`: 12 layers,
768 wide, 12 heads, context 1024). The architecture is the same: so are a checkpoint's names.

With `activation_checkpointing`, backward recomputes each block from its input instead of keeping
its activations (torch.utils.checkpoint, non-reentrant: the recomputation replays the block's
dropout masks from the saved RNG state, so gradients are the same bits as without it).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from elastune.recipes import Batch, Recipe
from elastune.spec.models import ByteGPTOptions

VOCAB = 256


class Block(nn.Module):
    def __init__(self, o: ByteGPTOptions):
        super().__init__()
        self.num_heads = o.num_heads
        self.dropout = o.dropout
        self.ln1 = nn.LayerNorm(o.width)
        # No bias on q/k/v: a key bias gets an exactly-zero gradient (softmax ignores a shift shared
        # by all keys), and Adam turns the rounding noise in that zero into full-size updates.
        self.qkv = nn.Linear(o.width, 3 * o.width, bias=False)
        self.proj = nn.Linear(o.width, o.width)
        self.ln2 = nn.LayerNorm(o.width)
        self.mlp = nn.Sequential(nn.Linear(o.width, 4 * o.width), nn.GELU(), nn.Linear(4 * o.width, o.width))
        self.drop = nn.Dropout(o.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.num_heads, c // self.num_heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(b, t, c)))
        return x + self.drop(self.mlp(self.ln2(x)))


class GPT(nn.Module):
    def __init__(self, o: ByteGPTOptions, vocab: int = VOCAB):
        super().__init__()
        self.context = o.context
        self.activation_checkpointing = o.activation_checkpointing
        self.tok = nn.Embedding(vocab, o.width)
        self.pos = nn.Embedding(o.context, o.width)
        self.drop = nn.Dropout(o.dropout)
        self.blocks = nn.ModuleList(Block(o) for _ in range(o.num_layers))
        self.ln = nn.LayerNorm(o.width)
        self.head = nn.Linear(o.width, vocab, bias=False)
        self.head.weight = self.tok.weight  # tied
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith(("proj.weight", "mlp.2.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * o.num_layers))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        x = self.drop(self.tok(tokens) + self.pos(torch.arange(t, device=tokens.device)))
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.activation_checkpointing and self.training else block(x)
        return self.head(self.ln(x))


def sample_losses(model: nn.Module, windows: Batch) -> torch.Tensor:
    """Mean next-token cross-entropy of each window: shape [batch]."""
    assert isinstance(windows, torch.Tensor)  # its dataset (the prepared token windows) yields one tensor
    inputs, targets = windows[:, :-1], windows[:, 1:]
    logits = model(inputs)
    per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return per_token.view(targets.shape).mean(dim=1)


def parameters(o: ByteGPTOptions, vocab: int) -> int:
    """Trainable parameters of a GPT (closed form; the tied head counts once)."""
    w = o.width
    block = 2 * 2 * w + 3 * w * w + (w * w + w) + (4 * w * w + 4 * w) + (4 * w * w + w)  # 2 norms, qkv, proj, mlp
    return vocab * w + o.context * w + o.num_layers * block + 2 * w


def flops_per_token(o: ByteGPTOptions, vocab: int) -> int:
    """Model FLOPs of one trained token (forward and backward): 6 per parameter, and attention's
    12 * layers * width * context (the PaLM appendix's accounting, used for utilisation figures)."""
    return 6 * parameters(o, vocab) + 12 * o.num_layers * o.width * o.context


def recipe(options: ByteGPTOptions, vocab: Callable[[], int] = lambda: VOCAB) -> Recipe:
    """`vocab` is asked when a model is built: a `gpt` recipe's comes from its dataset, which a run
    may prepare after it loaded the recipe."""
    return Recipe(
        build_model=lambda: GPT(options, vocab()),
        sample_losses=sample_losses,
        flops_per_token=lambda: flops_per_token(options, vocab()),
    )
