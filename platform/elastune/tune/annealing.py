"""The annealing loss law, as pure functions: predict a schedule's loss curve from a run's past.

Tissue et al. (2024), "Scaling law with learning rate annealing": after s steps with learning
rates eta_1..eta_s,

    L(s) = L0 + A * S1(s)^(-alpha) - C * S2(s)
    S1(s) = sum_{i<=s} eta_i                                   (forward area: how far training went)
    S2(s) = sum_{i<=s} m_i,  m_i = lam * m_{i-1} + (eta_{i-1} - eta_i)   (annealing area, momentum lam)

Fitted to the members' curves so far (each member's lrs and losses along its lineage), the law
predicts each member's loss at the end of the budget under the lrs its schedule will give from
here on. That ranks a
member about to anneal fairly against one that already has (`tune.rank_by:
predicted_final_loss`). The fit: for each alpha on a grid, (L0, A, C) by linear least squares;
the alpha with the least squared error wins. Lrs are in units of the job's peak (any scale works:
A and C absorb it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ALPHAS = np.linspace(0.05, 1.5, 59)
MOMENTUM = 0.999  # lam: how long a drop in lr keeps lowering the loss (the paper's value)


@dataclass(frozen=True)
class AnnealingLaw:
    l0: float
    a: float
    alpha: float
    c: float
    skip: int = 0  # warmup steps: their rises in lr are no annealing (or the reverse of it)

    def predict(self, lrs: np.ndarray | list[float]) -> np.ndarray:
        """Loss after each step of a run with these per-step lrs (from the start)."""
        s1, s2 = areas(np.asarray(lrs, dtype=float), skip=self.skip)
        losses: np.ndarray = self.l0 + self.a * np.power(np.maximum(s1, 1e-12), -self.alpha) - self.c * s2
        return losses


def areas(lrs: np.ndarray, momentum: float = MOMENTUM, skip: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """S1 and S2 after each step; lr changes within the first `skip` steps (warmup) add nothing
    to S2 (a warmup's rise would otherwise count as lasting negative annealing)."""
    s1 = np.cumsum(lrs)
    drops = np.diff(lrs, prepend=lrs[:1]) * -1.0  # eta_{i-1} - eta_i (0 at the first step)
    drops[: skip + 1] = 0.0
    m, s2 = 0.0, np.empty_like(lrs)
    for i, drop in enumerate(drops):
        m = momentum * m + drop
        s2[i] = (s2[i - 1] if i else 0.0) + m
    return s1, s2


def fit(curves: list[tuple[list[float], list[float]]], skip: int = 0) -> AnnealingLaw:
    """One law through several runs' (lrs, losses), each loss the one measured after its step's
    lr; the first `skip` steps of each (warmup, where the law does not hold) carry no weight.
    The law's constants belong to the task, not the schedule, so members fit it together: one
    that has annealed shows how much annealing gives to one that has not yet."""
    columns, targets = [], []
    for lrs, losses in curves:
        lr, y = np.asarray(lrs, dtype=float), np.asarray(losses, dtype=float)
        s1, s2 = areas(lr, skip=skip)
        keep = (np.arange(len(y)) >= skip) & np.isfinite(y) & (s1 > 0)
        columns.append((s1[keep], s2[keep]))
        targets.append(y[keep])
    y = np.concatenate(targets)
    best: tuple[float, AnnealingLaw] | None = None
    for alpha in ALPHAS:
        x = np.concatenate([np.stack([np.ones(len(s1)), np.power(s1, -alpha), -s2], axis=1) for s1, s2 in columns])
        coef, *_ = np.linalg.lstsq(x, y, rcond=None)
        err = float(np.sum((x @ coef - y) ** 2))
        if best is None or err < best[0]:
            best = (err, AnnealingLaw(float(coef[0]), float(coef[1]), float(alpha), float(coef[2]), skip))
    assert best is not None  # ALPHAS is not empty
    return best[1]


def predicted_final_losses(
    curves: dict[str, tuple[list[float], list[float]]], futures: dict[str, list[float]], skip: int = 0
) -> dict[str, float]:
    """Each member's loss at the end of its planned future lrs, by the law fitted to all members'
    pasts. A member whose past is not finite (diverged) is +inf."""
    usable = {m: c for m, c in curves.items() if len(c[1]) >= 2 and np.all(np.isfinite(c[1]))}
    if not usable:
        return {m: float("inf") for m in curves}
    law = fit(list(usable.values()), skip)
    return {m: float(law.predict([*curves[m][0], *futures[m]])[-1]) if m in usable else float("inf") for m in curves}
