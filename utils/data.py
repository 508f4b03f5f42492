"""CIFAR-10 (torchvision's pickle layout, downloaded when allowed) or any ImageFolder layout at IMAGE_SIZE px,
either decoded once into uint8 tensors and cached (DATA_MODE=ram) or kept as files and decoded batch by batch in
DataLoader workers (DATA_MODE=stream, for data bigger than memory); the one train/validation split; batches
augmented as tensors on the device, the same way on both paths."""
import hashlib
import multiprocessing
import os
import pickle
import sys
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from .config import UserError
from .device import cores
from .dist import split_evenly
from .files import cache_or_compute

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp")
CACHE_FORMAT = "uint8-cache-v3"  # v3: images of another size resized and centre-cropped keeping their aspect
DATA_MODES = ("auto", "ram", "stream")
# DataLoader workers start from a clean server process, not forked from the script's own: a fork inherits the
# state of ONNX Runtime's and gloo's threads, and crashed in the tests
WORKER_START = "forkserver"
# A worker runs the script's imports again before its first image (multiprocessing's way to a worker's __main__),
# seconds for every DataLoader; the server imports these once, then each worker forked from it finds them there
SERVER_IMPORTS = ("torch", "torchvision", "onnx", "onnxruntime", "matplotlib", "torch_pruning")
RAM_MARGIN = 1.5  # decoded bytes times this must fit the available memory for DATA_MODE=auto to keep them in RAM
CIFAR_FILES = ["batches.meta"] + [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


class Split(NamedTuple):
    """Images x (uint8 (N, 3, H, W): a tensor, or ImageFiles decoded as they are read), labels y (int64 (N,))
    and the class names the labels index."""
    x: torch.Tensor
    y: torch.Tensor
    classes: list

    def to(self, device):
        return Split(self.x.to(device), self.y.to(device), self.classes)

    def select(self, idx):
        """The images at positions `idx` (an int64 tensor), in that order, gathered only when read (subset)."""
        return Split(subset(self.x, idx.to(self.x.device)), self.y[idx.to(self.y.device)], self.classes)

    def head(self, n):
        """The first n images (all when n is 0)."""
        return self if not n else self.select(torch.arange(min(n, len(self.x))))


def decode_image(path, size):
    """One image file as uint8 (3, size, size) RGB: resized so that its shorter side is `size` and centre-cropped
    (its aspect kept, never squashed). UserError naming the file when it cannot be read."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            if (w, h) != (size, size):
                scale = size / min(w, h)
                rw, rh = max(size, round(w * scale)), max(size, round(h * scale))
                left, top = (rw - size) // 2, (rh - size) // 2
                im = im.resize((rw, rh), Image.BILINEAR).crop((left, top, left + size, top + size))
            return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise UserError(f"cannot read image {path} ({type(e).__name__}: {e}); remove or replace it") from None


class EpochBatches(torch.utils.data.Sampler):
    """A batch sampler whose batches are set before each pass: one DataLoader (and its workers) serves every
    epoch, each with its own order."""

    def __init__(self):
        self.rows = []

    def __iter__(self):
        return iter([r.tolist() for r in self.rows])

    def __len__(self):
        return len(self.rows)


class FileDecoder(torch.utils.data.Dataset):
    """Image i of `paths` decoded at `size` (decode_image): what a DataLoader worker runs. An image it cannot read
    comes back as its one-line message (stacked_or_error), for the main process to raise."""

    def __init__(self, paths, size):
        self.paths, self.size = paths, size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            return decode_image(self.paths[i], self.size)
        except UserError as e:
            return str(e)


def stacked_or_error(items):
    """A DataLoader batch: the decoded images stacked, or the first message of an image that could not be read
    (an exception raised in a worker would reach the main process as a traceback, not as one line)."""
    errors = [item for item in items if isinstance(item, str)]
    return errors[0] if errors else torch.stack(items)


class ImageFiles:
    """Images kept as files and decoded (decode_image) when read: indexed with positions (an int64 tensor or a
    slice) it gives uint8 (n, 3, size, size) as a tensor of decoded images would; `batches` decodes a pass's
    batches in `workers` DataLoader processes, in order, ahead of use. It lives on the CPU: to(device) is itself."""

    def __init__(self, paths, size, workers=0, pin_memory=False):
        self.paths, self.size, self.workers, self.pin_memory = list(paths), size, workers, pin_memory
        self.device = torch.device("cpu")
        self._loader = self._sampler = None

    def __getstate__(self):  # sent to other ranks as its file list: each starts its own workers
        return {**self.__dict__, "_loader": None, "_sampler": None}

    def __len__(self):
        return len(self.paths)

    @property
    def shape(self):
        return (len(self.paths), 3, self.size, self.size)

    def take(self, rows):
        """The files at `rows` (a slice or an int64 tensor of positions), not decoded."""
        paths = self.paths[rows] if isinstance(rows, slice) else [self.paths[i] for i in rows.tolist()]
        return ImageFiles(paths, self.size, self.workers, self.pin_memory)

    def to(self, device):
        """Itself, or on the way to a GPU its batches in pinned memory (copied to the GPU asynchronously)."""
        pin = torch.device(device).type == "cuda"
        return self if pin == self.pin_memory else ImageFiles(self.paths, self.size, self.workers, pin)

    def __getitem__(self, rows):
        positions = range(len(self.paths))[rows] if isinstance(rows, slice) else rows.tolist()
        return torch.stack([decode_image(self.paths[i], self.size) for i in positions])

    def batches(self, rows):
        """The images at each int64 tensor of `rows`, one uint8 batch each, decoded by the workers (which stay
        for the next pass)."""
        if self._loader is None:
            multiprocessing.get_context(WORKER_START).set_forkserver_preload(  # once the server runs, a no-op
                [__name__] + [m for m in SERVER_IMPORTS if m in sys.modules])
            self._sampler = EpochBatches()
            self._loader = torch.utils.data.DataLoader(FileDecoder(self.paths, self.size), batch_sampler=self._sampler,
                                                       num_workers=self.workers, persistent_workers=self.workers > 0,
                                                       pin_memory=self.pin_memory, collate_fn=stacked_or_error,
                                                       generator=torch.Generator(),  # not the global RNG's draws
                                                       multiprocessing_context=WORKER_START if self.workers else None)
        self._sampler.rows = list(rows)
        for images in self._loader:
            if isinstance(images, str):
                raise UserError(images)
            yield images


class ImageRows:
    """The images of a uint8 tensor (N, 3, H, W) at `rows` (int64 positions), gathered when read: a split of the
    decoded images that holds no copy of its own, so that every rank of a machine reads the one memory-mapped
    cache. Indexed with positions (an int64 tensor or a slice) it gives uint8 (n, 3, H, W) as a tensor would;
    on a GPU it becomes a tensor there (to)."""

    def __init__(self, images, rows):
        self.images, self.rows = images, rows

    def __len__(self):
        return len(self.rows)

    @property
    def shape(self):
        return (len(self.rows), *self.images.shape[1:])

    @property
    def device(self):
        return self.images.device

    def take(self, rows):
        return ImageRows(self.images, self.rows[rows])

    def __getitem__(self, rows):
        return self.images[self.rows[rows]]

    def to(self, device):
        """Itself on the CPU; on another device the gathered images there (a tensor)."""
        return self if torch.device(device).type == "cpu" else self.images[self.rows].to(device)


def subset(x, rows):
    """Images `x` (a tensor, ImageRows or ImageFiles) at `rows` (a slice or an int64 tensor): files stay files, a
    tensor on the CPU becomes the rows of it (ImageRows), not a copy."""
    if isinstance(x, (ImageFiles, ImageRows)):
        return x.take(rows)
    if x.device.type == "cpu":
        return ImageRows(x, torch.arange(len(x))[rows] if isinstance(rows, slice) else rows)
    return x[rows]


def image_batches(x, rows):
    """The uint8 images of `x` at each int64 tensor of `rows`, batch by batch: indexed from decoded tensors, or
    decoded from files by ImageFiles' workers."""
    return x.batches(rows) if isinstance(x, ImageFiles) else (x[r] for r in rows)


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


def decode_images(files, desc, batch_size=256):
    """Every image of `files` (ImageFiles) decoded into one uint8 (N, 3, size, size) tensor by its workers."""
    out = torch.empty(files.shape, dtype=torch.uint8)
    rows = torch.arange(len(files)).split(batch_size)
    with tqdm(total=len(files), desc=desc, unit="img", mininterval=1.0) as bar:
        for r, images in zip(rows, files.batches(rows)):
            out[r] = images
            bar.update(len(r))
    return out


def imagefolder_files(data_dir, size, workers):
    """{'train': Split, 'test': Split} of ImageFiles: the listing only, nothing decoded."""
    result = {}
    for split in ("train", "test"):
        paths, labels, classes = list_imagefolder(os.path.join(data_dir, split))
        result[split] = Split(ImageFiles(paths, size, workers), torch.tensor(labels), classes)
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


def image_size_of(path):
    """(width, height) of an image file from its header; None when unreadable (decoding names it)."""
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, UnidentifiedImageError, ValueError):
        return None


def resized(x, size):
    """uint8 (N, 3, h, w) square images resized to size x size as decode_image resizes a file's (bilinear)."""
    if x.shape[-1] == size:
        return x
    return torch.stack([torch.from_numpy(np.asarray(Image.fromarray(img.permute(1, 2, 0).numpy()).resize(
        (size, size), Image.BILINEAR)).copy()).permute(2, 0, 1) for img in x])


def available_memory():
    """Bytes of memory available for decoded images: psutil's available memory, or the environment's
    DATA_MEMORY_AVAILABLE (bytes; a test hook, and a cap a user may set)."""
    if os.environ.get("DATA_MEMORY_AVAILABLE"):
        return int(os.environ["DATA_MEMORY_AVAILABLE"])
    try:
        import psutil
        return psutil.virtual_memory().available
    except ImportError:  # a machine without it (requirements.txt installs it): the free pages the kernel counts
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def choose_data_mode(mode, n_images, image_size, can_stream=True):
    """'ram' or 'stream' for DATA_MODE `mode` (auto | ram | stream): the decoded images (n_images x 3 x
    image_size^2 bytes) kept in RAM when RAM_MARGIN times them fit the memory available, else streamed from the
    files. A forced ram that cannot fit is refused at once, before decoding. One copy a machine, whatever its
    ranks: every rank reads the one cache file memory-mapped (load_dataset), and the splits are rows of it."""
    need, available = n_images * 3 * image_size ** 2, available_memory()
    fits = need * RAM_MARGIN <= available
    gib = lambda b: f"{b / 2**30:.2f} GiB"
    sizes = (f"{n_images} images x 3 x {image_size}x{image_size} bytes = {gib(need)} (one copy a machine), "
             f"{RAM_MARGIN}x that against {gib(available)} available")
    if mode == "stream" and not can_stream:
        raise UserError("DATA_MODE=stream reads an ImageFolder layout (DATA_DIR/train/<class>/<image> and test/); "
                        "CIFAR-10's pickle files are read whole: use DATA_MODE=ram")
    if mode == "ram" and not fits:
        raise UserError(f"DATA_MODE=ram does not fit: {sizes}; use --DATA_MODE=stream (or auto), or a smaller "
                        f"IMAGE_SIZE")
    if mode == "auto":
        if not fits and not can_stream:
            raise UserError(f"the data does not fit in memory ({sizes}) and CIFAR-10's pickle files cannot be "
                            f"streamed: make an ImageFolder copy, or use a smaller IMAGE_SIZE")
        mode = "ram" if fits else "stream"
        print(f"data: DATA_MODE=auto chose {mode} ({sizes})")
    return mode


def load_dataset(data_dir, download, cache_dir, image_size=32, data_mode="ram", workers=None):
    """{'train': Split, 'test': Split} with x uint8 (N, 3, image_size, image_size): decoded once (by a DataLoader
    worker a core) into a cache file, then read from it memory-mapped (ram: the ranks of a machine share its
    pages); or ImageFiles that the batches decode in `workers` processes (stream; default a core each: under
    data parallelism a rank's threads); data_mode auto chooses (choose_data_mode)."""
    layout = detect_layout(data_dir, download)
    n_cores = cores()
    files = imagefolder_files(data_dir, image_size, n_cores) if layout == "imagefolder" else None
    n_images = sum(len(split.x) for split in files.values()) if files else 60000
    first = files and image_size_of(files["train"].x.paths[0])
    if first and first != (image_size, image_size):
        print(f"data: images resized to a shorter side of {image_size} px and centre-cropped to {image_size}x"
              f"{image_size}, their aspect kept (the first is {first[0]}x{first[1]})")
    if choose_data_mode(data_mode, n_images, image_size, can_stream=files is not None) == "stream":
        workers = workers or n_cores
        for split in files.values():
            split.x.workers = workers
        print(f"data: {data_dir} ({layout}) streamed from its files, decoded at {image_size}x{image_size} by "
              f"{workers} worker process(es) a rank")
        return files
    key = cache_key(data_dir, layout, image_size)

    def decode():
        if files:
            data = {s: Split(decode_images(f.x, f"decode {s}"), f.y, f.classes) for s, f in files.items()}
        else:
            data = {s: Split(resized(d.x, image_size), d.y, d.classes)
                    for s, d in load_cifar10(data_dir, download).items()}
        print(f"data: {data_dir} ({layout}) decoded")
        return {"classes": data["train"].classes, "source": os.path.abspath(data_dir), "layout": layout,
                **{s: {"x": data[s].x, "y": data[s].y} for s in ("train", "test")}}
    cached = cache_or_compute(cache_path(cache_dir, key), key, decode, "data", mmap=True)
    return {s: Split(cached[s]["x"], cached[s]["y"], cached["classes"]) for s in ("train", "test")}


def check_batch(batch_size, train):
    """A global batch no larger than the training split (every epoch drops its last partial batch)."""
    if len(train.x) < batch_size:
        raise UserError(f"BATCH_SIZE={batch_size} is larger than the {len(train.x)} training images")


def train_val_split(train, val_size, seed, subset=0):
    """(train, val) Splits: `val_size` training images held out (a fixed random choice by `seed`) for every
    decision the pipeline makes; `subset` > 0 keeps only that many of the rest for training. Every script calls
    this with the baseline's own values, so all stages hold out the same images."""
    if not 0 < val_size < len(train.x):
        raise UserError(f"VAL_SIZE must be between 1 and {len(train.x) - 1} for {len(train.x)} training images, "
                        f"got {val_size}")
    perm = torch.randperm(len(train.x), generator=torch.Generator().manual_seed(seed))
    val, rest = perm[:val_size], perm[val_size:]
    return train.select(rest).head(subset), train.select(val)


class Batch(NamedTuple):
    """One training or evaluation batch: images (float in [0, 1]), labels and the images' positions in their split,
    all on the device, which fixed augmentation view they show (-1: a fresh random one, or none), and the weight
    of its mean loss under data parallelism (its share of the global batch times the ranks: 1 where the shares
    are equal), so that the ranks' averaged gradients are those of the global batch's mean loss."""
    x: torch.Tensor
    y: torch.Tensor
    idx: torch.Tensor
    view: int = -1
    weight: float = 1.0


def crop_pad(size):
    """Pixels of padding of the random crop of size x size images: 4 at 32 px, in proportion at other sizes."""
    return max(1, size // 8)


def augment_params(n, generator, size=32):
    """Random pad-crop offsets (crop_pad(size)) and flips of n images: (3, n) int64 rows dy, dx (0..2 pad) and
    flip (0 or 1)."""
    span = 2 * crop_pad(size) + 1
    dy = torch.randint(0, span, (n,), generator=generator)
    dx = torch.randint(0, span, (n,), generator=generator)
    return torch.stack([dy, dx, random_flips(n, generator)])


def random_flips(n, generator):
    """n random horizontal flips, 0 or 1 (int64), each with probability one half."""
    return (torch.rand(n, generator=generator) < 0.5).long()


def apply_augment(x, params):
    """Pad-crop at the offsets and horizontal flip of `params` (augment_params, on x's device) on a float batch
    (N, C, H, W), as tensor ops on x's device."""
    n, c, h, w = x.shape
    dy, dx, flip = params
    pad = crop_pad(w)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = (torch.arange(h, device=x.device).view(1, h, 1) + dy.view(n, 1, 1)).expand(n, h, w)
    cols = (torch.arange(w, device=x.device).view(1, 1, w) + dx.view(n, 1, 1)).expand(n, h, w)
    idx = torch.arange(n, device=x.device).view(n, 1, 1).expand(n, h, w)
    out = padded.permute(0, 2, 3, 1)[idx, rows, cols].permute(0, 3, 1, 2)
    return torch.where(flip.bool().view(n, 1, 1, 1), out.flip(3), out)


def fixed_views(n, views, seed, size=32):
    """`views` fixed augmentations of each of n size x size images, (views, 3, n): the same for the same seed, so
    a teacher's logits on them can be computed once (utils.train.teacher_logits) and reused by every epoch."""
    generator = torch.Generator().manual_seed(seed)
    return torch.stack([augment_params(n, generator, size) for _ in range(views)])


def remirrored(params, generator):
    """A copy of augmentation `params` (augment_params) with the same crops and fresh random flips."""
    out = params.clone()
    out[2] = random_flips(params.shape[1], generator)
    return out


def alternating_flips(n, seed, epoch):
    """The flips of n images in epoch `epoch` under alternating flip (airbench): a random half of the images
    mirrored in even epochs (the same half every time, from `seed`), the other half in odd ones, so that every
    two epochs show each image both ways instead of each way by chance."""
    return random_flips(n, torch.Generator().manual_seed(seed)) ^ (epoch % 2)


def _to(t, device):
    """`t` on `device`; asynchronous only towards a GPU (a copy to the CPU must be complete before it is read)."""
    return t.to(device, non_blocking=torch.device(device).type == "cuda")


def batches(x, y, batch_size, device, shuffle=False, train=False, generator=None, channels_last=False, view=None,
            shard=(0, 1), flips=None):
    """Yield Batches on `device`; with train=True shuffled, augmented, last partial dropped. view: (index, (3, N)
    params) of a fixed augmentation view for every image (fixed_views), instead of fresh random ones. shard:
    (rank, ranks): of every batch of `batch_size` images, the rank's contiguous share, as even as it goes (data
    parallelism: the same images and augmentations as one process, split; Batch.weight says the share). flips:
    with train=True or a view, each image's horizontal flip (0 or 1, by position in x: alternating_flips) instead
    of the random or the view's one; the crops stay those of the seed or the view.

    The epoch's order and augmentation parameters are drawn up front, from the generator in the order drawing
    them batch by batch would use (the order, then each batch's crops and flips: the same batches for the same
    seed), and copied to the device once: a GPU never waits for a small copy from the host between steps."""
    order = torch.randperm(len(x), generator=generator) if shuffle else torch.arange(len(x))
    stop = len(x) - len(x) % batch_size if train and len(x) >= batch_size else len(x)
    order = order[:stop]
    if view is not None:
        params = view[1][:, order]
    elif train:
        params = torch.cat([augment_params(min(batch_size, stop - i), generator, x.shape[-1])
                            for i in range(0, stop, batch_size)], dim=1)
    else:
        params = None
    if params is not None and flips is not None:
        params[2] = flips[order]
    positions = _to(order, device)
    on = lambda t: positions if positions.device == t.device else _to(order, t.device)  # indices where t lies
    at_images, at_labels = on(x), on(y)
    params = None if params is None else _to(params, device)
    rank, ranks = shard
    steps = [(i, min(batch_size, stop - i)) for i in range(0, stop, batch_size)]
    shares = [slice(i + share.start, i + share.stop) for i, n in steps for share in [split_evenly(n, rank, ranks)]]
    for (_, n), rows, images in zip(steps, shares, image_batches(x, [at_images[r] for r in shares])):
        xb = _to(images, device).float().div_(255)
        if params is not None:
            xb = apply_augment(xb, params[:, rows])
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        yield Batch(xb, _to(y[at_labels[rows]], device), positions[rows], -1 if view is None else view[0],
                    (rows.stop - rows.start) * ranks / n)


def num_batches(n, batch_size, train):
    return n // batch_size if train and n >= batch_size else -(-n // batch_size)


@dataclass(frozen=True)
class DataSource:
    """Where a run's images come from and how they split, which every rank opens the same way (open_splits): the
    data folder, the cache's folder, the image size, DATA_MODE, and the baseline's VAL_SIZE, SEED and
    TRAIN_SUBSET. Small: under data parallelism rank 0 sends this, never the images."""
    data_dir: str
    download: bool
    cache_dir: str
    image_size: int
    mode: str
    val_size: int
    seed: int
    subset: int = 0


def open_splits(source, workers=None):
    """(data, train, val, source): the data set (load_dataset; `workers` decode when it streams), its train and
    validation splits (train_val_split), and the source with its mode resolved (ram or stream), for the other
    ranks to open the same (they read the cache rank 0 made)."""
    data = load_dataset(source.data_dir, source.download, source.cache_dir, source.image_size, source.mode, workers)
    train, val = train_val_split(data["train"], source.val_size, source.seed, source.subset)
    return data, train, val, replace(source, mode="stream" if isinstance(train.x, ImageFiles) else "ram")
