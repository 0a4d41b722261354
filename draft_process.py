"""draft_process.py: the mechanism behind saguaro.py's draft process. No ideas here, only plumbing.

saguaro.py runs the draft in a second process beside the target, joined by a private
torch.distributed process group of two (`Link`: gloo on CPUs and on one GPU, NCCL between two
GPUs), never the default group: under torchrun that one belongs to the target's tensor-parallel
ranks (tp.py), and rank 0 alone talks to the draft. This file starts and stops that process,
decides who gets which CPU cores, carries messages both ways, and turns every way of losing the
draft (it died, it hangs, it never started) into one state of the worker: `worker.lost`.
On a CPU the target's cores are lent to the draft while the target waits for an answer
(`_borrow`), and the draft's q' reaches the target through shared memory (`new_slab`).

What crosses, as small typed records (one `send`/`recv` pair packs and unpacks them all):

    target -> draft   Start    the prompts and the sampling settings: the draft prefills its cache
    target -> draft   Sync     after the target's prefill; answered once the draft's is done too
    target -> draft   Round    the outcome (k, t) per row, the backup and fan-outs to use (and
                               the fast backup's speculation, when it serves the misses)
    draft  -> target  Answer   per row: where the next speculation came from, y_1..y_K, q'
                               (and the draft's timeline, when recording: timeline.py)
    target -> draft   End      the generation is over;  Shutdown: the process exits

The draft side's logic is a class handed in by reference (`DraftWorker.side`, saguaro's
DraftSide): this module never imports saguaro.py. It calls, in the draft process,

    state = side(draft, start)       on Start
    reply = state.answer(round)      on Round: the Answer, sent at once
    state.work()                     then, while the target verifies: the next cache
"""
import atexit
import contextlib
import dataclasses
import datetime
import functools
import math
import os
import pickle
import signal
import socket
import threading
import time
import traceback
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import kernels
import timeline
from harness import StartFailed, check_seconds
from speculative import check_draft


# ----------------------------------------------------------------------------------------------
# 1) messages: typed records, one pack/unpack pair

@dataclasses.dataclass
class Start:
    prompts: list          # B lists of token ids
    K: int
    vocab: int             # ids both models share: q' is cut to these
    max_len: int           # the draft cache's length (trunk + the tree's scratch slots)
    temperature: float
    top_k: int | None
    top_p: float | None
    c: float               # Saguaro's C
    seed: int
    race_vocab: int = 0    # the target's vocabulary if the bonus is a shared race (0: it is not)
    trace: bool = False    # record the draft's spans (timeline.py): set by exchange()
    time_widths: tuple = ()  # tree widths (branches per row) to time once, before the first answer


@dataclasses.dataclass
class Round:
    k: torch.Tensor        # (B,) accepted tokens of the last verify; -1 before the first round
    t: torch.Tensor        # (B,) the bonus token it emitted
    live: torch.Tensor     # (B,) bool: rows still generating
    backup: str            # "jit" or "fast": who serves a miss this round
    fan_hit: list          # F_0..F_K for caches built after a hit
    fan_miss: list         # ... after a miss
    fast: torch.Tensor = None  # (B, K) the fast backup's speculation, for the rows that miss
    c: float = None        # Saguaro's C for this round's drafting (None: the Start's)
    shadow: bool = False   # send the plain q of the answer too (measure.learn_c's shadow of C)


HIT, JIT, FAST = 0, 1, 2   # Answer.source: where a row's next speculation comes from


@dataclasses.dataclass
class Answer:
    source: torch.Tensor   # (B,) HIT (the cache), JIT or FAST (a backup)
    tokens: torch.Tensor   # (B, K) the next speculation y
    rank: torch.Tensor = None  # (B,) rank of the true bonus among the draft's guesses, -1: unknown
    probs: torch.Tensor = None  # (B, K, V) the q' each y was drawn from; None at temperature 0
    build_s: float = 0.0   # seconds: the build that made this round's cache, the JIT, the glue
    jit_s: float = 0.0
    glue_s: float = 0.0
    forwards: int = 0      # draft forwards of this round: the answer's, the build's after it
    spans: list = None     # the draft's timeline since its last answer, when recording
    width: int = 0         # branches per row of the build that made this round's cache
    tree_s: dict = None    # width -> seconds of one tree step: the Start's time_widths, timed
    q_plain: torch.Tensor = None  # (B, K, V) the draft's q before C, when the Round asked
    ready_at: float = 0.0  # time.perf_counter() when the draft began waiting for this Round


@dataclasses.dataclass
class Sync:
    pass


@dataclasses.dataclass
class End:
    pass


@dataclasses.dataclass
class Shutdown:
    pass


class DraftLost(RuntimeError):
    """The draft process died or did not answer in time."""


class Link:
    """The two processes' own channel: a process group of two built on the worker's store (a
    PrefixStore keeps its keys apart), with no default group involved. rank: 0 the target, 1
    the draft; `device`: where tensors travel (the GPU for NCCL, else the CPU); `timeout`: what
    a wait without its own bound waits for. slab: shared memory (new_slab) both processes map,
    through which the draft's large tensors (q') reach the target on a CPU link; None: all
    through the group."""

    def __init__(self, store, rank, backend, device, timeout, slab=None):
        self.rank, self.slab = rank, slab
        store = dist.PrefixStore("link", store)
        if backend == "nccl":  # between two GPUs (not run on this project's CPU machines)
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self.group = dist.ProcessGroupNCCL(store, rank, 2, options)
        else:
            self.group = dist.ProcessGroupGloo(store, rank, 2, timeout)
        self.peer, self.device = 1 - rank, torch.device(device)

    def close(self):
        self.group.shutdown()


HEADER = 4096    # bytes of a record's first transfer: every Round and greedy Answer fits in it
RAW = 4096       # a tensor of more elements travels as it is, after the header (q' rows)
SLAB = 64 << 20  # bytes of shared memory for the draft's answers (pages used only when written)


def new_slab(nbytes=SLAB) -> torch.Tensor:
    """Shared memory for a Link on the CPU: (nbytes,) uint8, handed to the draft process when it
    is spawned (torch passes its file descriptor; no file is left behind). Its pages are taken
    only as they are written: q' at b = 8, K = 4 and 49152 tokens uses 6.3 MB of it. Through
    gloo (TCP on one machine) those bytes cost the waiting target ~2.5 ms a round, a copy in
    and a copy out ~0.2 ms."""
    return torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(nbytes))


@dataclasses.dataclass
class _Raw:             # in a header: "this field's tensor follows as a transfer of its own"
    shape: tuple
    dtype: torch.dtype


@dataclasses.dataclass
class _Shared:          # in a header: "this field's tensor lies in the link's slab, at offset"
    offset: int
    shape: tuple
    dtype: torch.dtype


@dataclasses.dataclass
class _Small:           # in a header: a small CPU tensor as its bytes (pickling a tensor itself
    shape: tuple        # costs ~0.1 ms, a record's few of them ~1 ms a round trip)
    dtype: torch.dtype
    data: bytes

    @classmethod
    def of(cls, t: torch.Tensor):
        t = t.detach().cpu().contiguous()
        return cls(tuple(t.shape), t.dtype, t.reshape(-1).view(torch.uint8).numpy().tobytes())

    def tensor(self) -> torch.Tensor:
        if not self.data:
            return torch.empty(self.shape, dtype=self.dtype)
        flat = torch.frombuffer(bytearray(self.data), dtype=torch.uint8)
        return flat.view(self.dtype).reshape(self.shape)


def send(msg, link, timeout_s=None):
    """One record to the peer in as few transfers as possible, since each costs the waiting
    peer a wake-up: the record pickled into one fixed-size transfer (length first; a longer
    pickle's rest follows), then each tensor of more than RAW elements as it is, on
    link.device (small ones ride in the pickle, on the CPU); from the draft, with a slab, the
    large ones are copied into the slab instead (the target copies them out at once, before it
    answers: the next record cannot overwrite them), as long as they fit."""
    fields, tensors, offset = {}, [], 0
    for f in dataclasses.fields(msg):
        value = getattr(msg, f.name)
        big = isinstance(value, torch.Tensor) and value.numel() > RAW
        nbytes = value.numel() * value.element_size() if big else 0
        if big and link.rank == 1 and link.slab is not None and offset + nbytes <= len(link.slab):
            link.slab[offset: offset + nbytes].view(value.dtype).view(value.shape).copy_(value)
            fields[f.name] = _Shared(offset, tuple(value.shape), value.dtype)
            offset += -(-nbytes // 64) * 64  # aligned for any dtype's view
        elif big:
            fields[f.name] = _Raw(tuple(value.shape), value.dtype)
            tensors.append(value.to(link.device).contiguous())
        else:
            fields[f.name] = _Small.of(value) if isinstance(value, torch.Tensor) else value
    data = pickle.dumps((type(msg).__name__, fields))
    data = len(data).to_bytes(8, "little") + data
    head = torch.zeros(HEADER, dtype=torch.uint8)
    head[: min(len(data), HEADER)] = torch.frombuffer(bytearray(data[:HEADER]), dtype=torch.uint8)
    if len(data) > HEADER:  # a long record (a Start with long prompts): the rest follows
        tensors.insert(0, torch.frombuffer(bytearray(data[HEADER:]), dtype=torch.uint8))
    for x in [head] + tensors:
        _wait(link, "send", x.to(link.device), timeout_s)


def recv(link, timeout_s=None):
    """The next record from the peer (timeout_s None: the link's own timeout)."""
    head = torch.zeros(HEADER, dtype=torch.uint8, device=link.device)
    _wait(link, "recv", head, timeout_s)
    data = head.cpu().numpy().tobytes()
    size = int.from_bytes(data[:8], "little") + 8
    if size > HEADER:
        rest = torch.zeros(size - HEADER, dtype=torch.uint8, device=link.device)
        _wait(link, "recv", rest, timeout_s)
        data += rest.cpu().numpy().tobytes()
    name, fields = pickle.loads(data[8:size])
    for key, value in fields.items():
        if isinstance(value, _Small):
            fields[key] = value.tensor()
        elif isinstance(value, _Raw):
            fields[key] = torch.zeros(value.shape, dtype=value.dtype, device=link.device)
            _wait(link, "recv", fields[key], timeout_s)
        elif isinstance(value, _Shared):
            nbytes = math.prod(value.shape) * value.dtype.itemsize
            part = link.slab[value.offset: value.offset + nbytes]
            fields[key] = part.view(value.dtype).view(value.shape).to(link.device, copy=True)
    return globals()[name](**fields)


def _wait(link, send_or_recv, tensor, timeout_s):
    """One point-to-point transfer, waited for; a timeout or a peer gone becomes DraftLost."""
    try:
        work = getattr(link.group, send_or_recv)([tensor], link.peer, 0)  # tag 0: in order
        if timeout_s is None:
            work.wait()
        else:
            work.wait(datetime.timedelta(seconds=timeout_s))
    except RuntimeError as e:  # gloo says "[file.cc:78] Timed out waiting 2000ms for recv ..."
        raise DraftLost(str(e).strip().split("] ", 1)[-1].split(". ")[0][:120]) from None


# ----------------------------------------------------------------------------------------------
# 2) limits and cores

def split_threads(threads=None):
    """The one decision of who gets which CPU cores: (target threads, draft threads), half and
    half of `threads` (default: the cores this process may use), the target's half first."""
    total = threads or len(os.sched_getaffinity(0))
    target = max(1, total // 2)
    return target, max(1, total - target)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------------
# 3) the worker, seen from the target

_LIVE = set()                           # started workers, closed at exit


class DraftWorker:
    """The draft process, seen from the target. Start it once, use it for many generations.
    draft: a name for drafts.load_draft (resolved in the process, from the target's weights),
    a picklable factory returning a kernels.Model, or a kernels.Model (pickled across).
    device: the draft's (default: the target's). threads: the draft's CPU threads (default:
    split_threads' share); on a CPU the two processes are pinned to disjoint cores, and
    `target_cpus` says which are the target's. timeout_s bounds every wait for an answer,
    load_timeout_s the start and the first answer after each Start (the draft reads the prompts
    first: a long prompt's prefill can outlast timeout_s). Raises ValueError on a draft that
    cannot serve, harness.StartFailed (a RuntimeError) when the process dies or times out while
    starting (and leaves nothing running)."""
    side = None  # the draft side's class (saguaro.DraftSide), run inside the process

    def __init__(self, draft, target, *, device=None, threads=None, timeout_s=10.0,
                 load_timeout_s=300.0):
        if self.side is None:
            raise TypeError("draft_process.DraftWorker is saguaro's plumbing without its draft "
                            "side: start saguaro.DraftWorker(draft, target) instead.")
        if draft is None:
            raise ValueError("saguaro needs a draft: a drafts.py name ('default'), a model "
                             "folder, a factory returning a kernels.Model, or a kernels.Model.")
        if isinstance(draft, kernels.Model):
            check_draft(target, draft, 1)  # one vocabulary, checked before a process starts
        if hasattr(draft, "propose") or (isinstance(draft, str) and draft == "ngram"):
            raise ValueError("saguaro's draft process needs a neural draft (a kernels.Model, its "
                             "name, or a factory): a model-free proposer cannot fill a speculation "
                             "cache. It serves as the fast backup (--backup fast) instead.")
        self.timeout_s = check_seconds("timeout_s (--timeout)", timeout_s)
        self.load_timeout_s = check_seconds("load_timeout_s", load_timeout_s)
        tdev = target.device
        ddev = kernels.resolve_device(device) if device else tdev
        if tdev.type != ddev.type:
            raise ValueError("target and draft on different device types: put both on CUDA "
                             "(NCCL between two GPUs) or both on the CPU (gloo).")
        # NCCL refuses two ranks on one GPU ("Duplicate GPU detected"): one GPU talks via gloo
        two_gpus = tdev.type == "cuda" and (tdev.index or 0) != (ddev.index or 0)
        self.backend = "nccl" if two_gpus else "gloo"
        self.rounds, self.process, self.link, self.prefilling = 0, None, None, False
        self.in_session, self.lost = False, None
        self.estimates = {}  # what the loop learned, per setting, kept across its calls
        # on a CPU each process gets its own cores, pinned: left free, the two processes (which
        # wake each other every round) get placed on one core by the scheduler, half speed each
        cpus = sorted(os.sched_getaffinity(0))
        threads = threads or (split_threads()[1] if ddev.type == "cpu" else None)
        draft_cpus, self.target_cpus = None, None
        if ddev.type == "cpu" and tdev.type == "cpu" and threads < len(cpus):
            draft_cpus, self.target_cpus = cpus[-threads:], cpus[:-threads]
        # the rendezvous store is ours: we wait for the draft process to join it while
        # watching that process, so one that dies while starting is reported at once
        self.store = dist.TCPStore("127.0.0.1", _free_port(), 2, True, wait_for_workers=False,
                                   timeout=datetime.timedelta(seconds=60))
        target_ref = (getattr(target, "path", None), str(target.dtype).split(".")[-1])
        slab = None if two_gpus else new_slab()
        self.process = mp.get_context("spawn").Process(
            target=_serve, daemon=True, name="saguaro-draft",
            args=(self.side, draft, target_ref, str(ddev), threads, draft_cpus, self.target_cpus,
                  self.backend, self.store.port, os.getpid(), slab))
        self.process.start()
        self.started = time.monotonic()
        _LIVE.add(self)
        try:
            deadline = time.monotonic() + self.load_timeout_s
            self._await("joined", deadline, "connect")
            self.link = Link(self.store, 0, self.backend, tdev if two_gpus else "cpu",
                             datetime.timedelta(seconds=60), slab)
            self._await("ready", deadline, "load its draft")  # maybe after a kernel build
            ready = self.store.get("ready").decode()
            if ready.startswith("bad input: "):  # a name or folder that is no draft: one line
                raise ValueError(f"the draft process could not load draft {draft!r}: "
                                 f"{ready.removeprefix('bad input: ')}")
            if ready.startswith("error"):
                raise StartFailed("the draft process could not load its draft (its traceback "
                                   "is printed above).")
            self.vocab_size, self.max_positions = map(int, ready.split())  # V, its context
            if self.vocab_size != target.cfg.vocab_size and target.tokenizer is None:
                raise ValueError(f"target and draft have vocabularies of {target.cfg.vocab_size} "
                                 f"and {self.vocab_size} tokens and no tokenizer to show they "
                                 "share ids.")
        except BaseException:
            self.close()
            raise

    def _await(self, key, deadline, what):
        """Wait for the draft process to set `key` in the store, polling (not blocking in C++),
        so that Ctrl-C, the process dying and the deadline are each noticed at once."""
        while not self.store.check([key]):
            if not self.process.is_alive():
                code = self.process.exitcode
                if code is not None and code < 0:  # a signal: it printed nothing
                    raise StartFailed(f"the draft process was killed by signal {-code} "
                                       f"({signal.Signals(-code).name}) before it could {what}; "
                                       "start the run again.")
                raise StartFailed(
                    f"the draft process exited (code {code}) before it could {what}; its error "
                    "is printed above. Processes are spawned, so a script that starts saguaro "
                    "must do it under `if __name__ == '__main__':`.")
            if time.monotonic() > deadline:
                raise StartFailed(f"the draft process (pid {self.process.pid}, still running) "
                                   f"did not {what} within {deadline - self.started:.0f} s: "
                                   "stopped, or far too slow on a busy machine.")
            time.sleep(0.02)

    def reset(self):
        """Forget what the loop learned over earlier calls (saguaro: a, r, hit rates, latencies).
        A seed reproduces a call on a fresh or reset worker (saguaro's backup jit or fast; auto
        also follows measured latencies); after other calls the rules start elsewhere: the same
        law, other coins."""
        self.estimates.clear()

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    def exchange(self, msg):
        """Send `msg`; for a Round, return the Answer (for a Sync, the Sync). The one place where
        the draft is lost: if it died or does not answer within timeout_s (load_timeout_s after
        a Start), warn once, stop it, set `lost` (why) and return None: the caller replays the
        round. Every later call returns at once, a Round sent to the fast backup with the
        stand-in answer of a draft that is gone (every row FAST: the speculation the Round
        carries). The target goes on alone."""
        if self.lost is None and not self.alive:
            self._lose("was not running" if not self.in_session else "exited")
            return None
        if self.lost is not None:
            if isinstance(msg, Start):  # a lost worker passed again
                _warn(f"was not running (lost earlier: {self.lost})")
            served = isinstance(msg, Round) and msg.backup == "fast"
            return Answer(torch.full_like(msg.k, FAST), msg.fast) if served else None
        if isinstance(msg, Start):
            msg.trace = timeline.recording()  # the draft records when this process does
        # the answer after a Start (the Sync) waits for the draft's prefill of the prompts too
        wait = self.load_timeout_s if self.prefilling else self.timeout_s
        try:
            send(msg, self.link, wait)
            self.in_session, self.prefilling = not isinstance(msg, End), isinstance(msg, Start)
            if isinstance(msg, (Sync, Round)):
                self.rounds += isinstance(msg, Round)
                answer = recv(self.link, wait)
                if isinstance(answer, Answer):  # one clock: they line up with this process's
                    timeline.extend(answer.spans)
                return answer
        except DraftLost as e:
            self._lose(f"stopped answering ({e})")
        return None

    def _lose(self, reason):
        with contextlib.suppress(Exception):  # the draft's own error, if it died of one
            if self.store.check(["died"]):
                reason += f"; the draft process raised {self.store.get('died').decode()}"
        self.lost = reason
        _warn(reason)
        self.close()

    def close(self, reason=None):
        """Stop the draft process (politely, then by force) and close the link. Never raises
        and always unregisters, so a new DraftWorker can start after any failure. reason: why,
        when the worker is stopped before its time (kept in `lost`, which a later call on this
        worker reports, instead of mistaking the stopped process for one that exited)."""
        if reason is not None and self.lost is None:
            self.lost = reason
        p, self.process = self.process, None
        link, self.link = self.link, None
        try:
            if p is not None:
                if p.is_alive() and link is not None and not self.in_session:
                    try:
                        send(Shutdown(), link, 1.0)
                    except DraftLost:
                        pass
                    p.join(2.0)
                # a lost draft may be stopped or hung: SIGTERM would wait on it, so kill it
                for stop in (p.kill,) if self.lost else (p.terminate, p.kill):
                    if p.is_alive():
                        stop()
                        p.join(5.0)
                if p.is_alive():
                    warnings.warn(f"saguaro: the draft process {p.pid} survived SIGKILL for 5 s; "
                                  "left behind.", RuntimeWarning, stacklevel=2)
        finally:
            self.in_session = False  # no process, no session: a later Start begins afresh
            _close_link(link)
            _LIVE.discard(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _warn(reason):
    warnings.warn(f"saguaro: the draft process {reason}; finishing on the target alone (the "
                  "output's law is unchanged, and at temperature 0 its tokens; only speed "
                  "drops).", RuntimeWarning, stacklevel=4)


def _close_link(link):
    """Close the link, which can raise after the peer was lost mid-message (gloo's pending
    work): warn and go on; the worker is gone either way."""
    if link is not None:
        try:
            link.close()
        except Exception as e:  # noqa: BLE001 -- any teardown error leaves the same state
            warnings.warn(f"saguaro: closing the draft link raised {type(e).__name__}: {e}",
                          RuntimeWarning, stacklevel=3)


@atexit.register
def _close_all():
    for worker in list(_LIVE):
        worker.close()


def beside(worker_class, check):
    """A decorator for a loop whose draft runs in a worker process (saguaro.generate): the loop
    always gets a running worker as `draft`. The caller passes one (reused across calls) or what
    worker_class takes: then a worker is started for this call, once check(target, prompt_ids,
    max_new_tokens, **settings) has passed, and stopped after it. Process options, taken here:
    draft_device, draft_threads, timeout_s (for a worker started here) and target_threads. The
    loop runs on the target's cores; a loop that raises leaves its worker out of step, so the
    worker is stopped."""
    def wrap(loop):
        @functools.wraps(loop)
        def run(target, prompt_ids, max_new_tokens, *, draft=None, target_threads=None,
                draft_threads=None, draft_device=None, timeout_s=10.0, **settings):
            check(target, prompt_ids, max_new_tokens, **settings)
            check_seconds("timeout_s", timeout_s)
            own = not isinstance(draft, worker_class)
            worker = worker_class(draft, target, device=draft_device, threads=draft_threads,
                                  timeout_s=timeout_s) if own else draft
            threads, cpus = torch.get_num_threads(), os.sched_getaffinity(0)
            try:
                kernels.set_threads(target_threads)
                if worker.target_cpus:  # this thread on the target's cores (the draft: the rest)
                    os.sched_setaffinity(0, worker.target_cpus)
                return loop(target, prompt_ids, max_new_tokens, draft=worker, **settings)
            except BaseException as e:
                worker.close(f"was stopped when a call raised {type(e).__name__}")
                raise
            finally:
                if own:
                    worker.close()
                torch.set_num_threads(threads)
                os.sched_setaffinity(0, cpus)
        return run
    return wrap


# ----------------------------------------------------------------------------------------------
# 4) the draft process

def load_draft(spec, target_ref, device):
    """What DraftWorker's `draft` names -> a kernels.Model on `device` (in the draft process)."""
    if isinstance(spec, str):  # drafts.py builds its drafts from the target's weights
        path, dtype = target_ref
        target = kernels.load_model(path or "default", str(device), dtype)
        import drafts
        model = drafts.load_draft(spec, target)
    elif callable(spec) and not isinstance(spec, torch.nn.Module):
        model = spec()
    else:
        model = spec
    if hasattr(model, "propose") or not hasattr(model, "new_cache"):
        raise ValueError(f"draft {spec!r} is not a neural draft (kernels.Model).")
    return model.to(device)


def _exit_with_parent(parent_pid):
    """The draft process's watchdog: once the target's process is gone, leave (no orphans)."""
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os._exit(0)


def _serve(side, spec, target_ref, device, threads, cpus, lent, backend, port, parent_pid,
           slab=None):
    """The draft process: load the draft, then serve generations until Shutdown. cpus: its own
    cores; lent: the target's (borrowed while the target waits: _borrow); slab: the Link's."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C belongs to the target: it closes us
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    store = dist.TCPStore("127.0.0.1", port, 2, False, timeout=datetime.timedelta(seconds=60))
    store.set("joined", "1")
    link = Link(store, 1, backend, dev if backend == "nccl" else "cpu",
                datetime.timedelta(days=7), slab)  # idle between runs is fine
    if cpus:  # this thread, and torch's compute threads, which inherit it, on the draft's
        # cores; the link's I/O threads, started above, may run on any core: pinned beside a
        # busy compute thread each of their wake-ups waited for a time slice (ms per message)
        os.sched_setaffinity(0, cpus)
    kernels.set_threads(threads)
    wide = _borrow(lent) if cpus and lent else None
    try:
        draft = load_draft(spec, target_ref, dev)
        store.set("ready", f"{draft.cfg.vocab_size} {draft.cfg.max_positions}")
    except (ValueError, OSError) as e:  # bad input (no such draft): the target says it
        store.set("ready", f"bad input: {e}")
        return
    except Exception:
        traceback.print_exc()
        store.set("ready", "error")
        return
    try:
        _answer_rounds(side, draft, link, wide)
    except DraftLost:  # the target is gone or closed the link: no one to tell, no traceback
        return
    except Exception as e:  # told to the target, which warns with it (DraftWorker._lose)
        with contextlib.suppress(Exception):  # unless the target is gone too
            store.set("died", f"{type(e).__name__}: {e}")
        raise
    link.close()


def _borrow(lent):
    """Start torch's compute threads for the target's cores `lent`, which the draft borrows
    while the target waits for its answer (a JIT backup: K draft steps with the target idle):
    pinned there at SCHED_IDLE, they run only while the target's own thread is blocked (an
    OpenMP thread spins a while after its last task; at normal priority that spin would take
    its time from the verify that follows). Returns the thread count of an answer (None: no
    thread could be made idle there, nothing is borrowed); the calling thread keeps its own
    cores, and the draft's work between answers its own count."""
    own = torch.get_num_threads()
    torch.ones(1 << 22).add_(1)  # a parallel region this large starts the pool's threads:
    before = set(os.listdir("/proc/self/task"))  # first the draft's own (a team reuses them
    torch.set_num_threads(own + len(lent))       # in order), then those for the lent cores
    torch.ones(1 << 22).add_(1)
    torch.set_num_threads(own)
    idle = 0
    for tid in set(os.listdir("/proc/self/task")) - before:
        try:  # idle first: a thread that cannot be made idle stays on the draft's cores
            os.sched_setscheduler(int(tid), os.SCHED_IDLE, os.sched_param(0))
            os.sched_setaffinity(int(tid), lent)
            idle += 1
        except OSError:  # gone already (not the pool's), or not allowed here: no borrowing
            pass
    return own + len(lent) if idle >= len(lent) else None


def _answer_rounds(side, draft, link, wide=None):
    """The draft process's loop: one reply per record until Shutdown; the answer on `wide`
    threads when given (_borrow), the work after it on the process's own."""
    state, idle, own = None, time.perf_counter(), torch.get_num_threads()
    with torch.inference_mode():
        while not isinstance(msg := recv(link), Shutdown):
            if isinstance(msg, Round):  # stamped first: it ends before the answer's span starts
                timeline.span("wait for target", idle, "draft")
            tick = time.perf_counter()
            if isinstance(msg, Start):
                timeline.start() if msg.trace else timeline.stop()
                state = side(draft, msg)
                timeline.span("prefill", tick, "draft")
            elif isinstance(msg, End):
                state = None
            elif isinstance(msg, Sync):  # sent after the target's prefill: ours is done too
                send(msg, link)
            else:
                torch.set_num_threads(wide or own)
                reply = state.answer(msg)  # at once: the target is waiting
                torch.set_num_threads(own)
                reply.spans, reply.ready_at = timeline.take(), idle
                send(reply, link)
                timeline.span("answer", tick, "draft")  # shipped with the next answer
                state.work()           # then the next cache, while the target verifies
            idle = time.perf_counter()
