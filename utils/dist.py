"""Data parallelism: a script runs as one process per rank, started by torchrun or, from a plain start that asks
for more than one rank (RANKS), by PyTorch's own launcher (torch.distributed.run) with the same flags.

Rank 0 is the script: it reads the data, makes every decision, writes every file and does every measurement.
The other ranks are followers: they open the same data (rank 0 says where and how: `share_data`), then run each
job rank 0 sends them (`run_job`: a training stage, or a share of the teacher's logits) in step with it, and end
when rank 0's script does. A job is a picklable callable that every rank runs, so all ranks walk the same code.

Two channels join the ranks: jobs travel on a control channel (gloo, on the CPU) that waits as long as rank 0
works alone (exports, calibration, timing); a job's collectives run on the training channel (gloo on the CPU,
NCCL on GPUs), which gives up after RANK_TIMEOUT seconds. Each rank also beats a heartbeat into the launcher's
store: a rank that stops answering (stopped, hung, its machine gone) ends the run within RANK_TIMEOUT seconds with
one line naming it, and a rank whose launcher is gone ends within seconds.
With one rank nothing here runs: no process group, no threads, today's results bit for bit.
"""
import contextlib
import datetime
import inspect
import io
import logging
import os
import signal
import socket
import sys
import threading
import time
import warnings
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from .config import UserError, show_config
from .device import cores, resolve_amp_dtype, torch_threads

MIN_SHARE = 32  # images, at least, in each rank's share of a step under RANKS=auto on the CPU (BatchNorm's batch)
# How long a follower waits on the control channel for rank 0's next job: rank 0 may work alone for long (a
# search's exports, calibrations and timings), and a rank that stops is caught by the heartbeats, not by this
CONTROL_WAIT = datetime.timedelta(hours=24)
BEAT_S = 1.0  # seconds between a rank's heartbeats (and its checks of the others' and of its launcher)


@dataclass(frozen=True)
class Layout:
    """How a run is laid out, built once (`data_parallel`): this process's rank among `world` ranks (`local_rank`
    of the `local_world` on its machine), the device it trains on, the machine's cores it may use and the threads
    each rank trains with. Rank 0 is the writer: it decides, writes and measures."""
    rank: int = 0
    local_rank: int = 0
    world: int = 1
    local_world: int = 1
    device: str = "cpu"
    cores: int = 1
    threads: int = 1

    @property
    def writer(self):
        return self.rank == 0

    def describe(self):
        return (f"{self.world} rank(s) x {self.threads} thread(s) on {self.cores} core(s)"
                + (f", {dist.get_backend()}" if dist.is_initialized() else ""))


_layout = Layout()  # this process's, once data_parallel has built it (the collectives below read it)
_control = None     # the control channel's process group (gloo)
_jobs = 0           # > 0 while this rank runs a job: the collectives below run only then
_heartbeat = None   # this rank's Heartbeat thread


def started_by_launcher():
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def launched_layout(device="cpu"):
    """This process's Layout as torchrun's variables describe it (one rank when no launcher started it): the one
    place that reads them."""
    env = os.environ if started_by_launcher() else {}
    world = int(env.get("WORLD_SIZE", 1))
    return Layout(rank=int(env.get("RANK", 0)), local_rank=int(env.get("LOCAL_RANK", 0)), world=world,
                  local_world=int(env.get("LOCAL_WORLD_SIZE", world)), device=device, cores=cores(),
                  threads=torch.get_num_threads())


def plan_ranks(text, device, n_cores, batch):
    """(ranks, threads per rank) for RANKS `text` and a global batch of `batch` images. auto: on CUDA a rank per
    GPU; on the CPU the layout that puts the most cores to work with at most one rank per MIN_SHARE images of a
    step (BatchNorm normalises each rank's share alone), ties going to more ranks (single-thread ranks trained
    faster than threads: the README's layout table), each rank getting an equal number of the cores as threads."""
    if text == "auto":
        if device == "cuda":
            ranks = max(1, torch.cuda.device_count())
        else:
            most = max(1, min(n_cores, batch // MIN_SHARE))
            ranks = max(range(1, most + 1), key=lambda r: (r * (n_cores // r), r))
    elif text.isdigit() and int(text) >= 1:
        ranks = int(text)
    else:
        raise UserError(f"--RANKS must be auto or a number of processes (1 or more), got {text!r}")
    if ranks > batch:
        raise UserError(f"BATCH_SIZE={batch} gives no image to some of {ranks} ranks: use a larger BATCH_SIZE or "
                        f"--RANKS={batch} at most")
    return ranks, max(1, n_cores // ranks)


def world():
    return dist.get_world_size() if dist.is_initialized() else 1


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def launch(script, argv, ranks, threads):
    """Run `script` with `argv` as `ranks` processes of `threads` threads each through torch.distributed.run
    (torchrun --standalone); returns the exit status: 0, or that of the rank that said what went wrong (its one
    line printed), else that of the first rank that failed, after the launcher has ended the other ranks."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run
    os.environ["OMP_NUM_THREADS"] = str(threads)
    for name in [n for n in logging.root.manager.loggerDict if n.startswith("torch.distributed.elastic")] + [
            "torch.distributed.elastic"]:  # the ranks say what went wrong (each module's logger has its own level)
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        run(parse_args(["--standalone", f"--nproc_per_node={ranks}", "--monitor-interval=0.5", script, *argv]))
        return 0
    except SignalException as e:  # Ctrl-C or `kill`: the launcher has passed the signal on to the ranks
        if e.sigval != signal.SIGINT:  # rank 0 says so after a Ctrl-C (utils.config.run_cli)
            print(f"interrupted ({e.sigval.name}): rerun the same command to resume from the last finished epoch",
                  file=sys.stderr)
        return 130
    except ChildFailedError as e:
        failures = sorted(e.failures.values(), key=lambda f: f.timestamp)
        said = [f for f in failures if f.exitcode > 0]  # a rank that exits with a status said why
        if said:
            return said[0].exitcode
        print(f"error: rank {failures[0].local_rank} ended by signal {-failures[0].exitcode}; the other ranks were "
              f"stopped (rerun the same command to resume)", file=sys.stderr)
        return 1


def data_parallel(cfg, script, argv, train_batch):
    """The run's layout from cfg.RANKS: (cfg with RANKS and AMP_DTYPE resolved, Layout), the config printed by
    rank 0; None in a plain start that launched the ranks (they did the work; a failure exits with the failed
    rank's status). train_batch: the global batch, split among the ranks as evenly as it goes."""
    if started_by_launcher():  # the launcher set the ranks and each one's threads (OMP_NUM_THREADS)
        ranks, threads = launched_layout().world, torch.get_num_threads()
    else:
        ranks, threads = plan_ranks(cfg.RANKS, cfg.DEVICE, cores(), train_batch)
    if ranks > 1 and not started_by_launcher():
        status = launch(script, argv, ranks, threads)
        if status:
            sys.exit(status)
        return None
    layout = replace(launched_layout(cfg.DEVICE), threads=threads)
    if ranks > 1:
        join(layout, cfg.RANK_TIMEOUT)
    amp_dtype, why = resolve_amp_dtype(cfg.AMP_DTYPE, cfg.DEVICE)  # after join: asked of this rank's own GPU
    cfg = replace(cfg, RANKS=str(ranks), AMP_DTYPE=amp_dtype)
    if layout.writer:
        show_config(os.path.splitext(os.path.basename(script))[0], cfg)
        print(f"layout: {layout.describe()}; training in {amp_dtype} ({why}), every accuracy in float32", flush=True)
        if ranks > 1 and train_batch % ranks:
            size = train_batch // ranks
            print(f"layout: each step's {train_batch} images split {size + 1} or {size} a rank, each rank's loss "
                  f"weighted by its share", flush=True)
    else:
        sys.stdout = open(os.devnull, "w")  # followers print nothing; their errors still reach stderr
        signal.signal(signal.SIGINT, lambda *_: sys.exit(130))  # and end quietly on Ctrl-C: rank 0 says it
    return cfg, layout


def join(layout, rank_timeout):
    """Join torchrun's process group (NCCL with this rank's GPU set first, so that no rank opens a context on
    another's; gloo on the CPU), open the control channel, and start the heartbeats (`Heartbeat`), which end the run
    when a rank stops answering for `rank_timeout` seconds."""
    global _layout, _control, _heartbeat
    if layout.device == "cuda":
        torch.cuda.set_device(layout.local_rank)
    # a rank that stops answering is named by the heartbeats after rank_timeout; a collective gives up later, for a
    # rank that still beats but never joins it
    dist.init_process_group("nccl" if layout.device == "cuda" else "gloo",
                            timeout=datetime.timedelta(seconds=2 * rank_timeout))
    _control = dist.new_group(backend="gloo", timeout=CONTROL_WAIT)
    _layout = layout
    _heartbeat = Heartbeat(layout, rank_timeout)
    _heartbeat.start()


class Heartbeat(threading.Thread):
    """Every BEAT_S seconds: count this rank's heartbeat up in the launcher's store, end this process when its
    launcher is gone (a rank must not train on without it, holding OUT_DIR's lock), and look at every rank's count:
    when one has not moved for `timeout` seconds, the lowest rank still beating says so in one line, kills the
    silent ranks of its own machine, and every rank still beating ends (exit status 2 for the one that spoke)."""

    def __init__(self, layout, timeout):
        super().__init__(name="heartbeat", daemon=True)
        self.layout, self.timeout, self.parent = layout, timeout, os.getppid()
        self.stopped = threading.Event()
        self.store = dist.distributed_c10d._get_default_store()
        self.store.set(f"rank/{layout.rank}", f"{socket.gethostname()} {os.getpid()}")

    def run(self):
        seen = {}  # rank -> (its last count, when it last moved)
        while not self.stopped.wait(BEAT_S):
            if os.getppid() != self.parent:  # rank 0 says so; every rank ends
                self.end(1, "the launcher of this run ended, and its ranks with it (rerun the same command to resume "
                            "from the last finished epoch)" if self.layout.writer else None)
            now = time.monotonic()
            try:
                self.store.add(f"beat/{self.layout.rank}", 1)
                counts = [self.store.add(f"beat/{r}", 0) for r in range(self.layout.world)]
            except Exception:  # the store is out of reach: what went wrong shows elsewhere first
                continue
            for r, count in enumerate(counts):
                if seen.get(r, (None,))[0] != count:
                    seen[r] = (count, now)
            silent = [r for r in range(self.layout.world) if now - seen[r][1] > self.timeout]
            if silent:
                self.silent(silent)

    def silent(self, ranks):
        speaker = min(set(range(self.layout.world)) - set(ranks))
        if self.layout.rank != speaker:  # the launcher ends this rank once the speaker has ended
            time.sleep(10 * BEAT_S)
            self.end(1)
        where = []
        for r in ranks:
            host, pid = self.store.get(f"rank/{r}").decode().split()
            where.append(f"rank {r} (pid {pid} on {host})")
            if host == socket.gethostname():
                with contextlib.suppress(OSError):
                    os.kill(int(pid), signal.SIGKILL)
        self.end(2, f"{', '.join(where)} stopped answering for {self.timeout:.0f} s (RANK_TIMEOUT); the run was "
                    f"ended (rerun the same command to resume from the last finished epoch)")

    @staticmethod
    def end(status, message=None):
        if message:  # on a line of its own, after any progress bar
            print(f"\nerror: {message}", file=sys.stderr, flush=True)
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        os._exit(status)


def peer_left(error):
    """Whether `error` is a collective that failed because another rank's process ended or stopped answering."""
    return isinstance(error, dist.DistError) or (isinstance(error, RuntimeError) and any(
        words in str(error) for words in ("Connection closed by peer", "Connection reset by peer", "Timed out")))


@contextlib.contextmanager
def ranks_working(layout):
    """Rank 0's block: every core for its own work (each rank trains with layout.threads), and the followers
    released when it ends (after an error of its own, torchrun ends them). A follower that ended first (it said
    why) ends this rank with one line."""
    if layout.world == 1:
        yield
        return
    try:
        with torch_threads(layout.cores):
            yield
        send(None)
    except Exception as e:
        if peer_left(e):
            raise UserError("another rank of this run ended (its message above says why); rerun the same command "
                            "to resume") from None
        raise
    finished()


def finished():
    """Leave the process group, every collective done (a rank that ended while another still talked to it
    aborted at exit)."""
    dist.barrier(group=_control)
    _heartbeat.stopped.set()
    _heartbeat.join()
    dist.destroy_process_group()


def send(obj):
    """Rank 0's object to every rank over the control channel, returned on every rank: pickled by torch.save, its
    tensors loaded on the CPU (a model is moved to each rank's own device by whoever trains it)."""
    if rank() == 0:
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        payload = torch.frombuffer(bytearray(buffer.getbuffer()), dtype=torch.uint8)
        size = torch.tensor([payload.numel()], dtype=torch.int64)
    else:
        size = torch.zeros(1, dtype=torch.int64)
    dist.broadcast(size, src=0, group=_control)
    if rank() != 0:
        payload = torch.empty(int(size.item()), dtype=torch.uint8)
    dist.broadcast(payload, src=0, group=_control)
    if rank() == 0:
        return obj
    return torch.load(io.BytesIO(payload.numpy().tobytes()), map_location="cpu", weights_only=False)


def share_data(source):
    """Where and how every rank opens the data (rank 0's `source`, small: a folder, a cache, a split's seed), on
    every rank: nothing as large as a split travels between the ranks."""
    return source if world() == 1 else send(source)


@contextlib.contextmanager
def in_job():
    global _jobs
    _jobs += 1
    try:
        yield
    finally:
        _jobs -= 1


def run_job(job, *args):
    """Run `job(*args)` on every rank: rank 0 sends it, the followers (in `follow`) run it with their own args;
    rank 0 with the followers' thread count (it has every core for its own work)."""
    if world() == 1:
        return job(*args)
    send(job)
    with torch_threads(_layout.threads), in_job():
        return job(*args)


def follow(prepare):
    """A follower's script: receive where the data is (`share_data`), open it with `prepare(source)` (a tuple of
    the job's arguments), then run each job rank 0 sends (`run_job`) with them until it sends None. When rank 0
    ended first (it said why), this rank ends quietly."""
    try:
        args = prepare(send(None))
        while (job := send(None)) is not None:
            with in_job():
                job(*args)
        finished()
    except Exception as e:
        if peer_left(e):
            sys.exit(1)
        raise


def training_threads():
    """Threads a rank trains with: the layout's under data parallelism, else this process's."""
    return _layout.threads if world() > 1 else torch.get_num_threads()


def _collective(name):
    """A collective helper may run only where every rank runs it: inside a job (run_job, follow)."""
    if not _jobs:
        raise RuntimeError(f"{name} runs on every rank at once: call it inside a job (utils.dist.run_job), not on "
                           f"rank 0 alone")


def wire_device():
    """Where tensors of a training collective must lie: this rank's GPU under NCCL, else the CPU."""
    return f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"


def all_sum(values):
    """The sum over ranks of a list of numbers (float64), as floats."""
    if world() == 1:
        return [float(v) for v in values]
    _collective("all_sum")
    t = torch.tensor(values, dtype=torch.float64, device=wire_device())
    dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def average_batchnorm(model):
    """BatchNorm's running statistics averaged over the ranks, so that each rank, and the checkpoint rank 0 writes,
    holds the same model (BatchNorm normalised each rank's share by itself); no other buffer changes."""
    if world() == 1:
        return
    _collective("average_batchnorm")
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            for buf in (module.running_mean, module.running_var):
                dist.all_reduce(buf)
                buf.div_(world())


def split_evenly(n, part, parts):
    """Part `part` of `parts` contiguous shares of n items, as even as they go (the first take one more where n
    does not divide): a slice of range(n)."""
    size, extra = divmod(n, parts)
    start = part * size + min(part, extra)
    return slice(start, start + size + (part < extra))


def shard(n):
    """This rank's contiguous share of n items (split_evenly)."""
    return split_evenly(n, rank(), world())


def all_gather_cat(t, dim=0):
    """Every rank's CPU tensor `t` (each rank's share, in rank order) joined along `dim`, on every rank."""
    if world() == 1:
        return t
    _collective("all_gather_cat")
    parts = [None] * world()
    dist.all_gather_object(parts, t)
    return torch.cat(parts, dim=dim)


def data_parallel_model(model, device):
    """`model` wrapped for data-parallel training: gradients averaged over the ranks in buckets during backward.
    Each rank keeps its own BatchNorm statistics while an epoch runs (average_batchnorm joins them after it)."""
    from torch.nn.parallel import DistributedDataParallel
    ids = [torch.cuda.current_device()] if torch.device(device).type == "cuda" else None
    # no buffer sync at each forward pass (torch 2.14 renamed the switch; 2.11 knows the old name only)
    sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
            else "broadcast_buffers")
    # a 1x1 convolution's weight is both contiguous and channels-last: its gradient may take the other layout than
    # its bucket, which DDP copies at no loss (and warns of, as a possible slowdown)
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    return DistributedDataParallel(model, device_ids=ids, **{sync: False})
