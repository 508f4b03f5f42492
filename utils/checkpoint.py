"""Self-describing checkpoints: model class and constructor arguments, weights, training state, config,
metrics and library versions in one dict, written atomically and read with weights_only=True."""
import hashlib
import os
import platform

import torch
import torchvision

from .config import UserError

FORMAT = "compress-ckpt-v1"
# What each stage leaves in OUT_DIR.
ARTIFACTS = {"baseline": "baseline.pth", "student": "student.pth", "pruned": "pruned.pth", "int8": "int8.onnx",
             "int8_sparse": "int8.sparse", "seed_recipe": "seed_recipe.pth"}
MADE_BY = {stage: "train_baseline.py" if stage == "baseline" else "compress_model.py" for stage in ARTIFACTS}


def atomic_save(obj, path):
    """torch.save to a temporary file beside `path`, then rename: a crash never leaves half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def versions():
    import numpy
    return {"python": platform.python_version(), "torch": str(torch.__version__),
            "torchvision": str(torchvision.__version__), "numpy": numpy.__version__}


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


def load_checkpoint(path, stage):
    """Read a checkpoint written by this pipeline; any problem is a one-line UserError."""
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
    return ckpt


def check_same_model(ckpt, spec, path):
    """A checkpoint of another architecture than the constants ask for is a UserError."""
    if ckpt["model"] != spec:
        raise UserError(f"{path} holds a {describe(ckpt['model'])}, but the constants ask for a "
                        f"{describe(spec)}; delete it or use the constants it was made with")


def load_model(ckpt, path):
    """Rebuild the checkpoint's model from its own description and load its weights."""
    from .models import build_model
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


def atomic_write_text(path, text):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
