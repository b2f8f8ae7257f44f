"""The `gpt` recipe: presets up to GPT-2 small's shape, its vocabulary from the dataset's
tokenizer, a parameter count and model FLOPs per token from closed forms."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from elastune.data.prepare import prepare
from elastune.recipes import load_recipe
from elastune.recipes.gpt import GPT, flops_per_token, parameters
from elastune.spec import validate_spec
from elastune.spec.models import ByteGPTOptions
from tests.helpers import ROOT, minimal

# GPT-2 small as published: 124,439,808 parameters (vocabulary 50,257, context 1024, tied head).
# This recipe leaves out the query/key/value bias (see recipes.gpt.Block): 12 layers x 3 x 768 fewer.
GPT2_SMALL = 124_439_808 - 12 * 3 * 768


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # a tied weight is one parameter


def test_the_gpt2_preset_is_gpt2_small_shaped():
    o = ByteGPTOptions(preset="gpt2-124m")
    assert (o.num_layers, o.width, o.num_heads, o.context) == (12, 768, 12, 1024)
    assert ByteGPTOptions(preset="gpt2-124m", num_layers=6).num_layers == 6  # an option next to it wins
    assert parameters(o, 50_257) == GPT2_SMALL
    with torch.device("meta"):
        assert count(GPT(o, 50_257)) == GPT2_SMALL


@pytest.mark.parametrize("preset", ["quickstart", "8m"])
def test_the_closed_forms_count_what_the_model_holds(preset):
    o = ByteGPTOptions(preset=preset)
    with torch.device("meta"):
        model = GPT(o, 1000)
    n = parameters(o, 1000)
    assert count(model) == n
    assert flops_per_token(o, 1000) == 6 * n + 12 * o.num_layers * o.width * o.context


def test_gpt_takes_its_vocabulary_from_the_dataset(tmp_path):
    words = [f"word{i} and its {i % 7} neighbours" for i in range(400)]
    (tmp_path / "t.txt").write_text(" ".join(words * 3))
    manifest = prepare(str(tmp_path / "t.txt"), tmp_path / "ds", window=17, tokenizer="bpe", vocab_size=300)
    spec = validate_spec(
        minimal(
            **{"model.recipe": "gpt", "model.options": {"preset": "quickstart", "context": 16}, "data.path": str(tmp_path / "ds")}
        )
    )
    recipe = load_recipe(spec.model, str(tmp_path), spec.data.path)
    model = recipe.build_model()
    assert model.head.out_features == manifest.vocab_size == 300 and model.head.weight is model.tok.weight
    assert recipe.flops_per_token is not None and recipe.flops_per_token() == flops_per_token(spec.model.options, 300)
    from elastune.data.dataset import TokenWindows

    losses = recipe.sample_losses(model, TokenWindows(tmp_path / "ds").take(np.arange(4)))
    assert losses.shape == (4,) and bool(torch.isfinite(losses).all())
    assert abs(float(losses.mean()) - float(np.log(300))) < 0.5  # an untrained model: about uniform over 300 ids


def test_the_shipped_bpe_and_124m_jobs_validate():
    from elastune.spec import load_spec

    bpe, big = load_spec(ROOT / "jobs" / "bpe.yaml"), load_spec(ROOT / "jobs" / "gpt2-124m.yaml")
    assert (bpe.model.recipe, bpe.data.tokenizer, bpe.data.vocab_size, bpe.eval is not None) == ("gpt", "bpe", 4096, True)
    assert (big.model.options.num_layers, big.model.options.width, big.data.window) == (12, 768, 1025)


def test_the_worked_examples_spec_validates():
    """docs/example-own-text.md's job spec, as printed there."""
    import re

    import yaml

    from elastune.spec import validate_spec

    text = (ROOT / "docs" / "example-own-text.md").read_text()
    (block,) = [b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if b.startswith("name: notes")]
    spec = validate_spec(yaml.safe_load(block))
    assert (spec.model.recipe, spec.data.path, spec.eval.every_samples, spec.stop.max_steps) == ("gpt", "data/notes", 1600, 300)
