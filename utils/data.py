"""CIFAR-10 (torchvision's pickle layout, downloaded when allowed) or any ImageFolder layout, decoded once
into uint8 tensors and cached; the one train/validation split; batches augmented as tensors on the device."""
import hashlib
import os
import pickle
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from .config import UserError
from .files import cache_or_compute

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp")
CACHE_FORMAT = "uint8-cache-v2"
CIFAR_FILES = ["batches.meta"] + [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


class Split(NamedTuple):
    """Images x (uint8 (N, 3, H, W)), labels y (int64 (N,)) and the class names the labels index."""
    x: torch.Tensor
    y: torch.Tensor
    classes: list

    def to(self, device):
        return Split(self.x.to(device), self.y.to(device), self.classes)

    def head(self, n):
        """The first n images (all when n is 0)."""
        return self if not n else Split(self.x[:n], self.y[:n], self.classes)


def detect_layout(data_dir, download):
    """'imagefolder', 'cifar10' (pickle batches present, or to be downloaded); UserError otherwise."""
    if os.path.isdir(os.path.join(data_dir, "train")) and os.path.isdir(os.path.join(data_dir, "test")):
        return "imagefolder"
    if os.path.isdir(os.path.join(data_dir, "cifar-10-batches-py")) or download:
        return "cifar10"
    if not os.path.isdir(data_dir):
        raise UserError(f"data folder {data_dir} does not exist (set DATA_DIR, or DOWNLOAD=True to fetch CIFAR-10)")
    raise UserError(f"data folder {data_dir} holds neither train/ and test/ class folders nor cifar-10-batches-py/")


def list_imagefolder(root):
    """(paths, labels, classes) of root/<class>/<image>, classes sorted by name as ImageFolder does."""
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
    paths, labels = [], []
    for label, cls in enumerate(classes):
        files = sorted(f.name for f in os.scandir(os.path.join(root, cls)) if f.name.lower().endswith(IMAGE_EXTS))
        paths += [os.path.join(root, cls, f) for f in files]
        labels += [label] * len(files)
    if not paths:
        raise UserError(f"no images found under {root} (expected {root}/<class>/<image>.jpg)")
    return paths, labels, classes


def decode_images(paths, size, desc):
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    for i, p in enumerate(tqdm(paths, desc=desc, unit="img", mininterval=1.0)):
        try:
            with Image.open(p) as im:
                im = im.convert("RGB")
                if im.size != (size, size):
                    im = im.resize((size, size), Image.BILINEAR)
                out[i] = np.asarray(im)
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise UserError(f"cannot read image {p} ({type(e).__name__}: {e}); remove or replace it") from None
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def load_imagefolder(data_dir, size):
    result = {}
    for split in ("train", "test"):
        paths, labels, classes = list_imagefolder(os.path.join(data_dir, split))
        result[split] = Split(decode_images(paths, size, f"decode {split}"), torch.tensor(labels), classes)
    if result["train"].classes != result["test"].classes:
        raise UserError(f"train/ and test/ in {data_dir} have different class folders")
    return result


class PlainDataUnpickler(pickle.Unpickler):
    """Reads only what CIFAR-10's batch files hold (dicts, lists, strings, bytes, numbers, numpy arrays): a file
    that names any other class or function (the way pickles run code) is refused instead of executed."""
    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused to load {module}.{name} (CIFAR-10 files hold plain data only)")
        return super().find_class(module, name)


def read_pickle(path):
    with open(path, "rb") as f:
        return PlainDataUnpickler(f, encoding="latin1").load()


def outermost_missing(path):
    """The outermost folder on the way to `path` that does not exist yet (None when `path` exists)."""
    path, missing = os.path.abspath(path), None
    while not os.path.exists(path):
        path, missing = os.path.dirname(path), path
    return missing


def load_cifar10(data_dir, download):
    """Read torchvision's CIFAR-10 layout (cifar-10-batches-py/); torchvision downloads it first if needed."""
    folder = os.path.join(data_dir, "cifar-10-batches-py")
    if not os.path.isdir(folder):
        from torchvision.datasets import CIFAR10
        made = outermost_missing(data_dir)
        try:
            CIFAR10(data_dir, train=True, download=download)
        except Exception as e:  # offline, interrupted download, failed integrity check
            for root, _, _ in (os.walk(made, topdown=False) if made else ()):
                if not os.listdir(root):  # the empty folders the attempt made; a partial download is kept
                    os.rmdir(root)
            raise UserError(f"could not download CIFAR-10 into {data_dir} ({os.path.abspath(data_dir)}: "
                            f"{type(e).__name__}: {e}); offline, set DATA_DIR to a local copy (CIFAR-10 or "
                            f"ImageFolder layout)") from None
    try:
        classes = read_pickle(os.path.join(folder, "batches.meta"))["label_names"]
        train = [read_pickle(os.path.join(folder, f"data_batch_{i}")) for i in range(1, 6)]
        test = [read_pickle(os.path.join(folder, "test_batch"))]
        return {split: Split(torch.from_numpy(np.concatenate([b["data"] for b in batches]).reshape(-1, 3, 32, 32)),
                             torch.tensor([label for b in batches for label in b["labels"]]), list(classes))
                for split, batches in (("train", train), ("test", test))}
    except (OSError, KeyError, TypeError, ValueError, pickle.UnpicklingError, EOFError) as e:
        raise UserError(f"{folder} is incomplete, corrupt or not CIFAR-10: {type(e).__name__}: {e}") from None


def files_fingerprint(data_dir, layout):
    """A hash of every data file's relative path, size and modification time: images added, removed, renamed,
    moved to another class or rewritten after the cache was made give another cache."""
    if layout == "imagefolder":
        paths = [p for split in ("train", "test") for p in list_imagefolder(os.path.join(data_dir, split))[0]]
    else:
        folder = os.path.join(data_dir, "cifar-10-batches-py")
        paths = [os.path.join(folder, f) for f in CIFAR_FILES if os.path.exists(os.path.join(folder, f))]
    h = hashlib.sha1()
    for p in paths:
        st = os.stat(p)
        h.update(f"{os.path.relpath(p, data_dir)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def cache_key(data_dir, layout, size):
    """What the decoded images were made from: the folder, its layout and image size, the cache format and the
    files' names, sizes and times."""
    fingerprint = files_fingerprint(data_dir, layout) if os.path.isdir(data_dir) else "none"
    return f"{os.path.abspath(data_dir)}|{layout}|{size}|{CACHE_FORMAT}|{fingerprint}"


def cache_path(cache_dir, key):
    return os.path.join(cache_dir, f"data_{hashlib.sha1(key.encode()).hexdigest()[:12]}.pt")


def load_dataset(data_dir, download, cache_dir, image_size=32):
    """{'train': Split, 'test': Split} with x uint8 (N, 3, H, W); decoded once, then read from the cache."""
    layout = detect_layout(data_dir, download)
    key = cache_key(data_dir, layout, image_size)

    def decode():
        data = load_imagefolder(data_dir, image_size) if layout == "imagefolder" else load_cifar10(data_dir, download)
        print(f"data: {data_dir} ({layout}) decoded")
        return {"classes": data["train"].classes, "source": os.path.abspath(data_dir), "layout": layout,
                **{s: {"x": data[s].x, "y": data[s].y} for s in ("train", "test")}}
    cached = cache_or_compute(cache_path(cache_dir, key), key, decode, "data")
    return {s: Split(cached[s]["x"], cached[s]["y"], cached["classes"]) for s in ("train", "test")}


def train_val_split(train, val_size, seed, subset=0):
    """(train, val) Splits: `val_size` training images held out (a fixed random choice by `seed`) for every
    decision the pipeline makes; `subset` > 0 keeps only that many of the rest for training. Every script calls
    this with the baseline's own values, so all stages hold out the same images."""
    if not 0 < val_size < len(train.x):
        raise UserError(f"VAL_SIZE must be between 1 and {len(train.x) - 1} for {len(train.x)} training images, "
                        f"got {val_size}")
    perm = torch.randperm(len(train.x), generator=torch.Generator().manual_seed(seed))
    val, rest = perm[:val_size], perm[val_size:]
    held_out = Split(train.x[val], train.y[val], train.classes)
    return Split(train.x[rest], train.y[rest], train.classes).head(subset), held_out


class Batch(NamedTuple):
    """One training or evaluation batch: images (float in [0, 1]), labels and the images' positions in their split,
    all on the device, and which fixed augmentation view they show (-1: a fresh random one, or none)."""
    x: torch.Tensor
    y: torch.Tensor
    idx: torch.Tensor
    view: int = -1


def augment_params(n, generator):
    """Random pad-4 crop offsets and flips of n images: (3, n) int64 rows dy, dx (0..8) and flip (0 or 1)."""
    dy = torch.randint(0, 9, (n,), generator=generator)
    dx = torch.randint(0, 9, (n,), generator=generator)
    return torch.stack([dy, dx, random_flips(n, generator)])


def random_flips(n, generator):
    """n random horizontal flips, 0 or 1 (int64), each with probability one half."""
    return (torch.rand(n, generator=generator) < 0.5).long()


def apply_augment(x, params):
    """Pad-4 crop at the offsets and horizontal flip of `params` (augment_params, on x's device) on a float batch
    (N, C, H, W), as tensor ops on x's device."""
    n, c, h, w = x.shape
    dy, dx, flip = params
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    rows = (torch.arange(h, device=x.device).view(1, h, 1) + dy.view(n, 1, 1)).expand(n, h, w)
    cols = (torch.arange(w, device=x.device).view(1, 1, w) + dx.view(n, 1, 1)).expand(n, h, w)
    idx = torch.arange(n, device=x.device).view(n, 1, 1).expand(n, h, w)
    out = padded.permute(0, 2, 3, 1)[idx, rows, cols].permute(0, 3, 1, 2)
    return torch.where(flip.bool().view(n, 1, 1, 1), out.flip(3), out)


def fixed_views(n, views, seed):
    """`views` fixed augmentations of each of n images, (views, 3, n): the same for the same seed, so a teacher's
    logits on them can be computed once (utils.train.teacher_logits) and reused by every epoch showing them."""
    generator = torch.Generator().manual_seed(seed)
    return torch.stack([augment_params(n, generator) for _ in range(views)])


def remirrored(params, generator):
    """A copy of augmentation `params` (augment_params) with the same crops and fresh random flips."""
    out = params.clone()
    out[2] = random_flips(params.shape[1], generator)
    return out


def _to(t, device):
    """`t` on `device`; asynchronous only towards a GPU (a copy to the CPU must be complete before it is read)."""
    return t.to(device, non_blocking=torch.device(device).type == "cuda")


def batches(x, y, batch_size, device, shuffle=False, train=False, generator=None, channels_last=False, view=None,
            shard=(0, 1)):
    """Yield Batches on `device`; with train=True shuffled, augmented, last partial dropped. view: (index, (3, N)
    params) of a fixed augmentation view for every image (fixed_views), instead of fresh random ones. shard:
    (rank, ranks): of every batch of `batch_size` images (which `ranks` divides), the rank's contiguous share
    (data parallelism: the same images and augmentations as one process, split).

    The epoch's order and augmentation parameters are drawn up front, from the generator in the order drawing
    them batch by batch would use (the order, then each batch's crops and flips: the same batches for the same
    seed), and copied to the device once: a GPU never waits for a small copy from the host between steps."""
    order = torch.randperm(len(x), generator=generator) if shuffle else torch.arange(len(x))
    stop = len(x) - len(x) % batch_size if train and len(x) >= batch_size else len(x)
    order = order[:stop]
    if view is not None:
        params = view[1][:, order]
    elif train:
        params = torch.cat([augment_params(min(batch_size, stop - i), generator)
                            for i in range(0, stop, batch_size)], dim=1)
    else:
        params = None
    positions = _to(order, device)
    at_images = positions if positions.device == x.device else _to(order, x.device)  # labels lie with the images
    params = None if params is None else _to(params, device)
    rank, ranks = shard
    share = batch_size // ranks
    for i in range(0, stop, batch_size):
        rows = slice(i + rank * share, min(i + (rank + 1) * share, stop))
        xb = _to(x[at_images[rows]], device).float().div_(255)
        if params is not None:
            xb = apply_augment(xb, params[:, rows])
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        yield Batch(xb, _to(y[at_images[rows]], device), positions[rows], -1 if view is None else view[0])


def num_batches(n, batch_size, train):
    return n // batch_size if train and n >= batch_size else -(-n // batch_size)
