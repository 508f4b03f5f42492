"""Pruning, structured and unstructured, with per-group and per-layer ratios chosen from a sensitivity analysis.

Structured: whole channels are removed through Torch-Pruning's dependency graph (DepGraph, Fang et al., CVPR
2023), which finds the layers whose channels are coupled and removes them together. A ResNet has two kinds of
coupled groups, each named here by where it lives:
  "layer2.1": a block's inner channels (its conv1's filters, bn1, its conv2's inputs);
  "layer2":   a stage's residual stream (the stem or the stage's shortcut conv, every block's conv2 output and
              bn2, the shortcut additions, and the inputs of the next stage or of the classifier).
A block's inner group may also go to 0 channels, which removes the block (depth pruning: a stage's later blocks
can go, its first cannot), because at 32x32 ONNX Runtime's INT8 convolutions with fewer than 16 output channels
take no less time, so only removing a block makes the widest maps cheaper.
The layers become physically smaller. The new widths go into the model's spec (stage `widths`, inner `mids`),
which is what a checkpoint rebuilds from: a pruned model is returned rebuilt from its spec, so it is the class
that loads it, not a modified copy.
Unstructured: per-layer magnitude masks (torch.nn.utils.prune), raised step by step on the cubic schedule of
Zhu & Gupta (AGP), with fine-tuning in between by the caller.
"""
import copy

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.utils import prune

from .models import Block, build_model, model_spec


def prunable_layers(model):
    """{layer name: module} of every Conv2d and Linear: the layers that unstructured pruning masks."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def prunable_weights(model):
    """(module, "weight") of every prunable layer, as torch.nn.utils.prune takes them."""
    return [(m, "weight") for m in prunable_layers(model).values()]


def blocks(model):
    """{block name: Block} in order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, Block)}


def channel_groups(model):
    """{group name: the conv whose output channels are the group's}: every stage's residual stream ("layer1"; its
    root is the stage's shortcut conv, or the stem when the stage has none), then every block's inner channels
    ("layer1.0"; root conv1). The classifier's outputs are never a group."""
    groups, root = {}, model.conv1
    for stage in model.stages:
        first = getattr(model, stage)[0]
        root = first.downsample[0] if first.downsample is not None else root
        groups[stage] = root
    return {**groups, **{name: b.conv1 for name, b in blocks(model).items()}}


def dependency_graph(model):
    """Torch-Pruning's dependency graph of `model` (traced on one image of its size)."""
    with torch.enable_grad():
        size = model.image_size
        return tp.DependencyGraph().build_dependency(model, example_inputs=torch.zeros(1, 3, size, size), verbose=False)


def group_of(graph, conv, idxs=None):
    """The coupled group of `conv`'s output channels `idxs` (default: all of them)."""
    return graph.get_pruning_group(conv, tp.prune_conv_out_channels, list(range(conv.out_channels)) if idxs is None
                                   else idxs)


def group_sizes(model):
    """{group name: weights of the convs and the classifier its channels run through}: what a channel of the
    group costs, for spreading a pruning level over the groups."""
    graph = dependency_graph(copy.deepcopy(model).cpu())
    sizes = {}
    for name, conv in channel_groups(graph.model).items():
        layers = {id(dep.target.module): dep.target.module for dep, _ in group_of(graph, conv)
                  if isinstance(dep.target.module, (nn.Conv2d, nn.Linear))}
        sizes[name] = sum(m.weight.numel() for m in layers.values())
    return sizes


def group_widths(model):
    """{group name: channels}."""
    return {name: conv.out_channels for name, conv in channel_groups(model).items()}


def removable(name):
    """Whether a group's channels may all go: a block's inner group, except the first block's of a stage."""
    return "." in name and not name.endswith(".0")


def structured_prune(model, keep_counts):
    """A copy of `model` (rebuilt from its spec, on the CPU, eval mode) where each group named in keep_counts keeps
    its keep_counts[name] most important channels, by Torch-Pruning's group L2 magnitude (each channel's weights
    over every layer of its group): at least 1, or 0 for a removable group, whose block is then left out. A
    group already removed may be named with 0. Masks of unstructured pruning are folded into the copy's weights
    (its zeros stay). `model` is not changed."""
    pruned = copy.deepcopy(model).to("cpu", memory_format=torch.contiguous_format).eval()
    make_pruning_permanent(pruned)
    graph = dependency_graph(pruned)
    importance = tp.importance.GroupMagnitudeImportance(p=2)
    roots, removed = channel_groups(pruned), []
    for name, count in keep_counts.items():
        if name not in roots and count == 0:
            continue
        conv = roots[name]
        n = max(0 if removable(name) else 1, min(int(count), conv.out_channels))
        if n == 0:
            removed.append(name)
        elif n < conv.out_channels:
            order = torch.sort(importance(group_of(graph, conv)), descending=True, stable=True).indices
            group_of(graph, conv, sorted(order[n:].tolist())).prune()
    kw = pruned.spec["kwargs"]
    mids = {name: 0 if name in removed else b.conv1.out_channels for name, b in blocks(pruned).items()}
    spec = model_spec(kw["stem"], [roots[stage].out_channels for stage in pruned.stages], kw["num_classes"],
                      kw["blocks"], [mids.get(f"{stage}.{i}", 0) for stage, n in zip(pruned.stages, kw["blocks"])
                                     for i in range(n)], pruned.image_size)
    rebuilt = build_model(spec).eval()
    rebuilt.load_state_dict({k: v for k, v in pruned.state_dict().items()
                             if not any(k.startswith(f"{name}.") for name in removed)})
    return rebuilt


def magnitude_order(weight):
    """Flat indices of `weight`'s entries, smallest |w| first: the order magnitude pruning removes them in."""
    return weight.detach().abs().flatten().argsort()


def smallest(order, ratio):
    """The `ratio` fraction of a magnitude_order that magnitude pruning zeroes (rounded to whole weights)."""
    return order[:int(round(ratio * len(order)))]


def magnitude_masks(model, ratios):
    """Mask the ratios[layer] fraction of smallest-|w| weights in each named layer (others untouched).
    Earlier masks are folded in first, so a weight pruned before stays pruned (its |w| is 0)."""
    layers = prunable_layers(model)
    for name, ratio in ratios.items():
        module = layers[name]
        if prune.is_pruned(module):
            prune.remove(module, "weight")
        weight = module.weight.detach()
        mask = torch.ones(weight.numel(), device=weight.device)
        mask[smallest(magnitude_order(weight), ratio)] = 0
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
    """Largest pruning ratio whose accuracy drop stays <= threshold, the drop taken as linear between measured
    points. curve: [(ratio, drop), ...] with ratio increasing; (0, 0) is implied. The drop need not rise with the
    ratio: leaving a block out (ratio 1.0) can cost less than halving it."""
    best, (r0, d0) = 0.0, (0.0, 0.0)
    for ratio, drop in curve:
        if drop <= threshold:
            best = ratio
        elif d0 <= threshold:
            best = max(best, r0 + (ratio - r0) * (threshold - d0) / (drop - d0))
        r0, d0 = ratio, drop
    return best


def allocate(curves, sizes, target):
    """Per-layer ratios from sensitivity curves so that the size-weighted mean ratio is `target`:
    one accuracy-drop threshold for all layers, found by bisection (the less sensitive a layer, the more it
    loses). sizes: {layer: weights}, the layers to prune; curves: {layer: [(ratio, drop)]} for each of them (it may
    hold more: those of blocks since left out). Ratios never exceed the largest measured."""
    total = sum(sizes.values())
    mean = lambda t: sum(ratio_at(curves[n], t) * sizes[n] for n in sizes) / total
    lo, hi = -1.0, 100.0
    if mean(hi) < target:  # even the most tolerant threshold falls short: take the most the curves allow
        return {n: ratio_at(curves[n], hi) for n in sizes}
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean(mid) < target else (lo, mid)
    return {n: ratio_at(curves[n], hi) for n in sizes}
