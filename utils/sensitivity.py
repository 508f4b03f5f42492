"""Per-layer sensitivity of validation accuracy to structured pruning, unstructured pruning and INT8
quantization: one layer (or coupled channel group) changed at a time, the rest left as it is, no
fine-tuning. The curves pick the per-layer ratios of the search (utils.prune.allocate) and the layers the INT8
fallback keeps in float. Saved as sensitivity.json, a Markdown table and a PNG plot (utils.plots)."""
import os
from typing import NamedTuple

import torch

from .checkpoint import cpu_copy
from .files import scratch_path
from .measure import model_accuracy, ort_accuracy
from .prune import group_widths, magnitude_order, prunable_layers, removable, smallest, structured_prune
from .quantize import layer_nodes, quantize_int8

class Sensitivity(NamedTuple):
    """Validation accuracy drops (points) with one layer or block changed at a time."""
    structured: dict    # {channel group: [(fraction of its channels removed, drop)]} (utils.prune.channel_groups);
                        # a removable group's curve ends at 1.0: its block left out
    unstructured: dict  # {layer: [(fraction of weights zeroed, drop)]}
    int8: dict          # {layer: drop when only it is quantized to INT8}

    @classmethod
    def from_json(cls, data):
        return cls(**{name: data[name] for name in cls._fields})


CHANNEL_FRACTIONS = (0.25, 0.5, 0.75, 0.9)        # channels of one coupled group removed
WEIGHT_FRACTIONS = (0.5, 0.7, 0.8, 0.9, 0.95)     # weights of one layer zeroed by magnitude


def structured_sensitivity(model, val, fractions=CHANNEL_FRACTIONS, device="cpu"):
    """{channel group: [(fraction of its channels removed, val accuracy drop in points)]}, for every residual
    stream and every block's inner channels (utils.prune.channel_groups), and for a removable group (a block that
    can be left out, utils.prune.removable) at 1.0 too; `model` is on `device`."""
    base = model_accuracy(model, val, device)
    return {name: [(f, base - model_accuracy(structured_prune(model, {name: round(width * (1 - f))}).to(device),
                                             val, device)) for f in fractions + ((1.0,) if removable(name) else ())]
            for name, width in group_widths(model).items()}


@torch.no_grad()
def unstructured_sensitivity(model, val, fractions=WEIGHT_FRACTIONS, device="cpu"):
    """{layer: [(fraction of its weights zeroed, val accuracy drop in points)]}: the weights magnitude pruning
    zeroes (utils.prune.smallest), zeroed in place (no copy of the model per point), each layer's weights put
    back after its curve; `model` is on `device`, without pruning masks, and ends as it was."""
    base = model_accuracy(model, val, device)
    curves = {}
    for name, layer in prunable_layers(model).items():
        weight = layer.weight
        kept, curves[name] = weight.detach().clone(), []
        order = magnitude_order(kept)
        for f in fractions:
            pruned = kept.flatten().clone()
            pruned[smallest(order, f)] = 0
            weight.copy_(pruned.view(kept.shape))
            curves[name].append((f, base - model_accuracy(model, val, device)))
        weight.copy_(kept)
    return curves


def int8_sensitivity(float_onnx, quant, val):
    """{layer: val accuracy drop in points when only that layer is quantized to INT8 (ONNX Runtime)}."""
    base = ort_accuracy(float_onnx, val)
    drops = {}
    with scratch_path(os.path.join(os.path.dirname(float_onnx), "sensitivity_int8.onnx")) as tmp:
        for name in layer_nodes(float_onnx):
            quantize_int8(float_onnx, tmp, quant, only=[name])
            drops[name] = base - ort_accuracy(tmp, val)
    return drops


def sensitivity_table(sens):
    """Markdown tables of the three analyses (drop in validation points)."""
    lines = []
    for kind, title in (("structured", "the group's channels removed"), ("unstructured", "weights zeroed")):
        fractions = sorted({f for curve in sens[kind].values() for f, _ in curve})
        lines += [f"\n{kind} pruning: accuracy drop (points) by fraction of {title}"
                  f"{' (100%: the block left out)' if kind == 'structured' else ''}\n",
                  "| layer | " + " | ".join(f"{f:.0%}" for f in fractions) + " |",
                  "|---|" + "---:|" * len(fractions)]
        lines += [f"| {name} | " + " | ".join(f"{dict(curve)[f]:+.2f}" if f in dict(curve) else "-"
                                              for f in fractions) + " |"
                  for name, curve in sens[kind].items()]
    lines += ["\nINT8 (only this layer quantized): accuracy drop (points)\n", "| layer | drop |", "|---|---:|"]
    lines += [f"| {name} | {d:+.2f} |" for name, d in sens["int8"].items()]
    return "\n".join(lines) + "\n"


def sensitivity_analysis(model, float_onnx, quant, val, device="cpu"):
    """All three analyses on `val`: the pruning ones on a float32 copy of the model in eval mode on `device` (the
    training device: a GPU measures them in exact float32 in seconds), the INT8 one in ONNX Runtime on the CPU
    (float_onnx is the model's export)."""
    model = cpu_copy(model).to(device)
    return {"structured": structured_sensitivity(model, val, device=device),
            "unstructured": unstructured_sensitivity(model, val, device=device),
            "int8": int8_sensitivity(float_onnx, quant, val)}
