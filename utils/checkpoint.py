"""Self-describing checkpoints: model class and constructor arguments, weights, training state, config,
metrics and library versions in one dict, written atomically and read with weights_only=True."""
import hashlib
import importlib.metadata
import os
import platform
from dataclasses import dataclass, field

import torch

from .config import UserError
from .files import atomic_save
from .models import build_model

FORMAT = "compress-ckpt-v1"
# What each stage leaves in OUT_DIR.
ARTIFACTS = {"baseline": "baseline.pth", "student": "student.pth", "student_int8": "student_int8.onnx",
             "pruned": "pruned.pth", "int8": "int8.onnx", "int8_sparse": "int8.sparse",
             "dynamic_quant": "dynamic_quant.pth"}
# The control beside them (compress_model.py's SCRATCH_CONTROL): the student's architecture trained without a teacher.
CONTROL = {"scratch": "scratch.pth"}
MADE_BY = {stage: "train_baseline.py" if stage == "baseline" else "compress_model.py" for stage in {**ARTIFACTS,
                                                                                                    **CONTROL}}


def versions():
    import numpy
    return {"python": platform.python_version(), "torch": str(torch.__version__),
            "torchvision": importlib.metadata.version("torchvision"), "numpy": numpy.__version__}  # not imported


def clean_state_dict(model):
    """The plain state_dict of `model`: pruning masks folded into the weights (`w = w_orig * mask`, as
    prune.remove would), wrapper prefixes (`_orig_mod.`, `module.`) removed."""
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    state = model.state_dict()
    out = {}
    for key, value in state.items():
        if key.endswith("_mask"):
            continue
        if key.endswith("_orig"):
            key, value = key[:-len("_orig")], value * state[key[:-len("_orig")] + "_mask"]
        out[key] = value.detach().clone().contiguous()
    return out


def load_checkpoint(path, stage, finished=False):
    """Read a checkpoint written by this pipeline; any problem is a one-line UserError. finished=True: refuse one
    whose training did not end (it holds optimizer state, and weights of an earlier epoch)."""
    if not os.path.exists(path):
        raise UserError(f"no {stage} checkpoint at {path}: run {MADE_BY[stage]} first")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path} is not a readable checkpoint (corrupt or truncated?): {type(e).__name__}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path} is not a checkpoint of this pipeline (no '{FORMAT}' format tag)")
    if ckpt.get("stage") != stage:
        raise UserError(f"{path} holds a '{ckpt.get('stage')}' checkpoint, expected '{stage}'")
    if finished and not ckpt.get("finished", True):
        raise UserError(f"{path} is unfinished (epoch {ckpt.get('epoch')} of {ckpt.get('epochs')}): rerun "
                        f"{MADE_BY[stage]} with the same constants to finish it")
    return ckpt


def check_same_model(ckpt, spec, path):
    """A checkpoint of another architecture than the constants ask for is a UserError."""
    if ckpt["model"] != spec:
        raise UserError(f"{path} holds a {describe(ckpt['model'])}, but the constants ask for a "
                        f"{describe(spec)}; delete it or use the constants it was made with")


def load_model(ckpt, path):
    """Rebuild the checkpoint's model from its own description and load its weights."""
    try:
        model = build_model(ckpt["model"])
        model.load_state_dict(ckpt["state_dict"])
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise UserError(f"{path}: weights do not fit the architecture it names ({type(e).__name__})") from None
    return model.eval()


def describe(spec):
    kw = spec.get("kwargs", {})
    mids = f", mids={kw['mids']}" if kw.get("mids") else ""
    return f"{spec.get('class')}(stem={kw.get('stem')}, widths={kw.get('widths')}{mids})"


def load_clean_state_dict(model, state_dict):
    """Load a plain state_dict, also into a model under pruning (weights go to `*_orig`, masks stay)."""
    own = model.state_dict()
    expected = {k[:-len("_orig")] if k.endswith("_orig") else k for k in own if not k.endswith("_mask")}
    if expected != set(state_dict):
        raise RuntimeError(f"state_dict keys differ from the model's: {sorted(expected ^ set(state_dict))[:4]}")
    mapped = {}
    for key, value in own.items():
        if key.endswith("_orig"):
            mapped[key] = state_dict[key[:-len("_orig")]]
        elif key.endswith("_mask"):
            mapped[key] = value
        else:
            mapped[key] = state_dict[key]
    model.load_state_dict(mapped)


def weights_fingerprint(state_dict):
    """A short hash of a state_dict's tensors: tells whether a later stage was built from these weights."""
    h = hashlib.sha1()
    for key in sorted(state_dict):
        h.update(key.encode())
        h.update(state_dict[key].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def count_params(model):
    """(parameters, nonzero parameters) as the model would be saved (pruning masks folded in; buffers such as
    BatchNorm statistics not counted)."""
    buffers = {name for name, _ in model.named_buffers()}
    tensors = [v for k, v in clean_state_dict(model).items() if v.is_floating_point() and k not in buffers]
    return sum(t.numel() for t in tensors), sum(int(t.count_nonzero()) for t in tensors)


def cpu_copy(model):
    """A plain float CPU copy of `model` in eval mode, rebuilt from its spec, pruning masks folded into the
    weights: what is exported, measured and saved. `model` itself is left as it is (device, format, mode)."""
    copy_ = build_model(model.spec)
    copy_.load_state_dict({k: v.detach().float().cpu() if v.is_floating_point() else v.cpu()
                           for k, v in clean_state_dict(model).items()})
    return copy_.eval()


@dataclass
class Progress:
    """Where a stage's training stands: after `epoch` of `epochs`, with its per-epoch history."""
    epoch: int
    epochs: int
    history: list = field(default_factory=list)

    @property
    def finished(self):
        return self.epoch == self.epochs


def write_checkpoint(path, meta, model, progress, optimizer=None, scheduler=None):
    """Save a stage's checkpoint atomically. An unfinished one keeps the optimizer and scheduler state to resume
    from; a finished one keeps none (nothing is left to resume), so its file is the size of the model."""
    done = progress.finished
    atomic_save({**meta, "format": FORMAT, "versions": versions(), "state_dict": clean_state_dict(model),
                 "optimizer": None if done or optimizer is None else optimizer.state_dict(),
                 "scheduler": None if done or scheduler is None else scheduler.state_dict(),
                 "epoch": progress.epoch, "epochs": progress.epochs, "finished": done, "history": progress.history,
                 "metrics": {"val_accuracy": progress.history[-1]["val_accuracy"] if progress.history else None}},
                path)
