"""Which checkpoints to keep: a pure decision, applied by Checkpointer.prune.

Kept: the newest `keep_last`; the best `keep_best` by `best_metric` (lower is better unless
`best_mode` is "max"); every pinned one; every checkpoint whose payloads a kept checkpoint
references (clones point at their source's files, so deleting the source would break them); and
every checkpoint a live clone in another root references.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    metrics: dict[str, float] = field(default_factory=dict)
    pinned: bool = False
    references: frozenset[int] = frozenset()  # steps whose payload files this checkpoint reads
    referenced_elsewhere: str | None = None  # a live checkpoint in another root reads our payloads


@dataclass(frozen=True)
class RetentionPolicy:
    keep_last: int = 3
    keep_best: int = 0
    best_metric: str | None = None
    best_mode: Literal["min", "max"] = "min"


@dataclass(frozen=True)
class RetentionDecision:
    keep: tuple[int, ...]
    delete: tuple[int, ...]
    reasons: dict[int, str]  # why each kept step stays


def decide_retention(checkpoints: list[CheckpointInfo], policy: RetentionPolicy) -> RetentionDecision:
    by_step = {c.step: c for c in checkpoints}
    reasons: dict[int, str] = {}
    for step in sorted(by_step)[-policy.keep_last :] if policy.keep_last > 0 else []:
        reasons.setdefault(step, f"one of the newest {policy.keep_last}")
    metric = policy.best_metric
    if policy.keep_best and metric:
        scored = [c for c in checkpoints if metric in c.metrics]
        sign = 1 if policy.best_mode == "min" else -1
        scored.sort(key=lambda c: (sign * c.metrics[metric], -c.step))
        for c in scored[: policy.keep_best]:
            reasons.setdefault(c.step, f"one of the best {policy.keep_best} by {metric}")
    for c in checkpoints:
        if c.pinned:
            reasons.setdefault(c.step, "pinned")
        if c.referenced_elsewhere:
            reasons.setdefault(c.step, f"referenced by {c.referenced_elsewhere}")
    pending = list(reasons)
    while pending:  # keep what kept checkpoints reference, transitively
        step = pending.pop()
        for ref in by_step[step].references if step in by_step else ():
            if ref in by_step and ref not in reasons:
                reasons[ref] = f"referenced by step {step}"
                pending.append(ref)
    keep = tuple(sorted(reasons))
    return RetentionDecision(keep=keep, delete=tuple(s for s in sorted(by_step) if s not in reasons), reasons=reasons)
