"""Pieces checked one by one: the distillation loss, pruning through fine-tuning, checkpoints, flags.
The compression pieces (structured rebuild, sparse storage, budget logic) are in test_compression.py."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from utils.checkpoint import (Progress, clean_state_dict, load_checkpoint, load_model, weights_fingerprint,
                              write_checkpoint)
from utils.prune import magnitude_masks, make_pruning_permanent, prunable_layers, weight_sparsity
from utils.config import UserError, config_type, file_constants, parse_flags
from utils.data import Split, alternating_flips, apply_augment, augment_params, batches, fixed_views, remirrored
from utils.measure import accuracy_interval, paired_drop_bound, paired_drop_interval
from utils.models import ARCHS, ResNet, build_model, count_macs, parse_arch, whiten_stem
from utils.search import SearchContext
from conftest import tiny_data, tiny_model
from utils.train import (CrossEntropy, Lookahead, Stage, TrainRecipe, batchnorms, cross_entropy_objective,
                         decoupled_kl, distillation_objective, fit, kd_loss, sgd_one_cycle, teacher_logits, teacher_outputs)


def test_kd_loss_matches_hand_computation():
    s = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
    t = [[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]]
    y = [1, 2]
    T, alpha = 4.0, 0.7

    def softmax(v, temp=1.0):
        e = [math.exp(x / temp) for x in v]
        return [x / sum(e) for x in e]
    kl = sum(sum(pt * math.log(pt / ps) for pt, ps in zip(softmax(ti, T), softmax(si, T))) for si, ti in zip(s, t)) / 2
    ce = -sum(math.log(softmax(si)[yi]) for si, yi in zip(s, y)) / 2
    expected = alpha * T * T * kl + (1 - alpha) * ce
    got = kd_loss(torch.tensor(s), torch.tensor(t), torch.tensor(y), T, alpha)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_per_layer_pruning_is_exact_and_kept_through_finetuning(tmp_path):
    model = tiny_model()
    n = sum(m.weight.numel() for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    magnitude_masks(model, {name: 0.4 for name in prunable_layers(model)})
    expected = sum(round(0.4 * m.weight.numel()) for m in prunable_layers(model).values()) / n
    assert weight_sparsity(model) == expected
    zeros_before = {k: v == 0 for k, v in clean_state_dict(model).items() if k.endswith("weight") and v.dim() > 1}
    recipe = TrainRecipe(lr=0.05, epochs=2, batch_size=16, momentum=0.9, weight_decay=5e-4, seed=0)
    stage = Stage("pruned", "pruned", str(tmp_path / "p.pth"), "cpu")
    fit(model, cross_entropy_objective(0.0), recipe, tiny_data(), tiny_data(16, 1), stage)
    make_pruning_permanent(model)
    after = clean_state_dict(model)
    assert all(torch.equal(after[k] == 0, z) for k, z in zeros_before.items()), "fine-tuning changed the mask"
    assert weight_sparsity(model) == expected
    saved = load_model(load_checkpoint(str(tmp_path / "p.pth"), "pruned"), "p.pth")
    assert weight_sparsity(saved) == expected


def test_lookahead_pulls_towards_slow_weights_and_ends_on_them():
    model = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    lookahead = Lookahead(model, every=2, step=0, total=4)
    with torch.no_grad():
        model.weight += 1.0                      # what one optimizer step would do
    lookahead.after_step()                      # step 1: between syncs, nothing happens
    assert torch.equal(model.weight, torch.ones(1, 2))
    lookahead.after_step()                      # step 2: slow moves by 1 - 0.95**2 * (2/4)**3, fast follows
    expected = 1 - 0.95 ** 2 * 0.5 ** 3
    assert torch.allclose(model.weight, torch.full((1, 2), expected))
    with torch.no_grad():
        model.weight += 1.0
    lookahead.after_step(epoch_end=True)        # step 3: an epoch's end syncs too
    assert torch.allclose(model.weight, lookahead.slow[0]) and model.weight[0, 0] < expected + 1
    with torch.no_grad():
        model.weight += 5.0
    lookahead.after_step()                      # the last step discards the fast weights' last moves
    assert torch.equal(model.weight, lookahead.slow[0]) and model.weight[0, 0] < expected + 2


def test_training_with_lookahead_resumes_exactly(tmp_path):
    """Interrupted in its second epoch and run again, a Lookahead training ends with the same weights."""
    recipe = TrainRecipe(lr=0.05, epochs=3, batch_size=16, momentum=0.9, weight_decay=5e-4, seed=0, lookahead=3)
    objective = cross_entropy_objective(0.1)
    straight = tiny_model()
    fit(straight, objective, recipe, tiny_data(), tiny_data(16, 1),
        Stage("student", "s", str(tmp_path / "a.pth"), "cpu"))
    calls = []

    def crashing(model, batch):
        calls.append(1)
        if len(calls) == 6:                     # the second of the second epoch's 4 steps
            raise KeyboardInterrupt
        return objective(model, batch)
    stage = Stage("student", "s", str(tmp_path / "b.pth"), "cpu")
    with pytest.raises(KeyboardInterrupt):
        fit(tiny_model(), crashing, recipe, tiny_data(), tiny_data(16, 1), stage)
    resumed = tiny_model()
    progress = fit(resumed, objective, recipe, tiny_data(), tiny_data(16, 1), stage)
    assert progress.finished and [r["epoch"] for r in progress.history] == [1, 2, 3]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(straight.state_dict()["fc.weight"], tiny_model().state_dict()["fc.weight"])


def test_a_stage_finished_at_two_ranks_is_reused_at_one(tmp_path, capsys):
    """A finished checkpoint whose key holds the ranks it trained at (as those made before the rank count left the
    key did) is reused by one process, not refused or trained again."""
    recipe = TrainRecipe(lr=0.05, epochs=2, batch_size=16, momentum=0.9, weight_decay=5e-4, seed=0)
    stage = Stage("student", "s", str(tmp_path / "s.pth"), "cpu")
    fit(tiny_model(), cross_entropy_objective(0.0), recipe, tiny_data(), tiny_data(16, 1), stage)
    ckpt = torch.load(stage.path, weights_only=True)
    ckpt["resume_key"]["ranks"], ckpt["ranks"] = 2, 2
    torch.save(ckpt, stage.path)
    capsys.readouterr()
    progress = fit(tiny_model(), cross_entropy_objective(0.0), recipe, tiny_data(), tiny_data(16, 1), stage)
    assert progress.finished and "s: already trained" in capsys.readouterr().out


def test_checkpoint_round_trip_rebuilds_the_architecture(tmp_path):
    model = tiny_model().eval()
    path = str(tmp_path / "m.pth")
    write_checkpoint(path, {"stage": "student", "model": model.spec}, model, Progress(1, 1))
    loaded = load_model(load_checkpoint(path, "student"), path)
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(loaded(x), model(x))
    assert weights_fingerprint(loaded.state_dict()) == weights_fingerprint(model.state_dict())
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in torch.load(path, weights_only=True)["state_dict"])


@pytest.mark.parametrize("argv, message", [
    (["--NOPE=1"], "unknown constant --NOPE"),
    (["--EPOCHS=abc"], "--EPOCHS expects int"),
    (["--EPOCHS=1.5"], "--EPOCHS expects int"),
    (["--FLAG=1"], "--FLAG expects bool"),
    (["EPOCHS=3"], "unexpected argument"),
    (["--EPOCHS"], "needs a value"),
])
def test_bad_flags_are_errors(argv, message):
    with pytest.raises(UserError, match=message):
        parse_flags({"EPOCHS": 3, "LR": 0.1, "NAME": "x", "FLAG": True}, argv)


def test_flags_take_the_type_of_their_default():
    cfg = parse_flags({"EPOCHS": 3, "LR": 0.1, "NAME": "x", "FLAG": True},
                      ["--EPOCHS=5", "--LR", "1", "--NAME=a b", "--FLAG=False"])
    assert cfg == {"EPOCHS": 5, "LR": 1.0, "NAME": "a b", "FLAG": False}
    assert isinstance(cfg["LR"], float)
    # booleans also as the printed config writes them
    assert parse_flags({"FLAG": False}, ["--FLAG=true"]) == {"FLAG": True}
    assert parse_flags({"FLAG": True}, ["--FLAG=false"]) == {"FLAG": False}


def test_config_layers_defaults_profile_environment_flags(monkeypatch):
    from utils.config import resolve_config
    defaults = {"DATA_DIR": "data", "EPOCHS": 3, "ARCH": "a", "PROFILE": "auto", "DEVICE": "auto"}
    profiles = {"gpu": {"EPOCHS": 40, "ARCH": "b"}}
    monkeypatch.setenv("DATA_DIR", "/env/data")
    cpu = resolve_config(defaults, [], profiles, lambda d: "cpu")
    assert cpu == {**defaults, "DATA_DIR": "/env/data", "PROFILE": "cpu", "DEVICE": "cpu"}
    gpu = resolve_config(defaults, ["--EPOCHS=5"], profiles, lambda d: "cuda")
    assert (gpu["EPOCHS"], gpu["ARCH"], gpu["PROFILE"]) == (5, "b", "gpu")
    flagged = resolve_config(defaults, ["--DATA_DIR=/flag"], profiles, lambda d: "cpu")
    assert flagged["DATA_DIR"] == "/flag"


SCRIPT = """import os
from utils.train import METRICS_FILE
# ---
EPOCHS = 3        # passes
LR = 0.1
NAME = "x"
# ---
HELPER_FILE = "progress.json"
"""


def test_only_the_constants_block_makes_flags(tmp_path):
    (tmp_path / "script.py").write_text(SCRIPT)
    assert file_constants(str(tmp_path / "script.py")) == {"EPOCHS": 3, "LR": 0.1, "NAME": "x"}


def test_a_script_configuration_is_a_frozen_typed_dataclass(tmp_path):
    (tmp_path / "script.py").write_text(SCRIPT)
    config = config_type("Config", str(tmp_path / "script.py"))
    cfg = config(EPOCHS=5)
    assert (cfg.EPOCHS, cfg.LR, cfg.NAME) == (5, 0.1, "x")
    assert [(f.name, f.type) for f in dataclasses.fields(config)] == [("EPOCHS", int), ("LR", float), ("NAME", str)]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.EPOCHS = 1


def test_accuracy_interval_is_the_wilson_interval():
    lo, hi = accuracy_interval(torch.arange(100) < 50)  # 50 of 100
    assert (lo, hi) == (pytest.approx(40.38, abs=0.01), pytest.approx(59.62, abs=0.01))
    lo, hi = accuracy_interval(torch.ones(10, dtype=torch.bool))
    assert hi == pytest.approx(100.0) and 60 < lo < 75  # never past 100%, unlike the normal approximation


def test_paired_drop_interval_counts_only_disagreements_and_is_deterministic():
    base = torch.arange(1000) % 10 < 8  # 80%
    assert paired_drop_interval(base, base.clone()) == [0.0, 0.0]
    other = base.clone()
    other[:40] = ~other[:40]  # 40 images flipped: 32 right -> wrong, 8 wrong -> right: 2.4 points lower
    lo, hi = paired_drop_interval(base, other)
    assert lo < 2.4 < hi and hi - lo < 3.0
    assert paired_drop_interval(base, other) == [lo, hi]
    unpaired = 2 * 1.96 * (2 * 0.8 * 0.2 / 1000) ** 0.5 * 100  # width if the two were independent samples
    assert hi - lo < unpaired


def test_paired_drop_bound_is_one_sided_and_stricter_than_the_point_estimate():
    base = torch.arange(1000) % 10 < 8
    assert paired_drop_bound(base, base.clone()) == 0.0
    other = base.clone()
    other[:40] = ~other[:40]  # 2.4 points lower
    lo, hi = paired_drop_interval(base, other)
    assert 2.4 < paired_drop_bound(base, other) < hi  # above the point estimate, below the two-sided 97.5%


def test_search_judges_the_budget_by_the_paired_bound_not_the_point_estimate():
    base = torch.arange(1000) % 10 < 8
    ctx = SearchContext(val=None, base_correct=base, max_drop=0.5, quant=None, timing=None, x_latency=None,
                        work_dir="")
    noisy = base.clone()
    right, wrong = torch.nonzero(base).flatten(), torch.nonzero(~base).flatten()
    noisy[right[:40]] = False
    noisy[wrong[:37]] = True  # 40 lost, 37 gained: 0.3 points lower on these 1000 images
    acc, bound, within = ctx.judge(noisy)
    assert acc == pytest.approx(79.7) and acc >= ctx.floor  # the point estimate is inside the budget ...
    assert bound > 0.5 and not within  # ... but 77 disagreements are too few to be sure of it
    assert ctx.judge(base.clone()) == (80.0, 0.0, True)


def test_resnet20_is_the_cifar_resnet20_and_arch_specs_parse():
    model = ResNet(**parse_arch("resnet20"))
    assert sum(p.numel() for p in model.parameters()) == 272_474  # He et al.'s 0.27 M (with shortcut convs)
    assert model.stages == ["layer1", "layer2", "layer3"] and model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert parse_arch("cifar:16-32-64:3") == {**parse_arch("resnet20"), "widths": (16, 32, 64)}
    pooled = ResNet(**parse_arch("resnet18_pool"))  # the max-pool stem: 16x16 maps in layer1 on 32x32 input
    assert pooled.layer1(pooled.maxpool(pooled.conv1(torch.rand(1, 3, 32, 32)))).shape == (1, 64, 16, 16)
    rebuilt = build_model(model.spec)
    assert rebuilt.spec == model.spec
    for bad in ("resnet99", "cifar:16-32", "avgpool:16-32:1", "cifar:16-x:1", ""):
        with pytest.raises(ValueError):
            parse_arch(bad)


def test_cached_teacher_logits_are_the_teachers_on_the_fixed_views():
    teacher = tiny_model().eval()
    x, y = tiny_data(48)
    split = Split(x, y, ["a", "b", "c", "d"])
    views = fixed_views(48, 3, seed=5)
    assert torch.equal(views, fixed_views(48, 3, seed=5)) and not torch.equal(views[0], views[1])
    cached = teacher_logits(teacher, split, views, "cpu", batch_size=20)
    assert cached.shape == (3, 48, 4)
    gen = torch.Generator().manual_seed(0)
    batch = next(batches(x, y, 16, "cpu", shuffle=True, train=True, generator=gen, view=(2, views[2])))
    with torch.no_grad():
        assert torch.allclose(teacher(batch.x), cached[2, batch.idx], atol=1e-5)

    def no_teacher(_):
        raise AssertionError("the cached logits must be read, not the teacher run")
    student = tiny_model()
    loss = distillation_objective(no_teacher, 4.0, 0.9, cached)(student, batch)
    assert loss.item() == pytest.approx(kd_loss(student(batch.x), cached[2, batch.idx], batch.y, 4.0, 0.9).item())


def test_flipped_teacher_targets_are_the_mean_over_the_image_and_its_mirror():
    teacher = tiny_model().eval()
    x = tiny_data(8)[0].float() / 255
    with torch.no_grad():
        expected = (teacher(x) + teacher(x.flip(3))) / 2
    assert torch.allclose(teacher_outputs(teacher, x, flip=True), expected, atol=1e-6)
    assert not torch.allclose(teacher_outputs(teacher, x), expected, atol=1e-4)
    views = fixed_views(8, 2, seed=1)
    split = Split(tiny_data(8)[0], tiny_data(8)[1], ["a", "b", "c", "d"])
    assert not torch.allclose(teacher_logits(teacher, split, views, "cpu", flip=True),
                              teacher_logits(teacher, split, views, "cpu"), atol=1e-4)


def test_a_remirrored_view_keeps_its_crops_and_the_flipped_targets():
    # what lets a TEACHER_FLIP epoch mirror its own images: same crops, fresh flips, the same cached targets
    teacher = tiny_model().eval()
    x = tiny_data(64)[0].float() / 255
    view = fixed_views(64, 1, seed=3)[0]
    mirrored = remirrored(view, torch.Generator().manual_seed(7))
    assert torch.equal(mirrored[:2], view[:2]) and not torch.equal(mirrored[2], view[2])
    assert torch.equal(mirrored, remirrored(view, torch.Generator().manual_seed(7)))
    assert torch.allclose(teacher_outputs(teacher, apply_augment(x, view), flip=True),
                          teacher_outputs(teacher, apply_augment(x, mirrored), flip=True), atol=1e-5)


def test_alternating_flips_mirror_each_image_in_every_other_epoch():
    # a fixed random half in even epochs, the other half in odd ones; the crops of the seed stay as they were
    even, odd = alternating_flips(200, 5, 0), alternating_flips(200, 5, 1)
    assert torch.equal(even, alternating_flips(200, 5, 2)) and torch.equal(even ^ 1, odd)
    assert 80 < int(even.sum()) < 120 and not torch.equal(even, alternating_flips(200, 6, 0))
    x, y = tiny_data(32)
    flips = alternating_flips(32, 5, 0)
    got = list(batches(x, y, 16, "cpu", shuffle=True, train=True, generator=torch.Generator().manual_seed(1),
                       flips=flips))
    gen = torch.Generator().manual_seed(1)
    order = torch.randperm(32, generator=gen)
    for i, batch in enumerate(got):
        idx = order[16 * i:16 * i + 16]
        params = augment_params(16, gen)  # the seed's crops; its flips drawn, then replaced
        params[2] = flips[idx]
        assert torch.equal(batch.idx, idx) and torch.equal(batch.x, apply_augment(x[idx].float().div(255), params))
    view = fixed_views(32, 1, seed=2)[0]
    kept = view.clone()
    batch = next(batches(x, y, 32, "cpu", train=True, view=(0, view), flips=flips))
    assert torch.equal(view, kept)  # the view itself is not changed
    assert torch.equal(batch.x, apply_augment(x.float().div(255), torch.stack([view[0], view[1], flips])))


def test_batchnorm_momentum_and_frozen_scales_train_as_asked_and_leave_the_model_as_it_was(tmp_path):
    """BN_MOMENTUM sets the running statistics' momentum while training only (the same weights, other running
    statistics; the layers' own momentum back after); FREEZE_BN_WEIGHTS keeps the BN scales where they came in;
    BN_BIAS_LR puts the BN biases in a group of their own at that multiple of the learning rate."""
    trained = {}
    for name, options in (("plain", {}), ("fast", dict(bn_momentum=0.6)), ("frozen", dict(bn_weights_frozen=True))):
        model = tiny_model()
        recipe = TrainRecipe(lr=0.05, epochs=1, batch_size=16, momentum=0.9, weight_decay=0.0, seed=0, **options)
        fit(model, CrossEntropy(0.0), recipe, tiny_data(80), tiny_data(16, 1),
            Stage("student", name, str(tmp_path / f"{name}.pth"), "cpu"))
        assert {m.momentum for m in batchnorms(model)} == {0.1}
        trained[name] = model.state_dict()
    plain, fast, frozen, start = trained["plain"], trained["fast"], trained["frozen"], tiny_model().state_dict()
    assert all(torch.equal(plain[k], fast[k]) for k in plain if "running" not in k and "num_batches" not in k)
    assert not torch.allclose(plain["bn1.running_mean"], fast["bn1.running_mean"])
    scales = [k for k in start if k.endswith(".weight") and start[k].ndim == 1 and "bn" in k]
    assert scales and all(torch.equal(frozen[k], start[k]) for k in scales)
    assert not torch.equal(frozen["conv1.weight"], start["conv1.weight"])
    recipe = TrainRecipe(lr=0.05, epochs=2, batch_size=16, momentum=0.9, weight_decay=0.0, seed=0, bn_bias_lr=64.0)
    optimizer, scheduler = sgd_one_cycle(tiny_model(), recipe, 10)
    biases = {id(m.bias) for m in batchnorms(tiny_model())}
    assert len(optimizer.param_groups) == 3 and len(optimizer.param_groups[2]["params"]) == len(biases)
    for _ in range(12):
        lrs = [group["lr"] for group in optimizer.param_groups]
        assert lrs[0] == lrs[1] and math.isclose(lrs[2], 64 * lrs[0])
        optimizer.step()
        scheduler.step()


def test_macs_are_counted_from_the_shapes():
    # ResNet-20 by hand: stem 32*32*16*27; stage 1: six 16->16 3x3 convs at 32x32; stage 2: 16->32 at 16x16, five
    # 32->32, the 1x1 shortcut 16->32; stage 3 likewise at 8x8; the classifier 64*10
    by_hand = (1024 * 16 * 27 + 6 * 1024 * 16 * 144 + 256 * 32 * 144 + 5 * 256 * 32 * 288 + 256 * 32 * 16
               + 64 * 64 * 288 + 5 * 64 * 64 * 576 + 64 * 64 * 32 + 64 * 10)
    model = ResNet(**ARCHS["resnet20"]).train()
    assert count_macs(model) == by_hand
    assert model.training  # left as it was given
    narrower = ResNet(**ARCHS["resnet20"], mids=[8] * 9)
    assert count_macs(narrower) < by_hand


def test_whitened_stem_decorrelates_its_input_patches_and_is_frozen():
    torch.manual_seed(0)
    model = ResNet(**parse_arch("resnet18_s2"))
    before = model.conv1.weight.detach().clone()
    images = (torch.rand(64, 3, 32, 32) * 255).to(torch.uint8)
    whiten_stem(model, images)
    weight = model.conv1.weight
    assert not weight.requires_grad and torch.equal(weight[54:], before[54:])  # 27 components and their negatives
    assert torch.equal(weight[27:54], -weight[:27])
    x = (images.float() / 255 - model.mean) / model.std
    out = torch.nn.functional.conv2d(x, weight[:27], stride=2, padding=1).transpose(0, 1).flatten(1)
    cov = torch.cov(out.double())
    assert torch.allclose(cov, torch.eye(27, dtype=torch.float64), atol=1e-2)


def test_the_summary_says_when_the_choice_missed_the_budget():
    from evaluate_results import choice_summary
    search = {"chosen": "student", "candidates": [{}, {}], "objective": "balanced", "student": "resnet20",
              "max_acc_drop": 0.5, "budget_met": False}
    assert "NOT within MAX_ACC_DROP=0.5" in choice_summary(search)
    assert ", within MAX_ACC_DROP=0.5" in choice_summary({**search, "budget_met": True})


def test_decoupled_kl_adds_up_to_kd_kl():
    """DKD's split: per image, KL = TCKD + (1 - the teacher's target probability at T) * NCKD, so DKD with that
    weight in place of beta is KD."""
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=g) * 3, torch.randn(6, 5, generator=g) * 3
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    T = 2.0
    tckd, nckd = decoupled_kl(s, t, y, T)
    kl = F.kl_div(F.log_softmax(s / T, 1), F.log_softmax(t / T, 1), reduction="none", log_target=True).sum(1)
    p_target = F.softmax(t / T, 1).gather(1, y[:, None]).squeeze(1)
    assert torch.allclose(tckd + (1 - p_target) * nckd, kl, atol=1e-5)
    assert (tckd >= 0).all() and (nckd >= 0).all()
    assert decoupled_kl(t, t, y, T)[1].abs().max() < 1e-6  # no divergence from itself
    ce = F.cross_entropy(s, y)
    assert kd_loss(s, t, y, T, 0.5, dkd_beta=0.0).item() == pytest.approx((0.5 * T * T * tckd.mean() + 0.5 * ce).item())


def test_dkd_gradients_are_finite_where_the_teacher_is_sure():
    s = torch.tensor([[30.0, -30.0, 0.0]], requires_grad=True)
    t = torch.tensor([[50.0, -50.0, -50.0]])
    kd_loss(s, t, torch.tensor([0]), 4.0, 0.5, dkd_beta=8.0).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
