"""Mixed precision: what a step computes in, and fp16's dynamic loss scale.

Parameters, their gradients and the optimizer state stay fp32 in every precision (the masters);
`bf16` and `fp16` run the forward and backward under torch.autocast, so matrix products take
the low precision and reductions (softmax, norms, the loss) stay fp32 as autocast's rules keep
them. Gradients land in the fp32 buffers, so `sum over the global batch / G` stays exact to fp32.

fp16's range is narrow: the loss is multiplied by a power-of-two scale before backward (exact:
it moves exponents only) and the summed gradient divided by it after the reduction. A reduced
buffer holding an inf or nan skips the step's update on every rank alike (each holds the same
reduced bytes) and halves the scale; `growth_interval` clean steps in a row double it. The
scale is training state: checkpoints hold it (as `amp/loss_scale`, `amp/growth_tracker`), so a
resume at any world size or a live recovery continues with it.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass

import torch

from elastune.checkpoint.format import Piece
from elastune.errors import SpecError

AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
GROWTH_FACTOR, BACKOFF_FACTOR = 2.0, 0.5
SCALE_STATE = ("amp/loss_scale", "amp/growth_tracker")


def precision_problem(precision: str, device: str, bf16_supported: bool) -> str | None:
    """Why `precision` cannot run on a `device` ("cpu" or "cuda"), or None."""
    if precision == "bf16" and device == "cuda" and not bf16_supported:
        return (
            "step.precision is bf16, but this GPU has no bfloat16 arithmetic (compute capability below 8.0); "
            "set step.precision: fp16 (with its loss scale) or fp32"
        )
    return None


def compile_problem(device: str) -> str | None:
    """Why torch.compile cannot compile for a `device` here, or None."""
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        return f"step.compile is true, but torch {torch.__version__} cannot compile on this Python; set step.compile: false"
    if device == "cpu" and shutil.which("cc") is None and shutil.which("gcc") is None:
        return (
            "step.compile is true, but no C compiler (cc or gcc) is on PATH, and torch.compile needs one for CPU kernels; "
            "install one (e.g. apt-get install gcc) or set step.compile: false"
        )
    return None


def compile_model(model: torch.nn.Module) -> torch.nn.Module:
    """torch.compile `model`, its random numbers drawn as eager mode draws them (`eager_random`)."""
    eager_random()
    return torch.compile(model)  # type: ignore[return-value]  # an OptimizedModule: a Module that compiles its forward


def compile_in_place(modules: list[torch.nn.Module]) -> None:
    """Compile each of `modules` in place (`Module.compile`: its names and identity stay), random
    numbers as eager mode's (`eager_random`). The fsdp layout compiles its blocks so, before
    sharding them: FSDP's gathers and reductions run between compiled blocks."""
    eager_random()
    for module in modules:
        module.compile()


def eager_random() -> None:
    """Inductor would otherwise generate dropout masks with its own generator: still seeded per
    micro-batch, but other masks than eager mode's, so a compiled and an uncompiled run (or a
    resume that switches) would train on different randomness. With `fallback_random` the masks
    are eager's, bit for bit, at a small cost in fusion."""
    import torch._inductor.config

    torch._inductor.config.fallback_random = True


def check_step(precision: str, compile: bool, device: str) -> None:
    """Raise SpecError (exit 2) when this machine cannot run the spec's step settings on a
    `device` of its own. The driver checks before any worker starts; each worker checks its
    own device (a driver without a GPU cannot speak for the cluster's)."""
    if device == "cuda" and not torch.cuda.is_available():
        return
    bf16 = device == "cuda" and torch.cuda.is_bf16_supported()
    problem = precision_problem(precision, device, bf16) or (compile_problem(device) if compile else None)
    if problem:
        raise SpecError(problem)


@dataclass
class LossScale:
    """fp16's dynamic loss scale (the same rule as torch.amp.GradScaler, kept as plain numbers so
    every rank holds the same and a checkpoint records it)."""

    scale: float = 65536.0
    growth_interval: int = 2000
    growth_tracker: int = 0  # clean steps since the scale last changed

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self.scale *= BACKOFF_FACTOR
            self.growth_tracker = 0
            return
        self.growth_tracker += 1
        if self.growth_tracker == self.growth_interval:
            self.scale *= GROWTH_FACTOR
            self.growth_tracker = 0

    def pieces(self) -> dict[str, Piece]:
        values = (torch.tensor(self.scale, dtype=torch.float64), torch.tensor(self.growth_tracker, dtype=torch.int64))
        return {name: Piece.whole(v) for name, v in zip(SCALE_STATE, values)}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        """Take the saved scale where a checkpoint has one (an fp32 or bf16 run's has none)."""
        if all(name in tensors for name in SCALE_STATE):
            self.scale = float(tensors[SCALE_STATE[0]].reshape(()))
            self.growth_tracker = int(tensors[SCALE_STATE[1]].reshape(()))


def unscale_and_check(buffers: list[torch.Tensor], scale: float) -> bool:
    """Divide reduced gradient buffers by the loss scale in place; True if any holds an inf or
    nan (the step must not apply). One fused pass per buffer (torch's own AMP kernel)."""
    found = torch.zeros(1, device=buffers[0].device)
    inv = torch.full((1,), 1.0 / scale, device=buffers[0].device)
    torch._amp_foreach_non_finite_check_and_unscale_(buffers, found, inv)
    return bool(found.item())
