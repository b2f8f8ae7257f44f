"""`elastune tune SPEC` in a process of its own, with the population's starting peak lrs fixed
(as test_tune's search fixes them), so the search it runs is that one:

    python -m tests.ray.tune_cli SPEC LR [LR ...]

test_tune kills it mid-search and runs it again (the search resumes).
"""

from __future__ import annotations

import sys

import elastune.tune.search as search_module
from elastune.cli.main import main
from elastune.tune.population import base_values

if __name__ == "__main__":
    spec, *lrs = sys.argv[1:]
    search_module.initial_values = lambda job, rng: [base_values(job) | {"optimizer.lr": float(lr)} for lr in lrs]  # type: ignore[assignment]
    sys.exit(main(["tune", spec]))
