"""GPTModel: full-model gradient check, the loss path, the tied head, training, generation, bad input."""
import math

import numpy as np
import pytest

from minigpt import GPTConfig, GPTModel, cross_entropy, generate, gradcheck, no_grad
from minigpt.generation import pick_next_token
from minigpt.nn import Module
from minigpt.optim import AdamW

TINY = GPTConfig(vocab_size=11, context_length=8, emb_dim=8, n_heads=2, n_layers=2)


def tiny_model(dtype=np.float64, seed=0, **overrides):
    cfg = GPTConfig(**{**TINY.__dict__, **overrides})
    model = GPTModel(cfg, seed=seed, dtype=dtype)
    rng = np.random.default_rng(seed)
    for name, p in model.named_parameters():   # weights of order 1, so gradients are far above round-off
        base = (1.0 if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name == "ln_f.weight"
                else 0.0)
        p.data[...] = base + 0.3 * rng.standard_normal(p.shape)
    return model


def batch(rng, B=2, T=6, V=11):
    idx = rng.integers(0, V, size=(B, T))
    idx[1, :3] = idx[0, 0]                       # repeated token ids
    targets = np.roll(idx, -1, axis=1)
    targets[0, :2] = -100                        # a masked prompt
    targets[1, -2:] = -100                       # padding
    return idx, targets


def test_full_model_gradient_matches_finite_differences():
    model = tiny_model()
    idx, targets = batch(np.random.default_rng(1))
    params = dict(model.named_parameters())
    kinds = {"wte", "wpe", "ln_1", "c_attn", "attn.c_proj", "ln_2", "c_fc", "mlp.c_proj", "ln_f"}
    assert all(any(kind in name for name in params) for kind in kinds)
    report = gradcheck(lambda: model.loss(idx, targets), params, max_elements=6)
    assert len(report.checked) == len(params) == 4 + 12 * TINY.n_layers - (0 if TINY.qkv_bias else 1)
    assert max(report.max_relative_error.values()) <= 1e-6


def test_loss_on_kept_rows_equals_cross_entropy_on_all_logits():
    """model.loss skips the head and the last block's projection and MLP at ignored positions; the value and
    every gradient must not change."""
    idx, targets = batch(np.random.default_rng(2))
    fast, full = tiny_model(), tiny_model()
    loss_fast = fast.loss(idx, targets)
    loss_full = cross_entropy(full(idx), targets)
    np.testing.assert_allclose(loss_fast.item(), loss_full.item(), rtol=1e-12)
    with no_grad():                               # evaluation skips the gradient passes: same value
        np.testing.assert_allclose(fast.loss(idx, targets).item(), loss_fast.item(), rtol=1e-12)
    loss_fast.backward()
    loss_full.backward()
    for (name, p), q in zip(fast.named_parameters(), full.parameters()):
        np.testing.assert_allclose(p.grad, q.grad, rtol=1e-10, atol=1e-14, err_msg=name)


def test_output_head_is_tied_to_the_token_embedding():
    """One parameter, two uses (lookup and head): its gradient must be the sum of both, element by element."""
    model = tiny_model()
    names = [name for name, _ in model.named_parameters()]
    assert "wte.weight" in names and not any("head" in name for name in names)
    idx, targets = batch(np.random.default_rng(3))
    report = gradcheck(lambda: model.loss(idx, targets), {"wte.weight": model.wte.weight}, max_elements=None)
    assert report.checked["wte.weight"] == TINY.vocab_size * TINY.emb_dim
    # rows of tokens absent from idx are reached through the head only, and still get a gradient
    unused = np.setdiff1d(np.arange(TINY.vocab_size), idx)
    assert len(unused) > 0 and np.abs(model.wte.weight.grad[unused]).min() > 0


def test_initial_loss_is_about_log_vocab_and_a_tiny_model_overfits():
    cfg = GPTConfig(vocab_size=50, context_length=16, emb_dim=32, n_heads=4, n_layers=2)
    model = GPTModel(cfg, seed=0)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 50, size=(4, 12))
    targets = np.roll(idx, -1, axis=1)
    first = model.loss(idx, targets).item()
    assert abs(first - math.log(50)) < 0.1
    opt = AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(60):
        opt.zero_grad()
        loss = model.loss(idx, targets)
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * first


def test_modules_list_parameters_by_gpt2_name_and_switch_modes():
    model = tiny_model(n_layers=1, qkv_bias=False)
    names = [name for name, _ in model.named_parameters()]
    assert names[:4] == ["wte.weight", "wpe.weight", "h.0.ln_1.weight", "h.0.ln_1.bias"]
    assert "h.0.attn.c_attn.weight" in names and "h.0.attn.c_attn.bias" not in names
    assert names[-2:] == ["ln_f.weight", "ln_f.bias"]
    model.eval()
    assert not any(m.training for _, m in model.named_modules())
    model.train()
    assert all(m.training for _, m in model.named_modules())
    assert isinstance(model.h[0], Module)


def test_a_frozen_parameter_gets_no_gradient_and_is_left_out_of_the_trainable_ones():
    """The tied embedding frozen: neither its lookup nor the output head may give it a gradient."""
    model = tiny_model()
    model.wte.weight.requires_grad = False
    names = [name for name, _ in model.named_parameters()]
    assert [name for name, _ in model.named_parameters(trainable_only=True)] == names[1:]
    assert model.parameters(trainable_only=True) == model.parameters()[1:]
    model.loss(*batch(np.random.default_rng(4))).backward()
    assert model.wte.weight.grad is None and model.wpe.weight.grad is not None


def test_dropout_is_active_in_train_mode_only():
    model = tiny_model(drop_rate=0.5)
    idx = np.array([[1, 2, 3]])
    assert not np.allclose(model(idx).data, model(idx).data)
    model.eval()
    np.testing.assert_array_equal(model(idx).data, model(idx).data)


def test_state_dict_round_trip_and_mismatch_errors():
    a, b = tiny_model(seed=1), tiny_model(seed=2)
    b.load_state_dict(a.state_dict())
    idx = np.array([[1, 2, 3]])
    np.testing.assert_array_equal(a(idx).data, b(idx).data)
    with pytest.raises(ValueError, match=r"state: missing tensor wpe.weight \(and \d+ more\)"):
        b.load_state_dict({"wte.weight": a.wte.weight.data})
    with pytest.raises(ValueError, match="unexpected tensor lm_head.weight is not a parameter"):
        b.load_state_dict(dict(a.state_dict(), **{"lm_head.weight": a.wte.weight.data}))
    bad = dict(a.state_dict(), **{"wpe.weight": np.zeros((3, 3))})
    with pytest.raises(ValueError, match=r"state: tensor wpe.weight has shape \(3, 3\), expected"):
        b.load_state_dict(bad)
    names = list(a.state_dict()) + ["wpe.weight"]
    with pytest.raises(ValueError, match="tensor wpe.weight is given more than once"):
        b.load_arrays(names, a.state_dict().__getitem__)


def test_bad_inputs_get_clear_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="longer than the model's context length 8"):
        model(np.zeros((1, 9), dtype=int))
    with pytest.raises(ValueError, match=r"token id 11 is outside the vocabulary \[0, 11\)"):
        model(np.array([[1, 11]]))
    with pytest.raises(TypeError, match="token ids must be integers"):
        model(np.zeros((1, 3)))
    with pytest.raises(ValueError, match=r"shape \(batch, time\)"):
        model(np.zeros(3, dtype=int))
    with pytest.raises(ValueError, match="targets have shape"):
        model.loss(np.zeros((1, 3), dtype=int), np.zeros((1, 4), dtype=int))
    with pytest.raises(ValueError, match="not divisible by n_heads"):
        GPTConfig(emb_dim=10, n_heads=3)
    with pytest.raises(ValueError, match="unknown GPT-2 model 'gpt3'"):
        GPTConfig.preset("gpt3")


def test_presets_have_gpt2_sizes():
    sizes = {"gpt2-small": 124_439_808, "gpt2-medium": 354_823_168}   # published parameter counts
    for name, n in sizes.items():
        cfg = GPTConfig.preset(name)
        C, L, V, T = cfg.emb_dim, cfg.n_layers, cfg.vocab_size, cfg.context_length
        per_block = 2 * 2 * C + (C * 3 * C + 3 * C) + (C * C + C) + (C * 4 * C + 4 * C) + (4 * C * C + C)
        assert V * C + T * C + L * per_block + 2 * C == n


@pytest.mark.parametrize("max_new", [5, 12])     # 12 new tokens on a 4-token prompt outgrow the context of 8
def test_kv_cache_gives_the_same_tokens_as_recomputing(max_new):
    model = tiny_model(dtype=np.float32)
    idx = np.array([[1, 2, 3, 4], [4, 3, 2, 1]])
    cached = generate(model, idx, max_new)
    uncached = generate(model, idx, max_new, use_cache=False)
    assert cached.shape == (2, 4 + max_new)
    np.testing.assert_array_equal(cached, uncached)
    np.testing.assert_array_equal(cached[:, :4], idx)


def test_kv_cache_logits_match_the_full_forward():
    from minigpt.model import KVCache
    model = tiny_model()
    idx = np.array([[3, 1, 4, 1, 5, 9]])
    with no_grad():
        full = model(idx).data
        cache = KVCache(model.cfg, 1, 6, model.dtype)
        first = model(idx[:, :4], kv_cache=cache).data
        rest = [model(idx[:, t:t + 1], kv_cache=cache).data for t in (4, 5)]
    np.testing.assert_allclose(np.concatenate([first, *rest], axis=1), full, rtol=1e-10, atol=1e-12)


def test_greedy_generation_picks_the_argmax_and_stops_at_eos():
    model = tiny_model(dtype=np.float32)
    idx = np.array([[1, 2, 3]])
    out = generate(model, idx, 1)
    with no_grad():
        expected = model(idx).data[0, -1].argmax()
    assert out[0, -1] == expected
    stopped = generate(model, idx, 6, eos_id=int(expected))
    np.testing.assert_array_equal(stopped, out)   # the eos token is kept, then generation ends


def test_sampling_is_seeded_and_respects_top_k():
    model = tiny_model(dtype=np.float32)
    idx = np.array([[1, 2, 3]])
    a = generate(model, idx, 5, temperature=1.0, top_k=3, rng=np.random.default_rng(0))
    b = generate(model, idx, 5, temperature=1.0, top_k=3, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(a, b)
    logits = np.array([[0.0, 5.0, 1.0, 4.0]])
    draws = {int(pick_next_token(logits, 1.0, 2, np.random.default_rng(s))[0]) for s in range(200)}
    assert draws == {1, 3}                        # only the two most likely tokens are ever drawn
    np.testing.assert_array_equal(pick_next_token(logits, 0.0), [1])
    with pytest.raises(ValueError, match="invalid max_new_tokens"):
        generate(model, idx, 3, temperature=-1.0)
