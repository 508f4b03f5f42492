"""The one training loop: baseline training, distillation and every fine-tuning run through `fit`, with a
`TrainRecipe` (how to train) and a `Stage` (what is trained, where its checkpoint and curves go)."""
import contextlib
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .checkpoint import Progress, check_same_model, load_checkpoint, load_clean_state_dict, write_checkpoint
from .config import UserError
from .data import alternating_flips, batches, fixed_views, num_batches, remirrored, subset
from .device import autocast, cudnn_autotune, peak_gpu_mib, reset_peak_gpu_memory
from .dist import (all_gather_cat, all_sum, average_batchnorm, data_parallel_model, rank, run_job, shard,
                   training_threads, world)
from .measure import model_accuracy, model_correct

METRICS_FILE = "metrics.jsonl"


@dataclass(frozen=True)
class TrainRecipe:
    """How a stage trains: SGD with Nesterov momentum and a one-cycle learning rate stepped per batch."""
    lr: float                    # peak learning rate
    epochs: int
    batch_size: int
    momentum: float
    weight_decay: float
    seed: int                    # batch order and augmentation
    channels_last: bool = False  # feed batches channels-last (the model should be too)
    amp_dtype: str = "float32"   # autocast dtype of the forward pass: float32 | bfloat16
    views: int = 0               # 0: a fresh random augmentation every epoch; K: the K fixed views of
                                 # data.fixed_views(N, K, seed), epoch e showing view e % K (cached teacher logits)
    mirror_views: bool = False   # with views: each epoch mirrors a fresh random half of the images instead of the
                                 # view's own flips (for targets a mirror does not change: flip-averaged teacher
                                 # logits)
    lookahead: int = 0           # 0: off; K: every K steps the weights are pulled towards a slow copy of them, more so
                                 # as training ends (Lookahead as airbench uses it; see `Lookahead`)
    bn_momentum: float = 0.1     # weight of each batch in BatchNorm's running mean and variance while training (torch's
                                 # `momentum`); the model's own value is back after
    bn_bias_lr: float = 1.0      # BatchNorm biases' peak learning rate over `lr`
    bn_weights_frozen: bool = False  # BatchNorm scales keep the values they came with (not in the optimizer)
    alternate_flip: bool = False  # fresh augmentations (or views with mirror_views) mirror each image in every other
                                  # epoch, a fixed random half in the first (data.alternating_flips), not at random


# fields added after checkpoints were made: left out of the resume key at their defaults, so that those still resume
LATER_FIELDS = ("lookahead", "mirror_views", "bn_momentum", "bn_bias_lr", "bn_weights_frozen", "alternate_flip")


def recipe_from(cfg, lr, epochs, views=0, mirror_views=False):
    """A script's TrainRecipe: its BATCH_SIZE, MOMENTUM, WEIGHT_DECAY, SEED, CHANNELS_LAST, AMP_DTYPE, LOOKAHEAD,
    BN_MOMENTUM, BN_BIAS_LR, FREEZE_BN_WEIGHTS and ALTERNATE_FLIP constants, with the stage's own peak learning
    rate, epochs and fixed views (where a view's targets hold for its own flips only, views without mirror_views,
    the flips stay the view's)."""
    return TrainRecipe(lr=lr, epochs=epochs, batch_size=cfg.BATCH_SIZE, momentum=cfg.MOMENTUM,
                       weight_decay=cfg.WEIGHT_DECAY, seed=cfg.SEED, channels_last=cfg.CHANNELS_LAST,
                       amp_dtype=cfg.AMP_DTYPE, views=views, mirror_views=mirror_views,
                       lookahead=cfg.LOOKAHEAD, bn_momentum=cfg.BN_MOMENTUM, bn_bias_lr=cfg.BN_BIAS_LR,
                       bn_weights_frozen=cfg.FREEZE_BN_WEIGHTS,
                       alternate_flip=cfg.ALTERNATE_FLIP and (not views or mirror_views))


# torch 2.14.1 crashed in the channels-last backward pass of a 1x1 stride-2 convolution with 8 input channels on
# images from 48 px up (seen in a test on one machine of the fleet); such a model trains contiguous instead
NARROW_STRIDED_1X1 = 16  # input channels under which a 1x1 stride-2 convolution keeps a model out of channels-last
NARROW_FROM_PX = 48


def channels_last_safe(model):
    """Whether `model` may train channels-last: not when it has a 1x1 stride-2 convolution of fewer than
    NARROW_STRIDED_1X1 input channels and takes images of NARROW_FROM_PX px or more."""
    if getattr(model, "image_size", 32) < NARROW_FROM_PX:
        return True
    return not any(isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1) and m.stride == (2, 2)
                   and m.in_channels < NARROW_STRIDED_1X1 for m in model.modules())


def placed_for_training(model, device, channels_last):
    """`model` moved (in place, as Module.to does) to the training device and, with channels_last, memory format
    (unless channels_last_safe says no: then one line says so): what a script does to the model it is about to
    train."""
    model = model.to(device)
    if channels_last and not channels_last_safe(model):
        print(f"layout: this model trains contiguous, not channels-last (a 1x1 stride-2 convolution of under "
              f"{NARROW_STRIDED_1X1} input channels at {model.image_size} px crashed torch's channels-last backward)")
        return model
    return model.to(memory_format=torch.channels_last) if channels_last else model


@dataclass
class Stage:
    """What a training run is: its checkpoint `kind` (baseline, student, pruned) and `label` (student, struct1,
    ...), its checkpoint path, the device, what it was made from (a checkpoint made from anything else is not
    resumed), what else its checkpoint records (config, classes, teacher), and the metrics.jsonl its epochs are
    appended to (None: beside the checkpoint)."""
    kind: str
    label: str
    path: str
    device: str
    made_from: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    metrics: str = None


@dataclass(frozen=True)
class CrossEntropy:
    """The cross-entropy objective (a picklable callable: under data parallelism each rank gets its own)."""
    label_smoothing: float

    def to(self, device):
        return self

    def __call__(self, model, batch):
        return F.cross_entropy(model(batch.x), batch.y, label_smoothing=self.label_smoothing)


def cross_entropy_objective(label_smoothing):
    return CrossEntropy(label_smoothing)


def kd_loss(student_logits, teacher_logits, targets, temperature, alpha, dkd_beta=None):
    """alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) * CE(student, targets); with
    dkd_beta the KL decoupled as DKD does (decoupled_kl): mean(TCKD + dkd_beta * NCKD), a constant weight where KD
    weighs NCKD by 1 - the teacher's target probability (small exactly where the teacher is sure, which suppresses
    what it knows of the other classes)."""
    t = temperature
    if dkd_beta is None:
        kl = F.kl_div(F.log_softmax(student_logits.float() / t, dim=1),
                      F.log_softmax(teacher_logits.float() / t, dim=1), reduction="batchmean", log_target=True)
    else:
        tckd, nckd = decoupled_kl(student_logits, teacher_logits, targets, t)
        kl = (tckd + dkd_beta * nckd).mean()
    return alpha * t * t * kl + (1 - alpha) * F.cross_entropy(student_logits.float(), targets)


def decoupled_kl(student_logits, teacher_logits, targets, temperature):
    """Per image, KD's KL(teacher/T || student/T) split in two (Zhao et al. 2022, DKD): (TCKD, NCKD), the KL of
    the binary split target class | the rest, and the KL over the non-target classes renormalised among
    themselves. KL = TCKD + (1 - teacher's target probability at T) * NCKD."""
    s, t = student_logits.float() / temperature, teacher_logits.float() / temperature
    target = F.one_hot(targets, s.shape[1]).bool()

    def split(logits):
        """log of (target probability, the rest's) and the non-target classes' log-softmax among themselves."""
        rest = logits.masked_fill(target, float("-inf"))
        total = logits.logsumexp(1, keepdim=True)
        binary = torch.cat([logits[target].unsqueeze(1), rest.logsumexp(1, keepdim=True)], 1) - total
        return binary, rest.log_softmax(1).masked_fill(target, 0.0)  # the target's entry weighs 0 below
    (s_bin, s_rest), (t_bin, t_rest) = split(s), split(t)
    tckd = (t_bin.exp() * (t_bin - s_bin)).sum(1)
    nckd = (t_rest.exp().masked_fill(target, 0.0) * (t_rest - s_rest)).sum(1)
    return tckd, nckd


@torch.no_grad()
def teacher_outputs(teacher, x, flip=False):
    """The teacher's float32 logits on batch x, computed in float32 also inside a training step's autocast; flip:
    the mean of its logits on x and on x mirrored left to right (test-time augmentation of the teacher only:
    softer, more accurate targets; the student runs as it is)."""
    with torch.autocast(x.device.type, enabled=False):
        logits = teacher(x).float()
        return (logits + teacher(x.flip(3)).float()) / 2 if flip else logits


def teacher_logits(teacher, train, views, device, batch_size=500, channels_last=False, flip=False):
    """The teacher's float32 logits (teacher_outputs) on every fixed view of every training image: (K, N,
    classes), on the CPU. views: data.fixed_views(N, K, seed), as the recipe that reads them makes it. Under data
    parallelism each rank computes a share of the images, and every rank gets them all."""
    return run_job(TeacherLogits(teacher, views, device, batch_size, channels_last, flip), train)


@dataclass
class TeacherLogits:
    """teacher_logits as a job every rank runs on its share of the images (utils.dist.run_job)."""
    teacher: torch.nn.Module
    views: torch.Tensor
    device: str
    batch_size: int
    channels_last: bool
    flip: bool

    def __call__(self, train, *_):
        teacher = self.teacher.to(self.device)  # a follower's copy arrives on the CPU (utils.dist.send)
        rows = shard(len(train.x))
        x, y = subset(train.x, rows), train.y[rows]
        out = []
        for k in range(len(self.views)):
            view = (k, self.views[k][:, rows])
            bar = tqdm(batches(x, y, self.batch_size, self.device, view=view, channels_last=self.channels_last),
                       total=num_batches(len(x), self.batch_size, False), desc=f"teacher view {k + 1}/"
                       f"{len(self.views)}", unit="batch", leave=False, mininterval=1.0, disable=rank() != 0)
            out.append(torch.cat([teacher_outputs(teacher, b.x, self.flip).cpu() for b in bar]))
        return all_gather_cat(torch.stack(out), dim=1)


@dataclass(frozen=True)
class Distillation:
    """KD loss against `teacher`, which must be in eval mode on the training device (it is not changed here).
    cached: its logits on the fixed views (teacher_logits) on the training device, read instead of running it on
    batches showing one; flip: the teacher's targets averaged with its logits on the mirrored batch
    (teacher_outputs). A picklable callable: under data parallelism each rank gets its own."""
    teacher: torch.nn.Module
    temperature: float
    alpha: float
    cached: torch.Tensor = None
    flip: bool = False
    dkd_beta: float = None  # kd_loss's: None for KD's KL, else DKD's with this weight

    def to(self, device):
        """This objective with its teacher and cached logits on `device` (where a rank trains)."""
        cached = None if self.cached is None else self.cached.to(device)
        return dataclasses.replace(self, teacher=self.teacher.to(device), cached=cached)

    def __call__(self, model, batch):
        if self.cached is not None and batch.view >= 0:
            logits = self.cached[batch.view, batch.idx]
        else:
            logits = teacher_outputs(self.teacher, batch.x, self.flip)
        return kd_loss(model(batch.x), logits, batch.y, self.temperature, self.alpha, self.dkd_beta)


def distillation_objective(teacher, temperature, alpha, cached=None, flip=False, dkd_beta=None):
    return Distillation(teacher, temperature, alpha, cached, flip, dkd_beta)


def batchnorms(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def parameter_groups(model, recipe):
    """The optimizer's groups and each one's peak learning rate: conv and linear weights with weight decay, the
    other parameters without (decaying BN scales and biases only slows short training); with bn_bias_lr other
    than 1 the BatchNorm biases in a group of their own at that multiple; with bn_weights_frozen the BatchNorm
    scales in none."""
    decayed = [p for p in model.parameters() if p.ndim > 1]
    bn_biases = {id(m.bias) for m in batchnorms(model) if m.bias is not None}
    frozen = {id(m.weight) for m in batchnorms(model) if m.weight is not None} if recipe.bn_weights_frozen else set()
    fast = bn_biases if recipe.bn_bias_lr != 1 else set()
    kept = [p for p in model.parameters() if p.ndim <= 1 and id(p) not in fast | frozen]
    groups = [({"params": decayed, "weight_decay": recipe.weight_decay}, recipe.lr),
              ({"params": kept, "weight_decay": 0.0}, recipe.lr)]
    if fast:
        groups.append(({"params": [p for p in model.parameters() if id(p) in fast], "weight_decay": 0.0},
                       recipe.lr * recipe.bn_bias_lr))
    return groups


def sgd_one_cycle(model, recipe, steps_per_epoch):
    """SGD with Nesterov momentum over `parameter_groups`; one-cycle learning rate stepped per batch."""
    epochs = max(recipe.epochs, 1)  # a zero-epoch stage never steps the schedule, but OneCycleLR needs a length
    if epochs * steps_per_epoch < 5:
        raise UserError(f"{epochs} epoch(s) of {steps_per_epoch} step(s) are too few for a one-cycle "
                        f"schedule (5 steps at least): use more epochs or a smaller BATCH_SIZE")
    groups = parameter_groups(model, recipe)
    opt = torch.optim.SGD([group for group, _ in groups], lr=recipe.lr, momentum=recipe.momentum, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[lr for _, lr in groups], epochs=epochs,
                                                steps_per_epoch=steps_per_epoch, pct_start=0.25, div_factor=10.0,
                                                final_div_factor=100.0)
    return opt, sched


@contextlib.contextmanager
def batchnorm_momentum(model, momentum):
    """Inside, every BatchNorm layer of `model` updates its running statistics at `momentum`; after, at the
    momentum it had."""
    layers = batchnorms(model)
    before = [m.momentum for m in layers]
    for m in layers:
        m.momentum = momentum
    try:
        yield
    finally:
        for m, value in zip(layers, before):
            m.momentum = value


class Lookahead:
    """Slow weights that every `every` steps move towards the trained ("fast") weights by 1 - decay and replace
    them, decay = BASE ** every * (step / total) ** 3: no averaging at the start, strong averaging as the
    learning rate anneals; the last step leaves the model at the slow weights. Float buffers (BN statistics) are
    averaged too. Synced at each epoch's end as well, so a checkpoint holds the slow weights and a resumed run
    starts its slow copy from them."""
    BASE = 0.95

    def __init__(self, model, every, step, total):
        self.every, self.step, self.total = every, step, total
        self.fast = [t for t in model.state_dict().values() if t.is_floating_point()]
        self.slow = [t.detach().clone() for t in self.fast]

    @torch.no_grad()
    def after_step(self, epoch_end=False):
        self.step += 1
        if self.step % self.every and not epoch_end and self.step < self.total:
            return
        decay = 1.0 if self.step >= self.total else self.BASE ** self.every * (self.step / self.total) ** 3
        for slow, fast in zip(self.slow, self.fast):
            slow.lerp_(fast, 1 - decay)
            fast.copy_(slow)


BAR_EVERY = 20  # steps between progress-bar loss updates: each reads the loss from the device (a sync on a GPU)


def train_one_epoch(model, objective, optimizer, scheduler, loader, total, desc, lookahead=None, device="cpu",
                    amp_dtype="float32"):
    """One pass over `loader`; returns (the summed training loss of its images, their number). Each step's
    backward pass takes the loss times the batch's weight (its share of a global batch split unevenly among the
    ranks: Batch.weight), so that every step is the global batch's. Each step's forward pass and loss run in their own
    autocast region (amp_dtype on `device`): autocast keeps its low-precision copies of the weights until the
    outermost region ends, so a region around the whole epoch would run every step on the epoch's first weights.
    The loss is summed where it is computed (float64, the same sums as adding each step's value on the CPU) and
    read once at the end, and every BAR_EVERY steps for the bar: a GPU is not made to wait for the host after
    every step."""
    model.train()
    running, seen = None, 0
    bar = tqdm(loader, total=total, desc=desc, unit="batch", leave=False, mininterval=1.0, disable=rank() != 0)
    for i, batch in enumerate(bar, 1):
        with autocast(device, amp_dtype):
            loss = objective(model, batch)
        optimizer.zero_grad(set_to_none=True)
        (loss if batch.weight == 1 else loss * batch.weight).backward()
        optimizer.step()
        scheduler.step()
        if lookahead is not None:
            lookahead.after_step(epoch_end=i == total)
        step_sum = loss.detach().double() * len(batch.y)
        running = step_sum if running is None else running + step_sum
        seen += len(batch.y)
        if i % BAR_EVERY == 0:
            bar.set_postfix(loss=f"{running.item() / seen:.3f}", refresh=False)
    return (running.item() if seen else 0.0), seen


def resume(model, optimizer, scheduler, stage, meta, epochs):
    """Load an earlier run of the same stage from its checkpoint: its Progress (epoch 0 when there is none)."""
    if not os.path.exists(stage.path):
        return Progress(0, epochs)
    ckpt = load_checkpoint(stage.path, stage.kind)
    check_same_model(ckpt, meta["model"], stage.path)
    made = dict(ckpt.get("resume_key", {}))
    ranks = made.pop("ranks", ckpt.get("ranks", 1))  # the ranks it was trained at (in its key before it could move)
    if made != meta["resume_key"]:
        changed = sorted(k for k in {**made, **meta["resume_key"]} if made.get(k) != meta["resume_key"].get(k))
        raise UserError(f"{stage.path} was made with other values of {', '.join(changed) or 'its settings'}; "
                        f"delete it to start over, or rerun with the values it was made with")
    load_clean_state_dict(model, ckpt["state_dict"])
    progress = Progress(ckpt["epoch"], ckpt["epochs"], ckpt["history"])
    if progress.finished:
        print(f"{stage.label}: already trained in {stage.path} (delete it to train again)")
        return progress
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    print(f"{stage.label}: resuming {stage.path} after epoch {ckpt['epoch']}/{ckpt['epochs']}")
    if ranks != meta["ranks"]:
        print(f"{stage.label}: the world size changed from {ranks} to {meta['ranks']} rank(s): the same batches, "
              f"BatchNorm's statistics and float sums taken over other shares", flush=True)
    return progress


def log_metrics(stage, record):
    """Append one epoch's figures to the stage's metrics.jsonl (one JSON object per line, written whole at the end
    of each epoch: a running job can be plotted while it trains)."""
    path = stage.metrics or os.path.join(os.path.dirname(os.path.abspath(stage.path)), METRICS_FILE)
    with open(path, "a") as f:
        f.write(json.dumps({"stage": stage.label, **record}) + "\n")


def fit(model, objective, recipe, train, val, stage):
    """Train `model` (on stage.device) for recipe.epochs on the `train` split, validating on `val` after each
    epoch; checkpoint each finished epoch at stage.path and append its figures to metrics.jsonl. An unfinished
    checkpoint made from the same recipe and inputs is resumed, at any number of ranks; a finished one is loaded.
    Under data parallelism rank 0 calls this and every rank trains (`Epochs`). Returns the Progress."""
    steps = num_batches(len(train[0]), recipe.batch_size, train=True)
    optimizer, scheduler = sgd_one_cycle(model, recipe, steps)
    defaults = {f.name: f.default for f in dataclasses.fields(TrainRecipe)}
    key = {k: v for k, v in dataclasses.asdict(recipe).items() if k not in LATER_FIELDS or v != defaults[k]}
    meta = {**stage.meta, "stage": stage.kind, "label": stage.label, "model": model.spec,
            "resume_key": {**key, **stage.made_from}, "ranks": world()}
    progress = resume(model, optimizer, scheduler, stage, meta, recipe.epochs)
    if progress.finished and progress.history:
        return progress
    if recipe.epochs == 0:  # nothing to train: the stage's checkpoint is the model as it came in
        progress = Progress(0, 0, [{"epoch": 0, "val_accuracy": model_accuracy(model, val, stage.device)}])
        write_checkpoint(stage.path, meta, model, progress)
        return progress
    if world() == 1:
        return train_epochs(model, objective, recipe, train, val, optimizer, scheduler, progress, stage, meta)
    return run_job(Epochs(model, objective, recipe, optimizer.state_dict(), scheduler.state_dict(), progress, stage,
                          meta), train, val)


@dataclass
class Epochs:
    """A stage's remaining epochs as a job every rank runs (utils.dist.run_job): the model, objective and
    optimizer state as rank 0 holds them after resuming."""
    model: torch.nn.Module
    objective: object
    recipe: TrainRecipe
    optimizer_state: dict
    scheduler_state: dict
    progress: Progress
    stage: Stage
    meta: dict

    def __call__(self, train, val):
        model = self.model.to(self.stage.device)  # a follower's copies arrive on the CPU (utils.dist.send)
        optimizer, scheduler = sgd_one_cycle(model, self.recipe, num_batches(len(train[0]), self.recipe.batch_size,
                                                                             True))
        optimizer.load_state_dict(self.optimizer_state)
        scheduler.load_state_dict(self.scheduler_state)
        return train_epochs(model, self.objective.to(self.stage.device), self.recipe, train, val, optimizer,
                            scheduler, self.progress, self.stage, self.meta)


def validation_accuracy(model, val, device, batch_size):
    """Exact float32 top-1 accuracy (%) on `val`; under data parallelism each rank measures a share and the
    counts are summed."""
    if world() == 1:
        return model_accuracy(model, val, device, batch_size)
    rows = shard(len(val[0]))
    correct = model_correct(model, (subset(val[0], rows), val[1][rows]), device, batch_size)
    hits, n = all_sum([correct.sum().item(), len(correct)])
    return 100.0 * hits / n


FLIP_SEED = 2**31  # plus the recipe's seed: alternate_flip's halves, apart from each epoch's seed (seed * 1000 + epoch)


def train_epochs(model, objective, recipe, train, val, optimizer, scheduler, progress, stage, meta):
    """The epochs of `fit` from progress.epoch on, on every rank: each rank trains on its share of every global
    batch (the gradients averaged by DistributedDataParallel, each share's loss weighted by its size, BatchNorm's
    statistics averaged after each epoch);
    rank 0 alone checkpoints, logs and prints. Returns the Progress."""
    ranks, writer = world(), rank() == 0
    steps = num_batches(len(train[0]), recipe.batch_size, train=True)
    views = fixed_views(len(train[0]), recipe.views, recipe.seed, train[0].shape[-1]) if recipe.views else None
    lookahead = (Lookahead(model, recipe.lookahead, progress.epoch * steps, recipe.epochs * steps)
                 if recipe.lookahead else None)
    net = data_parallel_model(model, stage.device) if ranks > 1 else model
    first, threads = progress.epoch, training_threads()
    channels_last = recipe.channels_last and channels_last_safe(model)  # batches as the model is laid out
    reset_peak_gpu_memory(stage.device)  # each stage's own peak
    for epoch in range(first, recipe.epochs):
        t0 = time.time()
        gen = torch.Generator().manual_seed(recipe.seed * 1000 + epoch)
        view = None if views is None else (epoch % recipe.views, views[epoch % recipe.views])
        flips = alternating_flips(len(train[0]), FLIP_SEED + recipe.seed, epoch) if recipe.alternate_flip else None
        if view is not None and recipe.mirror_views and flips is None:
            view = (view[0], remirrored(view[1], gen))
        loader = batches(train[0], train[1], recipe.batch_size, stage.device, shuffle=True, train=True,
                         generator=gen, channels_last=channels_last, view=view, shard=(rank(), ranks), flips=flips)
        lr = scheduler.get_last_lr()[0]
        with cudnn_autotune(stage.device), batchnorm_momentum(model, recipe.bn_momentum):
            summed, images = train_one_epoch(net, objective, optimizer, scheduler, loader, steps,
                                             f"{stage.label} {epoch + 1}/{recipe.epochs}", lookahead, stage.device,
                                             recipe.amp_dtype)
            if ranks > 1:
                summed, images = all_sum([summed, images])  # the mean over every rank's images
                average_batchnorm(model)
            loss = summed / images if images else 0.0
        train_s = time.time() - t0
        val_acc = validation_accuracy(model, val, stage.device, max(recipe.batch_size, 256))
        record = {"epoch": epoch + 1, "loss": loss, "val_accuracy": val_acc, "seconds": time.time() - t0}
        progress = Progress(epoch + 1, recipe.epochs, progress.history + [record])
        if not writer:
            continue
        write_checkpoint(stage.path, meta, model, progress, optimizer, scheduler)
        peak = peak_gpu_mib(stage.device)
        log_metrics(stage, {**record, "epochs": recipe.epochs, "lr": lr,
                            "images_per_s": steps * recipe.batch_size / train_s, "ranks": ranks,
                            "threads": threads, **({"peak_gpu_mib": round(peak, 1)} if peak is not None else {})})
        print(f"{stage.label:<10} epoch {epoch + 1:>3}/{recipe.epochs}  loss {loss:.4f}  val_acc {val_acc:6.2f}%  "
              f"{steps * recipe.batch_size / train_s:6.0f} img/s  {time.time() - t0:6.1f}s"
              f"{'' if peak is None else f'  peak GPU memory {peak:.0f} MiB'}", flush=True)
        left = recipe.epochs - epoch - 1
        if epoch == first and left:  # the stage's time from this run's first epoch (the first pays for warm-up)
            print(f"{stage.label}: about {left * (time.time() - t0) / 60:.1f} min more for the other {left} "
                  f"epoch(s)", flush=True)
    return progress
