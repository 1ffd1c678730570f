"""Fuzzing the loaders: a few hundred mutants of a tiny checkpoint, each one loaded, for the Hugging
Face safetensors layout and for minigpt's own .npz.

Every mutant must either load to exactly the original model or raise the documented error
(BadFileError, or FileNotFoundError): never another exception, never other weights in silence.
The mutations change the header length, the header's bytes, its JSON (dtype, shape, offsets, names,
metadata), or the file's end (truncated, extended). The tensor bytes themselves are left alone:
safetensors has no checksum, so a changed value there is another valid checkpoint, which no reader
can tell from the original (the values a reader can refuse, NaN and inf, are tested in test_weights).

An .npz is a zip archive whose members carry CRC-32s, so there the mutants also flip bytes anywhere:
in the data, a flip is caught by the CRC. Edits that rewrite a member with a correct CRC change the
stored config's JSON or a .npy header's dtype or shape; not its byte order or memory order, which turn
the same bytes into other valid weights that no reader can tell from the original.
"""
import ast
import io
import json
import re
import struct
import zipfile

import numpy as np
import pytest

from minigpt.model import GPTConfig, GPTModel
from minigpt.files.fileio import BadFileError
from minigpt.files.safetensors import read_safetensors
from minigpt.files.weights import CONFIG_KEY, load_hf_gpt2, load_npz, save_npz
from test_weights import tiny_hf_tensors, write_hf_checkpoint

N_MUTANTS = 400
DTYPE_EDITS = ["F32", "F16", "BF16", "F64", "I32", "I64", "I16", "I8", "U8", "BOOL", "Q4", "f32", ["F32"],
               None, 32]


def split(raw):
    """A safetensors file's bytes -> (header as a dict, data buffer)."""
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def join(header, data):
    """A header dict and a data buffer -> a file, with the header padded as the writers pad it."""
    header_bytes = json.dumps(header).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    return struct.pack("<Q", len(header_bytes)) + header_bytes + data


def edit_entry(header, rng):
    """Change one field of one tensor's entry (or the metadata) -> a description of the change."""
    names = [name for name in header if name != "__metadata__"]
    name = names[rng.integers(len(names))]
    entry = header[name]
    kind = rng.choice(["dtype", "shape", "offsets", "rename", "drop", "metadata", "field"])
    if kind == "dtype":
        entry["dtype"] = DTYPE_EDITS[rng.integers(len(DTYPE_EDITS))]
    elif kind == "shape":
        shape, choice = entry["shape"], rng.integers(6)
        if choice == 0:
            entry["shape"] = shape[::-1]
        elif choice == 1:
            entry["shape"] = shape + [1]
        elif choice == 2:
            entry["shape"] = shape[1:] if shape else [1]
        elif choice == 3 and shape:
            i = rng.integers(len(shape))
            entry["shape"][i] = [0, 2 * shape[i], shape[i] // 2 or 1, -shape[i], float(shape[i]), 2 ** 62][
                rng.integers(6)]
        elif choice == 4 and len(shape) >= 2 and shape[0] % 2 == 0:
            entry["shape"] = [shape[0] // 2, shape[1] * 2] + shape[2:]  # the same number of values
        else:
            entry["shape"] = header[names[rng.integers(len(names))]]["shape"]
    elif kind == "offsets":
        delta = int(rng.choice([-8, -4, -2, -1, 1, 2, 4, 8]))
        which = rng.integers(3)  # begin, end or both
        entry["data_offsets"] = [entry["data_offsets"][i] + (delta if which in (i, 2) else 0) for i in (0, 1)]
    elif kind == "rename":
        new = [names[rng.integers(len(names))], f"transformer.{name}", name.replace("h.0.", "h.7."),
               name + "x", name.replace("weight", "bias")][rng.integers(5)]
        header[new] = header.pop(name)  # onto an existing name: the dict keeps one, a gap appears
        return f"rename {name} -> {new}"
    elif kind == "drop":
        del header[name]
    elif kind == "metadata":
        header["__metadata__"] = [{"format": 1}, [], "pt", None, {"format": "pt", "x": "y"}][rng.integers(5)]
        return f"metadata -> {header['__metadata__']!r}"
    elif rng.integers(2):
        del entry[["dtype", "shape", "data_offsets"][rng.integers(3)]]
    else:
        entry["extra"] = 1  # a field the format does not know: ignored, as the reference does
    return f"{kind} of {name} -> {header.get(name)!r}"


def end_mutant(raw, rng, kind, max_junk):
    """`raw` cut at a random length ("truncate") or with 1 to max_junk random bytes appended ("extend")."""
    if kind == "truncate":
        size = int(rng.integers(0, len(raw)))
        return f"truncated to {size} bytes", raw[:size]
    junk = rng.integers(0, 256, size=rng.integers(1, max_junk + 1)).astype(np.uint8).tobytes()
    return f"{len(junk)} bytes appended", raw + junk


def mutate(raw, rng):
    """One random mutant of the file `raw` -> (description, bytes)."""
    (n,) = struct.unpack("<Q", raw[:8])
    kind = rng.choice(["bytes", "length", "truncate", "extend", "json", "json", "json"])
    if kind == "bytes":  # a few bytes of the length or the header overwritten
        mutant = np.frombuffer(raw, np.uint8).copy()
        where = rng.integers(0, 8 + n, size=rng.integers(1, 4))
        mutant[where] = rng.integers(0, 256, size=len(where))
        return f"bytes {sorted(where.tolist())} overwritten", mutant.tobytes()
    if kind == "length":
        new = int(rng.choice([n + int(rng.integers(-9, 10)), int(rng.integers(0, 2 ** 63))]))
        return f"header length {n} -> {new}", struct.pack("<Q", new) + raw[8:]
    if kind in ("truncate", "extend"):
        return end_mutant(raw, rng, kind, max_junk=16)
    header, data = split(raw)
    return edit_entry(header, rng), join(header, data)


def mutants(directory):
    """Write N_MUTANTS seeded mutants of the checkpoint in `directory`, one at a time, over its
    model.safetensors (config.json stays) -> yields each one's description."""
    weights_file = directory / "model.safetensors"
    raw, rng = weights_file.read_bytes(), np.random.default_rng(8)
    for _ in range(N_MUTANTS):
        description, mutant = mutate(raw, rng)
        weights_file.write_bytes(mutant)
        yield description


def assert_each_loads_exactly_or_is_refused(original, descriptions, load):
    """For each mutant (written in place, one description each), load() must give exactly `original`
    or raise a one-line BadFileError / FileNotFoundError; both outcomes must occur."""
    expected = original.state_dict()
    outcomes = {"loaded": 0, "refused": 0}
    for description in descriptions:
        try:
            model = load()
        except (BadFileError, FileNotFoundError) as e:
            assert "\n" not in str(e), description
            outcomes["refused"] += 1
            continue
        state = model.state_dict()
        assert model.cfg == original.cfg and all(np.array_equal(state[name], value)
                                                 for name, value in expected.items()), description
        outcomes["loaded"] += 1
    # Both outcomes occur: the mutants neither all break the file nor all miss what matters.
    assert outcomes["refused"] > N_MUTANTS / 2 and outcomes["loaded"] > 0, outcomes


def test_every_mutant_loads_exactly_or_is_refused(tmp_path):
    original = load_hf_gpt2(write_hf_checkpoint(tmp_path, tiny_hf_tensors()))
    assert_each_loads_exactly_or_is_refused(original, mutants(tmp_path), lambda: load_hf_gpt2(tmp_path))


def test_every_mutant_is_judged_like_the_reference_library_judges_it(tmp_path):
    """Where the reference implementation is installed: the same files are valid for both readers."""
    load_file = pytest.importorskip("safetensors.numpy").load_file
    write_hf_checkpoint(tmp_path, tiny_hf_tensors())
    for description in mutants(tmp_path):
        try:
            read_safetensors(tmp_path / "model.safetensors")
            ours = "valid"
        except BadFileError:
            ours = "refused"
        try:
            load_file(tmp_path / "model.safetensors")
            theirs = "valid"
        except Exception:  # the reference raises several types (SafetensorError, ValueError, ...)
            theirs = "refused"
        assert ours == theirs, f"{description}: minigpt says {ours}, the reference library {theirs}"


# ----------------------------------------------------------------------------- minigpt's .npz

NPY_DTYPE_EDITS = ["<f4", "<f8", "<f2", "<i4", "<u4", "|b1", "|u1", "<c8", "|O", "<U1", "|V4", "f4", "<q"]
# Each makes the config invalid or contradict the arrays, or leaves it as it was (n_layers 2, emb_dim 8):
# a valid other n_heads or drop_rate would be another valid model.
CONFIG_EDITS = [("n_layers", 2), ("n_layers", 3), ("n_layers", 10 ** 6), ("n_layers", 0), ("n_layers", "2"),
                ("emb_dim", 8), ("emb_dim", 2 ** 40), ("n_heads", 3), ("vocab_size", 39),
                ("vocab_size", 10 ** 12),
                ("context_length", 9), ("qkv_bias", "no"), ("qkv_bias", False), ("qkv_bias", None),
                ("drop_rate", -1), ("drop_rate", "x"), ("unknown", 1)]


def npz_members(raw):
    with zipfile.ZipFile(io.BytesIO(raw)) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def npz_bytes(members):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def edit_npy_header(content, rng):
    """A .npy member with its header's dtype or shape edited (the data stays) -> (description, bytes)."""
    header_length = int.from_bytes(content[8:10], "little")
    header = content[10:10 + header_length].decode("latin1")
    if rng.integers(2):
        new = NPY_DTYPE_EDITS[rng.integers(len(NPY_DTYPE_EDITS))]
        edited = re.sub(r"'descr': '[^']*'", f"'descr': '{new}'", header)
    else:
        shape = ast.literal_eval(re.search(r"'shape': (\([^)]*\))", header).group(1))
        new = [shape[::-1], shape + (1,), shape[1:], (2 * shape[0],) + shape[1:], (0,) + shape[1:],
               (2 ** 40,) + shape[1:], (-1,) + shape[1:]][rng.integers(7)]
        edited = re.sub(r"'shape': \([^)]*\)", f"'shape': {tuple(new)!r}", header)
    edited = edited.rstrip().ljust(header_length - 1) + "\n"  # keep the length: the data stays aligned
    edited_bytes = edited.encode("latin1")[:header_length]
    return f"header -> {new}", content[:10] + edited_bytes + content[10 + header_length:]


def mutate_npz(raw, rng):
    """One random mutant of the .npz `raw` -> (description, bytes)."""
    kind = rng.choice(["flip", "flip", "truncate", "extend", "config", "header", "header"])
    if kind == "flip":  # anywhere: local headers, data (caught by the CRCs), the central directory
        mutant = np.frombuffer(raw, np.uint8).copy()
        where = rng.integers(0, len(raw), size=rng.integers(1, 4))
        mutant[where] ^= rng.integers(1, 256, size=len(where)).astype(np.uint8)
        return f"bytes {sorted(where.tolist())} flipped", mutant.tobytes()
    if kind in ("truncate", "extend"):
        return end_mutant(raw, rng, kind, max_junk=64)
    members = npz_members(raw)
    if kind == "config":
        config = json.loads(np.load(io.BytesIO(members[f"{CONFIG_KEY}.npy"]))[()].item())
        field, value = CONFIG_EDITS[rng.integers(len(CONFIG_EDITS))]
        config[field] = value
        buffer = io.BytesIO()
        np.save(buffer, np.array(json.dumps(config)))
        members[f"{CONFIG_KEY}.npy"] = buffer.getvalue()
        return f"config {field} -> {value!r}", npz_bytes(members)
    names = sorted(name for name in members if name != f"{CONFIG_KEY}.npy")
    name = names[rng.integers(len(names))]
    description, members[name] = edit_npy_header(members[name], rng)
    return f"{name}: {description}", npz_bytes(members)


def test_every_npz_mutant_loads_exactly_or_is_refused(tmp_path):
    model = GPTModel(GPTConfig(vocab_size=40, context_length=8, emb_dim=8, n_heads=2, n_layers=2), seed=3)
    path = save_npz(model, tmp_path / "m.npz")
    raw, rng = path.read_bytes(), np.random.default_rng(9)

    def npz_mutants():
        for _ in range(N_MUTANTS):
            description, mutant = mutate_npz(raw, rng)
            path.write_bytes(mutant)
            yield description

    assert_each_loads_exactly_or_is_refused(model, npz_mutants(), lambda: load_npz(path))
