"""Read and write the safetensors format with NumPy alone.

Layout of a .safetensors file (https://github.com/huggingface/safetensors):

    [8 bytes]  N, the header length, little-endian u64
    [N bytes]  JSON header: {name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]},
                             "__metadata__": {str: str}}   (metadata optional)
    [rest]     the data buffer: raw little-endian tensors; offsets are relative to its start

Reading maps the file with `np.memmap`, so float32 tensors are zero-copy views of the file and a
6 GB checkpoint is never held in RAM twice. Half-precision tensors are widened to float32.
"""
import json
import math
import struct
from pathlib import Path

import numpy as np

from minigpt.fileio import atomic_write

# Storage dtype code -> how its bytes are laid out on disk. BF16 has no NumPy dtype: it is read
# as raw uint16 bits and widened by hand (see bf16_bits_to_float32).
DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
# NumPy dtype -> code, for writing.
CODES = {np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
         np.dtype(np.int64): "I64", np.dtype(np.int32): "I32", np.dtype(np.int16): "I16",
         np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8", np.dtype(np.bool_): "BOOL"}
METADATA_KEY = "__metadata__"


class CheckpointError(ValueError):
    """A weights file that cannot be used; the message is one line and names the file."""


def read_safetensors(path):
    """Read a .safetensors file -> (dict name -> np.ndarray, metadata dict).

    F32 (and every other natively supported dtype) comes back as a read-only view of the memory
    map; F16 and BF16 are converted to float32 copies. Raises FileNotFoundError for a missing
    file and CheckpointError for anything malformed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    file_size = path.stat().st_size
    if file_size == 0:
        raise CheckpointError(f"{path}: file is empty")
    if file_size < 8:
        raise CheckpointError(f"{path}: {file_size} bytes is too small to be a safetensors file")
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if 8 + header_len > file_size:
            raise CheckpointError(f"{path}: header length {header_len} is longer than the file "
                                  f"({file_size} bytes); not a safetensors file or truncated")
        header_bytes = f.read(header_len)
    header = _parse_header(path, header_bytes)
    metadata = header.pop(METADATA_KEY, None) or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: {METADATA_KEY} must be a JSON object")

    data_start = 8 + header_len
    data_len = file_size - data_start
    spans = {name: _check_entry(path, name, entry, data_len) for name, entry in header.items()}
    _check_no_overlap(path, spans)

    # np.memmap refuses a zero-length map, which a file of only empty tensors would need.
    buffer = (np.memmap(path, dtype=np.uint8, mode="r", offset=data_start, shape=(data_len,))
              if data_len > 0 else np.zeros(0, np.uint8))
    tensors = {}
    for name, entry in header.items():
        begin, _ = spans[name]
        stored = np.ndarray(tuple(entry["shape"]), DTYPES[entry["dtype"]], buffer=buffer, offset=begin)
        tensors[name] = _to_compute_dtype(stored, entry["dtype"])
    return tensors, metadata


def write_safetensors(path, tensors, metadata=None, float_dtype=None):
    """Write `tensors` (dict name -> array) to a .safetensors file, atomically.

    Tensors are laid out contiguously in name order; the JSON header is padded with spaces to a
    multiple of 8 bytes so the data buffer stays aligned. `"format": "pt"` is always added to the
    metadata because transformers refuses safetensors files without it. `float_dtype` ("F32",
    "F16" or "BF16") stores every floating-point tensor in that precision; None keeps each one's
    own dtype.
    """
    metadata = {"format": "pt", **(metadata or {})}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError("safetensors metadata must map str to str")
    header, arrays, offset = {METADATA_KEY: metadata}, [], 0
    for name in sorted(tensors):
        if name == METADATA_KEY:
            raise ValueError(f"{METADATA_KEY} is reserved and cannot name a tensor")
        code, stored = _to_storage(np.asarray(tensors[name]), float_dtype, name)
        header[name] = {"dtype": code, "shape": list(stored.shape),
                        "data_offsets": [offset, offset + stored.nbytes]}
        arrays.append(stored)
        offset += stored.nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)
    with atomic_write(path) as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for stored in arrays:
            f.write(memoryview(stored.reshape(-1)).cast("B"))  # raw bytes without a tobytes() copy


def float32_to_bf16_bits(x):
    """float32 array -> uint16 bfloat16 bit patterns, rounding to nearest even (NaN stays NaN)."""
    bits = np.asarray(x).astype(np.float32, order="C").view(np.uint32)
    # Adding 0x7FFF plus the lowest kept bit, then truncating, rounds half to even.
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
    return np.where(np.isnan(x), np.uint32(0x7FC0), rounded).astype(np.uint16)


def bf16_bits_to_float32(bits):
    """uint16 bfloat16 bit patterns -> float32: bfloat16 is the top half of a float32."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _parse_header(path, header_bytes):
    def reject_duplicates(pairs):
        keys = [k for k, _ in pairs]
        duplicates = sorted({k for k in keys if keys.count(k) > 1})
        if duplicates:
            raise CheckpointError(f"{path}: header names tensor {duplicates[0]!r} more than once")
        return dict(pairs)

    try:
        header = json.loads(header_bytes.decode("utf-8"), object_pairs_hook=reject_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: header is not valid JSON; not a safetensors file") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object; not a safetensors file")
    return header


def _check_entry(path, name, entry, data_len):
    """Validate one header entry against the data buffer -> its (begin, end) byte span."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise CheckpointError(f"{path}: tensor {name!r} needs dtype, shape and data_offsets")
    code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if code not in DTYPES:
        raise CheckpointError(f"{path}: tensor {name!r} has unknown dtype {code!r} "
                              f"(supported: {', '.join(DTYPES)})")
    if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
        raise CheckpointError(f"{path}: tensor {name!r} has invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise CheckpointError(f"{path}: tensor {name!r} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    needed = math.prod(shape) * DTYPES[code].itemsize
    if end - begin != needed:
        raise CheckpointError(f"{path}: tensor {name!r} of dtype {code} and shape {shape} needs "
                              f"{needed} bytes but data_offsets {offsets} span {end - begin}")
    if end > data_len:
        raise CheckpointError(f"{path}: tensor {name!r} data_offsets {offsets} run past the end of "
                              f"the file (data buffer is {data_len} bytes); truncated file?")
    return begin, end


def _is_count(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_no_overlap(path, spans):
    """Two tensors must never share bytes (empty tensors occupy none)."""
    previous_name, previous_end = None, 0
    for name, (begin, end) in sorted(spans.items(), key=lambda item: item[1]):
        if begin == end:
            continue
        if begin < previous_end:
            raise CheckpointError(f"{path}: tensors {previous_name!r} and {name!r} overlap in the data "
                                  f"buffer")
        previous_name, previous_end = name, end


def _to_compute_dtype(stored, code):
    if code == "F16":
        return stored.astype(np.float32)
    if code == "BF16":
        return bf16_bits_to_float32(stored)
    return stored


def _to_storage(array, float_dtype, name):
    """array -> (dtype code, contiguous little-endian array holding exactly the bytes to write)."""
    if float_dtype is not None and np.issubdtype(array.dtype, np.floating):
        if float_dtype == "BF16":
            return "BF16", float32_to_bf16_bits(array)
        if float_dtype not in ("F64", "F32", "F16"):
            raise ValueError(f"float_dtype must be F64, F32, F16 or BF16, not {float_dtype!r}")
        array = array.astype(DTYPES[float_dtype])
    code = CODES.get(array.dtype.newbyteorder("="))
    if code is None:
        raise ValueError(f"tensor {name!r} has dtype {array.dtype}, which safetensors cannot store")
    return code, array.astype(DTYPES[code], order="C", copy=False)  # keeps 0-d arrays 0-d
