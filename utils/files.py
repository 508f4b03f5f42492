"""Files that are whole or absent: the one atomic-write helper, the artifact set a run lands at once, the lock
that keeps two runs out of one OUT_DIR, and the clean-up of what a killed run left behind.

Every temporary file is named `<target>.tmp<pid><ext>` and every staging folder `.staging.tmp<pid>`, so a
later run can tell a dead process's leftovers (pid no longer running) from a live one's.
"""
import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import time

from .config import UserError

LOCK_NAME = ".lock"
TEMP_PATTERN = re.compile(r"\.tmp(\d+)")


def check_out_dir(out_dir):
    """OUT_DIR must be a folder (or not exist yet): a file of that name is a one-line error."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"OUT_DIR {out_dir} is a file, not a folder: choose another OUT_DIR")


@contextlib.contextmanager
def scratch_path(path):
    """Yield a temporary path beside `path` (same extension), removed after the block whatever happens."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}{os.path.splitext(path)[1]}"
    try:
        yield tmp
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; when the block succeeds it replaces `path` in one rename, and on any
    failure (an exception, Ctrl-C) it is removed: `path` is whole, or as it was before."""
    with scratch_path(path) as tmp:
        yield tmp
        os.replace(tmp, path)


def atomic_save(obj, path):
    """torch.save, atomically."""
    import torch
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def atomic_write_text(path, text):
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def write_json(path, obj, indent=1):
    """`obj` as indented JSON with a final newline, written atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def cache_or_compute(path, key, compute, what, mmap=False):
    """The dict stored at `path` when it was made from `key`, else compute() (a dict), stored there beside the key
    (atomically: JSON for a .json path, else torch.save, read back weights-only) and returned. A file that is
    unreadable or made from another key is computed again; one line says which happened. mmap: tensors read
    memory-mapped from the file, also right after computing them (every process that reads it shares its pages)."""
    if os.path.exists(path):
        try:
            if path.endswith(".json"):
                with open(path) as f:
                    saved = json.load(f)
            else:
                import torch
                saved = torch.load(path, weights_only=True, mmap=mmap)
            if saved.get("key") == key:
                print(f"{what}: reusing {path}")
                return {k: v for k, v in saved.items() if k != "key"}
            print(f"{what}: {path} was made from other inputs, computing it again")
        except Exception:  # truncated, foreign or from an older format: computed again
            print(f"{what}: {path} is unreadable, computing it again")
    value = compute()
    record = {"key": key, **value}
    if path.endswith(".json"):
        write_json(path, record)
    else:
        atomic_save(record, path)
        if mmap:
            import torch
            del value, record
            return {k: v for k, v in torch.load(path, weights_only=True, mmap=True).items() if k != "key"}
    return value


def atomic_write_bytes(path, data):
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temps(folder):
    """Delete temporary files and staging folders under `folder` left by processes that no longer run (a kill,
    a power cut); returns what was removed."""
    removed = []
    if not os.path.isdir(folder):
        return removed
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            match = TEMP_PATTERN.search(name)
            if not match or int(match.group(1)) == os.getpid() or pid_alive(int(match.group(1))):
                continue
            path = os.path.join(root, name)
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
            removed.append(path)
        dirs[:] = [d for d in dirs if os.path.exists(os.path.join(root, d))]
    return removed


@contextlib.contextmanager
def out_dir_lock(out_dir, script):
    """Hold OUT_DIR for one run: a second run on the same folder stops with one line naming the first one's pid.
    A lock left by a process that no longer runs is taken over; leftovers of killed runs are cleaned first."""
    check_out_dir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, LOCK_NAME)
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pid, holder = read_lock(path)
            if pid and pid != os.getpid() and pid_alive(pid):
                raise UserError(f"{out_dir} is in use by {holder} (pid {pid}); wait for it to finish, or use "
                                f"another OUT_DIR") from None
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)  # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()} {script}\n")
        break
    else:
        raise UserError(f"could not take the lock {path}: remove it if no run is using {out_dir}")
    try:
        for leftover in remove_stale_temps(out_dir):
            print(f"removed {leftover}, left by an interrupted run")
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def read_lock(path):
    """(pid, script) written in a lock file; (None, '?') when it is unreadable."""
    try:
        with open(path) as f:
            pid, _, script = f.read().strip().partition(" ")
        return int(pid), script or "?"
    except (OSError, ValueError):
        return None, "?"


def new_run_id():
    """A name for one run of compress_model.py, stored in each of its final artifacts."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}"


class ArtifactSet:
    """The final files of a run, written into a staging folder and moved into OUT_DIR together only when every
    one of them was written; if anything fails on the way, the files of the previous run stay as they were."""

    def __init__(self, out_dir):
        self.out_dir = out_dir
        self.staging = os.path.join(out_dir, f".staging.tmp{os.getpid()}")

    def path(self, name):
        """Where to write the file that will land as OUT_DIR/name."""
        return os.path.join(self.staging, name)

    def __enter__(self):
        shutil.rmtree(self.staging, ignore_errors=True)
        os.makedirs(self.staging)
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                for name in sorted(os.listdir(self.staging)):
                    os.replace(os.path.join(self.staging, name), os.path.join(self.out_dir, name))
        finally:
            shutil.rmtree(self.staging, ignore_errors=True)
        return False


def file_digest(path):
    """sha256 of a file's bytes (first 16 hex digits): which exact file a later stage was made from."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]
