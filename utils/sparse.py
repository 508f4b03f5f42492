"""Compact storage of a sparse INT8 ONNX model: every int8 initializer is stored as a bitmask of its nonzero
entries plus the nonzero values, the rest of the model (graph, scales, biases) as it is, and the whole
LZMA-compressed. ONNX Runtime cannot run such a file, so `load_sparse_onnx` rebuilds the exact ONNX model
(every weight bit-identical) in memory; `ort_session` runs it from there.

File layout (after LZMA): MAGIC, 8-byte length + JSON header, 8-byte length + ONNX model with the int8
initializers emptied, then per sparse tensor its packed mask and its nonzero int8 values.
"""
import json
import lzma
import os
import struct

import numpy as np

MAGIC = b"SPARSE-ONNX-1\n"
MIN_ELEMENTS = 64  # smaller int8 tensors are kept inside the model as they are, and so is any not stored as raw bytes


def _chunk(data):
    return struct.pack("<Q", len(data)) + data


def _read_chunk(buf, pos):
    (n,) = struct.unpack_from("<Q", buf, pos)
    return buf[pos + 8:pos + 8 + n], pos + 8 + n


def save_sparse_onnx(onnx_path, out_path):
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
    header = json.dumps({"tensors": entries}).encode()
    payload = MAGIC + _chunk(header) + _chunk(model.SerializeToString()) + b"".join(blobs)
    data = lzma.compress(payload, preset=9 | lzma.PRESET_EXTREME)
    tmp = f"{out_path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, out_path)
    return len(data)


def load_sparse_onnx(path):
    """The onnx.ModelProto stored at `path` by save_sparse_onnx, every int8 weight restored exactly."""
    import onnx
    with open(path, "rb") as f:
        try:
            buf = lzma.decompress(f.read())
        except lzma.LZMAError:
            raise ValueError(f"{path} is not a compact sparse model (not LZMA data)") from None
    if not buf.startswith(MAGIC):
        raise ValueError(f"{path} is not a compact sparse model (no {MAGIC!r} tag)")
    header, pos = _read_chunk(buf, len(MAGIC))
    model_bytes, pos = _read_chunk(buf, pos)
    model = onnx.ModelProto()
    model.ParseFromString(model_bytes)
    tensors = {t.name: t for t in model.graph.initializer}
    for entry in json.loads(header)["tensors"]:
        mask_len = (entry["size"] + 7) // 8
        mask = np.unpackbits(np.frombuffer(buf, np.uint8, mask_len, pos), count=entry["size"]).astype(bool)
        pos += mask_len
        values = np.zeros(entry["size"], np.int8)
        values[mask] = np.frombuffer(buf, np.int8, entry["nonzero"], pos)
        pos += entry["nonzero"]
        tensors[entry["name"]].raw_data = values.tobytes()
    return model
