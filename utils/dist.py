"""Data parallelism: a script runs as one process per rank, started by torchrun or, from a plain start that asks
for more than one rank (RANKS), by PyTorch's own launcher (torch.distributed.run) with the same flags.

Rank 0 is the script: it reads the data, makes every decision, writes every file and does every measurement.
The other ranks are followers: they receive the training splits once (`share_splits`), then run each job rank 0
sends them (`run_job`: a training stage, or a share of the teacher's logits) in step with it, and end when
rank 0's script does. A job is a picklable callable that every rank runs, so all ranks walk the same code.
With one rank nothing here runs: no process group, no copies, today's results bit for bit.
"""
import contextlib
import datetime
import inspect
import io
import logging
import os
import signal
import sys
import warnings
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from .config import UserError, show_config
from .device import resolve_amp_dtype, torch_threads

# How long a follower waits for rank 0's next job, which may follow the longest step rank 0 does alone (an ONNX
# export, calibration and timing of a candidate: minutes); a rank that dies ends the run at once (torchrun).
WAIT = datetime.timedelta(minutes=60)


@dataclass(frozen=True)
class Layout:
    """How a run is laid out: ranks (processes), threads per rank, cores of this machine, this process's rank."""
    ranks: int
    threads: int
    cores: int
    rank: int = 0

    @property
    def writer(self):
        return self.rank == 0

    def describe(self):
        return (f"{self.ranks} rank(s) x {self.threads} thread(s) on {self.cores} core(s)"
                + (f", {dist.get_backend()}" if dist.is_initialized() else ""))


def cores():
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def started_by_launcher():
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def resolve_ranks(text, device):
    """RANKS as a number: 'auto' is a rank per core on the CPU (single-thread ranks trained as fast as one process
    with every core, or faster: the README's table of layouts) and a rank per GPU on CUDA."""
    if text == "auto":
        return max(1, torch.cuda.device_count() if device == "cuda" else cores())
    if not text.isdigit() or int(text) < 1:
        raise UserError(f"--RANKS must be auto or a number of processes (1 or more), got {text!r}")
    return int(text)


def world():
    return dist.get_world_size() if dist.is_initialized() else 1


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def launch(script, argv, ranks, threads):
    """Run `script` with `argv` as `ranks` processes of `threads` threads each through torch.distributed.run
    (torchrun --standalone); returns the exit status: 0, or that of the first rank that failed (each rank prints
    its own one-line error), after the launcher has ended the other ranks."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run
    os.environ["OMP_NUM_THREADS"] = str(threads)
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # the ranks say what went wrong
    try:
        run(parse_args(["--standalone", f"--nproc_per_node={ranks}", "--monitor-interval=0.5", script, *argv]))
        return 0
    except SignalException as e:  # Ctrl-C or `kill`: the launcher has passed the signal on to the ranks
        if e.sigval != signal.SIGINT:  # rank 0 says so after a Ctrl-C (utils.config.run_cli)
            print(f"interrupted ({e.sigval.name}): rerun the same command to resume from the last finished epoch",
                  file=sys.stderr)
        return 130
    except ChildFailedError as e:
        first = min(e.failures.values(), key=lambda f: f.timestamp)
        if first.exitcode < 0:  # killed by a signal: no rank could say why
            print(f"error: rank {first.local_rank} ended by signal {-first.exitcode}; the other ranks were stopped "
                  f"(rerun the same command to resume)", file=sys.stderr)
        return first.exitcode if first.exitcode > 0 else 1


def data_parallel(cfg, script, argv, train_batch=None):
    """The run's layout from cfg.RANKS: (cfg with RANKS and AMP_DTYPE resolved, Layout), the config printed by
    rank 0; None in a plain start that launched the ranks (they did the work; a failure exits with the failed
    rank's status). train_batch: the global batch, which the ranks must divide."""
    ranks = int(os.environ["WORLD_SIZE"]) if started_by_launcher() else resolve_ranks(cfg.RANKS, cfg.DEVICE)
    if train_batch is not None and train_batch % ranks:
        raise UserError(f"BATCH_SIZE={train_batch} does not split into {ranks} equal shares: use a multiple of "
                        f"{ranks}, or --RANKS with a divisor of it")
    if ranks > 1 and not started_by_launcher():
        status = launch(script, argv, ranks, max(1, cores() // ranks))
        if status:
            sys.exit(status)
        return None
    amp_dtype, why = resolve_amp_dtype(cfg.AMP_DTYPE, cfg.DEVICE)
    cfg = replace(cfg, RANKS=str(ranks), AMP_DTYPE=amp_dtype)
    layout = Layout(ranks, torch.get_num_threads(), cores(), int(os.environ.get("RANK", 0)))
    if ranks > 1:
        join(cfg.DEVICE)
        layout = replace(layout, rank=dist.get_rank())
    if layout.writer:
        show_config(os.path.splitext(os.path.basename(script))[0], cfg)
        print(f"layout: {layout.describe()}; training in {amp_dtype} ({why}), every accuracy in float32", flush=True)
    else:
        sys.stdout = open(os.devnull, "w")  # followers print nothing; their errors still reach stderr
    return cfg, layout


def join(device):
    """Join torchrun's process group: NCCL with one GPU a rank on CUDA, gloo on the CPU."""
    if device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=WAIT)


def peer_left(error):
    """Whether `error` is a collective that failed because another rank's process ended."""
    return isinstance(error, dist.DistError) or (isinstance(error, RuntimeError) and any(
        words in str(error) for words in ("Connection closed by peer", "Connection reset by peer")))


@contextlib.contextmanager
def ranks_working(layout):
    """Rank 0's block: every core for its own work (torchrun gives each rank one thread), and the followers
    released when it ends (after an error of its own, torchrun ends them). A follower that ended first (it
    said why) ends this rank with one line."""
    if layout.ranks == 1:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(layout.cores)
    try:
        yield
        send(None)
    except Exception as e:
        if peer_left(e):
            raise UserError("another rank of this run ended (its message above says why); rerun the same command "
                            "to resume") from None
        raise
    finally:
        torch.set_num_threads(before)
    dist.destroy_process_group()


def follower(work, *args):
    """A follower's script: `work(*args)`; when rank 0 ends first (it says why), this rank ends quietly."""
    try:
        return work(*args)
    except Exception as e:
        if peer_left(e):
            sys.exit(1)
        raise


def wire_device():
    """Where tensors of a collective must lie: this rank's GPU under NCCL, else the CPU."""
    return f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"


def send(obj):
    """Rank 0's object to every rank, returned on every rank: pickled by torch.save, its tensors loaded on the CPU
    (a model is moved to each rank's own device by whoever trains it)."""
    device = wire_device()
    if rank() == 0:
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        payload = torch.frombuffer(bytearray(buffer.getbuffer()), dtype=torch.uint8).to(device)
        size = torch.tensor([payload.numel()], dtype=torch.int64, device=device)
    else:
        size = torch.zeros(1, dtype=torch.int64, device=device)
    dist.broadcast(size, src=0)
    if rank() != 0:
        payload = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    dist.broadcast(payload, src=0)
    if rank() == 0:
        return obj
    return torch.load(io.BytesIO(payload.cpu().numpy().tobytes()), map_location="cpu", weights_only=False)


def share_splits(splits):
    """Rank 0's training splits to every rank, once per script (the followers decode nothing)."""
    return splits if world() == 1 else send(splits)


def run_job(job, *args):
    """Run `job(*args)` on every rank: rank 0 sends it, the followers (in `follow`) run it with their own args;
    rank 0 with the followers' thread count (it has every core for its own work)."""
    if world() == 1:
        return job(*args)
    send(job)
    with torch_threads(training_threads()):
        return job(*args)


def follow(share):
    """A follower's script: receive the training splits (`share_splits`), pass them through `share` (e.g. onto
    the device), then run each job rank 0 sends (`run_job`) with them until it sends None."""
    def serve():
        splits = share(*send(None))
        while (job := send(None)) is not None:
            job(*splits)
        dist.destroy_process_group()
    return follower(serve)


def training_threads():
    """Threads a rank trains with: torchrun's one (OMP_NUM_THREADS) under data parallelism, else this process's."""
    return int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())) if world() > 1 else torch.get_num_threads()


def all_sum(values):
    """The sum over ranks of a list of numbers (float64), as floats."""
    if world() == 1:
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=wire_device())
    dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def average_buffers(model):
    """Every floating-point buffer (BatchNorm's running statistics) averaged over the ranks, so that each rank, and
    the checkpoint rank 0 writes, holds the same model; BatchNorm normalised each rank's share by itself."""
    if world() == 1:
        return
    for buf in model.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf)
            buf.div_(world())


def shard(n):
    """This rank's contiguous share of n items: a slice (the first ranks take one more where n does not divide)."""
    size, extra = divmod(n, world())
    start = rank() * size + min(rank(), extra)
    return slice(start, start + size + (rank() < extra))


def all_gather_cat(t, dim=0):
    """Every rank's CPU tensor `t` (each rank's share, in rank order) joined along `dim`, on every rank."""
    if world() == 1:
        return t
    parts = [None] * world()
    dist.all_gather_object(parts, t)
    return torch.cat(parts, dim=dim)


def data_parallel_model(model, device):
    """`model` wrapped for data-parallel training: gradients averaged over the ranks in buckets during backward.
    Each rank keeps its own BatchNorm statistics while an epoch runs (average_buffers joins them after it)."""
    from torch.nn.parallel import DistributedDataParallel
    ids = [torch.cuda.current_device()] if torch.device(device).type == "cuda" else None
    # no buffer sync at each forward pass (torch 2.14 renamed the switch; 2.11 knows the old name only)
    sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
            else "broadcast_buffers")
    # a 1x1 convolution's weight is both contiguous and channels-last: its gradient may take the other layout than
    # its bucket, which DDP copies at no loss (and warns of, as a possible slowdown)
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    return DistributedDataParallel(model, device_ids=ids, **{sync: False})
