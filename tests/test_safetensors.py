"""The NumPy safetensors reader and writer: round trips, the byte layout, and every malformed file."""
import json
import struct

import numpy as np
import pytest

from minigpt.files.fileio import BadFileError
from minigpt.files.safetensors import (bf16_bits_to_float32, float32_to_bf16_bits,
                                       read_safetensors, write_safetensors)


def raw_safetensors(path, header, data=b""):
    """Write a file byte by byte from the format description, independently of write_safetensors."""
    header_bytes = json.dumps(header).encode() if not isinstance(header, bytes) else header
    path.write_bytes(struct.pack("<Q", len(header_bytes)) + header_bytes + data)
    return path


def test_round_trip_keeps_names_shapes_and_exact_values(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "f32": rng.standard_normal((3, 4)).astype(np.float32),
        "f64": rng.standard_normal(5),
        "i64": np.arange(-3, 3, dtype=np.int64),
        "i32": np.arange(6, dtype=np.int32).reshape(2, 3),
        "u8": np.arange(256, dtype=np.uint8),
        "bool": np.array([True, False, True]),
        "scalar": np.array(2.5, dtype=np.float32),
        "empty": np.zeros((0, 3), np.float32),
        "big_endian": np.arange(4, dtype=">f4"),
    }
    write_safetensors(tmp_path / "t.safetensors", tensors)
    loaded, _ = read_safetensors(tmp_path / "t.safetensors")
    assert sorted(loaded) == sorted(tensors)
    for name, expected in tensors.items():
        assert loaded[name].shape == expected.shape, name
        assert loaded[name].dtype == expected.dtype.newbyteorder("="), name
        np.testing.assert_array_equal(loaded[name], expected, err_msg=name)


def test_layout_padded_header_sorted_contiguous_tensors_and_format_metadata(tmp_path):
    path = tmp_path / "t.safetensors"
    write_safetensors(path, {"b": np.ones(3, np.float32), "a": np.arange(2, dtype=np.int64)}, {"note": "hi"})
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0
    header = json.loads(raw[8:8 + n])
    assert header["__metadata__"] == {"format": "pt", "note": "hi"}
    assert header["a"] == {"dtype": "I64", "shape": [2], "data_offsets": [0, 16]}
    assert header["b"] == {"dtype": "F32", "shape": [3], "data_offsets": [16, 28]}
    assert raw[8 + n:] == np.arange(2, dtype="<i8").tobytes() + np.ones(3, "<f4").tobytes()
    _, metadata = read_safetensors(path)
    assert metadata == {"format": "pt", "note": "hi"}


def test_float32_tensors_are_read_only_views_of_the_file(tmp_path):
    write_safetensors(tmp_path / "t.safetensors", {"w": np.ones((4, 4), np.float32)})
    w = read_safetensors(tmp_path / "t.safetensors")[0]["w"]
    assert not w.flags.owndata and not w.flags.writeable


def test_half_precision_is_widened_to_float32(tmp_path):
    bf16_bits = np.array([0x3F80, 0xC020, 0x4049, 0x0000], dtype="<u2")  # 1.0, -2.5, 3.140625, 0.0
    f16 = np.array([0.5, -1.25, 65504.0], dtype="<f2")
    path = raw_safetensors(tmp_path / "h.safetensors", {
        "bf": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, 8]},
        "h": {"dtype": "F16", "shape": [3], "data_offsets": [8, 14]},
    }, bf16_bits.tobytes() + f16.tobytes())
    tensors, metadata = read_safetensors(path)
    assert metadata == {}
    assert tensors["bf"].dtype == np.float32 and tensors["h"].dtype == np.float32
    np.testing.assert_array_equal(tensors["bf"], [[1.0, -2.5], [3.140625, 0.0]])
    np.testing.assert_array_equal(tensors["h"], [0.5, -1.25, 65504.0])


def test_bf16_rounds_to_nearest_even():
    x = np.array([1.0, 1 + 2**-8, 1 + 3 * 2**-8, -3.0, np.inf, np.nan], np.float32)
    back = bf16_bits_to_float32(float32_to_bf16_bits(x))
    # bfloat16 keeps 7 mantissa bits: 1 + 2**-8 is halfway and rounds to the even 1.0
    np.testing.assert_array_equal(back[:5], [1.0, 1.0, 1 + 2**-6, -3.0, np.inf])
    assert np.isnan(back[5])


@pytest.mark.parametrize("float_dtype, tolerance", [("F16", 1e-3), ("BF16", 4e-3), ("F64", 0)])
def test_writing_floats_in_lower_precision(tmp_path, float_dtype, tolerance):
    x = np.random.default_rng(1).standard_normal(100).astype(np.float32)
    write_safetensors(tmp_path / "t.safetensors", {"x": x, "ids": np.arange(3)}, float_dtype=float_dtype)
    tensors, _ = read_safetensors(tmp_path / "t.safetensors")
    np.testing.assert_allclose(tensors["x"], x, rtol=tolerance)
    assert tensors["ids"].dtype == np.int64  # integers are never cast


def test_writer_rejects_what_safetensors_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match="cannot store"):
        write_safetensors(tmp_path / "t.safetensors", {"c": np.ones(2, np.complex64)})
    with pytest.raises(ValueError, match="reserved"):
        write_safetensors(tmp_path / "t.safetensors", {"__metadata__": np.ones(2)})
    with pytest.raises(TypeError, match="str to str"):
        write_safetensors(tmp_path / "t.safetensors", {"x": np.ones(2)}, {"step": 3})
    assert not list(tmp_path.iterdir())  # nothing half-written


def f32_entry(begin, end, shape):
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}


CORRUPT_FILES = {
    "empty": (b"", "file is empty"),
    "too_small": (b"\x01\x02\x03", "too small to be a safetensors file"),
    "header_longer_than_file": (struct.pack("<Q", 1000) + b"{}",
                                "header length 1000 is longer than the file"),
    "not_utf8": ((b'{"\xff": 1}', b""), "header: not UTF-8 text (byte 2"),
    "not_json": ((b"{oops", b""), "header: invalid JSON at line 1, column 2"),
    "not_object": ((b"[1, 2]", b""), "header is not a JSON object"),
    "unknown_dtype": (({"w": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 4]}}, bytes(4)),
                      "tensor 'w' has unknown dtype 'Q4'"),
    "size_mismatch": (({"w": f32_entry(0, 4, [2])}, bytes(8)), "needs 8 bytes but data_offsets"),
    "past_end": (({"w": f32_entry(0, 8, [2])}, bytes(4)), "run past the end of the file"),
    "overlap": (({"a": f32_entry(0, 8, [2]), "b": f32_entry(4, 12, [2])}, bytes(12)), "'a' and 'b' overlap"),
    "bad_shape": (({"w": f32_entry(0, 4, [-1])}, bytes(4)), "invalid shape"),
    "bad_offsets": (({"w": f32_entry(8, 4, [1])}, bytes(8)), "invalid data_offsets"),
    "missing_field": (({"w": {"dtype": "F32", "shape": [1]}}, bytes(4)),
                      "needs dtype, shape and data_offsets"),
    "duplicate": ((b'{"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, '
                   b'"w": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}', bytes(2)),
                  "names tensor 'w' more than once"),
    # The format's own rules (huggingface/safetensors README, "Format"): the header is a JSON object
    # starting with '{', its metadata maps strings to strings, and the tensors cover the data
    # buffer exactly, with neither gaps nor trailing bytes.
    "header_starts_with_space": ((b' {"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}', bytes(1)),
                                 "header is not a JSON object (it must start with '{')"),
    "gap": (({"a": f32_entry(0, 4, [1]), "b": f32_entry(8, 12, [1])}, bytes(12)),
            "bytes 4..8 of the data buffer belong to no tensor"),
    "gap_at_start": (({"w": f32_entry(4, 8, [1])}, bytes(8)),
                     "bytes 0..4 of the data buffer belong to no tensor"),
    "trailing_junk": (({"w": f32_entry(0, 4, [1])}, bytes(4) + b"junk"),
                      "4 bytes belong to no tensor after the last one"),
    "empty_tensor_inside_another": (({"a": f32_entry(0, 8, [2]), "e": f32_entry(4, 4, [0])}, bytes(8)),
                                    "'a' and 'e' overlap"),
    "metadata_not_strings": (({"__metadata__": {"step": 3}, "w": f32_entry(0, 4, [1])}, bytes(4)),
                             "__metadata__ must map strings to strings"),
    "dtype_list": (({"w": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, bytes(4)),
                   "tensor 'w' has unknown dtype ['F32']"),
    "too_many_dimensions": (({"w": f32_entry(0, 4, [1] * 65)}, bytes(4)), "cannot be a NumPy array"),
    "shape_beyond_numpy": (({"w": f32_entry(0, 0, [0, 2 ** 62])}, b""), "cannot be a NumPy array"),
    "deeply_nested_header": ((b'{"w": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", b""),
                             "nested too deeply"),
}


def write_corrupt(path, content):
    """`content` is raw file bytes, or (header, data) for raw_safetensors."""
    if isinstance(content, bytes):
        path.write_bytes(content)
        return path
    return raw_safetensors(path, *content)


@pytest.mark.parametrize("case", sorted(CORRUPT_FILES))
def test_malformed_file_gives_one_line_error_naming_the_file(tmp_path, case):
    content, message = CORRUPT_FILES[case]
    path = write_corrupt(tmp_path / f"{case}.safetensors", content)
    with pytest.raises(BadFileError) as info:
        read_safetensors(path)
    assert message in str(info.value)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_header_length_one_byte_short_is_refused(tmp_path):
    """The writer pads the header with spaces, so one byte less still parses as JSON; the data
    buffer would then start one byte early and every tensor be read one byte off."""
    path = tmp_path / "t.safetensors"
    write_safetensors(path, {"w": np.arange(3, dtype=np.float32)})
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    assert raw[8 + n - 1:8 + n] == b" "  # the premise: the header ends in padding
    raw[:8] = struct.pack("<Q", n - 1)
    path.write_bytes(bytes(raw))
    with pytest.raises(BadFileError, match="1 byte belongs to no tensor after the last one"):
        read_safetensors(path)


def test_header_larger_than_the_reference_limit_is_refused_before_reading_it(tmp_path):
    path = tmp_path / "huge-header.safetensors"
    with open(path, "wb") as f:  # a sparse file: no disk space used
        f.write(struct.pack("<Q", 200_000_000))
        f.truncate(8 + 200_000_000)
    with pytest.raises(BadFileError, match="header length 200000000 is over the 100000000 bytes"):
        read_safetensors(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_safetensors(tmp_path / "absent.safetensors")


def test_agrees_with_the_reference_safetensors_library(tmp_path):
    st_numpy = pytest.importorskip("safetensors.numpy")
    tensors = {"w": np.random.default_rng(2).standard_normal((5, 3)).astype(np.float32),
               "h": np.arange(4, dtype=np.float16), "ids": np.arange(7, dtype=np.int64)}
    write_safetensors(tmp_path / "ours.safetensors", tensors)
    theirs = st_numpy.load_file(tmp_path / "ours.safetensors")
    st_numpy.save_file(tensors, tmp_path / "theirs.safetensors", metadata={"format": "np"})
    ours, metadata = read_safetensors(tmp_path / "theirs.safetensors")
    assert metadata == {"format": "np"}
    for name, expected in tensors.items():
        np.testing.assert_array_equal(theirs[name], expected)
        assert theirs[name].dtype == expected.dtype
        np.testing.assert_array_equal(ours[name], expected)
