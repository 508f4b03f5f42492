"""What evaluate_results.py measures: accuracy of an artifact as loaded from disk, bytes on disk, latency."""
import gzip
import os
import platform
import statistics
import time

import torch


def ort_session(path, threads):
    """An ONNX Runtime CPU session with a fixed number of threads."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def ort_predict(session):
    name = session.get_inputs()[0].name
    return lambda xb: torch.from_numpy(session.run(None, {name: xb.cpu().numpy()})[0])


def eager_predict(model):
    model.eval()

    def predict(xb):
        with torch.inference_mode():
            return model(xb)
    return predict


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


def b1_b64_latency(predict, x, runs_b1):
    """{"b1_ms", "b64_ms"}: median ms at batch 1 (runs_b1 runs) and batch 64 (a tenth of them, at least 3) on
    float images x (>= 64 of them)."""
    return {"b1_ms": median_latency_ms(predict, x[:1], warmup=10, runs=runs_b1),
            "b64_ms": median_latency_ms(predict, x[:64], warmup=2, runs=max(runs_b1 // 10, 3))}


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
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
            "onnxruntime": onnxruntime.__version__}


COLUMNS = [  # header, width, row -> text
    ("stage", 12, lambda r: r["stage"]),
    ("runtime", 26, lambda r: r["runtime"]),
    ("test acc", 9, lambda r: f"{r['accuracy']:.2f}%"),
    ("drop", 6, lambda r: f"{r['accuracy_drop']:+.2f}"),
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
