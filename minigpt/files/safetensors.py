"""Read and write the safetensors format with NumPy alone.

Layout of a .safetensors file (https://github.com/huggingface/safetensors):

    [8 bytes]  N, the header length, little-endian u64
    [N bytes]  JSON header: {name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]},
                             "__metadata__": {str: str}}   (metadata optional)
    [rest]     the data buffer: raw little-endian tensors; offsets are relative to its start

The reader holds a file to the format's rules: the header starts with '{' (it may end in space
padding), names each tensor once, and its metadata maps strings to strings; each tensor's byte range
fits its dtype and shape, and together the ranges cover the data buffer exactly: no gaps, no
overlap, nothing after the last tensor. That last rule is what catches a header length that is a
few bytes off (the padding would still parse), which would otherwise shift every tensor silently.

Reading maps the file with `np.memmap`, so float32 tensors are zero-copy views of the file and a
6 GB checkpoint is never held in RAM twice. Half-precision tensors are widened to float32.
"""
import json
import math
import struct
from pathlib import Path

import numpy as np

from .fileio import BadFileError, atomic_write, parse_json

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
MAX_HEADER_BYTES = 100_000_000  # the reference implementation's limit: a longer header is refused unread


def read_safetensors(path):
    """Read a .safetensors file -> (dict name -> np.ndarray, metadata dict).

    F32 (and every other natively supported dtype) comes back as a read-only view of the memory
    map; F16 and BF16 are converted to float32 copies. Raises FileNotFoundError for a missing
    file and BadFileError for anything malformed.
    """
    path = Path(path)
    header, metadata, spans, data_start, data_len = _read_header(path)
    # np.memmap refuses a zero-length map, which a file of only empty tensors would need.
    buffer = (np.memmap(path, dtype=np.uint8, mode="r", offset=data_start, shape=(data_len,))
              if data_len > 0 else np.zeros(0, np.uint8))
    tensors = {}
    for name, entry in header.items():
        begin, _ = spans[name]
        try:
            stored = np.ndarray(tuple(entry["shape"]), DTYPES[entry["dtype"]], buffer=buffer, offset=begin)
        except ValueError as e:  # more or larger dimensions (even beside a 0) than NumPy can index
            raise BadFileError(f"{path}: tensor {name!r} of shape {entry['shape']} cannot be a NumPy "
                               f"array ({e})") from None
        tensors[name] = _to_compute_dtype(stored, entry["dtype"])
    return tensors, metadata


def read_safetensors_shapes(path):
    """{name: shape} of the tensors of a .safetensors file, from its header alone (checked as
    read_safetensors checks it): what a model's configuration needs, without reading a tensor."""
    header = _read_header(Path(path))[0]
    return {name: tuple(entry["shape"]) for name, entry in header.items()}


def _read_header(path):
    """(tensor entries, metadata, {name: byte span}, where the data starts, its length) of a checked
    header; FileNotFoundError or BadFileError otherwise."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    file_size = path.stat().st_size
    if file_size == 0:
        raise BadFileError(f"{path}: file is empty")
    if file_size < 8:
        raise BadFileError(f"{path}: {file_size} bytes is too small to be a safetensors file")
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if 8 + header_len > file_size:
            raise BadFileError(f"{path}: header length {header_len} is longer than the file "
                               f"({file_size} bytes); not a safetensors file or truncated")
        if header_len > MAX_HEADER_BYTES:
            raise BadFileError(f"{path}: header length {header_len} is over the {MAX_HEADER_BYTES} "
                               f"bytes the format allows; not a safetensors file")
        header_bytes = f.read(header_len)
    header = _parse_header(path, header_bytes)
    metadata = header.pop(METADATA_KEY, None)
    metadata = {} if metadata is None else metadata  # null reads as no metadata, as in the reference
    if not (isinstance(metadata, dict) and all(isinstance(value, str) for value in metadata.values())):
        raise BadFileError(f"{path}: {METADATA_KEY} must map strings to strings")

    data_start = 8 + header_len
    data_len = file_size - data_start
    spans = {name: _check_entry(path, name, entry, data_len) for name, entry in header.items()}
    _check_coverage(path, spans, data_len)
    return header, metadata, spans, data_start, data_len


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
            raise BadFileError(f"{path}: header names tensor {duplicates[0]!r} more than once")
        return dict(pairs)

    if not header_bytes.startswith(b"{"):
        raise BadFileError(f"{path}: header is not a JSON object (it must start with '{{'); "
                           f"not a safetensors file")
    # A header that starts with '{' and parses is a JSON object.
    return parse_json(header_bytes, f"{path}: header", BadFileError, object_pairs_hook=reject_duplicates)


def _check_entry(path, name, entry, data_len):
    """Validate one header entry against the data buffer -> its (begin, end) byte span."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise BadFileError(f"{path}: tensor {name!r} needs dtype, shape and data_offsets")
    code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(code, str) or code not in DTYPES:
        raise BadFileError(f"{path}: tensor {name!r} has unknown dtype {code!r} "
                           f"(supported: {', '.join(DTYPES)})")
    if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
        raise BadFileError(f"{path}: tensor {name!r} has invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise BadFileError(f"{path}: tensor {name!r} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    needed = math.prod(shape) * DTYPES[code].itemsize
    if end - begin != needed:
        raise BadFileError(f"{path}: tensor {name!r} of dtype {code} and shape {shape} needs "
                           f"{needed} bytes but data_offsets {offsets} span {end - begin}")
    if end > data_len:
        raise BadFileError(f"{path}: tensor {name!r} data_offsets {offsets} run past the end of "
                           f"the file (data buffer is {data_len} bytes); truncated file?")
    return begin, end


def _is_count(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_coverage(path, spans, data_len):
    """The (begin, end) spans must tile the data buffer: in offset order, each begins where the
    previous one ended (an empty tensor occupies no bytes), and the last ends at the end of the file."""
    previous_name, covered = None, 0
    for name, (begin, end) in sorted(spans.items(), key=lambda item: item[1]):
        if begin < covered:
            raise BadFileError(f"{path}: tensors {previous_name!r} and {name!r} overlap in the data "
                               f"buffer")
        if begin > covered:
            raise BadFileError(f"{path}: bytes {covered}..{begin} of the data buffer belong to no "
                               f"tensor (before {name!r}); the format allows no gaps")
        previous_name, covered = name, end
    if covered < data_len:
        extra = data_len - covered
        bytes_belong = "1 byte belongs" if extra == 1 else f"{extra} bytes belong"
        raise BadFileError(f"{path}: {bytes_belong} to no tensor after the last one (junk after the "
                           f"data, or a wrong header length)")


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
