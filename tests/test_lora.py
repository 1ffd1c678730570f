"""LoRA: the op against finite differences and its plain twin, frozen weights, the whole model with
adapters, merge/unmerge, adapters on disk, training, and every bad input."""
import json
import math
import re

import numpy as np
import pytest

from minigpt import GPTConfig, GPTModel, Tensor, gradcheck, lora, no_grad
from minigpt import IGNORE_INDEX, functional as F
from minigpt.nn import Linear, Module
from minigpt.optim import AdamW
from minigpt.files.fileio import BadFileError
from minigpt.files.weights import load_npz, save_npz
from minigpt.files.adapters import ADAPTERS_KEY, copy_adapters, load_adapters, save_adapters

TINY = GPTConfig(vocab_size=11, context_length=8, emb_dim=8, n_heads=2, n_layers=2)


def tiny_model(dtype=np.float64, seed=0, **overrides):
    """A tiny GPT with weights of order 1, so gradients are far above round-off."""
    model = GPTModel(GPTConfig(**{**TINY.__dict__, **overrides}), seed=seed, dtype=dtype)
    rng = np.random.default_rng(seed)
    for name, p in model.named_parameters():
        p.data[...] = (1.0 if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")) else 0.0) \
            + 0.3 * rng.standard_normal(p.shape)
    return model


def batch(rng, B=2, T=6, V=11):
    idx = rng.integers(0, V, size=(B, T))
    targets = np.roll(idx, -1, axis=1)
    targets[0, :2] = IGNORE_INDEX
    return idx, targets


def randomize_adapters(model, seed=0):
    """Non-zero B (it starts at zero, which would make every dA zero and merging a no-op)."""
    rng = np.random.default_rng(seed)
    for name, p in model.named_parameters(trainable_only=True):
        p.data[...] = 0.3 * rng.standard_normal(p.shape)


def frozen(array):
    return Tensor(array)  # requires_grad=False


# ----------------------------------------------------------------------------- the op

def test_lora_linear_gradient_matches_finite_differences_and_its_plain_twin():
    rng = np.random.default_rng(0)
    W, b = frozen(rng.standard_normal((6, 5))), frozen(rng.standard_normal(5))
    x, A, B = (Tensor(rng.standard_normal(shape), requires_grad=True)
               for shape in ((2, 3, 6), (6, 2), (2, 5)))
    report = gradcheck(lambda x, A, B: lora.lora_linear(x, W, b, A, B, 0.75), [x, A, B], max_elements=None)
    assert max(report.max_relative_error.values()) <= 1e-6
    assert W.grad is None and b.grad is None
    # the plain twin: one linear layer with the merged weight, same output and same dx
    out = lora.lora_linear(x, W, b, A, B, 0.75)
    x_twin = Tensor(x.data.copy(), requires_grad=True)
    twin = F.linear(x_twin, frozen(W.data + 0.75 * A.data @ B.data), b)
    np.testing.assert_allclose(out.data, twin.data, rtol=1e-12, atol=1e-12)
    dout = rng.standard_normal(out.shape)
    x.grad = None
    out.backward(dout)
    twin.backward(dout)
    np.testing.assert_allclose(x.grad, x_twin.grad, rtol=1e-12, atol=1e-12)


class RecordingArray(np.ndarray):
    """An array that records the shape of every matrix product it takes part in."""
    products = []

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        def plain(arrays):
            return [a.view(np.ndarray) if isinstance(a, RecordingArray) else a for a in arrays]
        if "out" in kwargs:
            kwargs["out"] = tuple(plain(kwargs["out"]))
        result = getattr(ufunc, method)(*plain(inputs), **kwargs)
        if ufunc is np.matmul:
            RecordingArray.products.append(result.shape)
        return result


def test_frozen_weight_gets_no_gradient_and_its_product_is_never_computed():
    """The backward must not form x^T dout (C, OC), the frozen weight's gradient: only x^T dxA (C, r)."""
    C, OC, r, N = 6, 5, 2, 4
    rng = np.random.default_rng(1)
    W, b = frozen(rng.standard_normal((C, OC))), frozen(rng.standard_normal(OC))
    A = Tensor(rng.standard_normal((C, r)), requires_grad=True)
    B = Tensor(rng.standard_normal((r, OC)), requires_grad=True)
    x = Tensor(rng.standard_normal((N, C)).view(RecordingArray), requires_grad=True)
    RecordingArray.products.clear()
    out = lora.lora_linear(x, W, b, A, B, 2.0)
    assert RecordingArray.products == [(N, r), (N, OC)]                  # forward: x A and x W
    RecordingArray.products.clear()
    out.backward(rng.standard_normal((N, OC)))
    assert RecordingArray.products == [(C, r)]                           # dA = x^T dxA; no x^T dout
    assert W.grad is None and b.grad is None
    assert all(t.grad is not None for t in (x, A, B))


def test_lora_linear_refuses_a_trainable_base_and_bad_shapes():
    rng = np.random.default_rng(2)
    A, B = Tensor(rng.standard_normal((4, 2))), Tensor(rng.standard_normal((2, 3)))
    with pytest.raises(ValueError, match="must be frozen"):
        lora.lora_linear(np.ones((1, 4)), Tensor(np.ones((4, 3)), requires_grad=True), None, A, B, 1.0)
    with pytest.raises(ValueError, match=r"shapes do not fit .* A \(4, 2\), B \(3, 2\)"):
        lora.lora_linear(np.ones((1, 4)), Tensor(np.ones((4, 3))), None, A, Tensor(np.ones((3, 2))), 1.0)


# ----------------------------------------------------------------------------- applying it

def test_apply_lora_wraps_the_block_linears_freezes_the_rest_and_inits_as_pytorch():
    model = tiny_model(dtype=np.float32)
    base_names = [name for name, _ in model.named_parameters()]
    base_total = sum(p.size for p in model.parameters())
    config = lora.apply_lora(model, 4, 8, rng=np.random.default_rng(5))
    assert config.layers == tuple(f"h.{i}.{t}" for i in range(2) for t in lora.DEFAULT_TARGETS)
    assert config.scale == 2.0
    names = [name for name, _ in model.named_parameters()]
    assert [n for n in names if "lora" not in n] == base_names              # GPT-2 names unchanged
    trainable = dict(model.named_parameters(trainable_only=True))
    assert sorted(trainable) == sorted(f"{path}.{name}" for path in config.layers
                                       for name in lora.ADAPTER_NAMES)
    C = TINY.emb_dim
    n_adapter = 2 * 4 * ((C + 3 * C) + (C + C) + (C + 4 * C) + (4 * C + C))  # 2 layers, r (in + out) each
    assert sum(p.size for p in trainable.values()) == n_adapter
    percent = 100 * n_adapter / (base_total + n_adapter)
    summary = f"trainable {n_adapter:,} of {base_total + n_adapter:,} ({percent:.2f}%)"
    assert lora.trainable_summary(model) == summary

    layer = model.h[0].mlp.c_fc
    assert layer.lora_A.dtype == np.float32 and not layer.lora_B.data.any()
    bound = 1 / math.sqrt(C)                                             # c_fc: in = C
    assert np.abs(layer.lora_A.data).max() <= bound
    A_proj = np.concatenate([model.h[i].mlp.c_proj.lora_A.data.ravel() for i in range(2)])
    assert 0.4 * bound < np.abs(A_proj).max() <= 0.5 * bound            # c_proj: in = 4C, up to 1/sqrt(4C)
    again = tiny_model(dtype=np.float32)
    lora.apply_lora(again, 4, 8, rng=np.random.default_rng(5))          # drawn from the given rng alone
    np.testing.assert_array_equal(again.h[0].mlp.c_fc.lora_A.data, layer.lora_A.data)


def test_at_initialisation_the_lora_model_is_exactly_the_base():
    idx, _ = batch(np.random.default_rng(3))
    model = tiny_model(dtype=np.float32)
    base_logits = model(idx).data
    lora.apply_lora(model, 2, 16)
    np.testing.assert_array_equal(model(idx).data, base_logits)


def test_whole_model_gradient_wrt_the_adapters_matches_finite_differences():
    model = tiny_model()
    config = lora.apply_lora(model, 2, 3)
    randomize_adapters(model)
    idx, targets = batch(np.random.default_rng(4))
    adapters = dict(model.named_parameters(trainable_only=True))
    report = gradcheck(lambda: model.loss(idx, targets), adapters, max_elements=8)
    assert len(report.checked) == 2 * len(config.layers) == 16
    assert max(report.max_relative_error.values()) <= 1e-6
    frozen_params = [p for name, p in model.named_parameters() if name not in adapters]
    assert frozen_params and all(p.grad is None for p in frozen_params)


def test_adamw_on_the_trainable_parameters_moves_only_the_adapters_and_overfits():
    cfg = GPTConfig(vocab_size=50, context_length=16, emb_dim=32, n_heads=4, n_layers=2)
    model = GPTModel(cfg, seed=0)
    model.wte.weight.data *= 10   # std 0.2: a frozen head that can be confident, so the loss can fall far
    lora.apply_lora(model, 4, 8, rng=np.random.default_rng(1))
    base = {name: p.data.copy() for name, p in model.named_parameters() if "lora" not in name}
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 50, size=(4, 12))
    targets = np.roll(idx, -1, axis=1)
    optimizer = AdamW(model.parameters(trainable_only=True), lr=3e-2, weight_decay=0.1)
    assert len(optimizer.params) == 16
    losses = []
    for _ in range(40):
        optimizer.zero_grad()
        loss = model.loss(idx, targets)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]
    for name, p in model.named_parameters():
        if name in base:
            np.testing.assert_array_equal(p.data, base[name], err_msg=name)
            assert p.grad is None, name
    assert model.h[0].attn.c_attn.lora_B.data.any()


# ----------------------------------------------------------------------------- merge and unmerge

def test_merged_logits_equal_unmerged_and_unmerge_restores_the_exact_layers(tmp_path):
    idx, _ = batch(np.random.default_rng(6))
    model = tiny_model(dtype=np.float32)
    base_names = [name for name, _ in model.named_parameters()]
    lora.apply_lora(model, 4, 4)
    randomize_adapters(model)
    layers_before = [model.h[i].attn.c_attn for i in range(2)]
    weights_before = {name: p.data.copy() for name, p in model.named_parameters()}
    with no_grad():
        unmerged = model(idx).data
        lora.merge_lora(model)
        merged = model(idx).data
    assert [name for name, _ in model.named_parameters()] == base_names        # a plain GPT-2 again
    assert type(model.h[0].attn.c_attn) is Linear
    # float32 rounding: the two orders of summation differ by a few ulps of the logits' size
    np.testing.assert_allclose(merged, unmerged, rtol=0, atol=1e-5 * np.abs(unmerged).max())
    assert not np.allclose(merged, tiny_model(dtype=np.float32)(idx).data, atol=1e-3)  # the adapters count

    save_npz(model, tmp_path / "merged.npz")                                     # export takes it as it is
    np.testing.assert_array_equal(load_npz(tmp_path / "merged.npz")(idx).data, merged)

    lora.unmerge_lora(model)
    assert [model.h[i].attn.c_attn for i in range(2)] == layers_before
    for name, p in model.named_parameters():
        np.testing.assert_array_equal(p.data, weights_before[name], err_msg=name)
    np.testing.assert_array_equal(model(idx).data, unmerged)


def test_merge_in_float64_is_exact_to_round_off():
    idx, _ = batch(np.random.default_rng(7))
    model = tiny_model()
    lora.apply_lora(model, 3, 6)
    randomize_adapters(model)
    unmerged = model(idx).data
    np.testing.assert_allclose(lora.merge_lora(model)(idx).data, unmerged, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- adapters on disk

def test_adapters_round_trip_and_hold_only_A_and_B(tmp_path):
    idx, _ = batch(np.random.default_rng(8))
    model = tiny_model(dtype=np.float32, n_layers=3)
    lora.apply_lora(model, 2, 5, targets=("attn.c_attn", "mlp.c_fc"))
    randomize_adapters(model)
    path = save_adapters(model, tmp_path / "adapters.npz")
    assert not list(tmp_path.glob(".*.tmp"))

    fresh = tiny_model(dtype=np.float32, n_layers=3)
    config = load_adapters(fresh, path)
    layers = tuple(f"h.{i}.{t}" for i in range(3) for t in ("attn.c_attn", "mlp.c_fc"))
    assert config == lora.LoRAConfig(2, 5.0, layers)
    np.testing.assert_array_equal(fresh(idx).data, model(idx).data)
    adapter_names = sorted(n for n, _ in model.named_parameters(trainable_only=True))
    assert sorted(n for n, _ in fresh.named_parameters(trainable_only=True)) == adapter_names
    with np.load(path) as archive:                                       # A and B alone, no base weight
        assert sorted(archive.files) == sorted([*adapter_names, ADAPTERS_KEY])

    in_float64 = GPTModel(model.cfg, dtype=np.float64)                   # the same base, loaded in float64
    in_float64.load_state_dict(tiny_model(dtype=np.float32, n_layers=3).state_dict())
    load_adapters(in_float64, path)
    np.testing.assert_allclose(in_float64(idx).data, model(idx).data, rtol=1e-4, atol=1e-5)


class TwoLayers(Module):
    """A model without a GPTConfig: adapters are matched by layer names and shapes alone."""

    def __init__(self, hidden=6, second="proj"):
        rng = np.random.default_rng(0)
        self.fc = Linear(4, hidden, rng=rng)
        setattr(self, second, Linear(hidden, 3, rng=rng))


def rewrite_adapters(path, drop=(), **changes):
    """The adapters file at `path` without the arrays `drop` and with some metadata fields changed."""
    with np.load(path) as archive:
        arrays = {name: archive[name] for name in archive.files if name not in drop}
    meta = json.loads(str(arrays[ADAPTERS_KEY][()]))
    meta.update(changes)
    arrays[ADAPTERS_KEY] = np.array(json.dumps(meta))
    np.savez(path, **arrays)


def refused(match, fn, *args, error=ValueError):
    """fn(*args) must raise `error` with a one-line message matching `match`."""
    with pytest.raises(error, match=match) as info:
        fn(*args)
    assert "\n" not in str(info.value)


def test_bad_arguments_get_one_clear_line():
    for rank in (0, -1, 1.5, True):
        refused("LoRA rank must be a positive integer", lora.apply_lora, tiny_model(), rank, 16)
    for alpha in (0, -2.0, float("nan"), "16", True):
        refused("LoRA alpha must be a positive number", lora.apply_lora, tiny_model(), 4, alpha)
    refused(r"LoRA alpha 1e\+300 is too large to train: its scale alpha / rank overflows float32",
            lora.apply_lora, tiny_model(), 4, 1e300)
    refused(r"LoRA rank 9 is larger than layer h.0.attn.c_attn \(8 -> 24\): at most 8",
            lora.apply_lora, tiny_model(), 9, 16)
    refused("LoRA target 'attn.c_q' matches no linear layer", lora.apply_lora, tiny_model(),
            2, 4, ["attn.c_q"])
    refused("must be a non-empty list", lora.apply_lora, tiny_model(), 2, 4, "attn.c_attn")
    model = tiny_model()
    lora.apply_lora(model, 2, 4)
    refused("already has LoRA adapters", lora.apply_lora, model, 2, 4)
    refused("already has LoRA adapters", lora.apply_lora, lora.merge_lora(model), 2, 4)
    refused("they are merged: call unmerge_lora first", save_adapters, model, "unused.npz")
    refused("no merged LoRA adapters to unmerge", lora.unmerge_lora, tiny_model())
    refused("the model has no LoRA adapters", lora.merge_lora, tiny_model())


def test_adapters_that_do_not_fit_are_refused_and_the_model_is_untouched(tmp_path):
    good = tmp_path / "good.npz"
    lora.apply_lora(trained := tiny_model(), 2, 4)
    save_adapters(trained, good)
    untouched = tiny_model()

    def refused_file(match, data=None, model=untouched, drop=(), **metadata):
        path = tmp_path / "bad.npz"
        path.write_bytes(good.read_bytes() if data is None else data)
        if drop or metadata:
            rewrite_adapters(path, drop, **metadata)
        refused(f"{re.escape(str(path))}: {match}", load_adapters, model, path, error=BadFileError)

    refused_file("adapters for a different base: theirs has n_layers 2, this model 3",
                 model=tiny_model(n_layers=3))
    refused_file("adapters for a different base: same shapes, but not the weights", model=tiny_model(seed=1))
    refused_file("not an .npz archive", data=b"not a zip file")
    damaged = bytearray(good.read_bytes())
    damaged[len(damaged) // 3] ^= 0xFF                                       # one byte of A's data flipped
    refused_file("damaged .npz archive", data=bytes(damaged))
    refused_file("LoRA rank must be a positive integer, got 0", rank=0)
    refused_file("LoRA alpha must be a positive number, got -1", alpha=-1)
    refused_file("LoRA alpha must be a positive number, got True", alpha=True)      # as "rank": true is
    refused_file(r"LoRA alpha 1e\+300 is too large to train", alpha=1e300)
    refused_file(r"LoRA rank 9 is larger than layer h.0.attn.c_attn \(8 -> 24\): at most 8", rank=9)
    refused_file(r"damaged adapters file \(metadata", format="something else")
    refused_file(r"damaged adapters file \(h.1.mlp.c_proj.lora_B is missing\)",
                 drop=["h.1.mlp.c_proj.lora_B"])
    huge = tmp_path / "huge.npz"                             # finite A and B whose merge overflows float32
    lora.apply_lora(overflowing := tiny_model(dtype=np.float32), 2, 4)
    for p in overflowing.parameters(trainable_only=True):
        p.data[...] = 1e20
    save_adapters(overflowing, huge)
    refused(r"merging the adapters of layer h.0.attn.c_attn \(alpha 4, rank 2\) gives non-finite weights",
            load_adapters, tiny_model(dtype=np.float32), huge, error=BadFileError)
    refused("no such file", load_adapters, untouched, tmp_path / "missing.npz", error=FileNotFoundError)
    assert all(p.requires_grad for p in untouched.parameters()) and not any("lora" in name for name, _ in
                                                                            untouched.named_parameters())

    # a model without a GPTConfig: layer names and shapes alone tell a different base
    small = TwoLayers()
    lora.apply_lora(small, 2, 2, targets=("fc", "proj"))
    small_adapters = save_adapters(small, tmp_path / "small.npz").read_bytes()
    refused_file("adapters for a different base: this model has no linear layer proj", data=small_adapters,
                 model=TwoLayers(second="out"))
    refused_file(r"adapters for a different base: layer fc is \(4, 6\) in theirs, \(4, 5\) here",
                 data=small_adapters, model=TwoLayers(hidden=5))


def test_copy_adapters_puts_a_files_A_and_B_back_and_refuses_other_adapters(tmp_path):
    idx, _ = batch(np.random.default_rng(9))
    model = tiny_model(dtype=np.float32)
    lora.apply_lora(model, 2, 4)
    randomize_adapters(model, seed=1)
    saved = save_adapters(model, tmp_path / "best.npz")
    logits = model(idx).data
    randomize_adapters(model, seed=2)                                    # training moves on ...
    assert not np.allclose(model(idx).data, logits)
    copy_adapters(model, saved)                                     # ... and the best come back
    np.testing.assert_array_equal(model(idx).data, logits)

    other = tiny_model(dtype=np.float32)
    lora.apply_lora(other, 3, 4)
    before = {name: p.data.copy() for name, p in other.named_parameters()}
    refused(r"adapters of rank 2, alpha 4 on 8 layers; the model's are rank 3, alpha 4 on 8 layers",
            copy_adapters, other, saved, error=BadFileError)
    assert all(np.array_equal(p.data, before[name]) for name, p in other.named_parameters())
    refused("the model has no LoRA adapters", copy_adapters, tiny_model(), saved)
