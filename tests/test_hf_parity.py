"""minigpt against transformers' GPT2LMHeadModel: logits, loss, every gradient, greedy generation.

Optional: skipped unless torch and transformers are importable. The reference is a tiny GPT-2 with
random weights, written by transformers' own save_pretrained, so the test also proves that minigpt
reads what transformers writes and that transformers reads what minigpt writes.
"""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import minigpt  # noqa: E402  (imported after the skips so a missing torch skips, never errors)
from minigpt.model import GPTConfig, GPTModel  # noqa: E402
from minigpt.files.weights import load_hf_gpt2, save_hf_gpt2  # noqa: E402

HF_TINY = dict(vocab_size=50, n_positions=16, n_embd=16, n_layer=3, n_head=4)


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    """A random tiny GPT-2 saved with save_pretrained -> its directory."""
    config = transformers.GPT2Config(**HF_TINY, activation_function="gelu_new", resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():  # HF's init leaves LayerNorms at 1 and 0 and biases at 0: randomise everything
        for name, param in model.named_parameters():
            param.normal_(1.0 if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")) else 0.0, 0.2)
    directory = tmp_path_factory.mktemp("hf_gpt2")
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def load_reference(directory, dtype=torch.float32):
    """GPT2LMHeadModel from `directory`, asserting that every weight came from the file."""
    model, info = transformers.GPT2LMHeadModel.from_pretrained(directory, attn_implementation="eager",
                                                               output_loading_info=True)
    assert not any(info.get(key) for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.to(dtype).eval()


def token_ids(batch=3, length=16, seed=0):
    return np.random.default_rng(seed).integers(0, HF_TINY["vocab_size"], size=(batch, length))


def reference_logits(reference, idx):
    with torch.no_grad():
        return reference(torch.from_numpy(idx)).logits.numpy()


def test_logits_match_transformers_in_float32(hf_checkpoint):
    ours, reference = load_hf_gpt2(hf_checkpoint), load_reference(hf_checkpoint)
    assert ours.cfg == GPTConfig(vocab_size=50, context_length=16, emb_dim=16, n_heads=4, n_layers=3)
    idx = token_ids()
    expected = reference_logits(reference, idx)
    assert np.abs(expected).max() > 1.0  # the weights are random enough that the logits are not flat
    np.testing.assert_allclose(ours(idx).data, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_our_export_loads_in_transformers_with_the_same_logits(tmp_path, qkv_bias):
    model = GPTModel(GPTConfig(vocab_size=50, context_length=16, emb_dim=16, n_heads=4, n_layers=3,
                               qkv_bias=qkv_bias), seed=7)
    rng = np.random.default_rng(7)
    for value in model.state_dict().values():  # leave the init's ones and zeros behind
        value += rng.normal(0.0, 0.2, value.shape).astype(value.dtype)
    save_hf_gpt2(model, tmp_path)
    idx = token_ids(seed=1)
    expected = reference_logits(load_reference(tmp_path), idx)
    np.testing.assert_allclose(model(idx).data, expected, rtol=0, atol=1e-4)


def relative_error(got, expected):
    return np.abs(got - expected).max() / max(np.abs(expected).max(), 1e-300)


def test_loss_and_every_gradient_match_transformers_in_float64(hf_checkpoint):
    ours = load_hf_gpt2(hf_checkpoint, dtype=np.float64)
    reference = load_reference(hf_checkpoint, torch.float64)
    idx = token_ids(seed=2)
    targets = np.roll(idx, -1, axis=1)
    targets[0, 10:] = minigpt.IGNORE_INDEX  # padding after the text
    targets[1, :5] = minigpt.IGNORE_INDEX   # a masked prompt

    logits = reference(torch.from_numpy(idx)).logits  # (B, T, V)
    expected_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                      torch.from_numpy(targets).reshape(-1),
                                                      ignore_index=minigpt.IGNORE_INDEX)
    expected_loss.backward()
    expected_grads = {name.removeprefix("transformer."): p.grad.numpy()
                      for name, p in reference.named_parameters()}

    loss_fns = {"cross_entropy": lambda: minigpt.cross_entropy(ours(idx), targets)}
    if hasattr(ours, "loss"):
        loss_fns["model.loss"] = lambda: ours.loss(idx, targets)
    for label, loss_fn in loss_fns.items():
        ours.zero_grad()
        loss = loss_fn()
        loss.backward()
        assert relative_error(loss.data, expected_loss.item()) < 1e-6, label
        grads = {name: p.grad for name, p in ours.named_parameters()}
        assert sorted(grads) == sorted(expected_grads)  # the tied head adds no parameter on either side
        for name, grad in grads.items():
            assert relative_error(grad, expected_grads[name]) < 1e-6, (label, name)


def test_greedy_generation_matches_transformers(hf_checkpoint):
    ours = load_hf_gpt2(hf_checkpoint, dtype=np.float64)  # float64: no near-ties flipped by rounding
    reference = load_reference(hf_checkpoint, torch.float64)
    idx = token_ids(batch=2, length=4, seed=3)
    prompt = torch.from_numpy(idx)
    with torch.no_grad():
        expected = reference.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10,
                                      do_sample=False, pad_token_id=0).numpy()
    np.testing.assert_array_equal(minigpt.generate(ours, idx, 10), expected)


def test_the_committed_fixture_is_what_transformers_computes_today():
    """tests/fixtures/gpt2-parity.npz (read by test_parity_fixture.py) against a fresh run of its script."""
    fixtures = Path(__file__).resolve().parent / "fixtures"
    spec = importlib.util.spec_from_file_location("make_parity_fixture", fixtures / "make_parity_fixture.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    fresh = script.build_fixture()
    with np.load(fixtures / "gpt2-parity.npz", allow_pickle=False) as archive:
        committed = {name: archive[name] for name in archive.files}
    assert sorted(committed) == sorted(fresh)
    for name in ("config", "inputs", "targets") + tuple(n for n in fresh if n.startswith("weight/")):
        np.testing.assert_array_equal(committed[name], fresh[name], err_msg=name)
    for name in ("logits", "loss") + tuple(n for n in fresh if n.startswith("grad/")):
        assert relative_error(committed[name], fresh[name]) < 1e-12, name
