"""When a run gives up on failures: a pure rule per recovery mode.

restart: every failure restarts the whole worker group, which resumes from the newest in-memory
snapshot; `scaling.max_failures` is a budget of such restarts, and a run that spends it fails (a
crash loop stops). Ray Train's own policy applies it.

live: a failure costs the survivors about a second and no step, so counting failures says nothing
about health: a multi-day run loses a worker now and then and keeps training. The run gives up
only when failures come without progress between them: more than `scaling.max_failures`
failures in a row while the newest committed step stayed the same. A replacement that keeps
dying while the survivors train does not end the run; a group that cannot commit a step does.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FailureDecision:
    retry: bool
    in_a_row: int  # failures since the newest committed step moved (this one included)
    reason: str


def decide_live(steps_at_failures: list[int | None], max_failures: int) -> FailureDecision:
    """`steps_at_failures`: the newest committed step (None: none yet) as each of the run's
    failures so far was handled, oldest first, this failure last. `max_failures` -1: never give up."""
    last = steps_at_failures[-1]
    in_a_row = 0
    for step in reversed(steps_at_failures):
        if step != last:
            break
        in_a_row += 1
    where = "before any step committed" if last is None else f"while the newest committed step stayed {last}"
    if max_failures != -1 and in_a_row > max_failures:
        return FailureDecision(
            False,
            in_a_row,
            f"{in_a_row} worker failures in a row {where}, more than scaling.max_failures "
            f"({max_failures}): the run is not making progress, so it stops here",
        )
    return FailureDecision(
        True, in_a_row, f"failure {in_a_row} in a row {where} (scaling.max_failures {max_failures}); recovering"
    )
