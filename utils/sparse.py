"""Compact storage of a sparse INT8 ONNX model: every int8 initializer is stored as a bitmask of its nonzero
entries plus the nonzero values, the rest of the model (graph, scales, biases) as it is, and the whole
LZMA-compressed. ONNX Runtime cannot run such a file, so `load_sparse_onnx` rebuilds the exact ONNX model
(every weight bit-identical) in memory; `ort_session` runs it from there.

File layout (after LZMA): MAGIC, 8-byte length + JSON header, 8-byte length + ONNX model with the int8
initializers emptied, then per sparse tensor its packed mask and its nonzero int8 values.
"""
import json
import lzma
import struct

import numpy as np

from .files import atomic_write_bytes

MAGIC = b"SPARSE-ONNX-1\n"
MIN_ELEMENTS = 64  # smaller int8 tensors are kept inside the model as they are, and so is any not stored as raw bytes
# Reading limits: a crafted file must not make the reader allocate what its header claims. LZMA of the real
# archives expands about 3x; a decompression bomb expands thousands of times.
MAX_EXPANSION = 200          # decompressed bytes per byte of the file, at most
MAX_DECOMPRESSED = 2 << 30   # and never more than 2 GiB in all


class SparseFormatError(ValueError):
    """A file that is not a compact sparse model, or a damaged one."""


def _chunk(data):
    return struct.pack("<Q", len(data)) + data


def _read_chunk(buf, pos):
    if pos + 8 > len(buf):
        raise SparseFormatError("truncated (a length field runs past the end)")
    (n,) = struct.unpack_from("<Q", buf, pos)
    if pos + 8 + n > len(buf):
        raise SparseFormatError(f"truncated (a {n}-byte section runs past the end)")
    return buf[pos + 8:pos + 8 + n], pos + 8 + n


def save_sparse_onnx(onnx_path, out_path, run_id=None):
    """Write onnx_path's model to out_path in the compact format; returns the number of bytes written."""
    import onnx
    from onnx import numpy_helper
    model = onnx.load(onnx_path)
    entries, blobs = [], []
    for tensor in model.graph.initializer:
        if (tensor.data_type != onnx.TensorProto.INT8 or not tensor.HasField("raw_data")
                or int(np.prod(tensor.dims)) < MIN_ELEMENTS):
            continue
        values = numpy_helper.to_array(tensor).ravel()
        mask = values != 0
        blobs += [np.packbits(mask).tobytes(), values[mask].tobytes()]
        entries.append({"name": tensor.name, "size": int(values.size), "nonzero": int(mask.sum())})
        tensor.ClearField("raw_data")
    header = json.dumps({"tensors": entries, **({"run_id": run_id} if run_id else {})}).encode()
    payload = MAGIC + _chunk(header) + _chunk(model.SerializeToString()) + b"".join(blobs)
    data = lzma.compress(payload, preset=9 | lzma.PRESET_EXTREME)
    atomic_write_bytes(out_path, data)
    return len(data)


def _decompress(path):
    """The LZMA payload of `path`, refusing to expand past a limit derived from the file's size."""
    with open(path, "rb") as f:
        raw = f.read()
    limit = min(MAX_DECOMPRESSED, MAX_EXPANSION * len(raw))
    decomp = lzma.LZMADecompressor()
    try:
        buf = decomp.decompress(raw, max_length=limit)
    except lzma.LZMAError:
        raise SparseFormatError("not LZMA data") from None
    if not decomp.eof:
        if decomp.needs_input:
            raise SparseFormatError("truncated LZMA data")
        raise SparseFormatError(f"expands past {limit:,} bytes ({MAX_EXPANSION}x its size): not an archive of this "
                                f"pipeline")
    return buf


def _check_entry(entry, tensors):
    """One header entry, checked against the model it belongs to before anything is allocated for it."""
    if not (isinstance(entry, dict) and isinstance(entry.get("name"), str) and isinstance(entry.get("size"), int)
            and isinstance(entry.get("nonzero"), int)):
        raise SparseFormatError("malformed tensor entry in the header")
    tensor = tensors.get(entry["name"])
    if tensor is None:
        raise SparseFormatError(f"the header names a tensor {entry['name']!r} the model does not have")
    if not 0 <= entry["nonzero"] <= entry["size"] or entry["size"] != int(np.prod(tensor.dims, dtype=np.int64)):
        raise SparseFormatError(f"tensor {entry['name']!r}: sizes in the header do not match the model")


def read_sparse(path):
    """(onnx.ModelProto with every int8 weight restored exactly, header) of a file written by save_sparse_onnx.
    Any damage is a SparseFormatError naming what is wrong."""
    import onnx
    from google.protobuf.message import DecodeError
    try:
        buf = _decompress(path)
        if not buf.startswith(MAGIC):
            raise SparseFormatError(f"no {MAGIC!r} tag")
        header_bytes, pos = _read_chunk(buf, len(MAGIC))
        model_bytes, pos = _read_chunk(buf, pos)
        header = json.loads(header_bytes)
        model = onnx.ModelProto()
        model.ParseFromString(model_bytes)
        tensors = {t.name: t for t in model.graph.initializer}
        if not isinstance(header, dict) or not isinstance(header.get("tensors"), list):
            raise SparseFormatError("malformed header")
        for entry in header["tensors"]:
            _check_entry(entry, tensors)
            mask_len = (entry["size"] + 7) // 8
            if pos + mask_len + entry["nonzero"] > len(buf):
                raise SparseFormatError(f"truncated (tensor {entry['name']!r} runs past the end)")
            mask = np.unpackbits(np.frombuffer(buf, np.uint8, mask_len, pos), count=entry["size"]).astype(bool)
            pos += mask_len
            if int(mask.sum()) != entry["nonzero"]:
                raise SparseFormatError(f"tensor {entry['name']!r}: its mask does not match its count of nonzeros")
            values = np.zeros(entry["size"], np.int8)
            values[mask] = np.frombuffer(buf, np.int8, entry["nonzero"], pos)
            pos += entry["nonzero"]
            tensors[entry["name"]].raw_data = values.tobytes()
    except SparseFormatError as e:
        raise SparseFormatError(f"{path} is not a compact sparse model (or a damaged one): {e}") from None
    except (ValueError, DecodeError, UnicodeDecodeError) as e:  # bad JSON or protobuf inside valid LZMA
        raise SparseFormatError(f"{path} is not a compact sparse model (or a damaged one): "
                                f"{type(e).__name__}") from None
    return model, header


def load_sparse_onnx(path):
    """The onnx.ModelProto stored at `path` by save_sparse_onnx, every int8 weight restored exactly."""
    return read_sparse(path)[0]
