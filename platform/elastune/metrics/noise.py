"""The simple gradient noise scale, B_simple = tr(Sigma) / |G|^2 (McCandlish et al., "An Empirical
Model of Large-Batch Training", appendix A), from gradient norms a step computes anyway.

For a mean gradient g_B over B samples, E|g_B|^2 = |G|^2 + tr(Sigma) / B. A step sees that at two
sizes: each micro-batch's own gradient (B = its size b, several per step) and the reduced
global-batch gradient (B = the global batch G). Two equations, two unknowns:

    S    = (mean_mb |g_b|^2 - |g_G|^2) / (mean_mb 1/b - 1/G)     unbiased for tr(Sigma)
    |G|^2 = |g_G|^2 - S / G                                       unbiased for |G|^2

One step's S and |G|^2 are noisy (|G|^2 can come out negative); their ratio is taken of running
averages (`NoiseScale`), as the paper does, not per step.
"""

from __future__ import annotations

from dataclasses import dataclass


def noise_estimates(
    sum_sq: float, sum_inv_b: float, count: int, global_sq: float, global_batch: int
) -> tuple[float, float] | None:
    """(S, |G|^2) of one step. `sum_sq`: the sum over the step's micro-batches of |g_b|^2 (each the
    micro-batch's mean gradient); `sum_inv_b`: the sum of their 1/b; `count`: how many;
    `global_sq`: |g_G|^2 of the step's mean gradient over `global_batch` samples. None when the
    step has one micro-batch only (both sizes are the same)."""
    if count < 2:
        return None
    inv_small = sum_inv_b / count
    spread = inv_small - 1.0 / global_batch
    if spread <= 0:
        return None
    trace = (sum_sq / count - global_sq) / spread
    return trace, global_sq - trace / global_batch


@dataclass
class NoiseScale:
    """B_simple from exponential moving averages of S and |G|^2 (weight `decay` on the past)."""

    decay: float = 0.95
    trace: float | None = None
    grad_sq: float | None = None

    def update(self, estimates: tuple[float, float] | None) -> float | None:
        if estimates is not None:
            s, g2 = estimates
            if self.trace is None:
                self.trace, self.grad_sq = s, g2
            else:
                assert self.grad_sq is not None  # set together with trace
                self.trace = self.decay * self.trace + (1 - self.decay) * s
                self.grad_sq = self.decay * self.grad_sq + (1 - self.decay) * g2
        return self.value

    @property
    def value(self) -> float | None:
        if self.trace is None or self.grad_sq is None or self.grad_sq <= 0:
            return None
        return self.trace / self.grad_sq
