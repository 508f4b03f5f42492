"""The figures: per-layer sensitivity (compress_model.py), the search's Pareto fronts and the training curves
(evaluate_results.py). Each is written atomically."""
import json
import os

from .files import atomic_path


def pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path):
    """Write a figure as PNG atomically, then close it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    pyplot().close(fig)


def plot_sensitivity(sens, path):
    """Three panels: structured curves per channel group (residual streams dashed), unstructured curves per layer,
    INT8 drop per layer."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(18, 5))
    for ax, kind, xlabel in ((axes[0], "structured", "fraction of the group's channels removed"),
                             (axes[1], "unstructured", "fraction of the layer's weights zeroed")):
        for name, curve in sens[kind].items():
            stream = kind == "structured" and "." not in name  # "layer2": a stage's residual stream
            ax.plot([0] + [f for f, _ in curve], [0] + [d for _, d in curve], marker=".",
                    linestyle="--" if stream else "-", label=f"{name} (stream)" if stream else name)
        ax.set(xlabel=xlabel, ylabel="validation accuracy drop (points)", title=f"{kind} pruning, one at a time")
        ax.legend(fontsize=6, ncol=2)
    names = list(sens["int8"])
    axes[2].barh(range(len(names)), [sens["int8"][n] for n in names])
    axes[2].set_yticks(range(len(names)), names, fontsize=7)
    axes[2].invert_yaxis()
    axes[2].set(xlabel="validation accuracy drop (points)", title="INT8, one layer at a time")
    fig.tight_layout()
    save_figure(fig, path)


def pareto_front(points):
    """The points no other point beats on both x (higher is better) and accuracy, sorted by x."""
    front = [p for p in points if not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in points)]
    return sorted(front)


PARETO_PANELS = (("size_ratio", "times smaller than the baseline checkpoint (log)"),
                 ("speedup_b1", "speed-up at batch 1 over the baseline, same runtime"),
                 ("speedup_b64", "speed-up at batch 64 over the baseline, same runtime"))


# Published small CIFAR-10 models (chenyaofo/pytorch-cifar-models: test accuracy in float32 on the official
# CIFAR-10 files; parameters), placed at the bytes they would take stored as INT8, one byte per parameter.
PUBLISHED = (("ResNet-20", 92.6, 0.27e6), ("MobileNetV2 x0.5", 92.9, 0.70e6), ("ResNet-56", 94.4, 0.86e6))


def plot_front_against_published(ax, search):
    """Accuracy against bytes on disk (log): the candidates' compact archives beside published models."""
    cands = search["candidates"]
    mib = [c["bytes"] / 2**20 for c in cands]
    ax.scatter(mib, [c["val_acc"] for c in cands], c="tab:blue", label="candidates (INT8 archive, validation)")
    front = pareto_front([(-m, c["val_acc"]) for m, c in zip(mib, cands)])
    ax.plot([-x for x, _ in front], [y for _, y in front], c="tab:blue", lw=1, alpha=0.6, label="Pareto front")
    chosen = next(c for c in cands if c["name"] == search["chosen"])
    ax.scatter([chosen["bytes"] / 2**20], [chosen["val_acc"]], marker="*", s=300, c="tab:red", label="chosen",
               zorder=3)
    ax.scatter([search["reference"]["bytes"] / 2**20], [search["baseline_val_acc"]], marker="s", s=80, c="k",
               label="baseline checkpoint")
    for name, acc, params in PUBLISHED:
        ax.scatter([params / 2**20], [acc], marker="D", s=60, c="tab:green")
        ax.annotate(name, (params / 2**20, acc), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.scatter([], [], marker="D", c="tab:green",
               label="published (test acc., size as INT8; chenyaofo/pytorch-cifar-models)")
    ax.axhline(search["floor"], ls="--", c="tab:red", lw=1,
               label=f"baseline - MAX_ACC_DROP ({search['floor']:.2f}%)")
    ax.set(xlabel="bytes on disk (MiB, log)", ylabel="accuracy (%)", xscale="log",
           title="against the field: accuracy by size")
    ax.legend(fontsize=7)


def plot_pareto(search, path):
    """Validation accuracy against compression and against speed-up for every candidate of the search, with the
    Pareto front, the budget floor, the chosen model, the scratch control and PyTorch's dynamic quantization marked;
    and accuracy
    against bytes beside published small CIFAR-10 models."""
    plt = pyplot()
    cands = search["candidates"]
    fig, axes = plt.subplots(2, 2, figsize=(14, 10))
    plot_front_against_published(axes[1, 1], search)
    for ax, (key, xlabel) in zip(axes.flat, PARETO_PANELS):
        ax.scatter([c[key] for c in cands], [c["val_acc"] for c in cands], c="tab:blue", label="candidates (INT8)")
        for c in cands:
            ax.annotate(c["name"], (c[key], c["val_acc"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        front = pareto_front([(c[key], c["val_acc"]) for c in cands])
        ax.plot(*zip(*front), c="tab:blue", lw=1, alpha=0.6, label="Pareto front")
        chosen = next(c for c in cands if c["name"] == search["chosen"])
        ax.scatter([chosen[key]], [chosen["val_acc"]], marker="*", s=300, c="tab:red", label="chosen", zorder=3)
        dynamic = search["dynamic_quant"]
        dynamic_x = search["reference"]["bytes"] / dynamic["bytes"] if key == "size_ratio" else dynamic[key]
        ax.scatter([dynamic_x], [dynamic["val_acc"]], marker="X", s=120, c="tab:orange",
                   label="PyTorch dynamic quantization (convolutions float)")
        control = search.get("scratch")
        if control:
            ax.scatter([control[key]], [control["val_acc"]], marker="P", s=120, c="tab:purple",
                       label="scratch control (student's architecture, no teacher; INT8)")
        ax.scatter([1.0], [search["baseline_val_acc"]], marker="s", s=80, c="k", label="baseline")
        ax.axhline(search["floor"], ls="--", c="tab:red", lw=1,
                   label=f"baseline - MAX_ACC_DROP ({search['floor']:.2f}%)")
        ax.set(xlabel=xlabel, ylabel="validation accuracy (%)")
        if key == "size_ratio":
            ax.set_xscale("log")
        ax.legend(fontsize=7)
    fig.suptitle(f"search candidates, OBJECTIVE={search['objective']}")
    fig.tight_layout()
    save_figure(fig, path)


def read_metrics(path):
    """{stage label: [epoch records]} from metrics.jsonl; a stage trained again (or resumed) keeps its latest
    record of each epoch; a line cut off by a crash is skipped."""
    stages = {}
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            stages.setdefault(record["stage"], {})[record["epoch"]] = record
    return {stage: [epochs[e] for e in sorted(epochs)] for stage, epochs in stages.items()}


def plot_training(metrics_path, path):
    """One panel per training stage (baseline, student, each fine-tuning): training loss and validation accuracy
    per epoch, with the learning rate and images per second in the panel's title. Returns False when there is
    nothing to draw."""
    if not os.path.exists(metrics_path):
        return False
    stages = read_metrics(metrics_path)
    if not stages:
        return False
    plt = pyplot()
    cols = min(4, len(stages))
    rows = -(-len(stages) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.4 * rows), squeeze=False)
    for ax, (stage, records) in zip(axes.flat, stages.items()):
        epochs = [r["epoch"] for r in records]
        ax.plot(epochs, [r["loss"] for r in records], marker=".", c="tab:blue", label="training loss")
        ax.set(xlabel="epoch", ylabel="loss")
        acc = ax.twinx()
        acc.plot(epochs, [r["val_accuracy"] for r in records], marker=".", c="tab:red", label="val accuracy")
        acc.set_ylabel("validation accuracy (%)", color="tab:red")
        speed = sum(r["images_per_s"] for r in records) / len(records)
        ax.set_title(f"{stage}: loss {records[-1]['loss']:.3f}, {records[-1]['val_accuracy']:.2f}% val, "
                     f"peak lr {max(r['lr'] for r in records):.3g}, {speed:.0f} img/s", fontsize=9)
    for ax in list(axes.flat)[len(stages):]:
        ax.axis("off")
    fig.tight_layout()
    save_figure(fig, path)
    return True
