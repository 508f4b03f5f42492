"""Training speed of each layout of this machine: one process with every core against a rank per core (data
parallelism), each in float32 and in bf16 autocast, for the student (ResNet-20) and the baseline (the stride-2
ResNet-18). Prints a Markdown table of training images per second (all ranks together, the second epoch: the
first pays for warm-up) and the machine's reference speed. Run it alone: timings beside other work mean nothing.

    DATA_DIR=/path/to/cifar10 python scripts/layouts.py [IMAGES_PER_EPOCH] [WORK_DIR]   # about 8 minutes on 2 cores

IMAGES_PER_EPOCH (default 10240) training images an epoch; WORK_DIR (default runs_layouts/) keeps each run's
folder, the decoded images shared by hard links.
"""
import glob
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
ARCHS = {"resnet20": "ResNet-20 (the student)", "resnet18_s2": "stride-2 ResNet-18 (the baseline)"}


def layouts(cores):
    """(label, RANKS, threads per rank) of each layout measured."""
    return [(f"1 process x {cores} threads", 1, cores), (f"{cores} ranks x 1 thread", cores, 1)]


def images_per_s(work, data_dir, arch, ranks, threads, dtype, images):
    """The second epoch's training images/s of train_baseline.py in that layout (a folder of its own)."""
    out = os.path.join(work, f"{arch}_{ranks}x{threads}_{dtype}")
    os.makedirs(out, exist_ok=True)
    for cached in glob.glob(os.path.join(work, "*", "data_*.pt"))[:1]:  # decoded once, linked into each folder
        target = os.path.join(out, os.path.basename(cached))
        if not os.path.exists(target):
            os.link(cached, target)
    metrics = os.path.join(out, "metrics.jsonl")
    if os.path.exists(metrics):
        os.remove(metrics)
    for stale in glob.glob(os.path.join(out, "*.pth")):
        os.remove(stale)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "RANKS": str(ranks)}
    subprocess.run([sys.executable, os.path.join(ROOT, "train_baseline.py"), f"--DATA_DIR={data_dir}",
                    f"--OUT_DIR={out}", f"--ARCH={arch}", f"--TRAIN_SUBSET={images}", "--EPOCHS=2",
                    f"--AMP_DTYPE={dtype}", "--DEVICE=cpu", "--PROFILE=cpu"], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    return [json.loads(line) for line in open(metrics)][-1]["images_per_s"]


def main(argv):
    import torch
    from utils.device import cpu_flags
    from utils.dist import cores
    from utils.measure import reference_speed
    data_dir = os.environ.get("DATA_DIR")
    if not data_dir:
        print("error: set DATA_DIR to the CIFAR-10 folder", file=sys.stderr)
        return 2
    images = int(argv[0]) if argv else 10240
    work = argv[1] if len(argv) > 1 else os.path.join(ROOT, "runs_layouts")
    n = cores()
    torch.set_num_threads(n)
    reference = reference_speed(20.0)
    amx = "AMX" if "amx_bf16" in cpu_flags() else "no AMX"
    bf16 = "AVX-512 BF16" if "avx512_bf16" in cpu_flags() else "no AVX-512 BF16"
    print(f"reference workload {reference:.0f} images/s; {n} cores, {amx}, {bf16}; torch {torch.__version__}; "
          f"{images} training images an epoch, the second epoch's speed", flush=True)
    rows = {arch: {} for arch in ARCHS}
    for arch in ARCHS:
        for label, ranks, threads in layouts(n):
            for dtype in ("float32", "bfloat16"):
                rows[arch][label, dtype] = images_per_s(work, data_dir, arch, ranks, threads, dtype, images)
                print(f"  {arch:<12} {label:<24} {dtype:<9} {rows[arch][label, dtype]:7.0f} images/s", flush=True)
    columns = [(label, dtype) for label, _, _ in layouts(n) for dtype in ("float32", "bfloat16")]
    print("\n| training images/s | " + " | ".join(f"{label}, {dtype}" for label, dtype in columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for arch, name in ARCHS.items():
        base = rows[arch][columns[0]]
        print(f"| {name} | " + " | ".join(f"{rows[arch][c]:.0f} ({rows[arch][c] / base:.2f}x)" for c in columns)
              + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
