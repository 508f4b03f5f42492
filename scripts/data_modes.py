"""The two data paths on the same images at the same size: train_baseline.py with DATA_MODE=ram (every image
decoded into memory first) and DATA_MODE=stream (decoded from the files batch by batch in DataLoader workers),
each at its default layout. Prints a Markdown table of the last epoch's training images/s and the peak memory of
each run (the proportional set sizes of its processes summed: the ranks and their workers, a shared page counted
once), beside the machine's reference speed. Run it alone: timings beside other work mean nothing.

    DATA_DIR=/path/to/cifar10 python scripts/data_modes.py [SIZE] [IMAGES_PER_EPOCH] [WORK_DIR]

First writes WORK_DIR/cifar10_SIZE (default runs_data_modes/cifar10_96): the ImageFolder DATA_DIR upsampled to
SIZE px (default 96), JPEG quality 90, once. IMAGES_PER_EPOCH: 0 (the default) trains one epoch of the whole
training split; a number trains two epochs of that many images, a quicker speed figure, but the split is cut
before training, in DATA_MODE=ram as well: the memory figures compare the two paths only over the whole split.
"""
import json
import os
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def upsampled_copy(data_dir, size, target):
    """DATA_DIR's ImageFolder (train/ and test/) resized to size x size JPEGs under `target`, made once."""
    from multiprocessing import Pool
    from utils.data import list_imagefolder
    from utils.device import cores
    done = os.path.join(target, ".complete")
    if os.path.exists(done):
        return target
    jobs = []
    for split in ("train", "test"):
        paths, labels, classes = list_imagefolder(os.path.join(data_dir, split))
        jobs += [(p, os.path.join(target, split, classes[label], os.path.splitext(os.path.basename(p))[0] + ".jpg"),
                  size) for p, label in zip(paths, labels)]
    for folder in {os.path.dirname(out) for _, out, _ in jobs}:
        os.makedirs(folder, exist_ok=True)
    with Pool(cores()) as pool:
        pool.map(resize_one, jobs, chunksize=256)
    open(done, "w").close()
    return target


def resize_one(job):
    from PIL import Image
    src, out, size = job
    with Image.open(src) as im:
        im.convert("RGB").resize((size, size), Image.BICUBIC).save(out, quality=90)


def peak_memory(proc, stop):
    """The largest sum of proportional set sizes (bytes) over `proc` and its descendants, sampled every 0.2 s: the
    memory the run holds, each page shared between its processes (torch's libraries in every rank and worker)
    counted once, where a sum of resident sizes would count it in each."""
    import psutil
    peak, root = 0, psutil.Process(proc.pid)
    while not stop.is_set():
        try:
            tree = [root] + root.children(recursive=True)
            peak = max(peak, sum(p.memory_full_info().pss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.2)
    return peak


def epochs(images):
    """Two when an epoch is a subset (the second one's speed is read), one over the whole training split."""
    return 2 if images else 1


def run(data_dir, out, mode, size, images):
    """(last epoch's training images/s, peak memory in bytes, seconds) of train_baseline.py in `mode`."""
    os.makedirs(out, exist_ok=True)
    for stale in os.listdir(out):  # the last run's checkpoint, metrics and decoded-image cache: decoding counts
        if stale in ("baseline.pth", "metrics.jsonl") or stale.startswith("data_"):
            os.remove(os.path.join(out, stale))
    command = [sys.executable, os.path.join(ROOT, "train_baseline.py"), f"--DATA_DIR={data_dir}", f"--OUT_DIR={out}",
               f"--IMAGE_SIZE={size}", f"--DATA_MODE={mode}", f"--TRAIN_SUBSET={images}", f"--EPOCHS={epochs(images)}",
               "--DEVICE=cpu", "--PROFILE=cpu"]
    t0, stop, result = time.time(), threading.Event(), {}
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    watcher = threading.Thread(target=lambda: result.update(peak=peak_memory(proc, stop)))
    watcher.start()
    code = proc.wait()
    stop.set()
    watcher.join()
    if code:
        raise SystemExit(f"error: {' '.join(command)} ended with status {code}")
    lines = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return lines[-1]["images_per_s"], result["peak"], time.time() - t0


def main(argv):
    import torch
    from utils.device import cores
    from utils.measure import reference_speed
    data_dir = os.environ.get("DATA_DIR")
    if not data_dir:
        print("error: set DATA_DIR to an ImageFolder copy of CIFAR-10 (train/ and test/)", file=sys.stderr)
        return 2
    size = int(argv[0]) if argv else 96
    images = int(argv[1]) if len(argv) > 1 else 0
    work = argv[2] if len(argv) > 2 else os.path.join(ROOT, "runs_data_modes")
    torch.set_num_threads(cores())
    reference = reference_speed(20.0)
    t0 = time.time()
    folder = upsampled_copy(data_dir, size, os.path.join(work, f"cifar10_{size}"))
    print(f"reference workload {reference:.0f} images/s; {cores()} cores; torch {torch.__version__}; "
          f"{folder} ({time.time() - t0:.0f}s to make); {images or 'all the'} training images an epoch, "
          f"{epochs(images)} epoch(s), the last one's speed",
          flush=True)
    rows = {mode: run(folder, os.path.join(work, mode), mode, size, images) for mode in ("ram", "stream")}
    print(f"\n| DATA_MODE, {size} px | training images/s | peak memory (PSS) | run (decoding included) |")
    print("|---|---|---|---|")
    for mode, (speed, peak, seconds) in rows.items():
        print(f"| {mode} | {speed:.0f} | {peak / 2**30:.2f} GiB | {seconds:.0f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
