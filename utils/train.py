"""The one training loop (baseline training, distillation and fine-tuning all use it), its objectives,
evaluation, and the device profile."""
import contextlib
import os
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .checkpoint import (FORMAT, atomic_save, check_same_model, clean_state_dict, load_checkpoint,
                         load_clean_state_dict, versions)
from .config import UserError
from .data import batches, num_batches


def pick_device(name):
    """'auto' -> cuda when present, else cpu."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("DEVICE=cuda but no CUDA device is available")
    return name


def autocast(device):
    """bf16 autocast on CUDA; plain float32 on CPU."""
    if device == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def cross_entropy_objective(label_smoothing):
    def objective(model, x, y):
        return F.cross_entropy(model(x), y, label_smoothing=label_smoothing)
    return objective


def kd_loss(student_logits, teacher_logits, targets, temperature, alpha):
    """alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) * CE(student, targets)."""
    t = temperature
    kl = F.kl_div(F.log_softmax(student_logits.float() / t, dim=1), F.log_softmax(teacher_logits.float() / t, dim=1),
                  reduction="batchmean", log_target=True)
    return alpha * t * t * kl + (1 - alpha) * F.cross_entropy(student_logits.float(), targets)


def distillation_objective(teacher, temperature, alpha):
    teacher.eval()

    def objective(model, x, y):
        with torch.no_grad():
            teacher_logits = teacher(x)
        return kd_loss(model(x), teacher_logits, y, temperature, alpha)
    return objective


def sgd_one_cycle(model, lr, momentum, weight_decay, epochs, steps_per_epoch):
    """SGD with Nesterov momentum; one-cycle learning rate stepped per batch."""
    if max(epochs, 1) * steps_per_epoch < 5:
        raise UserError(f"{max(epochs, 1)} epoch(s) of {steps_per_epoch} step(s) are too few for a one-cycle "
                        f"schedule (5 steps at least): use more epochs or a smaller BATCH_SIZE")
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, nesterov=True, weight_decay=weight_decay)
    # max(epochs, 1): a zero-epoch stage never steps the schedule, but OneCycleLR needs a length
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, epochs=max(epochs, 1), steps_per_epoch=steps_per_epoch,
                                                pct_start=0.25, div_factor=10.0, final_div_factor=100.0)
    return opt, sched


@torch.no_grad()
def predict_accuracy(predict, x, y, batch_size, device="cpu"):
    """Top-1 accuracy (%) of predict(float batch) -> logits over all of (x, y)."""
    correct = 0
    for xb, yb in batches(x, y, batch_size, device):
        logits = torch.as_tensor(predict(xb))
        correct += (logits.argmax(1).to(yb.device) == yb).sum().item()
    return 100.0 * correct / len(x)


def model_accuracy(model, x, y, batch_size, device):
    model.eval()
    channels_last = device == "cuda"

    def predict(xb):
        with autocast(device):
            return model(xb.contiguous(memory_format=torch.channels_last) if channels_last else xb).float()
    return predict_accuracy(predict, x, y, batch_size, device)


def train_one_epoch(model, objective, optimizer, scheduler, loader, total, desc):
    model.train()
    running, seen = 0.0, 0
    bar = tqdm(loader, total=total, desc=desc, unit="batch", leave=False, mininterval=1.0)
    for xb, yb in bar:
        loss = objective(model, xb, yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        running += loss.item() * len(xb)
        seen += len(xb)
        bar.set_postfix(loss=f"{running / seen:.3f}", refresh=False)
    return running / max(seen, 1)


def resume_state(model, optimizer, scheduler, ckpt_path, meta):
    """Load an earlier run of the same stage from ckpt_path: (next epoch, history, finished)."""
    if not os.path.exists(ckpt_path):
        return 0, [], False
    ckpt = load_checkpoint(ckpt_path, meta["stage"])
    check_same_model(ckpt, meta["model"], ckpt_path)
    if ckpt.get("resume_key") != meta["resume_key"]:
        changed = sorted(k for k in meta["resume_key"] if ckpt.get("resume_key", {}).get(k) != meta["resume_key"][k])
        raise UserError(f"{ckpt_path} was made with other values of {', '.join(changed)}; "
                        f"delete it to start over, or rerun with the values it was made with")
    load_clean_state_dict(model, ckpt["state_dict"])
    if ckpt["finished"]:
        print(f"{meta['stage']}: already trained in {ckpt_path} (delete it to train again)")
        return ckpt["epoch"], ckpt["history"], True
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    print(f"{meta['stage']}: resuming {ckpt_path} after epoch {ckpt['epoch']}/{ckpt['epochs']}")
    return ckpt["epoch"], ckpt["history"], False


def fit(model, objective, optimizer, scheduler, train, val, *, epochs, batch_size, device, seed, ckpt_path, meta,
        channels_last=False):
    """Train `epochs` epochs on `train`, validate on `val` after each, and checkpoint each finished epoch.

    meta: what describes the run (stage, model spec, config, resume_key); stored in every checkpoint.
    channels_last: feed batches in channels-last memory format (match the model's).
    An unfinished checkpoint at ckpt_path made with the same meta is resumed; a finished one is loaded.
    Returns the per-epoch history.
    """
    start, history, finished = resume_state(model, optimizer, scheduler, ckpt_path, meta)
    if finished:
        return history
    steps = num_batches(len(train[0]), batch_size, train=True)
    for epoch in range(start, epochs):
        t0 = time.time()
        gen = torch.Generator().manual_seed(seed * 1000 + epoch)
        loader = batches(*train, batch_size, device, shuffle=True, train=True, generator=gen,
                         channels_last=channels_last)
        desc = f"{meta['stage']} {epoch + 1}/{epochs}"
        with autocast(device):
            loss = train_one_epoch(model, objective, optimizer, scheduler, loader, steps, desc)
        val_acc = model_accuracy(model, *val, batch_size=max(batch_size, 256), device=device)
        history.append({"epoch": epoch + 1, "loss": loss, "val_accuracy": val_acc, "seconds": time.time() - t0})
        print(f"{meta['stage']:<8} epoch {epoch + 1:>3}/{epochs}  loss {loss:.4f}  val_acc {val_acc:6.2f}%  "
              f"{time.time() - t0:6.1f}s", flush=True)
        write_checkpoint(ckpt_path, meta, model, optimizer, scheduler, epoch + 1, epochs, history)
    if epochs == 0:  # nothing to train: the stage's checkpoint is the model as it came in
        history.append({"epoch": 0, "val_accuracy": model_accuracy(model, *val, batch_size=256, device=device)})
        write_checkpoint(ckpt_path, meta, model, optimizer, scheduler, 0, 0, history)
    return history


def write_checkpoint(path, meta, model, optimizer, scheduler, epoch, epochs, history):
    """Save a stage's checkpoint atomically; a finished one keeps no optimizer state (nothing is left to
    resume), so its file is the size of the model it describes."""
    done = epoch == epochs
    atomic_save({**meta, "format": FORMAT, "versions": versions(), "state_dict": clean_state_dict(model),
                 "optimizer": None if done else optimizer.state_dict(),
                 "scheduler": None if done else scheduler.state_dict(),
                 "epoch": epoch, "epochs": epochs, "finished": done, "history": history,
                 "metrics": {"val_accuracy": history[-1]["val_accuracy"]}}, path)
