"""An adaptive global batch (`batch.adaptive`): the batch follows the gradient noise scale.

McCandlish et al. ("An Empirical Model of Large-Batch Training") find the largest useful batch,
the critical batch, near the simple noise scale B_simple = tr(Sigma) / |G|^2, which grows as the
loss falls. Every step measures both parts already (metrics.noise). Here they are smoothed over
samples, and at most once every `every_samples` the batch moves to `fraction` x B_simple, in whole
micro-batches within [min, max], only upward unless `decrease` is set; the peak learning rate
follows the batch by the declared rule (`lr_factor`). Schedules stay functions of samples seen.

Every rank runs the same `AdaptiveBatch` on the same numbers (each step's noise estimates come
from the reduced statistics and the reduced gradient, bitwise equal on every rank), so every rank
takes the same decision without a message. A decision is data: (from_samples, batch, lr factor),
merged into the job's `phases` (`with_decisions`) that the worker loop trains, carried in every
snapshot's meta (a restart or a resume continues the same history) and written to the run
directory's replay.yaml, which trains the same batches and learning rates with the rule off.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, astuple, dataclass
from typing import Any, Literal

from elastune.events import BatchChange
from elastune.spec.models import JobSpec

LrRule = Literal["linear", "sqrt", "adascale", "none"]


def lr_rule(spec: JobSpec) -> LrRule:
    """batch.adaptive.lr_scaling as set, else sqrt for Adam and linear for SGD."""
    a = spec.batch.adaptive
    assert a is not None  # an adaptive job
    return a.lr_scaling or ("sqrt" if spec.optimizer.name == "adamw" else "linear")


def lr_factor(rule: LrRule, base_batch: int, batch: int, b_simple: float | None = None) -> float:
    """What the peak lr is multiplied by at global batch `batch`, against `base_batch`: linear
    (batch / base), sqrt (its square root), none (1), or adascale, the gain AdaScale (Johnson et
    al. 2020) gives a batch S = batch / base times larger:
        r = (sigma^2 + mu^2) / (sigma^2 / S + mu^2) = (b / base + 1) / (b / batch + 1)
    with sigma^2 = tr(Sigma) / base and mu^2 = |G|^2, so b = B_simple: 1 where the gradient is
    all signal (b -> 0), S where it is all noise (b -> infinity). It is taken at the change and
    held until the next one (AdaScale's own schedule, which advances by r per step, is not used:
    schedules here are functions of samples seen)."""
    ratio = batch / base_batch
    if rule == "linear":
        return ratio
    if rule == "sqrt":
        return math.sqrt(ratio)
    if rule == "adascale":
        if b_simple is None:
            raise ValueError("the adascale gain needs the noise scale at the change")
        return (b_simple / base_batch + 1) / (b_simple / batch + 1)
    return 1.0


def efficiency(b_simple: float, base: int, batch: int) -> float:
    """Statistical efficiency (Pollux, Qiao et al. 2021): the progress a sample makes at global
    batch `batch` against one at `base`, (b + base) / (b + batch), b the noise scale: a batch
    far below b loses nothing per sample, one far above it wastes most of its samples."""
    return (b_simple + base) / (b_simple + batch)


def goodput_batch(
    b_simple: float, base: int, micro: int, world: int, low: int, high: int, overhead: float, per_micro: float
) -> int:
    """The batch in [low, high], in whole micro-batches, with the most goodput at `world` workers:
    throughput x efficiency, where a step of K micro-batches takes overhead + per_micro x
    ceil(K / world) seconds (the busiest rank's passes, then what every step pays: the reduction,
    the update, waiting). For each per-rank count c the largest batch is best (same step time,
    goodput rising with the batch), so the candidates are c x world micro-batches."""
    best, most = low, -1.0
    for c in range(math.ceil(low / micro / world), math.ceil(high / micro / world) + 1):
        batch = max(low, min(c * world, high // micro) * micro)
        seconds = overhead + per_micro * math.ceil(batch / micro / world)
        value = batch / seconds * efficiency(b_simple, base, batch) if seconds > 0 else 0.0
        if value > most:
            best, most = batch, value
    return best


def target_batch(b_simple: float, fraction: float, micro: int, low: int, high: int) -> int:
    """fraction x b_simple in the nearest whole number of micro-batches, within [low, high]."""
    wanted = fraction * b_simple / micro
    if not wanted < high / micro:  # also inf: nothing above high
        return high
    return min(high, max(low, max(1, round(wanted)) * micro))


@dataclass
class Smoothed:
    """Moving averages of tr(Sigma) and |G|^2 over samples: a step of B samples weighs
    1 - exp(-B / tau) against the past, so the averages span about `tau` samples whatever the
    batch. Their ratio is B_simple (a ratio of averages, as metrics.noise explains)."""

    trace: float | None = None
    grad_sq: float | None = None

    def update(self, estimates: tuple[float, float] | None, batch: int, tau: int) -> None:
        if estimates is None or not all(map(math.isfinite, estimates)):  # one micro-batch, an fp16 skip, a diverged step
            return
        s, g2 = estimates
        if self.trace is None or self.grad_sq is None:
            self.trace, self.grad_sq = s, g2
            return
        w = -math.expm1(-batch / tau)
        self.trace += w * (s - self.trace)
        self.grad_sq += w * (g2 - self.grad_sq)

    @property
    def b_simple(self) -> float | None:
        """None: no estimate yet, or |G|^2 not above zero (the gradient is lost in its noise)."""
        if self.trace is None or self.grad_sq is None or self.grad_sq <= 0:
            return None
        return max(self.trace, 0.0) / self.grad_sq


def smoothed_noise_scale(rows: list[Any], tau: int) -> list[tuple[int, float | None]]:
    """(samples seen, smoothed B_simple) after each of a run's metrics rows (events.Row): what
    an adaptive batch with time constant `tau` decided from; the report draws it."""
    noise, out = Smoothed(), []
    for row in rows:
        noise.update(row.noise, row.global_batch_size, tau)
        out.append((row.samples_seen, noise.b_simple))
    return out


@dataclass
class Speed:
    """What a step costs at the current world size, from every rank's figures of its previous
    step (step seconds, seconds in its own forward and backward passes, its micro-batches), summed
    in the step's statistics so every rank holds the same: `per_micro` = busy seconds per
    micro-batch, `overhead` = the step's seconds less the busiest rank's passes. Moving averages
    over samples, as Smoothed; started over when the world size changes."""

    world: int = 0
    overhead: float | None = None
    per_micro: float | None = None

    def update(self, sums: list[float], world: int, batch: int, tau: int) -> None:
        step_s, busy_s, micro, ranks = sums
        if ranks != world or micro <= 0:  # no figures yet, or of a group of another size
            if world != self.world:
                self.world, self.overhead, self.per_micro = world, None, None
            return
        per_micro = busy_s / micro
        overhead = max(0.0, step_s / ranks - per_micro * math.ceil(micro / ranks))
        if self.overhead is None or self.per_micro is None or world != self.world:
            self.world, self.overhead, self.per_micro = world, overhead, per_micro
            return
        w = -math.expm1(-batch / tau)
        self.overhead += w * (overhead - self.overhead)
        self.per_micro += w * (per_micro - self.per_micro)


@dataclass(frozen=True)
class Decision:
    """From `from_samples` on, global batch `global_batch_size` and the peak lr times `lr_factor`;
    `b_simple`: the smoothed noise scale the rule saw there; goodput's, the step figures it chose
    by (Speed): seconds every step pays, seconds per micro-batch on a rank."""

    from_samples: int
    global_batch_size: int
    lr_factor: float
    b_simple: float
    overhead_seconds: float | None = None
    micro_batch_seconds: float | None = None


def with_decisions(spec: JobSpec, decisions: list[Decision]) -> JobSpec:
    """`spec` with each decision merged into its phases: the batch from that sample on and the
    peak lr there (the lr the job's phases give there, times the decision's factor). A phase of
    the job's own that sets lr after a decision has the factor in force applied too, so the
    result trains with the rule's lr everywhere. The result is the job as trained so far, so
    batch.adaptive is not in it (its phases hold the batch)."""
    raw = spec.to_dict()
    raw["batch"].pop("adaptive", None)
    phases = {p["from_samples"]: dict(p) for p in raw.get("phases", [])}
    for d in decisions:
        phases.setdefault(d.from_samples, {"from_samples": d.from_samples})
    base_lr, factor, batch, out = spec.optimizer.lr, 1.0, spec.batch.global_batch_size, []
    by_start = {d.from_samples: d for d in decisions}
    for start in sorted(phases):
        phase = phases[start]
        base_lr = phase.get("lr", base_lr)
        if start in by_start:
            factor, batch = by_start[start].lr_factor, by_start[start].global_batch_size
            phase["global_batch_size"] = batch
        if "lr" in phase or start in by_start:
            phase["lr"] = base_lr * factor
        out.append(phase)
    raw["phases"] = out
    return JobSpec.model_validate(raw)


def replay_spec(spec: JobSpec, decisions: list[Decision]) -> dict[str, Any]:
    """The job an adaptive run trained, as a spec that trains it again without the rule: its
    decisions as phases, batch.adaptive removed, its own name and checkpoints (`-replay`)."""
    raw = with_decisions(spec, decisions).to_dict()
    raw["name"] = f"{spec.name[:56].rstrip('-')}-replay"
    raw["checkpoint"].pop("path", None)  # under output_dir/<name>/, not the adaptive run's root
    return raw


def decisions_of(meta: dict[str, Any]) -> list[Decision]:
    """The decisions a checkpoint's meta holds (AdaptiveBatch.state), [] where it holds none."""
    return [Decision(**d) for d in (meta.get("adaptive") or {}).get("decisions", [])]


def aligned(target: int, micro: int, low: int, high: int, align: int) -> int:
    """The batch nearest `target` (the smaller on a tie) among the multiples of `micro` in
    [low, high] that divide `align`; `low` when none does."""
    fits = [b for b in range(low, high + 1, micro) if align % b == 0]
    return min(fits, key=lambda b: (abs(b - target), b)) if fits else low


class AdaptiveBatch:
    """One run's adaptive batch, as every rank keeps it: `observe` each committed step, train
    `trains` (the job with the decisions so far as phases), and put `state()` in each snapshot's
    meta; a worker that restores a snapshot passes that state back in (`saved`).

    A search member (`base`: the job with its values; `boundaries`: its intervals' ends) changes
    its batch only at its boundaries, to batches that divide every boundary, so that each interval
    ends at a step; `rebase` takes up the values the population hands it there."""

    def __init__(
        self,
        spec: JobSpec,
        saved: dict[str, Any] | None = None,
        base: JobSpec | None = None,
        boundaries: tuple[int, ...] | None = None,
    ):
        assert spec.batch.adaptive is not None  # an adaptive job
        self.job = spec
        self.boundaries = frozenset(boundaries) if boundaries else None
        self.align = math.gcd(*boundaries) if boundaries else None
        self.speed = Speed()  # measured, not state: a restarted group measures its own
        self.offer: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # goodput: this rank's last step
        self.decisions: list[Decision] = []
        self.rebase(base or spec)
        self.restore(saved)

    def rebase(self, base: JobSpec) -> JobSpec:
        """Train `base` (the job with a member's values) with the decisions so far; returns `trains`."""
        a = base.batch.adaptive
        assert a is not None  # a member's spec keeps the job's batch.adaptive
        self.base, self.a, self.rule = base, a, lr_rule(base)
        self.low = a.min or self.job.batch.global_batch_size
        self.trains = with_decisions(base, self.decisions)
        return self.trains

    def restore(self, saved: dict[str, Any] | None) -> JobSpec:
        """Take up the state a snapshot's meta holds (None: the run's start); returns `trains`."""
        self.noise = Smoothed(**saved["noise"]) if saved else Smoothed()
        self.decisions = decisions_of({"adaptive": saved})
        self.trains = with_decisions(self.base, self.decisions)
        return self.trains

    def history(self) -> list[list[Any]]:
        """The decisions so far as BatchChange.history holds them (plain data)."""
        return [list(astuple(d)[:4]) for d in self.decisions]

    def timed(self, step_seconds: float, busy_seconds: float | None, micro_batches: int) -> None:
        """This rank's figures of the step it just took, offered with its next step (goodput)."""
        if self.a.goodput and busy_seconds is not None:
            self.offer = (step_seconds, busy_seconds, float(micro_batches), 1.0)

    def observe(
        self, samples: int, batch: int, world: int, estimates: tuple[float, float] | None, speed: Any = None
    ) -> Decision | None:
        """After a step of `batch` samples at `world` workers that ended at `samples`, with its
        noise estimates and the reduced `speed` figures of the step before (goodput; a tensor or
        a list, read only then): the change from there on, if the rule makes one."""
        a = self.a
        self.noise.update(estimates, batch, a.smoothing)
        if a.goodput and speed is not None:
            self.speed.update(speed.tolist() if hasattr(speed, "tolist") else list(speed), world, batch, a.smoothing)
        since = self.decisions[-1].from_samples if self.decisions else 0
        b = self.noise.b_simple
        if samples - since < a.every_samples or b is None or samples >= self.job.budget_samples:
            return None
        if self.boundaries is not None and samples not in self.boundaries:
            return None
        target = self._target(b, world)
        if target is not None and self.align is not None:
            target = aligned(target, self.job.batch.micro_batch_size, self.low, a.max, self.align)
        if target is None or target == batch or (target < batch and not a.decrease):
            return None
        factor = lr_factor(self.rule, self.job.batch.global_batch_size, target, b)
        figures = (self.speed.overhead, self.speed.per_micro) if a.goodput else (None, None)
        decision = Decision(samples, target, factor, b, *figures)
        self.decisions.append(decision)
        self.trains = with_decisions(self.base, self.decisions)
        return decision

    def _target(self, b: float, world: int) -> int | None:
        a, micro = self.a, self.job.batch.micro_batch_size
        if not a.goodput:
            assert a.fraction is not None  # the spec holds one rule or the other
            return target_batch(b, a.fraction, micro, self.low, a.max)
        s = self.speed
        if s.overhead is None or s.per_micro is None:
            return None  # no step measured at this world size yet
        return goodput_batch(b, self.job.batch.global_batch_size, micro, world, self.low, a.max, s.overhead, s.per_micro)

    def event(self, step: int, previous: int) -> BatchChange:
        """The newest decision, taken after `step` where the batch was `previous`, as the run's event."""
        d = self.decisions[-1]
        return BatchChange(
            time=time.time(),
            step=step,
            samples_seen=d.from_samples,
            previous=previous,
            global_batch_size=d.global_batch_size,
            lr_factor=d.lr_factor,
            b_simple=d.b_simple,
            overhead_seconds=d.overhead_seconds,
            micro_batch_seconds=d.micro_batch_seconds,
            history=tuple(tuple(h) for h in self.history()),
        )

    def state(self) -> dict[str, Any]:
        """Plain data for a snapshot's meta (JSON), read back by the constructor."""
        return {"noise": asdict(self.noise), "decisions": [asdict(d) for d in self.decisions]}
