"""Training learns on every path it offers: bfloat16 autocast steps lower the loss as float32 steps do, every
step's forward pass runs on the weights of the step before, the teacher's targets stay float32, and the batches
of an epoch cost the device a fixed number of copies from the host, however many batches there are."""
import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import OPTIONS, assert_learns_as_the_plain_recipe, learnable_data, tiny_data, tiny_model
from utils.data import batches
from utils.device import autocast
from utils.measure import model_accuracy
from utils.train import Stage, TrainRecipe, cross_entropy_objective, distillation_objective, fit, teacher_outputs

RECIPE = dict(lr=0.05, epochs=1, batch_size=32, momentum=0.9, weight_decay=0.0, seed=0)


def step_losses(tmp_path, amp_dtype, loss=None, options=None):
    """Each step's loss of one epoch of `fit` (20 steps of 32 images) of tiny_model in `amp_dtype`, by `loss`
    (an objective; default cross-entropy), with the TrainRecipe fields of `options`."""
    loss = loss or (lambda model, batch: F.cross_entropy(model(batch.x), batch.y))
    losses = []

    def objective(model, batch):
        value = loss(model, batch)
        losses.append(value.item())
        return value
    fit(tiny_model(), objective, TrainRecipe(**RECIPE, amp_dtype=amp_dtype, **(options or {})), learnable_data(640),
        learnable_data(16, 1), Stage("student", "student", str(tmp_path / f"{amp_dtype}.pth"), "cpu"))
    return losses


def assert_learns_as_in_float32(tmp_path, loss=None, options=None):
    """Over one epoch the last five steps' mean loss falls below 0.4 of the first five's in float32 and in bf16,
    and bf16 ends within 0.25 of float32. An epoch-long autocast region ran every step on the epoch's first
    weights: its loss stayed where it started for the whole epoch (and rose over the next ones)."""
    ends = {}
    for dtype in ("float32", "bfloat16"):
        losses = step_losses(tmp_path / dtype, dtype, loss, options)
        first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
        assert last < 0.4 * first, f"{dtype}: loss {first:.3f} over the first steps, {last:.3f} over the last"
        ends[dtype] = last
    assert abs(ends["bfloat16"] - ends["float32"]) < 0.25, ends


def test_bf16_steps_lower_the_loss_as_float32_steps_do(tmp_path):
    assert_learns_as_in_float32(tmp_path)


@pytest.mark.parametrize("dkd_beta", [None, 8.0], ids=["kd", "dkd"])
def test_distillation_learns_in_bf16_as_in_float32(tmp_path, dkd_beta):
    """The KD loss (and DKD's) against a trained teacher run on every batch (TEACHER_VIEWS=0, the GPU profile's
    way)."""
    teacher = tiny_model()
    fit(teacher, cross_entropy_objective(0.0), TrainRecipe(**RECIPE), learnable_data(640), learnable_data(16, 1),
        Stage("baseline", "baseline", str(tmp_path / "teacher.pth"), "cpu"))
    assert_learns_as_in_float32(tmp_path, distillation_objective(teacher.eval(), 4.0, 0.5, flip=True,
                                                                 dkd_beta=dkd_beta))


@pytest.fixture(scope="module")
def plain_losses(tmp_path_factory):
    return step_losses(tmp_path_factory.mktemp("plain"), "float32")


@pytest.mark.parametrize("option", OPTIONS)
def test_each_recipe_option_learns_as_the_plain_recipe(tmp_path, option, plain_losses):
    assert_learns_as_the_plain_recipe(step_losses(tmp_path, "float32", options=OPTIONS[option]), plain_losses)


def test_the_recipe_options_together_learn_in_bf16_as_in_float32(tmp_path):
    assert_learns_as_in_float32(tmp_path, options=OPTIONS["bundle"])


def test_every_bf16_forward_pass_uses_the_weights_of_the_last_optimizer_step(tmp_path):
    """The stem's output on one fixed probe, computed inside each step's objective (under the training autocast),
    changes after every optimizer step: autocast's cached low-precision weights never outlive a step."""
    probe = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    seen = []

    def objective(model, batch):
        with torch.no_grad():
            seen.append(model.conv1(probe).float().clone())
        return F.cross_entropy(model(batch.x), batch.y)
    fit(tiny_model(), objective, TrainRecipe(**RECIPE, amp_dtype="bfloat16"), tiny_data(192), tiny_data(16, 1),
        Stage("student", "student", str(tmp_path / "s.pth"), "cpu"))
    assert len(seen) == 6
    assert all(not torch.equal(a, b) for a, b in zip(seen, seen[1:])), "a step ran on the weights of an earlier one"


def test_the_teacher_gives_float32_targets_inside_the_training_autocast():
    """Its logits equal those it gives outside any autocast: the teacher never runs in bf16, whatever the
    student trains in."""
    teacher, x = tiny_model().eval(), torch.rand(4, 3, 32, 32)
    plain = teacher_outputs(teacher, x, flip=True)
    with autocast("cpu", "bfloat16"):
        inside = teacher_outputs(teacher, x, flip=True)
    assert inside.dtype == torch.float32 and torch.equal(inside, plain)


class HostToDeviceCopies(TorchDispatchMode):
    """Counts the copies from CPU tensors to tensors of another device ('meta' stands in for a GPU here)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            source = args[1] if func is torch.ops.aten.copy_.default else args[0]
            target = out if isinstance(out, torch.Tensor) else args[0]
            if source.device.type == "cpu" and target.device.type != "cpu":
                self.count += 1
        return out


def epoch_copies(n, **kwargs):
    """The host-to-device copies of one training epoch's batches of 16 from n images already on the device."""
    x = torch.empty(n, 3, 32, 32, dtype=torch.uint8, device="meta")
    y = torch.empty(n, dtype=torch.int64, device="meta")
    with HostToDeviceCopies() as copies:
        for _ in batches(x, y, 16, "meta", shuffle=True, train=True, generator=torch.Generator().manual_seed(0),
                         channels_last=True, **kwargs):
            pass
    return copies.count


def test_an_epoch_copies_its_order_and_augmentation_to_the_device_once():
    """Drawn up front and copied once, not per batch: the same count for 2 batches as for 8, at most 2 (the
    order and the augmentation parameters), with fresh augmentations or fixed views."""
    assert epoch_copies(32) == epoch_copies(128) <= 2
    views = torch.zeros(3, 128, dtype=torch.int64)
    assert epoch_copies(32, view=(0, views[:, :32])) == epoch_copies(128, view=(0, views)) <= 2


def test_batches_draw_the_same_order_and_augmentations_as_drawn_batch_by_batch():
    """The epoch's random stream is used in the same order as before (the order, then each batch's crops and
    flips): the same seed gives the same batches as always, so the same weights."""
    from utils.data import apply_augment, augment_params
    x, y = tiny_data(40)
    got = list(batches(x, y, 16, "cpu", shuffle=True, train=True, generator=torch.Generator().manual_seed(3)))
    gen = torch.Generator().manual_seed(3)
    order = torch.randperm(40, generator=gen)
    for i, batch in enumerate(got):
        idx = order[16 * i:16 * i + 16]
        expected = apply_augment(x[idx].float().div(255), augment_params(16, gen))
        assert torch.equal(batch.idx, idx) and torch.equal(batch.y, y[idx]) and torch.equal(batch.x, expected)
    assert len(got) == 2


def test_a_bf16_run_records_the_float32_validation_accuracy_of_its_weights(tmp_path):
    """metrics.jsonl's val_accuracy of a bf16 stage is the exact float32 figure of the weights it saved, as the
    final figures are: one name, one precision."""
    model, val = tiny_model(), learnable_data(64, 1)
    fit(model, cross_entropy_objective(0.0), TrainRecipe(**RECIPE, amp_dtype="bfloat16"), learnable_data(640), val,
        Stage("student", "student", str(tmp_path / "s.pth"), "cpu"))
    record = json.loads(open(tmp_path / "metrics.jsonl").read().splitlines()[-1])
    assert record["val_accuracy"] == model_accuracy(model, val)
    with autocast("cpu", "bfloat16"):
        assert model_accuracy(model, val) == record["val_accuracy"]


def test_auto_trains_in_bf16_only_where_the_cpu_has_bf16_matrix_instructions(monkeypatch):
    """AMP_DTYPE=auto reads the CPU's flags: AMX or AVX-512 BF16 give bfloat16, any other CPU float32; a value
    asked for is kept."""
    from utils import device
    for flags, expected in (({"avx2", "amx_bf16", "amx_tile"}, "bfloat16"), ({"avx512f", "avx512_bf16"}, "bfloat16"),
                            ({"avx2", "avx512f"}, "float32")):
        monkeypatch.setattr(device, "cpu_flags", lambda: flags)
        assert device.resolve_amp_dtype("auto", "cpu")[0] == expected, flags
    assert device.resolve_amp_dtype("float32", "cpu") == ("float32", "as asked")
