"""The model contract: built-in recipe, user factories beside the spec, and their errors."""

from pathlib import Path

import pytest
import torch

from elastune.errors import SpecError
from elastune.recipes import Recipe, load_recipe
from elastune.spec import load_spec, spec_dir_of
from elastune.spec.models import FactoryModel

ROOT = Path(__file__).resolve().parents[2]


def test_worked_example_factory_builds_and_gives_per_sample_losses():
    job = ROOT / "jobs" / "custom-model" / "job.yaml"
    spec = load_spec(job)
    recipe = load_recipe(spec.model, spec_dir_of(job))
    model = recipe.build_model()
    losses = recipe.sample_losses(model, torch.randint(0, 256, (5, spec.data.window)))
    assert losses.shape == (5,) and torch.all(losses > 0)


def test_byte_gpt_losses_are_per_sample():
    spec = load_spec(ROOT / "jobs" / "quickstart.yaml")
    recipe = load_recipe(spec.model)
    windows = torch.randint(0, 256, (3, spec.data.window))
    model = recipe.build_model().eval()
    losses = recipe.sample_losses(model, windows)
    assert losses.shape == (3,)
    assert torch.allclose(losses[1], recipe.sample_losses(model, windows[1:2])[0], rtol=1e-5)


def _write(tmp_path, body: str) -> str:
    (tmp_path / "user_mod.py").write_text(body)
    return str(tmp_path)


def test_missing_module_says_where_to_put_it(tmp_path):
    with pytest.raises(SpecError, match="cannot import module 'nope_mod'.*put nope_mod.py beside the job spec"):
        load_recipe(FactoryModel(factory="nope_mod:build"), str(tmp_path))


def test_missing_function_and_wrong_return(tmp_path):
    d = _write(tmp_path, "def build(**kw):\n    return 42\n")
    with pytest.raises(SpecError, match="has no function 'other'"):
        load_recipe(FactoryModel(factory="user_mod:other"), d)
    with pytest.raises(SpecError, match="returned int, not an elastune.recipes.Recipe"):
        load_recipe(FactoryModel(factory="user_mod:build"), d)


def test_options_reach_the_factory_and_bad_options_are_named(tmp_path):
    d = _write(tmp_path / "", "")
    (tmp_path / "opt_mod.py").write_text(
        "from elastune.recipes import Recipe\n"
        "def build(width):\n"
        "    return Recipe(build_model=lambda: width, sample_losses=None)\n"
    )
    recipe = load_recipe(FactoryModel(factory="opt_mod:build", options={"width": 3}), d)
    assert isinstance(recipe, Recipe) and recipe.build_model() == 3
    with pytest.raises(SpecError, match=r"rejected model.options \{'depth': 2\}"):
        load_recipe(FactoryModel(factory="opt_mod:build", options={"depth": 2}), d)


def test_activation_checkpointing_gives_the_same_gradients_bit_for_bit():
    """Recomputing each block in backward replays its dropout masks: the same gradients."""
    from elastune.recipes.gpt import GPT, sample_losses
    from elastune.spec.models import ByteGPTOptions

    windows = torch.randint(0, 256, (4, 17), generator=torch.Generator().manual_seed(1))
    grads, kept = [], []
    for ac in (False, True):
        torch.manual_seed(0)
        model = GPT(ByteGPTOptions(num_layers=2, width=16, num_heads=2, context=16, dropout=0.2, activation_checkpointing=ac))
        torch.manual_seed(7)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            losses = sample_losses(model, windows)
        losses.sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
        kept.append(sum(saved))
    assert kept[1] < kept[0] / 2, kept  # checkpointing really dropped the blocks' activations
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name
