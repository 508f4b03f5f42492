"""The search: the distilled students as the first candidates, the pick of one of them by the objective, then
candidates made from it by structured pruning, then gradual (AGP) unstructured pruning, then a recovery
fine-tuning of the choice; each candidate turned into its deployable INT8 artifacts and measured (validation
accuracy, bytes, latency), with the INT8 fallback to mixed precision, and the choice under the budget.

The budget is judged with its noise: a candidate is within it when the one-sided 95% upper bound of its paired
drop against the baseline on validation (measure.paired_drop_bound) is at most MAX_ACC_DROP, not when its point
estimate is: on 5,000 images one point is 50 images, and a point estimate just inside the budget is outside it
on other images about half the time.

A candidate is judged by the artifact that ships: its INT8 ONNX file (latency, run by ONNX Runtime) and the
compact archive of that file (size). Accuracy is always the validation split's; the test split is not seen.
Training is not done here: the caller passes a `finetune` function (compress_model.py fine-tunes with
distillation), so the search's walks read as what they try.
"""
import copy
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from .checkpoint import clean_state_dict, count_params, cpu_copy, weights_fingerprint
from .data import Split
from .measure import Timing, model_accuracy, ort_correct, ort_latency, paired_drop_bound, percent
from .models import arch_slug, count_macs
from .prune import agp_schedule, allocate, group_sizes, group_widths, magnitude_masks, prunable_layers, \
    removable, structured_prune, weight_sparsity, zero_fractions
from .quantize import Quantization, export_onnx, quantize_int8
from .sparse import save_sparse_onnx

OBJECTIVES = ("size", "latency", "balanced")


@dataclass(frozen=True)
class SearchPlan:
    """What the search tries (compress_model.py's constants of the same names, lower-cased)."""
    objective: str          # size | latency | balanced: what is minimised within the budget
    struct_max: float       # largest structured pruning level (structured_counts)
    struct_steps: int       # structured candidates, evenly spaced up to struct_max
    struct_epochs: int      # fine-tuning epochs after each structured step
    channel_multiple: int   # channel counts rounded to a multiple of this
    sparsity: float         # unstructured sparsity at the last AGP step
    agp_steps: int          # AGP steps on the cubic schedule (none for objective latency)
    agp_epochs: int         # fine-tuning epochs after each AGP step
    final_epochs: int       # recovery fine-tuning of the choice
    max_float_layers: int   # INT8 fallback: most layers kept in float


@dataclass
class SearchContext:
    """What every candidate is measured with and against."""
    val: Split              # validation split (CPU): every decision is judged on it
    base_correct: torch.Tensor  # the baseline's per-image correctness on val (float32)
    max_drop: float         # MAX_ACC_DROP: the most points the paired 95% bound of a candidate's drop may reach
    quant: Quantization     # INT8 settings and calibration images
    timing: Timing          # how candidates are timed
    x_latency: torch.Tensor  # float images the latency is measured on (64)
    work_dir: str           # candidates' checkpoints, ONNX files and archives
    device: str = "cpu"     # where eager float accuracies are measured (exact float32): the training device
    reference: dict = None  # the baseline: checkpoint bytes and float ONNX latency (reference_point)
    latency_cache: dict = field(default_factory=dict)  # {shape: (measured on, latency)}

    @property
    def floor(self):
        """The point estimate's floor (baseline val - MAX_ACC_DROP): shown beside the paired bound, and a model
        under it in float is not tried with the INT8 fallback."""
        return percent(self.base_correct) - self.max_drop

    def judge(self, correct):
        """(accuracy %, paired 95% bound of the drop, within the budget) of per-image correctness on val."""
        bound = paired_drop_bound(self.base_correct, correct)
        return percent(correct), bound, bound <= self.max_drop


@dataclass(frozen=True)
class Entry:
    """A candidate's log entry, the one definition of an element of search.json's "candidates" (and of its
    "scratch"): what was measured of the deployable model, on validation, against the baseline (the reference)."""
    name: str
    kind: str                 # student | structured | unstructured | recovery | control
    float_val_acc: float      # validation accuracy (%) of the float model (exact float32)
    val_acc: float            # validation accuracy (%) of its INT8 ONNX model: what the budget judges
    drop_bound: float         # one-sided 95% bound of the INT8 model's paired drop against the baseline (points)
    within_budget: bool       # drop_bound <= MAX_ACC_DROP
    float_layers: list        # layers the INT8 fallback kept in float ([] for plain INT8)
    onnx_bytes: int           # the INT8 ONNX file
    bytes: int                # its compact archive (utils.sparse): what the size objective counts
    int8_onnx: str            # paths of both, in the search's work folder
    archive: str
    b1_ms: float              # ONNX Runtime latency, batch 1 and batch 64 (ms)
    b64_ms: float
    latency_measured_on: str  # the candidate of the same shape whose timing this is (shared_latency)
    params: int               # parameters of the float model
    macs: int                 # multiply-accumulates of one image, dense (models.count_macs)
    sparsity: float           # fraction of conv and linear weights exactly zero
    widths: list              # stage widths (the residual streams) ...
    mids: list                # ... and blocks' inner widths (0: the block left out); None: as wide as the stage
    size_ratio: float         # the baseline checkpoint's bytes / bytes
    mac_ratio: float          # the baseline's MACs / macs
    speedup_b1: float         # the baseline's float ONNX latency / this one's, batch 1 and batch 64
    speedup_b64: float
    arch: str = None          # students and the control: the architecture (utils.models.parse_arch)
    level: float = None       # structured steps: the pruning level (search.structured_counts)
    target: float = None      # unstructured steps: the sparsity aimed at


@dataclass
class Candidate:
    """One model the search tried: its log entry, the deployable float model (CPU, eval) and the INT8
    sensitivities of the student it came from ({layer: drop}; None before they are measured)."""
    entry: Entry
    model: torch.nn.Module
    int8_drops: dict = None

    @property
    def name(self):
        return self.entry.name


@dataclass
class SearchResult:
    candidates: list        # [Candidate] in the order tried
    chosen: Candidate
    budget_met: bool        # False: nothing kept the floor, and `chosen` is the most accurate
    seconds: float

    def log(self):
        """search.json's "candidates"."""
        return [asdict(c.entry) for c in self.candidates]


# finetune(label, checkpoint path, model, epochs, made_from) -> the fine-tuned model
Finetune = Callable[[str, str, torch.nn.Module, int, dict], torch.nn.Module]


def float_onnx_path(work_dir, name):
    """Where the search exports the float model of candidate `name` (and of the baseline, "baseline")."""
    return os.path.join(work_dir, f"{name}_fp32.onnx")


def reference_point(teacher, baseline_path, val_acc, ctx):
    """What every candidate is compared with: the baseline checkpoint's bytes, its float ONNX export's latency."""
    onnx_path = export_onnx(teacher, float_onnx_path(ctx.work_dir, "baseline"))
    return {"name": "baseline", "val_acc": val_acc, "bytes": os.path.getsize(baseline_path),
            "macs": count_macs(teacher), **ort_latency(onnx_path, ctx.x_latency, ctx.timing)}


def quantize_within_budget(float_onnx, int8_path, ctx, int8_drops, max_float_layers):
    """Post-training INT8; when it alone is outside the budget, keep the layers most sensitive to INT8 in float,
    1, 2, 4, ... of them up to max_float_layers (none without int8_drops). When no step brings the model within
    the budget, plain INT8 is kept (float layers would only make it bigger). Returns (per-image correctness on
    val, layers kept in float)."""
    order = sorted(int8_drops or {}, key=lambda n: -int8_drops[n])
    tries, count = [[]], 1
    while count <= min(max_float_layers, len(order)):
        tries.append(order[:count])
        count *= 2
    for keep in tries:
        quantize_int8(float_onnx, int8_path, ctx.quant, keep_float=keep)
        correct = ort_correct(int8_path, ctx.val)
        if ctx.judge(correct)[2]:
            return correct, keep
        if not keep:
            plain = correct  # the first try, plain INT8
    if tries[-1]:  # the last try kept layers in float and missed too: the file back to plain INT8, which is
        quantize_int8(float_onnx, int8_path, ctx.quant)  # deterministic, so its correctness is the first try's
    return plain, []


def shared_latency(name, int8_path, shape, ctx):
    """Latency of a candidate's INT8 graph. ONNX Runtime's dense kernels take the same time whatever the weight
    values, so candidates with the same shape (inner widths, layers kept in float) share one measurement, made
    on the first of them: timing noise then cannot decide between candidates that differ only in zeros."""
    key = json.dumps(shape)
    if key not in ctx.latency_cache:
        ctx.latency_cache[key] = (name, ort_latency(int8_path, ctx.x_latency, ctx.timing))
    source, measured = ctx.latency_cache[key]
    return {**measured, "latency_measured_on": source}


def measure_candidate(name, model, ctx, int8_drops, max_float_layers, **info):
    """Float accuracy, then export, quantize (with the fallback), archive and time one deployable model; returns
    its log entry. `model` is a CPU model; its float accuracy is measured on a copy on ctx.device. info: the
    entry's fields that say what the candidate is (kind, and arch, level or target)."""
    on_device = model if ctx.device == "cpu" else copy.deepcopy(model).to(ctx.device)
    float_val = model_accuracy(on_device, ctx.val, ctx.device)
    float_onnx = export_onnx(model, float_onnx_path(ctx.work_dir, name))
    int8_path = os.path.join(ctx.work_dir, f"{name}.int8.onnx")
    # already under the floor in float: no fallback can help, plain INT8 is measured for the log
    layers = prunable_layers(model)  # a block left out has no layers to keep in float
    drops = {n: d for n, d in int8_drops.items() if n in layers} if int8_drops and float_val >= ctx.floor else None
    correct, keep = quantize_within_budget(float_onnx, int8_path, ctx, drops, max_float_layers)
    val_acc, bound, within = ctx.judge(correct)
    archive = int8_path.replace(".onnx", ".sparse")
    nbytes = save_sparse_onnx(int8_path, archive)
    measured, ref = shared_latency(name, int8_path, [model.spec, keep], ctx), ctx.reference
    macs, kw = count_macs(model), model.spec["kwargs"]
    entry = Entry(name=name, float_val_acc=float_val, val_acc=val_acc, drop_bound=bound, float_layers=keep,
                  within_budget=within, onnx_bytes=os.path.getsize(int8_path), bytes=nbytes, int8_onnx=int8_path,
                  archive=archive, **measured, params=count_params(model)[0], macs=macs,
                  sparsity=weight_sparsity(model), widths=kw["widths"], mids=kw.get("mids"), **info,
                  size_ratio=ref["bytes"] / nbytes, mac_ratio=ref["macs"] / macs,
                  speedup_b1=ref["b1_ms"] / measured["b1_ms"], speedup_b64=ref["b64_ms"] / measured["b64_ms"])
    print(f"candidate {name:<18} val {float_val:6.2f}% float -> {val_acc:6.2f}% int8 (drop <= {bound:5.2f})"
          f"{' (float: ' + ', '.join(keep) + ')' if keep else ''}  {entry.bytes / 2**20:6.3f} MiB "
          f"({entry.size_ratio:5.1f}x)  {entry.macs / 1e6:.1f} M MACs  "
          f"b1 {entry.b1_ms:.3f} ms ({entry.speedup_b1:.2f}x)  "
          f"b64 {entry.b64_ms:.2f} ms ({entry.speedup_b64:.2f}x)"
          f"{'' if entry.latency_measured_on == name else ' (timed as ' + entry.latency_measured_on + ')'}  "
          f"{'within' if entry.within_budget else 'OUTSIDE'} budget", flush=True)
    return entry


def score(entry, objective):
    """Lower is better, from what is counted, never from what is timed: size: bytes on disk, then MACs; latency:
    MACs (multiply-accumulates of one image, dense), then bytes; balanced: the geometric mean of the size ratio
    and the MAC ratio taken twice (in place of the two speed-ups), then bytes. Two timings of the same file
    differ from run to run, so a choice made on them would differ too; the MACs are what the dense INT8 kernels'
    time follows, and every candidate's latency is still measured and reported."""
    if objective == "size":
        return (entry.bytes, entry.macs)
    if objective == "latency":
        return (entry.macs, entry.bytes)
    return (-(entry.size_ratio * entry.mac_ratio ** 2) ** (1 / 3), entry.bytes)


def choose(candidates, objective):
    """The best Candidate by `objective` among those within the budget: (candidate, True). With none within the
    budget, the most accurate: (candidate, False)."""
    within = [c for c in candidates if c.entry.within_budget]
    if not within:
        return max(candidates, key=lambda c: c.entry.val_acc), False
    return min(within, key=lambda c: score(c.entry, objective)), True


def candidate_path(work, name, made_from):
    """A candidate's checkpoint, named by what it was made from: a rerun with other constants starts afresh
    instead of clashing with an older candidate of the same name."""
    digest = hashlib.sha1(json.dumps(made_from, sort_keys=True).encode()).hexdigest()[:8]
    return os.path.join(work, f"{name}_{digest}.pth")


class Search:
    """The candidates tried so far, and the two ways to add one: as it is, or fine-tuned from a parent."""

    def __init__(self, ctx, plan, finetune, finetune_key=None):
        """finetune_key: what `finetune` trains with besides its arguments (its recipe and loss), so that a
        candidate fine-tuned with other settings gets a checkpoint of its own."""
        self.ctx, self.plan, self.finetune = ctx, plan, finetune
        self.finetune_key = finetune_key or {}
        self.candidates = []

    def measure(self, name, model, int8_drops=None, **info):
        """`model` (any device; measured on a CPU copy) as a Candidate, measured like every other, not logged:
        what the search's candidates are compared with (the scratch control) is made this way too."""
        final = cpu_copy(model)
        return Candidate(measure_candidate(name, final, self.ctx, int8_drops, self.plan.max_float_layers, **info),
                         final, int8_drops)

    def add(self, name, model, int8_drops=None, **info):
        """Measure `model` as a candidate (measure) and log it."""
        self.candidates.append(self.measure(name, model, int8_drops, **info))
        return self.candidates[-1]

    def step(self, name, model, parent, epochs, made_from, **info):
        """Fine-tune `model`, pruned from the candidate `parent`, then measure it as a candidate."""
        made_from = {"source": weights_fingerprint(clean_state_dict(parent.model)), **made_from}
        path = candidate_path(self.ctx.work_dir, name, {**made_from, "epochs": epochs, **self.finetune_key})
        return self.add(name, self.finetune(name, path, model, epochs, made_from), parent.int8_drops, **info)


def structured_counts(student, curves, sizes, level, multiple):
    """Channels per coupled group (utils.prune.channel_groups: residual streams and blocks' inner channels) at
    pruning level `level`: the fraction of channels removed, averaged over the groups weighted by the weights each
    runs through (sizes: utils.prune.group_sizes), spread by sensitivity (utils.prune.allocate), rounded to a
    multiple of `multiple` (never above the group's width, never below `multiple`). A removable group
    (utils.prune.removable) gets 0, its block left out, only where the allocation gives it all of its channels:
    where leaving the block out costs no more than the level's threshold, not where rounding would."""
    ratios = allocate(curves, sizes, level)
    return {name: 0 if removable(name) and ratios[name] >= 1.0 else
            min(width, max(multiple, multiple * round(width * (1 - ratios[name]) / multiple)))
            for name, width in group_widths(student).items()}


@dataclass(frozen=True)
class PruneStep:
    """One step of a walk: the candidate's name, how it is pruned from the last candidate kept (model -> (pruned
    copy, what it was made from)), its fine-tuning epochs and what its log entry adds."""
    name: str
    prune: Callable
    epochs: int
    info: dict


def walk(search, start, steps):
    """The one walk over pruning steps: each step prunes the last candidate kept and is fine-tuned and measured,
    until one falls under the floor. Returns the last candidate within the budget (or `start`)."""
    current = start
    for step in steps:
        model, made_from = step.prune(current.model)
        cand = search.step(step.name, model, current, step.epochs, made_from, **step.info)
        if not cand.entry.within_budget:
            break
        current = cand
    return current


def structured_steps(plan, start, curves):
    """Channels of the residual streams and the blocks' insides removed at evenly spaced levels up to struct_max,
    each level's channels spread over the groups by their sensitivity (from the start's widths)."""
    steps, sizes = [], group_sizes(start.model)
    for k in range(1, plan.struct_steps + 1):
        level = plan.struct_max * k / plan.struct_steps
        counts = structured_counts(start.model, curves, sizes, level, plan.channel_multiple)
        steps.append(PruneStep(f"struct{k}", lambda model, counts=counts: (structured_prune(model, counts),
                                                                           {"channels": counts}),
                               plan.struct_epochs, {"kind": "structured", "level": level}))
    return steps


def agp_steps(plan, curves):
    """Gradual unstructured pruning on the cubic schedule to `sparsity`, per-layer ratios from the sensitivities;
    earlier zeros are folded in and kept (the ratios only grow)."""
    def prune_to(target):
        def prune(model):
            model = copy.deepcopy(model)
            sizes = {n: m.weight.numel() for n, m in prunable_layers(model).items()}
            ratios = allocate(curves, sizes, target)
            magnitude_masks(model, ratios)
            return model, {"ratios": ratios}
        return prune
    return [PruneStep(f"sparse{k}", prune_to(target), plan.agp_epochs, {"kind": "unstructured", "target": target})
            for k, target in enumerate(agp_schedule(plan.sparsity, plan.agp_steps), 1)]


def recovery(search, chosen):
    """The chosen pruned model fine-tuned final_epochs more with its zeros kept; it replaces the choice if it stays
    within the budget and is at least as accurate on validation."""
    model = copy.deepcopy(chosen.model)
    magnitude_masks(model, zero_fractions(model))  # masks exactly where the zeros are
    cand = search.step(f"{chosen.name}_ft", model, chosen, search.plan.final_epochs, {}, kind="recovery")
    better = cand.entry.within_budget and cand.entry.val_acc >= chosen.entry.val_acc
    return cand if better else chosen


def pick_student(search, students):
    """Each distilled student ({name: model}) measured as a candidate (plain INT8: its sensitivities are not known
    yet); the pick is the best by the objective within the budget, else the most accurate. Returns it."""
    first = len(search.candidates)
    for name, model in students.items():
        search.add(f"student_{arch_slug(name)}" if len(students) > 1 else "student", model, kind="student",
                   arch=name)
    picked, met = choose(search.candidates[first:], search.plan.objective)
    print(f"student: {picked.entry.arch} picked of {', '.join(students)} "
          f"({'within the budget' if met else 'none within the budget: the most accurate'})", flush=True)
    return picked


def run_search(search, student, sens):
    """From the picked student (a candidate of `search`, re-measured with its INT8 fallback), the structured walk,
    the AGP walk from the last structured model kept (not for OBJECTIVE=latency: zeros buy no time), the choice
    by the objective within the budget among all candidates, students included, then its recovery fine-tuning.
    sens: the student's Sensitivity (utils.sensitivity)."""
    t0, plan = time.time(), search.plan
    if not student.entry.within_budget and student.entry.float_val_acc >= search.ctx.floor and sens.int8:
        mixed = search.add(f"{student.name}_mixed", student.model, sens.int8, kind="student",
                           arch=student.entry.arch)
        if mixed.entry.float_layers:  # layers kept in float brought it within: the walks start from it
            student = mixed
        else:  # plain INT8 again, the same model as the student's entry: not logged twice
            search.candidates.remove(mixed)
    student.int8_drops = sens.int8
    kept = walk(search, student, structured_steps(plan, student, sens.structured))
    if plan.objective != "latency":
        walk(search, kept, agp_steps(plan, sens.unstructured))
    chosen, met = choose(search.candidates, plan.objective)
    if chosen.entry.kind != "student" and met and plan.final_epochs:
        chosen = recovery(search, chosen)
    return SearchResult(search.candidates, chosen, met, time.time() - t0)
