"""Pruning, structured and unstructured, with per-layer ratios chosen from a sensitivity analysis.

Structured: whole inner channels of a residual block (conv1's filters, bn1, conv2's input channels) are
removed, so the layers become physically smaller; the residual stream keeps its width, so every shortcut
stays consistent without a dependency graph. The new inner widths go into the model's spec (`mids`), which
is what a checkpoint rebuilds from.
Unstructured: per-layer magnitude masks (torch.nn.utils.prune), raised step by step on the cubic schedule of
Zhu & Gupta (AGP), with fine-tuning in between by the caller.
"""
import copy

import torch
from torch import nn
from torch.nn.utils import prune

from .models import Block, model_spec


def prunable_layers(model):
    """{layer name: module} of every Conv2d and Linear: the layers that unstructured pruning masks."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def prunable_weights(model):
    """(module, "weight") of every prunable layer, as torch.nn.utils.prune takes them."""
    return [(m, "weight") for m in prunable_layers(model).values()]


def blocks(model):
    """{block name: Block} in order: the units of structured pruning."""
    return {name: m for name, m in model.named_modules() if isinstance(m, Block)}


def channel_importance(block):
    """Score of each inner channel: the size of the path through it, |conv1 filter| x |BN scale| x |conv2 column|."""
    with torch.no_grad():
        w1 = block.conv1.weight.flatten(1).norm(dim=1)
        scale = (block.bn1.weight / (block.bn1.running_var + block.bn1.eps).sqrt()).abs()
        w2 = block.conv2.weight.transpose(0, 1).flatten(1).norm(dim=1)
        return w1 * scale * w2


def shrink_block(block, keep):
    """Keep only the inner channels `keep` (sorted indices) of a Block, in place."""
    keep = torch.as_tensor(sorted(keep), dtype=torch.long)
    conv1, bn1, conv2 = block.conv1, block.bn1, block.conv2
    block.conv1 = nn.Conv2d(conv1.in_channels, len(keep), 3, conv1.stride, 1, bias=False)
    block.bn1 = nn.BatchNorm2d(len(keep), eps=bn1.eps, momentum=bn1.momentum)
    block.conv2 = nn.Conv2d(len(keep), conv2.out_channels, 3, 1, 1, bias=False)
    with torch.no_grad():
        block.conv1.weight.copy_(conv1.weight[keep])
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(block.bn1, name).copy_(getattr(bn1, name)[keep])
        block.bn1.num_batches_tracked.copy_(bn1.num_batches_tracked)
        block.conv2.weight.copy_(conv2.weight[:, keep])


def structured_prune(model, keep_counts):
    """A copy of `model` where block b keeps its keep_counts[b] most important inner channels (at least 1)."""
    model = copy.deepcopy(model).to("cpu", memory_format=torch.contiguous_format)
    for name, block in blocks(model).items():
        n = max(1, min(int(keep_counts.get(name, block.conv1.out_channels)), block.conv1.out_channels))
        if n < block.conv1.out_channels:
            shrink_block(block, channel_importance(block).topk(n).indices.tolist())
    kw = model.spec["kwargs"]
    model.spec = model_spec(kw["stem"], kw["widths"], kw["num_classes"], kw["blocks"],
                            [b.conv1.out_channels for b in blocks(model).values()])
    return model


def magnitude_masks(model, ratios):
    """Mask the ratios[layer] fraction of smallest-|w| weights in each named layer (others untouched).
    Earlier masks are folded in first, so a weight pruned before stays pruned (its |w| is 0)."""
    layers = prunable_layers(model)
    for name, ratio in ratios.items():
        module = layers[name]
        if prune.is_pruned(module):
            prune.remove(module, "weight")
        weight = module.weight.detach()
        k = int(round(ratio * weight.numel()))
        mask = torch.ones(weight.numel(), device=weight.device)
        if k > 0:
            mask[weight.abs().flatten().argsort()[:k]] = 0
        with torch.no_grad():  # the masked weight is recomputed at every forward; no graph to keep from here
            prune.custom_from_mask(module, "weight", mask.view(weight.shape))


def make_pruning_permanent(model):
    for module, name in prunable_weights(model):
        if prune.is_pruned(module):
            prune.remove(module, name)


def weight_sparsity(model):
    """Fraction of conv and linear weights that are exactly zero."""
    weights = [getattr(m, n) for m, n in prunable_weights(model)]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def zero_fractions(model):
    """{layer: fraction of its weights that are exactly zero}: with magnitude_masks, masks exactly the zeros."""
    return {name: int((m.weight == 0).sum()) / m.weight.numel() for name, m in prunable_layers(model).items()}


def agp_schedule(final, steps):
    """Sparsity after each of `steps` steps on the cubic schedule s_t = final * (1 - (1 - t/steps)^3)."""
    return [final * (1 - (1 - t / steps) ** 3) for t in range(1, steps + 1)]


def ratio_at(curve, threshold):
    """Largest pruning ratio whose measured accuracy drop stays <= threshold (linear between measured points).
    curve: [(ratio, drop), ...] with ratio increasing; (0, 0) is implied."""
    best, prev = 0.0, (0.0, 0.0)
    for ratio, drop in curve:
        if drop <= threshold:
            best, prev = ratio, (ratio, drop)
            continue
        r0, d0 = prev
        best = r0 + (ratio - r0) * max(0.0, threshold - d0) / max(drop - d0, 1e-9)
        break
    return best


def allocate(curves, sizes, target):
    """Per-layer ratios from sensitivity curves so that the size-weighted mean ratio is `target`:
    one accuracy-drop threshold for all layers, found by bisection (the less sensitive a layer, the more it
    loses). curves: {layer: [(ratio, drop)]}, sizes: {layer: weights}. Ratios never exceed the largest measured."""
    total = sum(sizes.values())
    mean = lambda t: sum(ratio_at(curves[n], t) * sizes[n] for n in curves) / total
    lo, hi = -1.0, 100.0
    if mean(hi) < target:  # even the most tolerant threshold falls short: take the most the curves allow
        return {n: ratio_at(curves[n], hi) for n in curves}
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean(mid) < target else (lo, mid)
    return {n: ratio_at(curves[n], hi) for n in curves}
