"""From a float model to the artifact that ships: ONNX export (on a copy), static post-training INT8 with ONNX
Runtime (QDQ format, per-channel weights, calibrated on training images), optionally with some layers kept in
float; the ONNX file's metadata and parameter counts; and PyTorch's dynamic quantization, for comparison: the
quantization a PyTorch user tries first, which leaves every convolution in float and so shows what static INT8
adds."""
import contextlib
import copy
import io
import json
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .checkpoint import FORMAT, cpu_copy, load_checkpoint, versions, weights_fingerprint
from .config import UserError
from .files import atomic_path, atomic_save, scratch_path
from .models import build_model

ONNX_INPUT = "input"  # float32 (N, 3, H, W), RGB in [0, 1]; normalisation happens inside the model
ONNX_OUTPUT = "logits"


@dataclass
class Quantization:
    """Static INT8 settings: calibration images (float (N, 3, H, W) in [0, 1], on the CPU), per-channel weight
    scales or one per tensor, and ONNX Runtime's calibration method (MinMax | Entropy | Percentile)."""
    calib: torch.Tensor
    per_channel: bool = True
    method: str = "MinMax"


EXPORTED_FROM = "exported_from"  # the metadata key of what a float export was made from (export_key)


def export_key(model):
    """What a float export is made from: the model's spec and weights, the image size it is made for and the
    exporter's versions. Two exports with the same key are the same file."""
    import onnxscript
    return {"spec": model.spec, "weights": weights_fingerprint(model.state_dict()), "image_size": model.image_size,
            "torch": str(torch.__version__), "onnxscript": onnxscript.__version__}


def export_onnx(model, path, reuse=()):
    """Export a float model to ONNX with a dynamic batch dimension (torch.export based exporter) and return where
    it lies. A CPU copy is exported: `model` keeps its device, memory format and training mode. An export of the
    same model already at `path` or at one of `reuse` (its metadata holds the same export_key) is returned instead
    of exporting again: a rerun, and evaluate_results.py, reuse what compress_model.py exported."""
    model = cpu_copy(model)
    key = json.loads(json.dumps(export_key(model)))  # as read back from the metadata
    for earlier in (path, *reuse):
        if onnx_file_metadata(earlier, EXPORTED_FROM) == key:
            return earlier
    x = torch.rand(2, 3, model.image_size, model.image_size)  # the size the model is made for
    with atomic_path(path) as tmp, warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), tmp, input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT],
                          dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=4096)}}, dynamo=True,
                          external_data=False)
        save_onnx_metadata(tmp, {EXPORTED_FROM: key})
    return path


class CalibrationReader:
    """Feeds ONNX Runtime's calibrator batches of float images."""

    def __init__(self, images, batch_size=64):
        self.batches = iter([{ONNX_INPUT: images[i:i + batch_size].numpy()} for i in range(0, len(images), batch_size)])

    def get_next(self):
        return next(self.batches, None)


def layer_nodes(onnx_path):
    """{layer name: ONNX node name} of each Conv and Gemm, found by its weight initializer ("<layer>.weight")."""
    import onnx
    return {n.input[1][:-len(".weight")]: n.name for n in onnx.load(onnx_path).graph.node
            if n.op_type in ("Conv", "Gemm") and n.input[1].endswith(".weight")}


def quantize_int8(float_onnx, int8_onnx, quant, keep_float=(), only=None):
    """Static post-training INT8: every Conv and Gemm gets int8 weights (per output channel) and uint8
    activations, with ranges calibrated on quant.calib. keep_float: layer names left in float (mixed
    precision); only: quantize just these layers."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process
    with scratch_path(f"{int8_onnx}.prep.onnx") as prepared, atomic_path(int8_onnx) as tmp:
        quant_pre_process(float_onnx, prepared, skip_symbolic_shape=True)
        nodes = layer_nodes(prepared)
        quantize_static(prepared, tmp, CalibrationReader(quant.calib), quant_format=QuantFormat.QDQ,
                        per_channel=quant.per_channel, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                        calibrate_method=getattr(CalibrationMethod, quant.method),
                        nodes_to_exclude=[nodes[n] for n in keep_float],
                        nodes_to_quantize=None if only is None else [nodes[n] for n in only])
    return int8_onnx


def save_onnx_metadata(path, info):
    """Store a JSON description (stage, classes, config, input format, run id) in the ONNX file's metadata."""
    import onnx
    model = onnx.load(path)
    for key, value in info.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    with atomic_path(path) as tmp:
        onnx.save(model, tmp)


def onnx_metadata(model, key):
    """One value stored by save_onnx_metadata (None when absent or not ours)."""
    for prop in model.metadata_props:
        if prop.key == key:
            try:
                return json.loads(prop.value)
            except ValueError:
                return None
    return None


def onnx_file_metadata(path, key):
    """onnx_metadata of the ONNX file at `path`; None when there is none, or it is unreadable."""
    import onnx
    try:
        return onnx_metadata(onnx.load(path), key)
    except Exception:  # missing, truncated or foreign: as if absent
        return None


def onnx_param_counts(model):
    """(parameters, nonzero) of an ONNX model (a path or a ModelProto): its weight and bias initializers, as
    stored (BatchNorm folded into the convolutions by the exporter); quantization scales, zero points and the
    input-normalisation constants are not counted."""
    import onnx
    from onnx import numpy_helper
    model = onnx.load(model) if isinstance(model, str) else model
    arrays = [numpy_helper.to_array(t) for t in model.graph.initializer
              if ("weight" in t.name or "bias" in t.name) and not t.name.endswith(("_scale", "_zero_point"))]
    return sum(a.size for a in arrays), sum(int(np.count_nonzero(a)) for a in arrays)


def dynamic_quant_model(model):
    """PyTorch's dynamic quantization: torch.ao's quantize_dynamic over {Linear, Conv2d}, on a CPU copy. It
    quantizes the Linear layer only; every Conv2d stays float32, which is why the file barely shrinks."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated; kept to show what it does
        from torch.ao.quantization import quantize_dynamic
        return quantize_dynamic(copy.deepcopy(model).cpu().eval(), {nn.Linear, nn.Conv2d}, dtype=torch.qint8)


def dynamic_quant(model, path, meta):
    """Dynamic quantization of `model`, its state_dict saved (in a self-describing dict) at `path`."""
    quantized = dynamic_quant_model(model)
    atomic_save({**meta, "format": FORMAT, "stage": "dynamic_quant", "versions": versions(),
                 "state_dict": quantized.state_dict()}, path)
    return quantized


def load_dynamic_quant(path):
    """Rebuild the dynamically quantized model from its checkpoint: float model, quantize_dynamic, its weights."""
    with warnings.catch_warnings():
        # torch deprecates the storages and constructors of quantized tensors (TypedStorage, _qtensor) that loading
        # these weights goes through: its warnings would land amid the results a user reads
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        ckpt = load_checkpoint(path, "dynamic_quant")
        model = dynamic_quant_model(build_model(ckpt["model"]))
        try:
            model.load_state_dict(ckpt["state_dict"])
        except (KeyError, RuntimeError) as e:
            raise UserError(f"{path}: weights do not fit the architecture it names ({type(e).__name__})") from None
    return model, ckpt
