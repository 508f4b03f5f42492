"""Measuring a model or an artifact: accuracy (eager PyTorch or ONNX Runtime), latency, bytes, the machine.

Accuracy passes use every core (or the GPU, for eager float models, in exact float32); only latency timing is
pinned to a fixed thread count. None of these helpers changes the model it is given: eager models are measured
in eval mode and their own mode is restored, latency is timed on a copy.
"""
import contextlib
import copy
import gzip
import os
import platform
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch

from .data import batches
from .device import cores, exact_float32, torch_threads


@dataclass
class Timing:
    """How latency is measured: threads (PyTorch and ONNX Runtime), timed runs at batch 1 and batch 64, untimed
    warm-up runs before batch 1 (a tenth of them, at least one, before batch 64)."""
    threads: int
    runs_b1: int
    runs_b64: int
    warmup: int


def ort_session(model, threads=None):
    """An ONNX Runtime CPU session on a path or serialized model; threads=None: every core."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or cores()
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def ort_predict(session):
    name = session.get_inputs()[0].name
    return lambda xb: torch.from_numpy(session.run(None, {name: xb.cpu().numpy()})[0])


@contextlib.contextmanager
def evaluating(model):
    """`model` in eval mode for the block; each module's own training flag restored after it."""
    modes = [m.training for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in zip(model.modules(), modes):
            m.training = mode


@torch.no_grad()
def predict_correct(predict, x, y, batch_size, device="cpu"):
    """Per image of (x, y), whether predict(float batch) -> logits puts the label first (bool, on the CPU)."""
    hits = []
    for batch in batches(x, y, batch_size, device):
        logits = torch.as_tensor(predict(batch.x))
        hits.append((logits.argmax(1).to(batch.y.device) == batch.y).cpu())
    return torch.cat(hits)


def percent(correct):
    """Top-1 accuracy (%) from per-image correctness."""
    return 100.0 * correct.sum().item() / len(correct)


def model_correct(model, split, device="cpu", batch_size=500):
    """Per-image correctness of an eager model on split (x, y, ...), on `device` (where the model is), in eval
    mode, in exact float32 on every device (no autocast, no TF32): every accuracy the pipeline records or
    decides on is measured alike, whatever precision the model trains in."""
    weight = next(model.parameters(), None)
    channels_last = weight is not None and weight.dim() == 4 and not weight.is_contiguous()

    def predict(xb):
        with torch.autocast(torch.device(device).type, enabled=False):
            return model(xb.contiguous(memory_format=torch.channels_last) if channels_last else xb).float()
    with evaluating(model), exact_float32():
        return predict_correct(predict, split[0], split[1], batch_size, device)


def model_accuracy(model, split, device="cpu", batch_size=500):
    """Top-1 accuracy (%) of an eager model (see model_correct)."""
    return percent(model_correct(model, split, device, batch_size))


def ort_correct(model, split, batch_size=500):
    """Per-image correctness of an ONNX model (path or serialized) in ONNX Runtime, on every core."""
    return predict_correct(ort_predict(ort_session(model)), split[0], split[1], batch_size)


def ort_accuracy(model, split, batch_size=500):
    """Top-1 accuracy (%) of an ONNX model in ONNX Runtime (see ort_correct)."""
    return percent(ort_correct(model, split, batch_size))


Z95 = 1.959964  # two-sided 95% normal quantile


def accuracy_interval(correct):
    """95% Wilson score interval (%) of an accuracy measured on len(correct) independent images."""
    n, k = len(correct), int(correct.sum())
    p, z2 = k / n, Z95 ** 2
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * ((p * (1 - p) / n + z2 / (4 * n * n)) ** 0.5) / (1 + z2 / n)
    # the ends are exactly 0% and 100% when no image, or every image, is right (float rounding aside)
    return [0.0 if k == 0 else 100 * (centre - half), 100.0 if k == n else 100 * (centre + half)]


def paired_drops(base, other, resamples=10000, seed=0):
    """Bootstrap draws (points) of accuracy(base) - accuracy(other), both measured on the same images (per-image
    correctness). Only the images where the two disagree move the difference, so resampling the images is
    drawing, from a multinomial, how many of them fall where base alone is right (b) and where other alone is
    right (c): drop = (b - c) / n. Deterministic for a seed."""
    n = len(base)
    b, c = int((base & ~other).sum()), int((~base & other).sum())
    draws = np.random.default_rng(seed).multinomial(n, [b / n, c / n, 1 - (b + c) / n], size=resamples)
    return 100.0 * (draws[:, 0] - draws[:, 1]) / n


def paired_drop_interval(base, other):
    """95% paired bootstrap interval (points) of accuracy(base) - accuracy(other) (paired_drops)."""
    drops = paired_drops(base, other)
    return [float(np.percentile(drops, 2.5)), float(np.percentile(drops, 97.5))]


def paired_drop_bound(base, other):
    """The drop (points) of `other` against `base` that is exceeded with 5% chance only: the one-sided 95% upper
    bound of paired_drops. The search keeps a candidate when this is within MAX_ACC_DROP, so that validation
    noise alone does not let a model through that loses more on other images."""
    return float(np.percentile(paired_drops(base, other), 95))


def median_latency_ms(predict, x, warmup, runs):
    """Median wall time in ms of predict(x) over `runs` calls, after `warmup` untimed calls."""
    for _ in range(warmup):
        predict(x)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        predict(x)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def latency(predict, x, timing):
    """{"b1_ms", "b64_ms"}: median ms at batch 1 and at batch 64 of float images x (>= 64 of them)."""
    return {"b1_ms": median_latency_ms(predict, x[:1], timing.warmup, timing.runs_b1),
            "b64_ms": median_latency_ms(predict, x[:64], max(timing.warmup // 10, 1), timing.runs_b64)}


def ort_latency(model, x, timing):
    """Latency of an ONNX model in ONNX Runtime with timing.threads threads."""
    return latency(ort_predict(ort_session(model, timing.threads)), x, timing)


def eager_latency(model, x, timing):
    """Latency of an eager model on the CPU with timing.threads threads (timed on an eval-mode CPU copy)."""
    model = copy.deepcopy(model).cpu().eval()

    def predict(xb):
        with torch.inference_mode():
            return model(xb)
    with torch_threads(timing.threads):
        return latency(predict, x, timing)


def gzip_size(path):
    with open(path, "rb") as f:
        return len(gzip.compress(f.read(), compresslevel=9))


def machine_info():
    import onnxruntime
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cores": cores(), "platform": platform.platform(),
            "onnxruntime": onnxruntime.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def reference_speed(seconds=30.0, batch_size=256, device="cpu"):
    """Images per second of training steps of torchvision's stock resnet18 on random 32x32 batches (SGD,
    channels-last, this process's threads): a fixed workload that tells how fast this machine is, so that run
    times from different machines can be compared."""
    import torchvision
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).to(device, memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.rand(batch_size, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch_size,), device=device)
    images, t0 = 0, None
    for step in range(10**6):
        if step == 3:  # after warm-up
            images, t0 = 0, time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        images += batch_size
        if t0 is not None and time.perf_counter() - t0 >= seconds:
            break
    return images / (time.perf_counter() - t0)


COLUMNS = [  # header, width, row -> text
    ("stage", 12, lambda r: r["stage"]),
    ("runtime", 26, lambda r: r["runtime"]),
    ("test acc", 9, lambda r: f"{r['accuracy']:.2f}%"),
    ("95% interval", 13, lambda r: "{:.2f}-{:.2f}".format(*r["accuracy_ci95"])),
    ("drop", 6, lambda r: f"{r['accuracy_drop']:+.2f}"),
    ("paired drop 95%", 15, lambda r: "{:+.2f} {:+.2f}".format(*r["accuracy_drop_ci95"])),
    ("MiB", 7, lambda r: f"{r['size_bytes'] / 2**20:.2f}"),
    ("gzip MiB", 8, lambda r: f"{r['gzip_bytes'] / 2**20:.2f}"),
    ("smaller", 7, lambda r: f"{r['size_ratio']:.2f}x"),
    ("params", 11, lambda r: "-" if r["params"] is None else f"{r['params']:,}"),
    ("nonzero", 11, lambda r: "-" if r["nonzero_params"] is None else f"{r['nonzero_params']:,}"),
    ("b1 ms", 7, lambda r: f"{r['latency_b1_ms']:.3f}"),
    ("b64 ms", 7, lambda r: f"{r['latency_b64_ms']:.2f}"),
    ("b1 x", 6, lambda r: f"{r['speedup_b1']:.2f}x"),
    ("b64 x", 6, lambda r: f"{r['speedup_b64']:.2f}x"),
    ("eager b1", 8, lambda r: f"{r['latency']['pytorch']['b1_ms']:.3f}" if "pytorch" in r["latency"] else "-"),
    ("eager b64", 9, lambda r: f"{r['latency']['pytorch']['b64_ms']:.2f}" if "pytorch" in r["latency"] else "-"),
]


def results_table(rows):
    """A fixed-width table (also valid Markdown): latency and speed-ups on each row's runtime, against the
    baseline on that same runtime; size against the baseline checkpoint's bytes on disk."""
    line = lambda cells: "| " + " | ".join(c.rjust(w) if i else c.ljust(w)
                                           for i, (c, (_, w, _)) in enumerate(zip(cells, COLUMNS))) + " |"
    out = [line([h for h, _, _ in COLUMNS]),
           "|" + "|".join(("-" * (w + 1) + ":") if i else ("-" * (w + 2)) for i, (_, w, _) in enumerate(COLUMNS)) + "|"]
    out += [line([fmt(r) for _, _, fmt in COLUMNS]) for r in rows]
    return "\n".join(out)
