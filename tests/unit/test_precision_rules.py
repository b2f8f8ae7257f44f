"""Step settings as rules: fp16's loss scale against torch's own update kernel, what a machine
cannot run, bad step fields named with their fix, the scale through a checkpoint."""

from __future__ import annotations

import pytest
import torch

from elastune.cli.main import main
from elastune.errors import SpecError
from elastune.train import precision
from elastune.train.precision import LossScale, check_step, compile_problem, precision_problem
from elastune.train.reduce import bucket_bounds
from tests.helpers import minimal, spec_problems


def test_the_loss_scale_follows_torchs_grad_scaler_rule():
    """The same overflow pattern through LossScale and torch._amp_update_scale_ (GradScaler's kernel)."""
    ours = LossScale(2.0**10, growth_interval=3)
    scale, tracker = torch.tensor([2.0**10]), torch.tensor([0], dtype=torch.int32)
    pattern = [1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0]
    for inf in pattern:
        ours.update(bool(inf))
        torch._amp_update_scale_(scale, tracker, torch.tensor([float(inf)]), 2.0, 0.5, 3)
        assert (ours.scale, ours.growth_tracker) == (float(scale), int(tracker))


def test_unscaling_finds_an_inf_anywhere_and_divides_exactly():
    a, b = torch.full((5,), 6.0), torch.full((3,), 2.0)
    assert not precision.unscale_and_check([a, b], 2.0) and a.eq(3.0).all() and b.eq(1.0).all()
    b[1] = float("nan")
    assert precision.unscale_and_check([a, b], 2.0)


def test_what_a_device_cannot_run_is_named_with_the_fix(monkeypatch):
    assert precision_problem("bf16", "cpu", False) is None and precision_problem("fp16", "cuda", False) is None
    said = precision_problem("bf16", "cuda", False)
    assert "step.precision is bf16" in said and "step.precision: fp16" in said
    monkeypatch.setattr(precision.shutil, "which", lambda name: None)
    said = compile_problem("cpu")
    assert "step.compile" in said and "no C compiler" in said and "step.compile: false" in said
    with pytest.raises(SpecError, match="no C compiler"):
        check_step("fp32", True, "cpu")
    check_step("fp32", False, "cpu")  # nothing to compile: fine without a compiler


def test_bad_step_fields_are_named_with_their_fix():
    for field, value in (
        ("step.bucket_mb", 0),
        ("step.bucket_mb", -1),
        ("step.precision", "fp8"),
        ("step.reduce_dtype", "fp16"),
        ("step.loss_scale.initial", 1000.0),
    ):
        msg = spec_problems(minimal(**{field: value}))
        assert f"{field} = " in msg and "fix:" in msg, msg


def test_a_bad_step_field_exits_2_without_a_traceback(tmp_path, capsys):
    import yaml

    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(minimal(**{"step.bucket_mb": 0})))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "step.bucket_mb" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "sizes, elems, want",
    [
        ([3, 4, 5], 100, [(0, 12)]),  # all in one
        ([3, 4, 5], 5, [(7, 12), (0, 7)]),  # from the end; a bucket closes once full
        ([3, 4, 5], 1, [(7, 12), (3, 7), (0, 3)]),  # one parameter each
        ([10, 1, 1], 2, [(10, 12), (0, 10)]),  # a large parameter is a bucket of its own
    ],
)
def test_buckets_are_whole_parameters_from_the_end(sizes, elems, want):
    assert bucket_bounds(sizes, elems) == want


def test_the_loss_scale_travels_in_checkpoints_and_other_precisions_ignore_it(tmp_path):
    from elastune.checkpoint.checkpointer import Checkpointer
    from elastune.checkpoint.format import Manifest
    from elastune.spec.models import AdamWSpec
    from elastune.train.optim import build_optimizer
    from elastune.train.state import TrainState, restore_state, state_pieces
    from tests.helpers import tiny_model

    model = tiny_model()
    opt = build_optimizer(model, AdamWSpec(name="adamw", lr=1e-2))
    ckpt = Checkpointer(str(tmp_path))
    ckpt.save(
        Manifest(3, 72, "h", {"kind": "replicated"}, {}),
        state_pieces(TrainState(model, opt, scaler=LossScale(512.0, 10, growth_tracker=7))),
        0,
        1,
    )
    m = ckpt.latest()
    scale = LossScale()
    restore_state(
        TrainState(tiny_model(seed=1), build_optimizer(tiny_model(), AdamWSpec(name="adamw", lr=1e-2)), scaler=scale),
        m.shapes,
        lambda wanted: ckpt.load_pieces(m, wanted),
        "test",
    )
    assert (scale.scale, scale.growth_tracker) == (512.0, 7)
    # An fp32 run resumes from it, and an fp16 run from an fp32 checkpoint starts at its initial scale.
    other = tiny_model(seed=1)
    restore_state(
        TrainState(other, build_optimizer(other, AdamWSpec(name="adamw", lr=1e-2))),
        m.shapes,
        lambda w: ckpt.load_pieces(m, w),
        "test",
    )
    fresh = LossScale(1024.0)
    fresh.load({})
    assert fresh.scale == 1024.0
