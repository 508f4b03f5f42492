"""Step 2 of 3: compress the baseline automatically, within an accuracy budget.

    python compress_model.py [--NAME=VALUE ...]

State how much validation accuracy you can give up (MAX_ACC_DROP, points) and what to optimise (OBJECTIVE);
the pipeline then
  1. computes the baseline's logits once on TEACHER_VIEWS fixed augmentations of every training image (with
     TEACHER_FLIP the mean over each view and its mirror) and distils it into each of the STUDENTS (small ResNets)
                                                                                   -> OUT_DIR/student_<name>.pth
  2. measures each student as INT8 and picks one by the objective within the budget -> OUT_DIR/student.pth
     (its INT8 model, what the pruned model's speed is compared with             -> OUT_DIR/student_int8.onnx)
     and trains the picked architecture on the labels alone, the control that says what the teacher bought
     (SCRATCH_CONTROL; timed apart from the pipeline)                             -> OUT_DIR/scratch.pth
  3. measures each layer's sensitivity to pruning and to INT8 of the picked student -> OUT_DIR/sensitivity.*
  4. searches: structured channel pruning in steps (per-block ratios from the sensitivities), then gradual
     (AGP) unstructured pruning on the best of those, fine-tuning with distillation after every step; each
     candidate is quantized to INT8 (ONNX Runtime, with a mixed-precision fallback), stored, timed and
     judged on validation by the paired 95% bound of its drop                      -> OUT_DIR/search.json
  5. keeps the best candidate within the budget, fine-tuned a little longer: float -> OUT_DIR/pruned.pth
     its INT8 ONNX file (what you deploy; runs without this code)                 -> OUT_DIR/int8.onnx
     the same INT8 model, sparsity stored compactly (utils/sparse.py)             -> OUT_DIR/int8.sparse
and PyTorch's dynamic quantization of that model, convolutions left in float      -> OUT_DIR/dynamic_quant.pth
Rerunning resumes an interrupted stage and reuses finished ones. The final files land together, each with
the run's id, only once all of them are written; a second run on the same OUT_DIR stops at once.
"""
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable

import torch

from utils.checkpoint import (ARTIFACTS, CONTROL, Progress, clean_state_dict, count_params, load_checkpoint,
                              load_model, weights_fingerprint, write_checkpoint)
from utils.config import UserError, check_choice, check_range, config_type, configure, run_cli
from utils.data import (DATA_MODES, RAM_MARGIN, DataSource, Split, available_memory, check_batch, fixed_views,
                        open_splits)
from utils.device import check_amp_dtype, pick_device
from utils.dist import data_parallel, follow, ranks_working, share_data
from utils.files import ArtifactSet, atomic_write_text, cache_or_compute, file_digest, new_run_id, out_dir_lock, \
    write_json
from utils.measure import Timing, eager_latency, model_accuracy, model_correct, percent
from utils.models import LARGE_IMAGES, ResNet, arch_slug, parse_arch
from utils.plots import plot_sensitivity
from utils.prune import group_widths
from utils.quantize import Quantization, dynamic_quant, export_onnx, onnx_param_counts, save_onnx_metadata
from utils.search import (OBJECTIVES, Search, SearchContext, SearchPlan, float_onnx_path, pick_student,
                          reference_point, run_search)
from utils.sensitivity import Sensitivity, sensitivity_analysis, sensitivity_table
from utils.sparse import save_sparse_onnx
from utils.train import (METRICS_FILE, Stage, cross_entropy_objective, distillation_objective,
                         fit, placed_for_training, recipe_from, teacher_logits)

# -----------------------------------------------------------------------------------------------
DATA_DIR = "data"            # the data the baseline was trained on (CIFAR-10 or ImageFolder root); env DATA_DIR too
DOWNLOAD = True              # download CIFAR-10 into DATA_DIR when no data is there (needs internet)
DATA_MODE = "auto"           # auto | ram | stream: decoded images in memory, or decoded from the files batch by batch
                             # (ImageFolder data; auto: ram when they fit the memory); the size is the baseline's
OUT_DIR = "runs"             # where baseline.pth is, and where every stage's artifact goes
MAX_ACC_DROP = 1.0           # points of accuracy the final INT8 model may lose against the baseline, judged by the
                             # one-sided 95% bound of its paired drop on validation (not the point estimate)
OBJECTIVE = "balanced"       # size | latency | balanced: what the search minimises within MAX_ACC_DROP: archive
                             # bytes, MACs (what latency follows; timings vary from run to run), or both
PROFILE = "auto"             # auto | cpu | gpu: defaults below for the CPU, replaced by PROFILES["gpu"] on CUDA
DEVICE = "auto"              # auto | cpu | cuda
STUDENTS = "auto"            # comma-separated utils.models.ARCHS names or stem:widths:blocks specs, each
                             # distilled, the search picking one; resnet20: CIFAR ResNet-20 (16-32-64, 32x32 maps,
                             # 0.27 M parameters); resnet_s2_w32: the baseline's shape at half width (2.8 M, 16x16);
                             # auto: AUTO_STUDENTS of the profile (see students_for)
KD_EPOCHS = 36               # distillation epochs of each student
TEACHER_VIEWS = 3            # fixed augmentations of each training image the teacher's logits are computed on once
                             # and every training epoch reuses (0: run the teacher on every batch)
TEACHER_FLIP = True          # the teacher's targets: the mean of its logits on each view and on its mirror image
                             # (twice the teacher's passes); each epoch then mirrors a fresh random half of its images
SCRATCH_CONTROL = True       # also train the picked student's architecture on the labels alone (same epochs and
                             # recipe, no teacher) as OUT_DIR/scratch.pth: what distillation bought; timed apart
KD_TEMPERATURE = 4.0         # T: softening of both models' logits
KD_ALPHA = 0.5               # weight of the T^2-scaled KL term; 1 - KD_ALPHA weighs cross-entropy on the labels
                             # (near 1 the student copies the teacher, its errors too)
KD_LOSS = "kd"               # kd | dkd: the distillation term, KD's KL, or DKD's (Zhao et al. 2022: the KL split into
                             # the target class's part and the other classes', the latter weighed by DKD_BETA)
DKD_BETA = 8.0               # KD_LOSS=dkd: weight of the non-target classes' KL (KD's is 1 - the teacher's target
                             # probability); DKD's CIFAR-100 setting is 8 (its TCKD weight 1 is ours)
KD_LR = 0.2                  # peak one-cycle learning rate of distillation
BATCH_SIZE = 256             # images per step (distillation and fine-tuning)
MOMENTUM = 0.9               # SGD Nesterov momentum
WEIGHT_DECAY = 5e-4          # L2 penalty
LOOKAHEAD = 0                # 0: off; K: Lookahead every K steps in distillation and fine-tuning (utils.train)
BN_MOMENTUM = 0.1            # 0 to 1: weight of each batch in BatchNorm's running statistics while training (torch's
                             # momentum); airbench trains at 0.4 (0.6 in its convention): Lookahead pays only with it
BN_BIAS_LR = 16.0            # BatchNorm biases' peak learning rate as a multiple of the stage's, 1 to leave them at
                             # it; airbench's 64 with frozen scales: 18 -> 13.5 epochs to 94% (docs/experiments.md)
FREEZE_BN_WEIGHTS = True     # BatchNorm scales not trained (airbench has none); the baseline's blocks then start as
                             # initialised, not as the identity (a frozen zero scale would switch a block off)
ALTERNATE_FLIP = False       # mirror each training image in every other epoch (a fixed random half in the first), not
                             # at random (airbench: 10.8 -> 9.9 epochs to 94%)
SENS_IMAGES = 1000           # validation images of the sensitivity analysis (the search judges on all of them)
STRUCT_MAX = 0.6             # largest structured pruning level, 0 to <1: the fraction of channels removed (residual
                             # streams and blocks' insides), averaged over the groups weighted by their weights
STRUCT_STEPS = 3             # structured candidates, evenly spaced up to STRUCT_MAX, each pruned from the last
STRUCT_EPOCHS = 2            # fine-tuning epochs after each structured step
CHANNEL_MULTIPLE = 16        # channel counts are rounded to a multiple of this: INT8 kernels run slowly on odd widths
SPARSITY = 0.85              # unstructured sparsity of conv+linear weights at the last AGP step, 0 to <1
AGP_STEPS = 4                # AGP steps (cubic schedule) to SPARSITY, each a candidate (skipped for OBJECTIVE=latency)
AGP_EPOCHS = 1               # fine-tuning epochs after each AGP step
FINAL_EPOCHS = 1             # more fine-tuning of the chosen pruned model (zeros kept); kept if validation agrees
FINETUNE_LR = 0.02           # peak one-cycle learning rate of every fine-tuning
CALIB_IMAGES = 512           # training images that calibrate the INT8 activation ranges
CALIB_METHOD = "MinMax"      # MinMax | Entropy | Percentile (ONNX Runtime calibrators)
PER_CHANNEL = True           # per-output-channel weight scales (False: one scale per tensor)
MAX_FLOAT_LAYERS = 4         # INT8 fallback: most layers kept in float (most INT8-sensitive first) to meet the budget
LATENCY_THREADS = 1          # ONNX Runtime threads when timing candidates (as evaluate_results.py's THREADS)
LATENCY_RUNS = 100           # timed batch-1 runs per candidate (batch 64: a tenth)
CHANNELS_LAST = True         # channels-last memory format while training
AMP_DTYPE = "auto"           # auto | float32 | bfloat16: autocast dtype of each training step (auto: bfloat16 where
                             # the CPU has bf16 matrix instructions or on a GPU; decisions are always float32)
RANKS = "auto"               # auto | N: data-parallel processes for every training stage; auto: one per GPU on CUDA,
                             # on the CPU as many as use the most cores with 32+ images each a step, the cores shared
                             # out as threads; rank 0 alone measures and writes; env RANKS too
RANK_TIMEOUT = 300           # seconds a rank may stop answering (or a training collective wait) before the run ends
SEED = 0                     # seed of initialisation, batch order and the calibration images
# -----------------------------------------------------------------------------------------------
PROFILES = {"cpu": {}, "gpu": {"KD_EPOCHS": 40, "TEACHER_VIEWS": 0, "BATCH_SIZE": 512, "KD_LR": 0.4,
                               "STRUCT_EPOCHS": 4, "AGP_EPOCHS": 2, "AMP_DTYPE": "bfloat16"}}
# STUDENTS=auto below LARGE_IMAGES px: one CPU-sized student; on a GPU two wider ones for the search to choose from
AUTO_STUDENTS = {"cpu": "resnet20", "gpu": "resnet20_w32,resnet18_cifar_w32"}
Config = config_type("Config", __file__)  # the constants above as a frozen dataclass: cfg.NAME


def check_config(cfg):
    check_choice(cfg, "DATA_MODE", DATA_MODES)
    names = [] if cfg.STUDENTS == "auto" else cfg.STUDENTS.split(",")
    for name in names:
        try:
            parse_arch(name)
        except ValueError as e:
            raise UserError(f"--STUDENTS: {e}") from None
    if len(set(names)) != len(names):
        raise UserError(f"--STUDENTS names a student twice: {cfg.STUDENTS}")
    check_choice(cfg, "CALIB_METHOD", ("MinMax", "Entropy", "Percentile"))
    check_choice(cfg, "OBJECTIVE", OBJECTIVES)
    check_choice(cfg, "KD_LOSS", ("kd", "dkd"))
    check_range(cfg, "DKD_BETA", 0, 1000)
    check_amp_dtype(cfg)
    check_range(cfg, "MAX_ACC_DROP", 0, 100)
    check_range(cfg, "RANK_TIMEOUT", 1, 10**6)
    for name in ("BATCH_SIZE", "CALIB_IMAGES", "SENS_IMAGES", "LATENCY_THREADS", "LATENCY_RUNS",
                 "CHANNEL_MULTIPLE"):
        check_range(cfg, name, 1, 10**9)
    for name in ("KD_EPOCHS", "TEACHER_VIEWS", "STRUCT_STEPS", "STRUCT_EPOCHS", "AGP_STEPS", "AGP_EPOCHS",
                 "FINAL_EPOCHS", "MAX_FLOAT_LAYERS", "LOOKAHEAD"):
        check_range(cfg, name, 0, 10**9)
    for name in ("STRUCT_MAX", "SPARSITY"):
        check_range(cfg, name, 0, 1, high_open=True)
    check_range(cfg, "KD_TEMPERATURE", 0, 100, low_open=True)
    check_range(cfg, "KD_ALPHA", 0, 1)
    for name in ("KD_LR", "FINETUNE_LR"):
        check_range(cfg, name, 0, 10, low_open=True)
    check_range(cfg, "MOMENTUM", 0, 1, high_open=True)
    check_range(cfg, "BN_MOMENTUM", 0, 1)
    check_range(cfg, "BN_BIAS_LR", 0, 10**4)
    check_range(cfg, "WEIGHT_DECAY", 0, 1)


class Teacher:
    """The baseline as the teacher: its checkpoint, its model (eval mode, on the device) and where it lies."""

    def __init__(self, cfg):
        self.path = os.path.join(cfg.OUT_DIR, ARTIFACTS["baseline"])
        self.ckpt = load_checkpoint(self.path, "baseline", finished=True)
        model = load_model(self.ckpt, self.path).to(cfg.DEVICE).eval()
        if cfg.CHANNELS_LAST and cfg.DEVICE == "cuda":
            # as its input batches and the students are: with TEACHER_VIEWS=0 it runs on every training step, and
            # a contiguous model would convert the layout in each convolution. On the CPU it runs once per cached
            # view; its layout there stays as the CPU benchmark measured it.
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.classes = self.ckpt["classes"]
        self.fingerprint = weights_fingerprint(self.ckpt["state_dict"])


@dataclass
class Distiller:
    """Trains a model against the teacher (the KD loss) through the one training loop: the distillation of the
    student and every fine-tuning of the search. meta: what each checkpoint records besides its weights."""
    objective: Callable
    train: Split
    val: Split
    cfg: Config
    meta: dict

    def recipe(self, lr, epochs):
        # flip-averaged targets are the same for a view and its mirror, so each epoch may mirror its own images
        return recipe_from(self.cfg, lr, epochs, views=self.cfg.TEACHER_VIEWS, mirror_views=self.cfg.TEACHER_FLIP)

    def fit(self, stage, model, recipe, objective=None):
        """Train `model` (moved to the device and memory format of training) by `objective` (default: the KD
        loss, whose settings then join what the checkpoint was made from)."""
        model = placed_for_training(model, self.cfg.DEVICE, self.cfg.CHANNELS_LAST)
        made_from = stage.made_from
        if objective is None:
            objective = self.objective
            made_from = {**made_from, **self.kd_settings()}
        fit(model, objective, recipe, self.train, self.val, replace(stage, made_from=made_from))
        return model

    def finetune_key(self):
        """What every fine-tuning trains with besides its model and epochs: the recipe and the KD loss's settings."""
        recipe = asdict(self.recipe(self.cfg.FINETUNE_LR, 0))
        del recipe["epochs"]
        return {**recipe, **self.kd_settings()}

    def kd_settings(self):
        """The KD loss's constants: what a checkpoint trained by it was made from besides its recipe (KD_LOSS and
        DKD_BETA only with dkd, so that a checkpoint made before them still resumes)."""
        names = ("KD_TEMPERATURE", "KD_ALPHA", "TEACHER_FLIP")
        if self.cfg.KD_LOSS == "dkd":
            names += ("KD_LOSS", "DKD_BETA")
        return {k: getattr(self.cfg, k) for k in names}

    def finetune(self, label, path, model, epochs, made_from):
        """The search's fine-tuning step (utils.search.Finetune)."""
        stage = Stage("pruned", label, path, self.cfg.DEVICE, made_from, self.meta,
                      metrics=os.path.join(self.cfg.OUT_DIR, METRICS_FILE))
        return self.fit(stage, model, self.recipe(self.cfg.FINETUNE_LR, epochs))


def load_splits(cfg, teacher, layout):
    """The baseline's own train/validation split (its image size, VAL_SIZE, SEED and TRAIN_SUBSET), on the CPU;
    the data's classes must be the ones the baseline was trained on, and BATCH_SIZE no more than its training
    images. The other ranks open the same (share_data)."""
    base = teacher.ckpt["config"]
    source = DataSource(cfg.DATA_DIR, cfg.DOWNLOAD, cfg.OUT_DIR, teacher.model.image_size, cfg.DATA_MODE,
                        base["VAL_SIZE"], base["SEED"], base.get("TRAIN_SUBSET", 0))
    data, train, val, source = open_splits(source, layout.threads)
    if data["train"].classes != teacher.classes:
        raise UserError(f"{teacher.path} was trained on the classes {teacher.classes}, but {cfg.DATA_DIR} holds "
                        f"{data['train'].classes}: use the data it was trained on, or train a new baseline")
    check_batch(cfg.BATCH_SIZE, train)
    share_data(source)
    return on_device((data, train, val, source), cfg.DEVICE)


def on_device(opened, device):
    """(train on the training device, val on the CPU) of what open_splits returned."""
    _, train, val, _ = opened
    return train.to(device), val


def baseline_on_val(teacher, val, cfg):
    """The baseline's per-image correctness on validation, in exact float32 like every candidate's: what each
    candidate's paired drop is measured against."""
    correct = model_correct(teacher.model, val, cfg.DEVICE, 512)
    print(f"budget: baseline val {percent(correct):.2f}%; a candidate is within MAX_ACC_DROP={cfg.MAX_ACC_DROP} "
          f"when the one-sided 95% bound of its paired drop on these {len(correct)} images is; "
          f"OBJECTIVE={cfg.OBJECTIVE}", flush=True)
    return correct


def students_for(cfg, image_size):
    """STUDENTS, with auto resolved: the profile's AUTO_STUDENTS, and from LARGE_IMAGES px up the same stages
    behind torchvision's ImageNet stem (as the baseline's ARCH=auto), which keeps the student's maps, and so its
    MACs, a fraction of the teacher's."""
    if cfg.STUDENTS != "auto":
        return cfg.STUDENTS
    names = AUTO_STUDENTS[cfg.PROFILE].split(",")
    if image_size < LARGE_IMAGES:
        return ",".join(names)
    specs = [parse_arch(name) for name in names]
    return ",".join(f"imagenet:{'-'.join(map(str, s['widths']))}:{s.get('blocks', (2,))[0]}" for s in specs)


def views_that_fit(cfg, train, teacher):
    """cfg, with TEACHER_VIEWS=0 (the teacher run on every step's batch, said in one line) where its cached logits
    (views x images x classes float32) would not fit in the memory available, as decoded images may not either."""
    need = cfg.TEACHER_VIEWS * len(train.x) * len(teacher.classes) * 4
    if need * RAM_MARGIN <= available_memory():
        return cfg
    print(f"teacher logits: {cfg.TEACHER_VIEWS} views x {len(train.x)} images x {len(teacher.classes)} classes = "
          f"{need / 2**30:.2f} GiB do not fit the memory available: the teacher runs on every step instead "
          f"(TEACHER_VIEWS=0)")
    return replace(cfg, TEACHER_VIEWS=0)


def cached_teacher(teacher, train, cfg):
    """The teacher's logits on TEACHER_VIEWS fixed augmentations of every training image (utils.train
    .teacher_logits), stored in OUT_DIR/teacher_logits.pt and reused while the teacher and the views are the same.
    None when TEACHER_VIEWS is 0."""
    if not cfg.TEACHER_VIEWS:
        return None
    key = {"teacher": teacher.fingerprint, "views": cfg.TEACHER_VIEWS, "seed": cfg.SEED, "n": len(train.x),
           "flip": cfg.TEACHER_FLIP}

    def compute():
        t0 = time.time()
        views = fixed_views(len(train.x), cfg.TEACHER_VIEWS, cfg.SEED, train.x.shape[-1])
        logits = teacher_logits(teacher.model, train, views, cfg.DEVICE, channels_last=cfg.CHANNELS_LAST,
                                flip=cfg.TEACHER_FLIP)
        print(f"teacher logits: {key['views']} fixed views of {len(train.x)} images in {time.time() - t0:.0f}s",
              flush=True)
        return {"logits": logits}
    path = os.path.join(cfg.OUT_DIR, "teacher_logits.pt")
    return cache_or_compute(path, key, compute, "teacher logits")["logits"].to(cfg.DEVICE)  # read by every step


def student_path(cfg, name):
    return os.path.join(cfg.OUT_DIR, f"student_{arch_slug(name)}.pth")


def new_student(name, teacher, cfg):
    """A freshly initialised student of architecture `name`, seeded by SEED: a student and its scratch control
    start from the same weights."""
    torch.manual_seed(cfg.SEED)
    return ResNet(**parse_arch(name), num_classes=len(teacher.classes), image_size=teacher.model.image_size)


def distil(teacher, distiller, cfg):
    """Knowledge distillation into each of the STUDENTS (loss: KD_ALPHA*T^2*KL + (1-KD_ALPHA)*CE, KL decoupled
    with KD_LOSS=dkd):
    {name: model}, each checkpointed as OUT_DIR/student_<name>.pth."""
    students, names = {}, cfg.STUDENTS.split(",")
    for name in names:
        student = new_student(name, teacher, cfg)
        label = "student" if len(names) == 1 else f"student_{arch_slug(name)}"  # as the search names them
        stage = Stage("student", label, student_path(cfg, name), cfg.DEVICE, {"teacher": teacher.fingerprint},
                      distiller.meta)
        students[name] = distiller.fit(stage, student, distiller.recipe(cfg.KD_LR, cfg.KD_EPOCHS))
    return students


def scratch_control(student, teacher, distiller, search, cfg):
    """The control that says what distillation bought: the picked student's architecture, from the student's
    initial weights, trained for KD_EPOCHS with the student's recipe on the labels alone (cross-entropy with the
    baseline's LABEL_SMOOTHING, a fresh random augmentation every epoch, as the baseline trains), checkpointed as
    OUT_DIR/scratch.pth and measured as the candidates are (never one of them). Returns (its Candidate,
    seconds); (None, 0) when SCRATCH_CONTROL is off."""
    if not cfg.SCRATCH_CONTROL:
        return None, 0.0
    t0, arch, base = time.time(), student.entry.arch, teacher.ckpt["config"]
    smoothing = base["LABEL_SMOOTHING"]
    split = {k: base.get(k, 0) for k in ("VAL_SIZE", "SEED", "TRAIN_SUBSET")}  # the images it trains on
    stage = Stage("scratch", "scratch", os.path.join(cfg.OUT_DIR, CONTROL["scratch"]), cfg.DEVICE,
                  {"arch": arch, "LABEL_SMOOTHING": smoothing, **split}, distiller.meta)
    recipe = replace(distiller.recipe(cfg.KD_LR, cfg.KD_EPOCHS), views=0)
    model = distiller.fit(stage, new_student(arch, teacher, cfg), recipe, cross_entropy_objective(smoothing))
    control = search.measure("scratch", model, kind="control", arch=arch)
    print(f"scratch control: {arch} on the labels alone {control.entry.float_val_acc:.2f}% val, the distilled "
          f"student {student.entry.float_val_acc:.2f}% ({time.time() - t0:.0f}s, not counted in the run's time)",
          flush=True)
    return control, time.time() - t0


def quantization(train, cfg):
    """INT8 settings, with CALIB_IMAGES training images (a fixed random choice) to calibrate on."""
    pick = torch.randperm(len(train.x), generator=torch.Generator().manual_seed(cfg.SEED))[:cfg.CALIB_IMAGES]
    calib = train.x[pick.to(train.x.device)].cpu().float() / 255
    return Quantization(calib, cfg.PER_CHANNEL, cfg.CALIB_METHOD)


def sensitivities(student, ctx, cfg):
    """The sensitivity analysis of the student (a candidate) on SENS_IMAGES validation images with the search's
    INT8 settings, reused when sensitivity.json was made from the same student and images; also written as
    sensitivity.md and .png."""
    out, model = cfg.OUT_DIR, student.model
    key = {"student": weights_fingerprint(clean_state_dict(model)), "SENS_IMAGES": cfg.SENS_IMAGES,
           "CALIB_IMAGES": cfg.CALIB_IMAGES, "groups": list(group_widths(model)), "blocks_left_out": True}

    def compute():
        t0 = time.time()
        float_onnx = export_onnx(model, float_onnx_path(ctx.work_dir, student.name))  # its own, from its measuring
        sens = sensitivity_analysis(model, float_onnx, ctx.quant, ctx.val.head(cfg.SENS_IMAGES), cfg.DEVICE)
        atomic_write_text(os.path.join(out, "sensitivity.md"), sensitivity_table(sens))
        plot_sensitivity(sens, os.path.join(out, "sensitivity.png"))
        print(f"sensitivity: {out}/sensitivity.md, sensitivity.png ({time.time() - t0:.0f}s)", flush=True)
        return sens
    sens = cache_or_compute(os.path.join(out, "sensitivity.json"), key, compute, "sensitivity")
    return Sensitivity.from_json(json.loads(json.dumps(sens)))  # as a rerun reads it back: the same either way


def search_context(val, base_correct, quant, teacher, cfg):
    timing = Timing(cfg.LATENCY_THREADS, cfg.LATENCY_RUNS, max(cfg.LATENCY_RUNS // 10, 3), warmup=10)
    ctx = SearchContext(val=val, base_correct=base_correct, max_drop=cfg.MAX_ACC_DROP, quant=quant,
                        timing=timing, x_latency=val.x[:64].float() / 255,
                        work_dir=os.path.join(cfg.OUT_DIR, "search"), device=cfg.DEVICE)
    ctx.reference = reference_point(teacher.model, teacher.path, percent(base_correct), ctx)
    return ctx


def search_plan(cfg):
    return SearchPlan(objective=cfg.OBJECTIVE, struct_max=cfg.STRUCT_MAX, struct_steps=cfg.STRUCT_STEPS,
                      struct_epochs=cfg.STRUCT_EPOCHS, channel_multiple=cfg.CHANNEL_MULTIPLE,
                      sparsity=cfg.SPARSITY, agp_steps=cfg.AGP_STEPS, agp_epochs=cfg.AGP_EPOCHS,
                      final_epochs=cfg.FINAL_EPOCHS, max_float_layers=cfg.MAX_FLOAT_LAYERS)


def summary(counts, path, val_acc):
    """What a before-to-after line shows of one model: counts = (parameters, nonzero), its file, its accuracy."""
    params, nonzero = counts
    return {"params": params, "nonzero": nonzero, "mib": os.path.getsize(path) / 2**20, "val_acc": val_acc}


def print_change(stage, before, after):
    fmt = "{params:>10,} params {nonzero:>10,} nonzero {mib:7.3f} MiB  val {val_acc:6.2f}%"
    print(f"{stage:<8} {fmt.format(**before)}  ->  {fmt.format(**after)}", flush=True)


def artifact_meta(cfg, teacher, run_id):
    """What every final file records besides its content: the config, the classes, the teacher, the run's id."""
    return {"config": asdict(cfg), "classes": teacher.classes, "teacher": teacher.path, "run_id": run_id}


def dynamic_quantization(chosen, teacher, ctx, meta):
    """PyTorch's dynamic quantization of the chosen model, saved in the search's folder (write_artifacts ships it
    as dynamic_quant.pth) and measured as a point of the Pareto plots: validation accuracy, bytes, and speed-ups
    over the baseline in eager PyTorch (the only runtime it has), timed like the candidates."""
    path = os.path.join(ctx.work_dir, ARTIFACTS["dynamic_quant"])
    model = dynamic_quant(chosen.model, path, {**meta, "model": chosen.model.spec})
    base = eager_latency(teacher.model, ctx.x_latency, ctx.timing)
    dynamic = eager_latency(model, ctx.x_latency, ctx.timing)
    return {"name": "dynamic_quant", "runtime": "pytorch (eager)", "val_acc": model_accuracy(model, ctx.val),
            "bytes": os.path.getsize(path), **dynamic, "speedup_b1": base["b1_ms"] / dynamic["b1_ms"],
            "speedup_b64": base["b64_ms"] / dynamic["b64_ms"]}


def report(result, cfg):
    print(f"search: {len(result.candidates)} candidates in {result.seconds:.0f}s; chosen {result.chosen.name} "
          f"({'within' if result.budget_met else 'NOT within'} the budget, OBJECTIVE={cfg.OBJECTIVE})", flush=True)
    if not result.budget_met:
        print(f"warning: no candidate's paired 95% bound of its drop on validation was within MAX_ACC_DROP="
              f"{cfg.MAX_ACC_DROP}; {result.chosen.name} is the most accurate. Raise MAX_ACC_DROP or KD_EPOCHS.")


def write_artifacts(result, student, control, dynamic, teacher, ctx, cfg, seconds, meta):
    """The picked student as student.pth and its plain INT8 model as student_int8.onnx (what pruning is measured
    against), the chosen model as pruned.pth (float; rebuilds its pruned shape),
    int8.onnx (what ships), int8.sparse (the same, stored compactly), dynamic_quant.pth (PyTorch's dynamic
    quantization of it, `dynamic` its measurements) and search.json: written into a staging folder, each with
    this run's id (meta, artifact_meta), and moved into OUT_DIR together once all are written."""
    out, chosen, run_id = cfg.OUT_DIR, result.chosen, meta["run_id"]
    paths = {stage: os.path.join(out, ARTIFACTS[stage]) for stage in ("student", "pruned", "int8", "int8_sparse")}
    with ArtifactSet(out) as staged:
        student_file = student_path(cfg, student.entry.arch)
        shutil.copyfile(student_file, staged.path(ARTIFACTS["student"]))
        write_checkpoint(staged.path(ARTIFACTS["pruned"]), {**meta, "stage": "pruned", "model": chosen.model.spec,
                         "search": asdict(chosen.entry)}, chosen.model,
                         Progress(1, 1, [{"epoch": 1, "val_accuracy": chosen.entry.float_val_acc}]))
        for stage, made, source in (("student_int8", student, "student"), ("int8", chosen, "pruned")):
            shutil.copyfile(made.entry.int8_onnx, staged.path(ARTIFACTS[stage]))
            save_onnx_metadata(staged.path(ARTIFACTS[stage]),
                               {**meta, "stage": stage, "input": "float32 (N, 3, 32, 32) RGB in [0, 1]",
                                "source": paths[source], "float_layers": made.entry.float_layers})
        int8 = staged.path(ARTIFACTS["int8"])
        save_sparse_onnx(int8, staged.path(ARTIFACTS["int8_sparse"]), run_id)
        shutil.copyfile(os.path.join(ctx.work_dir, ARTIFACTS["dynamic_quant"]),
                        staged.path(ARTIFACTS["dynamic_quant"]))
        write_json(staged.path("search.json"),
            {"config": asdict(cfg), "run_id": run_id, "baseline_val_acc": ctx.reference["val_acc"], "floor": ctx.floor,
             "objective": cfg.OBJECTIVE, "reference": ctx.reference, "candidates": result.log(),
             "chosen": chosen.name, "budget_met": result.budget_met, "dynamic_quant": dynamic, "seconds": seconds,
             "student": student.entry.arch, "max_acc_drop": cfg.MAX_ACC_DROP,
             "scratch": control and asdict(control.entry),
             "inputs": {ARTIFACTS["baseline"]: file_digest(teacher.path),
                        ARTIFACTS["student"]: file_digest(student_file),
                        **({CONTROL["scratch"]: file_digest(os.path.join(out, CONTROL["scratch"]))} if control
                           else {})}})
    before = summary(count_params(student.model), paths["student"], student.entry.float_val_acc)
    after = summary(count_params(chosen.model), paths["pruned"], chosen.entry.float_val_acc)
    int8_stats = summary(onnx_param_counts(paths["int8"]), paths["int8"], chosen.entry.val_acc)
    print_change("prune", before, after)
    print_change("int8", after, int8_stats)
    print_change("store", int8_stats, {**int8_stats, "mib": os.path.getsize(paths["int8_sparse"]) / 2**20})
    print_change("dynamic", after, {**after, "mib": dynamic["bytes"] / 2**20, "val_acc": dynamic["val_acc"]})
    print(f"compress_model: run {run_id} done in {seconds['total']:.0f}s (sensitivity and search "
          f"{seconds['sensitivity_and_search']:.0f}s; the scratch control {seconds['scratch_control']:.0f}s more); "
          f"next: python evaluate_results.py")


def main(argv):
    cfg = configure(Config, "compress_model", argv, check_config, PROFILES, pick_device, show=False)
    # Data parallelism: a plain start with RANKS above 1 launches the ranks and waits for them here
    started = data_parallel(cfg, __file__, argv, cfg.BATCH_SIZE)
    if started is None:
        return
    cfg, layout = started
    if not layout.writer:  # a follower: opens the data rank 0 opened, trains its share of every stage rank 0 runs
        return follow(lambda source: on_device(open_splits(source, layout.threads), cfg.DEVICE))
    torch.manual_seed(cfg.SEED)
    with out_dir_lock(cfg.OUT_DIR, "compress_model.py"), ranks_working(layout):
        t_start = time.time()
        teacher = Teacher(cfg)
        cfg = replace(cfg, STUDENTS=students_for(cfg, teacher.model.image_size))
        train, val = load_splits(cfg, teacher, layout)
        cfg = views_that_fit(cfg, train, teacher)
        base_correct = baseline_on_val(teacher, val, cfg)
        kd = distillation_objective(teacher.model, cfg.KD_TEMPERATURE, cfg.KD_ALPHA,
                                    cached_teacher(teacher, train, cfg), cfg.TEACHER_FLIP,
                                    cfg.DKD_BETA if cfg.KD_LOSS == "dkd" else None)
        distiller = Distiller(kd, train, val, cfg,
                              {"config": asdict(cfg), "classes": teacher.classes, "teacher": teacher.path})
        students = distil(teacher, distiller, cfg)
        t_search = time.time()
        quant = quantization(train, cfg)
        ctx = search_context(val, base_correct, quant, teacher, cfg)
        search = Search(ctx, search_plan(cfg), distiller.finetune, distiller.finetune_key())
        student = pick_student(search, students)
        control, control_s = scratch_control(student, teacher, distiller, search, cfg)
        sens = sensitivities(student, ctx, cfg)
        result = run_search(search, student, sens)
        report(result, cfg)
        meta = artifact_meta(cfg, teacher, new_run_id())
        dynamic = dynamic_quantization(result.chosen, teacher, ctx, meta)
        seconds = {"distillation": t_search - t_start, "scratch_control": control_s,
                   "sensitivity_and_search": time.time() - t_search - control_s,
                   "total": time.time() - t_start - control_s}
        write_artifacts(result, student, control, dynamic, teacher, ctx, cfg, seconds, meta)


if __name__ == "__main__":
    run_cli(main)
