"""Loading and saving GPT-2 weights: both Hugging Face layouts, our .npz, downloads, the convert CLI.

Every checkpoint here is tiny, random and written by the test itself; nothing touches the network.
"""
import json
import os
import re
import socket
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from minigpt.files import weights
from minigpt.model import GPT2_PRESETS, GPTConfig, GPTModel
from minigpt.files.fileio import BadFileError
from minigpt.files.safetensors import (bf16_bits_to_float32, float32_to_bf16_bits,
                                       read_safetensors, write_safetensors)
from minigpt.files.weights import (check_float_parameter, load_hf_gpt2, load_npz, load_weights, save_hf_gpt2,
                                   save_npz, weights_format)

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY = dict(vocab_size=50, context_length=16, emb_dim=8, n_heads=2, n_layers=2)


def tiny_hf_tensors(seed=0, qkv_bias=True):
    """A random GPT-2 state in HF names, built from the layout itself rather than from GPTModel."""
    rng = np.random.default_rng(seed)
    V, T, C = TINY["vocab_size"], TINY["context_length"], TINY["emb_dim"]
    shapes = {"wte.weight": (V, C), "wpe.weight": (T, C), "ln_f.weight": (C,), "ln_f.bias": (C,)}
    for i in range(TINY["n_layers"]):
        shapes.update({
            f"h.{i}.ln_1.weight": (C,), f"h.{i}.ln_1.bias": (C,),
            f"h.{i}.attn.c_attn.weight": (C, 3 * C), f"h.{i}.attn.c_proj.weight": (C, C),
            f"h.{i}.attn.c_proj.bias": (C,), f"h.{i}.ln_2.weight": (C,), f"h.{i}.ln_2.bias": (C,),
            f"h.{i}.mlp.c_fc.weight": (C, 4 * C), f"h.{i}.mlp.c_fc.bias": (4 * C,),
            f"h.{i}.mlp.c_proj.weight": (4 * C, C), f"h.{i}.mlp.c_proj.bias": (C,),
        })
        if qkv_bias:
            shapes[f"h.{i}.attn.c_attn.bias"] = (3 * C,)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def write_hf_checkpoint(directory, tensors, prefixed=False, float_dtype="F32", config=None):
    """Write `tensors` like the hub files (plain names + mask buffers) or like save_pretrained."""
    directory.mkdir(parents=True, exist_ok=True)
    stored = {(f"transformer.{name}" if prefixed else name): value for name, value in tensors.items()}
    if not prefixed:  # the hub files also hold the causal-mask buffers, which are not parameters
        T = TINY["context_length"]
        for i in range(TINY["n_layers"]):
            stored[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, T, T), np.float32))
            stored[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    write_safetensors(directory / "model.safetensors", stored, float_dtype=float_dtype)
    if config is not False:
        config = config or {"model_type": "gpt2", "n_head": TINY["n_heads"], "n_embd": TINY["emb_dim"],
                            "n_layer": TINY["n_layers"], "vocab_size": TINY["vocab_size"],
                            "n_positions": TINY["context_length"]}
        (directory / "config.json").write_text(json.dumps(config))
    return directory


def as_stored(tensors, float_dtype):
    """The float32 values a checkpoint stored in `float_dtype` holds."""
    if float_dtype == "F16":
        return {name: value.astype(np.float16).astype(np.float32) for name, value in tensors.items()}
    if float_dtype == "BF16":
        return {name: bf16_bits_to_float32(float32_to_bf16_bits(value)) for name, value in tensors.items()}
    return tensors


def assert_state_equal(model, expected):
    state = model.state_dict()
    assert sorted(state) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(state[name], value, err_msg=name)


@pytest.mark.parametrize("float_dtype", ["F32", "F16", "BF16"])
@pytest.mark.parametrize("prefixed", [False, True], ids=["hub", "save_pretrained"])
def test_loads_both_hf_layouts_in_every_float_dtype(tmp_path, prefixed, float_dtype):
    tensors = tiny_hf_tensors()
    write_hf_checkpoint(tmp_path, tensors, prefixed, float_dtype)
    for path in (tmp_path, tmp_path / "model.safetensors"):
        model = load_hf_gpt2(path)
        assert model.cfg == GPTConfig(**TINY)
        assert model.dtype == np.float32
        assert_state_equal(model, as_stored(tensors, float_dtype))


@pytest.mark.parametrize("prefixed", [False, True], ids=["hub", "save_pretrained"])
def test_the_config_is_read_from_the_header_alone(tmp_path, monkeypatch, prefixed):
    """What a run's memory estimate reads before loading: the GPTConfig, and no tensor."""
    write_hf_checkpoint(tmp_path / "hf", tiny_hf_tensors(qkv_bias=prefixed), prefixed)
    expected = load_hf_gpt2(tmp_path / "hf").cfg
    save_npz(GPTModel(GPTConfig(**TINY)), tmp_path / "tiny.npz")
    monkeypatch.setattr(weights, "read_safetensors", lambda path: pytest.fail("a tensor was read"))
    for path in (tmp_path / "hf", tmp_path / "hf" / "model.safetensors"):
        assert weights.read_weights_config(path) == expected and expected.qkv_bias is prefixed
    assert weights.read_weights_config(tmp_path / "tiny.npz") == GPTConfig(**TINY)
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        weights.read_weights_config(tmp_path)


def test_loads_in_float64(tmp_path):
    tensors = tiny_hf_tensors()
    model = load_hf_gpt2(write_hf_checkpoint(tmp_path, tensors), dtype=np.float64)
    assert model.dtype == np.float64
    assert_state_equal(model, tensors)


def test_n_heads_from_config_json_or_a_matching_preset(tmp_path, monkeypatch):
    tensors = tiny_hf_tensors()
    assert load_hf_gpt2(write_hf_checkpoint(tmp_path / "a", tensors, config={"n_head": 4})).cfg.n_heads == 4
    write_hf_checkpoint(tmp_path / "b", tensors, config=False)
    with pytest.raises(BadFileError, match="number of attention heads.*config.json"):
        load_hf_gpt2(tmp_path / "b")
    monkeypatch.setitem(GPT2_PRESETS, "gpt2-small", dict(emb_dim=8, n_layers=2, n_heads=2))
    assert load_hf_gpt2(tmp_path / "b").cfg.n_heads == 2


def test_qkv_bias_follows_the_checkpoint(tmp_path):
    tensors = tiny_hf_tensors(qkv_bias=False)
    model = load_hf_gpt2(write_hf_checkpoint(tmp_path, tensors))
    assert model.cfg.qkv_bias is False
    assert_state_equal(model, tensors)


def test_lm_head_must_be_tied(tmp_path):
    tensors = tiny_hf_tensors()
    write_hf_checkpoint(tmp_path / "tied", {**tensors, "lm_head.weight": tensors["wte.weight"]})
    assert_state_equal(load_hf_gpt2(tmp_path / "tied"), tensors)
    write_hf_checkpoint(tmp_path / "untied", {**tensors, "lm_head.weight": tensors["wte.weight"] + 1})
    with pytest.raises(BadFileError, match="lm_head.weight differs from wte.weight"):
        load_hf_gpt2(tmp_path / "untied")


def drop(name):
    return lambda tensors: {k: v for k, v in tensors.items() if k != name}


def reshape(name, shape):
    return lambda tensors: {**tensors, name: np.zeros(shape, np.float32)}


BAD_CHECKPOINTS = {
    "missing": (drop("h.1.mlp.c_fc.bias"), "missing tensor h.1.mlp.c_fc.bias"),
    "missing_wte": (drop("wte.weight"), "missing tensor wte.weight"),
    "misshaped": (reshape("h.0.ln_1.weight", (9,)),
                  "tensor h.0.ln_1.weight has shape (9,), expected (8,)"),
    "misshaped_wpe": (reshape("wpe.weight", (16, 9)),
                      "tensor wpe.weight has shape (16, 9), expected (16, 8)"),
    "unexpected": (lambda t: {**t, "h.0.attn.extra": np.zeros(2, np.float32)},
                   "unexpected tensor h.0.attn.extra"),
    "layer_gap": (lambda t: {k.replace("h.1.", "h.2."): v for k, v in t.items()},
                  "missing tensor h.1."),
    "no_layers": (lambda t: {k: v for k, v in t.items() if not k.startswith("h.")},
                  "no transformer blocks"),
    "twice": (lambda t: {**t, "transformer.ln_f.bias": t["ln_f.bias"]}, "tensor ln_f.bias is stored twice"),
}


@pytest.mark.parametrize("case", sorted(BAD_CHECKPOINTS))
def test_bad_hf_checkpoint_names_the_tensor(tmp_path, case):
    edit, message = BAD_CHECKPOINTS[case]
    write_hf_checkpoint(tmp_path, edit(tiny_hf_tensors()), config={"n_head": 2})
    with pytest.raises(BadFileError, match="model.safetensors") as info:
        load_hf_gpt2(tmp_path)
    assert message in str(info.value)


@pytest.mark.parametrize("dtype", [np.int32, np.bool_, np.int64, np.uint8])
def test_a_parameter_stored_as_integers_or_booleans_is_refused(tmp_path, dtype):
    """An I32 tensor has as many bytes as an F32 one: cast into a float parameter, it would load
    as nonsense without a word."""
    tensors = tiny_hf_tensors()
    tensors["h.1.attn.c_proj.weight"] = np.ones((8, 8), dtype)
    write_hf_checkpoint(tmp_path, tensors)
    message = (f"model.safetensors: tensor h.1.attn.c_proj.weight has dtype {np.dtype(dtype).name}, "
               f"but a parameter must be floating point")
    with pytest.raises(BadFileError, match=message):
        load_hf_gpt2(tmp_path)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("float_dtype", ["F32", "F16", "BF16"])
def test_a_parameter_holding_nan_or_inf_is_refused(tmp_path, bad, float_dtype):
    tensors = tiny_hf_tensors()
    tensors["h.0.mlp.c_fc.weight"][3, 5] = bad
    tensors["h.0.mlp.c_fc.weight"][7, 1] = bad
    write_hf_checkpoint(tmp_path, tensors, float_dtype=float_dtype)
    with pytest.raises(BadFileError) as info:
        load_hf_gpt2(tmp_path)
    assert str(info.value) == (f"{tmp_path / 'model.safetensors'}: tensor h.0.mlp.c_fc.weight holds 2 "
                               f"non-finite values (NaN or inf; the first at index (3, 5))")


def test_check_float_parameter():
    """The check the loaders share: float dtypes only, every value finite."""
    check_float_parameter("f", "w", np.zeros((2, 3), np.float16))  # passes: nothing to raise
    check_float_parameter("f", "w", np.full(3, np.finfo(np.float64).max))  # sums to inf, yet finite
    with pytest.raises(BadFileError, match="^f: tensor w has dtype int8, but a parameter must be"):
        check_float_parameter("f", "w", np.zeros(3, np.int8))
    with pytest.raises(BadFileError, match=r"^f: tensor w holds 1 non-finite value \(NaN or inf; "
                                           r"the first at index \(1,\)\)$"):
        check_float_parameter("f", "w", np.array([np.finfo(np.float64).max, np.nan, 1.0]))


def test_config_json_nested_too_deeply_is_one_line(tmp_path):
    write_hf_checkpoint(tmp_path, tiny_hf_tensors())
    (tmp_path / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(BadFileError, match=r"config.json: invalid JSON: nested too deeply"):
        load_hf_gpt2(tmp_path)


@pytest.mark.parametrize("config, message", [
    ({"n_head": 2, "n_embd": 16}, "n_embd is 16 but the weights"),
    ({"n_head": 3}, "not divisible by n_heads 3"),
    ({"n_head": 2, "activation_function": "relu"}, "activation_function 'relu' is not supported"),
    ({"n_head": 2, "layer_norm_epsilon": 1e-6}, "layer_norm_epsilon 1e-06 is not supported"),
    ({"n_head": 2, "scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=True is not"),
])
def test_config_json_that_disagrees_with_the_weights(tmp_path, config, message):
    write_hf_checkpoint(tmp_path, tiny_hf_tensors(), config=config)
    with pytest.raises(BadFileError, match=message):
        load_hf_gpt2(tmp_path)


def test_hf_export_then_import_is_exact(tmp_path):
    model = GPTModel(GPTConfig(**TINY), seed=3)
    written = save_hf_gpt2(model, tmp_path / "export")
    assert written == tmp_path / "export" / "model.safetensors"
    stored, metadata = read_safetensors(written)
    assert metadata == {"format": "pt"}
    assert sorted(stored) == sorted(model.state_dict())  # hub names: no prefix, no lm_head
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"] and config["model_type"] == "gpt2"
    assert (config["n_embd"], config["n_layer"], config["n_head"], config["n_positions"]) == (8, 2, 2, 16)
    assert config["activation_function"] == "gelu_new" and config["layer_norm_epsilon"] == 1e-5
    again = load_hf_gpt2(tmp_path / "export")
    assert again.cfg == model.cfg
    assert_state_equal(again, model.state_dict())


def test_export_without_qkv_bias_writes_zero_biases_with_the_same_outputs(tmp_path):
    model = GPTModel(GPTConfig(**TINY, qkv_bias=False), seed=4)
    again = load_hf_gpt2(save_hf_gpt2(model, tmp_path / "model.safetensors"))
    assert again.cfg.qkv_bias is True
    np.testing.assert_array_equal(again.state_dict()["h.1.attn.c_attn.bias"], np.zeros(24))
    idx = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    np.testing.assert_array_equal(again(idx).data, model(idx).data)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_npz_round_trip_is_exact(tmp_path, dtype):
    model = GPTModel(GPTConfig(**TINY, drop_rate=0.1, qkv_bias=False), seed=5, dtype=dtype)
    save_npz(model, tmp_path / "m.npz")
    with np.load(tmp_path / "m.npz", allow_pickle=False) as archive:
        assert json.loads(str(archive["__config__"]))["drop_rate"] == 0.1
    again = load_npz(tmp_path / "m.npz", dtype=dtype)
    assert again.cfg == model.cfg and again.dtype == dtype
    assert_state_equal(again, model.state_dict())


def write_npz(path, **arrays):
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


def test_bad_npz_files(tmp_path):
    model = GPTModel(GPTConfig(**TINY))
    state, config = model.state_dict(), np.array(json.dumps(TINY))
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_npz(tmp_path / "absent.npz")
    (tmp_path / "text.npz").write_text("not an archive")
    np.save(tmp_path / "array.npy", np.ones(3))
    cases = {
        tmp_path / "text.npz": "not an .npz archive",
        tmp_path / "array.npy": "not an .npz archive",
        write_npz(tmp_path / "no_config.npz", **state): "no __config__ entry",
        write_npz(tmp_path / "bad_config.npz",
                  __config__=np.array('{"emb_dim": "x"}')): "not a valid GPTConfig",
        write_npz(tmp_path / "deep_config.npz", __config__=np.array("[" * 100_000 + "]" * 100_000),
                  **state): "__config__: invalid JSON: nested too deeply",
        write_npz(tmp_path / "missing.npz", __config__=config,
                  **drop("ln_f.bias")(state)): "missing tensor ln_f.bias",
        write_npz(tmp_path / "misshaped.npz", __config__=config,
                  **{**state, "wte.weight": np.ones((50, 4))}): "tensor wte.weight has shape (50, 4)",
        write_npz(tmp_path / "object.npz", __config__=config,
                  **{**state, "wte.weight": np.array([None], dtype=object)}): "damaged .npz archive",
    }
    for path, message in cases.items():
        with pytest.raises(BadFileError, match=re.escape(message)):
            load_npz(path)


def test_load_weights_dispatches_on_the_path(tmp_path):
    model = GPTModel(GPTConfig(**TINY), seed=6)
    save_npz(model, tmp_path / "m.npz")
    save_hf_gpt2(model, tmp_path / "hf")
    for path in (tmp_path / "m.npz", tmp_path / "hf", tmp_path / "hf" / "model.safetensors"):
        assert_state_equal(load_weights(path), model.state_dict())
    assert weights_format(tmp_path / "new_dir") == "hf"
    with pytest.raises(BadFileError, match="expected a .npz file, a .safetensors file or a directory"):
        load_weights(tmp_path / "weights.pt")
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        load_weights(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="no model.safetensors in this directory"):
        load_weights(tmp_path)


def closed_port_url():
    """A URL template on a local port nobody listens on: downloads fail at once, offline."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/{{repo}}/{{filename}}"


def test_download_without_network_fails_fast_saying_how_to_use_a_local_file(tmp_path, monkeypatch):
    monkeypatch.setattr(weights, "HF_URL", closed_port_url())
    with pytest.raises(ConnectionError) as info:
        weights.pretrained_gpt2("gpt2-small", tmp_path)
    assert "openai-community/gpt2" in str(info.value) and "--weights PATH" in str(info.value)
    assert not any(tmp_path.rglob("*.safetensors"))
    with pytest.raises(ValueError, match="unknown GPT-2 model 'gpt3'"):
        weights.pretrained_gpt2("gpt3", tmp_path)


def test_pretrained_uses_the_cache_and_converts_once(tmp_path, monkeypatch):
    monkeypatch.setattr(weights, "HF_URL", closed_port_url())  # any download attempt would fail
    tensors = tiny_hf_tensors()
    write_hf_checkpoint(tmp_path / "gpt2-medium", tensors)
    assert weights.download_gpt2("gpt2-medium", tmp_path) == tmp_path / "gpt2-medium"
    assert_state_equal(weights.pretrained_gpt2("gpt2-medium", tmp_path), tensors)
    assert (tmp_path / "gpt2-medium.npz").is_file()
    (tmp_path / "gpt2-medium" / "model.safetensors").unlink()  # from now on only the .npz is read
    assert_state_equal(weights.pretrained_gpt2("gpt2-medium", tmp_path), tensors)


# ----------------------------------------------------------------------------- python -m minigpt.convert

def start_convert(*args):
    """Start `python -m minigpt.convert args` in a fresh process, as a user would run it."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen([sys.executable, "-m", "minigpt.files.convert", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO_ROOT)


def finish(process):
    stdout, stderr = process.communicate(timeout=60)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def run_convert(*args):
    return finish(start_convert(*args))


def test_convert_both_ways(tmp_path):
    tensors = tiny_hf_tensors()
    write_hf_checkpoint(tmp_path / "hf", tensors, float_dtype="F16")
    result = run_convert(tmp_path / "hf", tmp_path / "m.npz")
    assert result.returncode == 0, result.stderr
    result = run_convert(tmp_path / "m.npz", tmp_path / "export")
    assert result.returncode == 0, result.stderr
    assert_state_equal(load_hf_gpt2(tmp_path / "export"), as_stored(tensors, "F16"))


def write_raw(path, dtype, data):
    """A safetensors file holding one (50, 8) wte.weight of `dtype`, with `data` as its buffer."""
    entry = {"dtype": dtype, "shape": [50, 8], "data_offsets": [0, 1600]}
    header = json.dumps({"wte.weight": entry}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def corrupt_inputs(tmp_path):
    """name -> (IN path, expected fragment of the error line)."""
    good = tiny_hf_tensors()
    write_hf_checkpoint(tmp_path / "missing_tensor", drop("ln_f.weight")(good))
    write_hf_checkpoint(tmp_path / "misshaped", reshape("h.1.mlp.c_fc.weight", (8, 5))(good))
    text = tmp_path / "text.safetensors"
    text.write_text("hello, this is not a checkpoint")
    long_header = tmp_path / "long_header.safetensors"
    long_header.write_bytes(struct.pack("<Q", 10**6) + b"{}")
    past_end = write_raw(tmp_path / "past_end.safetensors", "F32", data=bytes(64))
    odd_dtype = write_raw(tmp_path / "odd_dtype.safetensors", "F8_E9", data=bytes(1600))
    (tmp_path / "fake.npz").write_text("not a zip")
    return {
        "absent": (tmp_path / "absent.safetensors", "no such file"),
        "text": (text, "header length"),
        "long_header": (long_header, "header length 1000000 is longer than the file"),
        "past_end": (past_end, "run past the end of the file"),
        "odd_dtype": (odd_dtype, "unknown dtype 'F8_E9'"),
        "missing_tensor": (tmp_path / "missing_tensor", "missing tensor ln_f.weight"),
        "misshaped": (tmp_path / "misshaped", "tensor h.1.mlp.c_fc.weight has shape (8, 5)"),
        "fake_npz": (tmp_path / "fake.npz", "not an .npz archive"),
    }


def test_convert_reports_each_bad_input_in_one_line(tmp_path):
    cases = corrupt_inputs(tmp_path)
    processes = {name: start_convert(path, tmp_path / f"{name}.npz") for name, (path, _) in cases.items()}
    for name, (_, message) in cases.items():  # the processes run in parallel; check each in turn
        result = finish(processes[name])
        assert result.returncode == 2, (name, result.stderr)
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, (name, result.stderr)
        assert message in result.stderr, (name, result.stderr)
        assert result.stdout == ""
        assert not (tmp_path / f"{name}.npz").exists()


def test_convert_rejects_an_unknown_output_before_reading_the_input(tmp_path):
    result = run_convert(tmp_path / "absent.safetensors", tmp_path / "out.bin")
    assert result.returncode == 2
    assert result.stderr == f"error: {tmp_path / 'out.bin'}: expected a .npz file, a .safetensors file " \
                            f"or a directory holding model.safetensors\n"
