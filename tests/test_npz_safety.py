"""Our .npz files (weights, checkpoints, LoRA adapters) are checked before they cost memory or change
weights in silence: the stored config against the arrays' .npy headers before the model is built, each
array's header before its data is read, integer/bool or NaN/inf arrays refused with the tensor's name."""
import io
import json
import re
import tracemalloc
import zipfile

import numpy as np
import numpy.lib.format
import pytest

import train
from minigpt import lora
from minigpt.files.checkpoint import read_checkpoint, restore_checkpoint, save_checkpoint
from minigpt.training import TrainState
from minigpt.data import InstructionDataset
from minigpt.loader import DataLoader
from minigpt.model import GPTConfig, GPTModel, parameter_shapes
from minigpt.optim import AdamW
from minigpt.files.fileio import BadFileError
from minigpt.tasks import make_task_splits
from minigpt.tokenizer import byte_tokenizer
from minigpt.files.weights import CONFIG_KEY, load_npz, save_npz
from minigpt.files.adapters import load_adapters, save_adapters

TINY = dict(vocab_size=257, context_length=64, emb_dim=16, n_heads=2, n_layers=1)


def npy_bytes(array=None, header=None, data=b""):
    """An .npy file: of `array`, or a hand-made `header` dict followed by `data`."""
    buffer = io.BytesIO()
    if header is None:
        np.save(buffer, array)
    else:
        numpy.lib.format.write_array_header_1_0(buffer, header)
        buffer.write(data)
    return buffer.getvalue()


def write_zip(path, members, compress=False):
    """An .npz whose members are {name: .npy bytes, or a callable writing them to a file object}."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as archive:
        for name, content in members.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as f:
                content(f) if callable(content) else f.write(content)
    return path


def members_of(model, **config_changes):
    """The members save_npz writes for `model`, with the stored config changed by `config_changes`."""
    config = {**model.cfg.__dict__, **config_changes}
    members = {name: npy_bytes(value) for name, value in model.state_dict().items()}
    members[CONFIG_KEY] = npy_bytes(np.array(json.dumps(config)))
    return members


def inflating_member(n):
    """An .npy writer for n float32 zeros: 4n bytes that deflate to about a thousandth of that."""
    def write(f):
        numpy.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (n,)})
        chunk = bytes(2 ** 22)
        for _ in range(4 * n // len(chunk)):
            f.write(chunk)
    return write


def peak_memory(fn, *args):
    """Run fn(*args) -> (the exception it raised, the peak of memory traced meanwhile, in bytes)."""
    tracemalloc.start()
    try:
        fn(*args)
        raised = None
    except Exception as e:  # noqa: BLE001 - the caller asserts the type
        raised = e
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return raised, peak


def test_parameter_shapes_are_the_models_own():
    for cfg in (GPTConfig(**TINY), GPTConfig(**{**TINY, "n_layers": 3, "qkv_bias": False})):
        model = GPTModel(cfg)
        assert list(parameter_shapes(cfg)) == [(name, p.shape) for name, p in model.named_parameters()]


@pytest.mark.parametrize("changes, message", [
    (dict(n_layers=10 ** 6), "missing tensor h.1.ln_1.weight, which the stored config (vocab_size 257, "
                             "context_length 64, emb_dim 16, n_heads 2, n_layers 1000000, qkv_bias True) "
                             "implies"),
    (dict(emb_dim=2 ** 40, n_heads=1),
     "tensor wte.weight has shape (257, 16), but the stored config implies (257, 1099511627776)"),
    (dict(vocab_size=10 ** 9), "tensor wte.weight has shape (257, 16)"),
])
def test_a_config_that_does_not_fit_the_arrays_is_refused_before_the_model_is_built(tmp_path, changes,
                                                                                    message):
    path = write_zip(tmp_path / "m.npz", members_of(GPTModel(GPTConfig(**TINY)), **changes))
    raised, peak = peak_memory(load_npz, path)
    assert isinstance(raised, BadFileError) and message in str(raised), raised
    assert peak < 4 * 2 ** 20


def test_a_member_that_inflates_is_refused_from_its_header_before_it_is_read(tmp_path):
    members = members_of(GPTModel(GPTConfig(**TINY)))
    path = write_zip(tmp_path / "m.npz", {**members, "wpe.weight": inflating_member(2 ** 24)},  # 64 MiB
                     compress=True)
    raised, peak = peak_memory(load_npz, path)
    assert isinstance(raised, BadFileError) and "tensor wpe.weight has shape (16777216,)" in str(raised)
    assert peak < 8 * 2 ** 20


@pytest.mark.parametrize("header, data, message", [
    ({"descr": "<f4", "fortran_order": False, "shape": (257, 16)}, bytes(100),
     "entry 'wte.weight': its header says (257, 16) float32 (16448 bytes) but it holds 100"),
    ({"descr": "<i4", "fortran_order": False, "shape": (257, 16)}, bytes(4 * 257 * 16),
     "tensor wte.weight has dtype int32, but a parameter must be floating point"),
    ({"descr": "|b1", "fortran_order": False, "shape": (257, 16)}, bytes(257 * 16),
     "tensor wte.weight has dtype bool"),
])
def test_a_member_whose_header_lies_or_is_not_float_is_refused(tmp_path, header, data, message):
    members = members_of(GPTModel(GPTConfig(**TINY)))
    members["wte.weight"] = npy_bytes(header=header, data=data)
    with pytest.raises(BadFileError, match=re.escape(message)):
        load_npz(write_zip(tmp_path / "m.npz", members))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_weights_holding_nan_or_inf_are_refused_with_the_tensor(tmp_path, bad):
    model = GPTModel(GPTConfig(**TINY))
    model.h[0].mlp.c_fc.weight.data[3, 5] = bad
    with pytest.raises(BadFileError, match=re.escape("tensor h.0.mlp.c_fc.weight holds 1 non-finite value "
                                                     "(NaN or inf; the first at index (3, 5))")):
        load_npz(save_npz(model, tmp_path / "m.npz"))


@pytest.mark.parametrize("field, value", [("qkv_bias", "no"), ("qkv_bias", 1), ("drop_rate", "0.1"),
                                          ("drop_rate", True)])
def test_config_fields_must_have_their_json_type(tmp_path, field, value):
    path = write_zip(tmp_path / "m.npz", members_of(GPTModel(GPTConfig(**TINY)), **{field: value}))
    with pytest.raises(BadFileError, match=f"GPTConfig.{field} must be"):
        load_npz(path)
    with pytest.raises(ValueError, match=f"GPTConfig.{field} must be"):
        GPTConfig(**{**TINY, field: value})


# ----------------------------------------------------------------------------- checkpoints

def checkpoint_parts():
    train_entries, _, _ = make_task_splits(seed=0, n_train=8, n_val=1, n_test=1)
    tokenizer = byte_tokenizer()
    loader = DataLoader(InstructionDataset(train_entries, tokenizer, "phi3"), batch_size=4)
    model = GPTModel(GPTConfig(**TINY))
    return model, AdamW(model.parameters()), loader


def rewrite_checkpoint(path, change):
    """Rewrite the checkpoint at `path` with change(name, array) -> array for every entry."""
    with np.load(path) as archive:
        arrays = {name: change(name, archive[name]) for name in archive.files}
    np.savez(path, **arrays)


@pytest.mark.parametrize("entry, value, message", [
    ("model/ln_f.weight", np.full(16, np.nan, np.float32), "tensor ln_f.weight holds 16 non-finite values"),
    ("model/wpe.weight", np.ones((64, 16), np.int32), "tensor wpe.weight has dtype int32"),
    ("optimizer/exp_avg_sq/0", np.ones((257, 16), np.float16) * np.inf,
     "tensor optimizer/exp_avg_sq/0 holds 4112 non-finite values"),
    ("optimizer/exp_avg/1", np.ones(3, np.float32), "optimizer/exp_avg/1 has shape (3,), expected (64, 16)"),
])
def test_restore_refuses_weights_or_adam_state_that_would_load_wrong(tmp_path, entry, value, message):
    model, optimizer, loader = checkpoint_parts()
    path = save_checkpoint(tmp_path / "c.npz", model, optimizer, TrainState())
    rewrite_checkpoint(path, lambda name, array: value if name == entry else array)
    with pytest.raises(ValueError, match=re.escape(message)):
        restore_checkpoint(path, *checkpoint_parts())


def test_a_checkpoint_config_that_does_not_fit_its_arrays_is_refused_on_reading(tmp_path):
    model, optimizer, _ = checkpoint_parts()
    path = save_checkpoint(tmp_path / "c.npz", model, optimizer, TrainState())

    def claim_a_million_layers(name, array):
        if name != "state":
            return array
        meta = json.loads(str(array[()]))
        meta["model_config"]["n_layers"] = 10 ** 6
        return np.array(json.dumps(meta))

    rewrite_checkpoint(path, claim_a_million_layers)
    raised, peak = peak_memory(read_checkpoint, path)
    assert isinstance(raised, ValueError) and "missing tensor h.1.ln_1.weight" in str(raised), raised
    assert peak < 4 * 2 ** 20


def test_resume_with_nan_weights_in_the_checkpoint_is_one_line(tmp_path, capsys):
    run_dir = tmp_path / "run"
    tiny = ["--emb-dim", "16", "--n-layers", "1", "--n-heads", "2", "--n-train", "8", "--n-val", "2",
            "--n-test", "2", "--batch-size", "4", "--max-steps", "1", "--max-new-tokens", "2"]
    assert train.main(tiny + ["--out-dir", str(run_dir)]) == 0
    rewrite_checkpoint(run_dir / "checkpoint.npz", lambda name, array: (
        np.full_like(array, np.inf) if name == "model/h.0.attn.c_proj.bias" else array))
    capsys.readouterr()
    assert train.main(["--resume", str(run_dir), "--max-steps", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "tensor h.0.attn.c_proj.bias holds 16 non-finite values" in err


# ----------------------------------------------------------------------------- LoRA adapters

def test_adapters_are_checked_from_their_headers_and_must_be_finite_floats(tmp_path):
    model = GPTModel(GPTConfig(**TINY))
    lora.apply_lora(model, 2, 4, targets=("attn.c_attn",))
    path = save_adapters(model, tmp_path / "a.npz")
    with zipfile.ZipFile(path) as archive:
        members = {name.removesuffix(".npy"): archive.read(name) for name in archive.namelist()}
    big = {**members, "h.0.attn.c_attn.lora_A": inflating_member(2 ** 24)}
    inflating = write_zip(tmp_path / "big.npz", big, compress=True)
    raised, peak = peak_memory(load_adapters, GPTModel(GPTConfig(**TINY)), inflating)
    assert isinstance(raised, BadFileError)
    assert "h.0.attn.c_attn.lora_A has shape (16777216,)" in str(raised)
    assert peak < 8 * 2 ** 20
    ints = write_zip(tmp_path / "ints.npz", {**members, "h.0.attn.c_attn.lora_B": npy_bytes(
        np.ones((2, 48), np.int32))})
    with pytest.raises(BadFileError, match="tensor h.0.attn.c_attn.lora_B has dtype int32"):
        load_adapters(GPTModel(GPTConfig(**TINY)), ints)
