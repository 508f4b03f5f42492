"""CIFAR-10 (torchvision's pickle layout, downloaded when allowed) or any ImageFolder layout, decoded once
into uint8 tensors and cached; batches are augmented as tensors on the training device."""
import hashlib
import os
import pickle

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .checkpoint import atomic_save
from .config import UserError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp")
CACHE_FORMAT = "uint8-cache-v1"


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
        with Image.open(p) as im:
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            out[i] = np.asarray(im)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def load_imagefolder(data_dir, size):
    result = {}
    for split in ("train", "test"):
        paths, labels, classes = list_imagefolder(os.path.join(data_dir, split))
        result[split] = (decode_images(paths, size, f"decode {split}"), torch.tensor(labels), classes)
    if result["train"][2] != result["test"][2]:
        raise UserError(f"train/ and test/ in {data_dir} have different class folders")
    return result


def load_cifar10(data_dir, download):
    """Read torchvision's CIFAR-10 layout (cifar-10-batches-py/); torchvision downloads it first if needed."""
    folder = os.path.join(data_dir, "cifar-10-batches-py")
    if not os.path.isdir(folder):
        from torchvision.datasets import CIFAR10
        try:
            CIFAR10(data_dir, train=True, download=download)
        except Exception as e:  # offline, interrupted download, failed integrity check
            raise UserError(f"could not download CIFAR-10 into {data_dir} ({type(e).__name__}: {e}); offline, "
                            f"set DATA_DIR to a local copy (CIFAR-10 or ImageFolder layout)") from None
    try:
        classes = read_pickle(os.path.join(folder, "batches.meta"))["label_names"]
        train = [read_pickle(os.path.join(folder, f"data_batch_{i}")) for i in range(1, 6)]
        test = [read_pickle(os.path.join(folder, "test_batch"))]
    except (OSError, KeyError, pickle.UnpicklingError, EOFError) as e:
        raise UserError(f"{folder} is incomplete or corrupt: {type(e).__name__}: {e}") from None
    return {split: (torch.from_numpy(np.concatenate([b["data"] for b in batches]).reshape(-1, 3, 32, 32)),
                    torch.tensor([label for b in batches for label in b["labels"]]), list(classes))
            for split, batches in (("train", train), ("test", test))}


def read_pickle(path):
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


def cache_path(cache_dir, data_dir, layout, size):
    key = f"{os.path.abspath(data_dir)}|{layout}|{size}|{CACHE_FORMAT}"
    return os.path.join(cache_dir, f"data_{hashlib.sha1(key.encode()).hexdigest()[:12]}.pt")


def load_dataset(data_dir, download, cache_dir, image_size=32):
    """{'train': (x, y, classes), 'test': ...} with x uint8 (N, 3, H, W); decoded once, then read from cache."""
    layout = detect_layout(data_dir, download)
    path = cache_path(cache_dir, data_dir, layout, image_size)
    if os.path.exists(path):
        try:
            cached = torch.load(path, weights_only=True)
            print(f"data: {data_dir} ({layout}) from cache {path}")
            return {s: (cached[s]["x"], cached[s]["y"], cached["classes"]) for s in ("train", "test")}
        except Exception:
            print(f"data: cache {path} is unreadable, decoding again")
    data = load_imagefolder(data_dir, image_size) if layout == "imagefolder" else load_cifar10(data_dir, download)
    os.makedirs(cache_dir, exist_ok=True)
    atomic_save({"classes": data["train"][2], "source": os.path.abspath(data_dir), "layout": layout,
                 **{s: {"x": data[s][0], "y": data[s][1]} for s in ("train", "test")}}, path)
    print(f"data: {data_dir} ({layout}) decoded and cached in {path}")
    return data


def split_train_val(x, y, val_size, seed):
    """Hold out `val_size` training images (a fixed random choice) for every decision the pipeline makes."""
    if not 0 < val_size < len(x):
        raise UserError(f"VAL_SIZE must be between 1 and {len(x) - 1} for {len(x)} training images, got {val_size}")
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    val, train = perm[:val_size], perm[val_size:]
    return (x[train], y[train]), (x[val], y[val])


def augment(x, generator):
    """Pad-4 random crop and horizontal flip of a float batch (N, C, H, W), done as tensor ops."""
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (n, 1, 1), generator=generator).to(x.device)
    dx = torch.randint(0, 9, (n, 1, 1), generator=generator).to(x.device)
    rows = (torch.arange(h, device=x.device).view(1, h, 1) + dy).expand(n, h, w)
    cols = (torch.arange(w, device=x.device).view(1, 1, w) + dx).expand(n, h, w)
    idx = torch.arange(n, device=x.device).view(n, 1, 1).expand(n, h, w)
    out = padded.permute(0, 2, 3, 1)[idx, rows, cols].permute(0, 3, 1, 2)
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device).view(n, 1, 1, 1)
    return torch.where(flip, out.flip(3), out)


def batches(x, y, batch_size, device, shuffle=False, train=False, generator=None, channels_last=False):
    """Yield (float images in [0, 1], labels) on `device`; with train=True shuffled, augmented, last partial dropped."""
    order = torch.randperm(len(x), generator=generator) if shuffle else torch.arange(len(x))
    stop = len(x) - len(x) % batch_size if train and len(x) >= batch_size else len(x)
    for i in range(0, stop, batch_size):
        idx = order[i:i + batch_size]
        xb = x[idx].to(device, non_blocking=True).float().div_(255)
        if train:
            xb = augment(xb, generator)
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        yield xb, y[idx].to(device, non_blocking=True)


def num_batches(n, batch_size, train):
    return n // batch_size if train and n >= batch_size else -(-n // batch_size)
