"""minigpt against transformers' GPT-2 on every run, through a committed reference: no torch needed.

tests/fixtures/gpt2-parity.npz holds a tiny random GPT-2 (vocabulary 64, context 16, emb 16, 2 layers,
4 heads), a batch whose targets include ignored ones, and what transformers computed for it in
float64: the logits, the loss and every parameter's gradient. tests/fixtures/make_parity_fixture.py
wrote it (torch and transformers are needed there only); tests/test_hf_parity.py is the live
comparison, which runs when torch is installed. float32 is compared against the float64 reference,
so its tolerances measure minigpt's own float32 error.
"""
import json
from pathlib import Path

import numpy as np
import pytest

from minigpt import IGNORE_INDEX, GPTConfig, GPTModel, cross_entropy

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "gpt2-parity.npz"
# Relative errors (max |ours - theirs| / max |theirs|, per array). Measured: float64 logits 9e-16,
# loss 0, gradients 2e-15; float32 logits 3e-7, loss 2e-8, gradients 2e-6. GELU's 0.044715 changed
# to 0.0447 moves the logits by 8e-6: float64 catches that, float32's tolerances are looser.
TOLERANCE = {np.float64: dict(logits=1e-12, loss=1e-12, grad=1e-12),
             np.float32: dict(logits=1e-5, loss=1e-6, grad=1e-4)}
LOSSES = {"model.loss": lambda model, inputs, targets: model.loss(inputs, targets),  # fused head + loss
          "cross_entropy(logits)": lambda model, inputs, targets: cross_entropy(model(inputs), targets)}


@pytest.fixture(scope="module")
def reference():
    assert FIXTURE.exists(), f"{FIXTURE} is missing: python tests/fixtures/make_parity_fixture.py writes it"
    with np.load(FIXTURE, allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


def model_from(reference, dtype):
    """GPTModel with the fixture's config and weights; load_state_dict rejects a missing or extra name."""
    model = GPTModel(GPTConfig(**json.loads(str(reference["config"]))), dtype=dtype)
    model.load_state_dict({name.removeprefix("weight/"): value for name, value in reference.items()
                           if name.startswith("weight/")})
    return model


def relative_error(got, expected):
    return float(np.abs(got - expected).max() / np.abs(expected).max())


def test_the_fixture_exercises_what_it_claims(reference):
    targets = reference["targets"]
    assert (targets == IGNORE_INDEX).any() and (targets != IGNORE_INDEX).any()
    assert np.abs(reference["logits"]).max() > 1.0  # random enough weights that the logits are not flat
    grads = [value for name, value in reference.items() if name.startswith("grad/")]
    assert len(grads) == len(model_from(reference, np.float64).parameters())
    assert all(np.abs(grad).max() > 0 for grad in grads)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
def test_logits_match_transformers(reference, dtype):
    logits = model_from(reference, dtype)(reference["inputs"]).data
    assert logits.dtype == dtype
    assert relative_error(logits, reference["logits"]) <= TOLERANCE[dtype]["logits"]


@pytest.mark.parametrize("loss_fn", LOSSES.values(), ids=LOSSES.keys())
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
def test_loss_and_every_gradient_match_transformers(reference, dtype, loss_fn):
    model = model_from(reference, dtype)
    loss = loss_fn(model, reference["inputs"], reference["targets"])
    loss.backward()
    assert relative_error(loss.data, reference["loss"]) <= TOLERANCE[dtype]["loss"]
    for name, param in model.named_parameters():
        assert relative_error(param.grad, reference[f"grad/{name}"]) <= TOLERANCE[dtype]["grad"], name
