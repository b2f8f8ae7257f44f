"""Population-based schedule search against random search and a grid-tuned cosine, on a noisy
quadratic model (NQM), at equal compute, several seeds, in one invocation.

The NQM (Zhang et al. 2019; McCandlish et al. 2018): loss 0.5 * sum_i h_i w_i^2 over d
dimensions with curvatures h_i = 1/i, trained by SGD whose gradient at batch B carries Gaussian
noise of covariance c * H / B. Its optimum needs a schedule: a high lr moves the low-curvature
directions, a low one damps the noise. Training here is numpy in one process (what is measured is
the search, not the system; the system's own exploit cost is in tests/ray/test_tune.py and the
quickstart figures in BENCHMARKS.md), but every rule is Elastune's own: members' values, specs
and schedules (`population.member_spec`, `train.schedules.step_values`), exploit and explore
(`population.decide`), fitness (`population.fitness`). Noise is seeded by (seed, step), so an
exploited member continues exactly as its donor would have.

- PBT: the `tune:` section below, P members x the budget, ranked by fitness (`rank_by: loss`),
  and again ranked by the annealing law's predicted end-of-budget loss (`predicted_final_loss`).
- Random search: the same P members' first values, each trained the whole budget unchanged
  (equal compute); the best final loss.
- Grid-tuned cosine: cosine over K peak lrs (log grid), each the whole budget (K / P times the
  compute); the best final loss. Its best loss sets the target loss (+5 %).

Reported per seed: final loss (exact expected loss of the final weights), samples to reach the
target (a member's own trajectory, checked at each interval end for PBT and random), exploits.

    .venv/bin/python tests/bench/bench_pbt.py [--seeds 3]
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "platform"))

from elastune.events import row_from_json  # noqa: E402
from elastune.spec import validate_spec  # noqa: E402
from elastune.train.schedules import step_values  # noqa: E402
from elastune.tune.annealing import predicted_final_losses  # noqa: E402
from elastune.tune.population import Member, decide, fitness, initial_values, member_spec  # noqa: E402

DIM, NOISE, BATCH = 100, 1.0, 16
BUDGET, INTERVAL = 16_000, 1_600  # samples: 1,000 steps, 10 intervals
GRID = np.logspace(-2, np.log10(1.9), 12)  # peak lrs of the grid-tuned cosine (stable below 2 / h_max = 2)
H = 1.0 / np.arange(1, DIM + 1)

JOB = {
    "name": "nqm",
    "model": {"recipe": "byte_gpt", "options": {"context": 16, "width": 16, "num_heads": 2}},  # unused: the NQM trains
    "data": {"path": "unused", "window": 17},
    "batch": {"global_batch_size": BATCH, "micro_batch_size": BATCH},
    "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.0},
    "schedule": {"name": "cosine", "warmup_samples": 0},
    "stop": {"max_samples": BUDGET},
    "tune": {
        "population": 8,
        "interval_samples": INTERVAL,
        "quantile": 0.25,
        "search": {
            "optimizer.lr": {"scale": "log", "low": 0.01, "high": 1.9},
            "schedule.name": {"scale": "choice", "choices": ["constant", "cosine", "linear", "wsd", "rex"]},
            "schedule.decay_fraction": {"scale": "linear", "low": 0.1, "high": 0.6},
            "schedule.min_lr_ratio": {"scale": "linear", "low": 0.0, "high": 0.2},
        },
    },
}


def loss_of(w: np.ndarray) -> float:
    return float(0.5 * np.sum(H * w * w))


def train(w: np.ndarray, spec, start: int, end: int, seed: int) -> tuple[np.ndarray, list[dict]]:
    """SGD on the NQM from `start` to `end` samples under `spec`'s schedule; rows like a run's."""
    rows, samples = [], start
    while samples < end:
        values = step_values(spec, samples)
        step = samples // BATCH
        noise = np.random.default_rng((seed, step)).standard_normal(DIM) * np.sqrt(NOISE * H / values.global_batch_size)
        before = loss_of(w)  # the step's loss, before its update (as a run records it)
        w = w - values.lr * (H * w + noise)
        samples += values.global_batch_size
        rows.append(
            {
                "samples_seen": samples,
                "global_batch_size": values.global_batch_size,
                "lr": values.lr,
                "loss": before if math.isfinite(before) else math.inf,
            }
        )
    return w, rows


def start_weights(seed: int) -> np.ndarray:
    return np.random.default_rng((seed, 10**9)).standard_normal(DIM) * 3.0


# PBT's remedies, each alone on top of the defaults (`--variants`): the tune section's settings.
VARIANTS: dict[str, dict] = {
    "quantile 0.125": {"quantile": 0.125},
    "quantile 0.5": {"quantile": 0.5},
    "factors 0.5/2": {"perturb_factors": (0.5, 2.0)},
    "factors 0.9/1.1": {"perturb_factors": (0.9, 1.1)},
    "resample 0": {"resample_probability": 0.0},
    "resample 0.5": {"resample_probability": 0.5},
    "quantile 0.5 + factors 0.5/2": {"quantile": 0.5, "perturb_factors": (0.5, 2.0)},
}


def pbt(seed: int, rank_by: str = "loss", **settings) -> dict:
    base = validate_spec({**JOB, "seed": seed, "tune": {**JOB["tune"], "rank_by": rank_by, **settings}})
    raw, tune = base.to_dict(), base.tune
    rng = random.Random(seed)
    members = {f"m{i}": Member(f"m{i}", v, "") for i, v in enumerate(initial_values(base, rng))}
    weights = {m: start_weights(seed) for m in members}
    curves: dict[str, list[tuple[int, float]]] = {m: [] for m in members}
    history: dict[str, list[dict]] = {m: [] for m in members}  # rows along each member's lineage
    exploits, start = 0, 0
    for end in range(INTERVAL, BUDGET + 1, INTERVAL):
        scores = {}
        for m, member in members.items():
            weights[m], rows = train(weights[m], validate_spec(member_spec(raw, member.values)), start, end, seed)
            history[m] += rows
            typed = [row_from_json(r, format=1) for r in rows]  # the run's row records (fields not here read as None)
            scores[m] = fitness(typed, end, tune.fitness_samples or INTERVAL // 4)
            curves[m].append((end, loss_of(weights[m])))
        if end < BUDGET:
            if rank_by == "predicted_final_loss":  # as the searcher does (search.Population._predicted)
                past = {m: ([r["lr"] for r in h][:-1], [r["loss"] for r in h][1:]) for m, h in history.items()}
                future = {
                    m: [history[m][-1]["lr"]]
                    + [step_values(validate_spec(member_spec(raw, members[m].values)), s).lr for s in range(end, BUDGET, BATCH)]
                    for m in members
                }
                scores = predicted_final_losses(past, future)
            for e in decide(members, scores, end, tune, rng):
                weights[e.recipient] = weights[e.donor].copy()  # the donor's exact state
                curves[e.recipient] = list(curves[e.donor])
                history[e.recipient] = list(history[e.donor])
                members[e.recipient].values = e.values
                exploits += 1
        start = end
    best = min(members, key=lambda m: loss_of(weights[m]))
    return {"loss": loss_of(weights[best]), "curve": curves[best], "exploits": exploits, "samples": tune.population * BUDGET}


def random_search(seed: int) -> dict:
    base = validate_spec({**JOB, "seed": seed})
    raw, out = base.to_dict(), []
    for values in initial_values(base, random.Random(seed)):  # the same first values PBT starts from
        spec = validate_spec(member_spec(raw, values))
        w, curve = start_weights(seed), []
        for end in range(INTERVAL, BUDGET + 1, INTERVAL):
            w, _ = train(w, spec, end - INTERVAL, end, seed)
            curve.append((end, loss_of(w)))
        out.append({"loss": loss_of(w), "curve": curve})
    best = min(out, key=lambda r: r["loss"])
    return {**best, "samples": base.tune.population * BUDGET}


def grid_cosine(seed: int) -> dict:
    base = validate_spec({**JOB, "seed": seed})
    raw, out = base.to_dict(), []
    for lr in GRID:
        spec = validate_spec(member_spec(raw, {"optimizer.lr": float(lr), "schedule.name": "cosine"}))
        w, curve = start_weights(seed), []
        for end in range(INTERVAL, BUDGET + 1, INTERVAL):
            w, _ = train(w, spec, end - INTERVAL, end, seed)
            curve.append((end, loss_of(w)))
        out.append({"loss": loss_of(w), "curve": curve, "lr": float(lr)})
    best = min(out, key=lambda r: r["loss"])
    return {**best, "samples": len(GRID) * BUDGET}


def to_target(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((s for s, loss in curve if loss <= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--variants", action="store_true", help="also each of PBT's remedies (VARIANTS) alone")
    args = parser.parse_args()
    variants = VARIANTS if args.variants else {}
    print(
        f"NQM d={DIM}, batch {BATCH}, budget {BUDGET:,} samples, interval {INTERVAL:,}; "
        f"population {JOB['tune']['population']}, grid {len(GRID)} lrs"
    )
    print(f"{'seed':>4} {'method':<22} {'final loss':>11} {'vs cosine':>9} {'to target':>10} {'exploits':>8} {'compute':>8}")
    ratios: dict[str, list[float]] = {"pbt": [], "pbt look-ahead": [], "random": [], **{f"pbt {v}": [] for v in variants}}
    for seed in range(args.seeds):
        grid = grid_cosine(seed)
        target = grid["loss"] * 1.05
        runs = (
            ("pbt", pbt(seed)),
            ("pbt look-ahead", pbt(seed, "predicted_final_loss")),
            *((f"pbt {name}", pbt(seed, **settings)) for name, settings in variants.items()),
            ("random", random_search(seed)),
            ("grid cosine", grid),
        )
        for name, result in runs:
            ratio = result["loss"] / grid["loss"]
            if name in ratios:
                ratios[name].append(ratio)
            reached = to_target(result["curve"], target)
            print(
                f"{seed:>4} {name:<22} {result['loss']:>11.5f} {ratio:>9.3f} {reached if reached else '-':>10} "
                f"{result.get('exploits', '-'):>8} {result['samples'] / (JOB['tune']['population'] * BUDGET):>7.1f}x"
            )
        print(f"     (grid cosine's best peak lr: {grid['lr']:.3f})")
    for name, values in ratios.items():
        # Paired with the default PBT on the same seeds: the heavy tail makes means noisy.
        wins = sum(v < p for v, p in zip(values, ratios["pbt"]))
        print(
            f"{name}: final loss / grid-tuned cosine's, mean over seeds {statistics.mean(values):.3f}, "
            f"median {statistics.median(values):.3f} (max {max(values):.3f}); "
            f"better than default PBT on {wins}/{len(values)} seeds"
        )


if __name__ == "__main__":
    main()
