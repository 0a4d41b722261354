"""saguaro.py: Saguaro, the optimized SSD: the draft really runs beside the target.

ssd.py shows the idea step by step on one device: while the target verifies speculation s, the
draft prepares the next speculation for the outcomes v = (k, t) it predicts, so a cache hit
costs no drafting time. New in this file (Kumar, Dao, May 2026, Sec. 4):

1. The async draft stream. Target and draft are two processes joined by torch.distributed (gloo
   on CPU, NCCL between two GPUs). Each round the target sends the outcome (k, t) per row; the
   draft answers at once from its speculation cache (hit: K tokens and the q rows to verify them)
   or with a backup, then builds the next cache WHILE the target verifies. Each process keeps
   its own model and KV cache: only tokens and q rows cross, never KV. On a CPU each process
   is pinned to its own cores: it only pays if the build (the glue + K tree steps) fits in one
   verify, so on a small CPU keep the tree small (our 2-core CPU: K = 3, one branch, budget
   B = 1). After a hit the glue costs one token, not K + 1: the hit branch already computed the
   rest (reuse_branch).
2. Geometric fan-out (Thm. 12). With acceptance a, P(k) = a^k (1-a) for k < K and a^K for k = K;
   with the miss curve 1 - p_hit(F) = F^-r, the budget B = sum_k F_k is best spent as
   F_k ~ P(k)^(1/(1+r)): F_k = F_0 a^(k/(1+r)) for k < K, F_K = F_0 a^(K/(1+r)) (1-a)^(-1/(1+r)).
   a and r are measured online (kept across the calls on one DraftWorker with the same
   settings); one schedule applies after a hit, one after a miss.
3. Saguaro sampling (Def. 14). The draft samples from q', its q with the top-(F+1) tokens scaled
   by C in [0, 1] and renormalized: the residual max(0, p - q') then lands on the tokens the
   cache bet on more often. Exact, because verification divides by the same q'.
4. Batch-aware fallback (Sec. 4.3). A miss is served by the JIT backup (the draft decodes K
   tokens now: good acceptance, costs time) or the fast backup (n-gram lookup: ~free, weaker).
   A batch waits if any row misses, P(all hit) = p_hit^b, so past a critical batch size b* the
   fast backup wins; b* comes from the speed model below and the measured a, p_hit, latencies.
   A miss served by the fast backup also hands the NEXT lookup a cache built over a weak
   speculation, which hits at its own rate p_f: if the draft's caches hit at p_d, in the long
   run a share p_f / (1 - p_d + p_f) of lookups hit, the p_hit the rule puts in for fast.
5. The speed model (Thm. 7), times in units of one target verify, E = tokens per round:
   speedup = [p_hit E_hit + (1-p_hit) E_miss] / [p_hit max(1, T_p) + (1-p_hit)(1 + T_b)].
6. Faults: if the draft process dies or stops answering, the target finishes on its own with
   the fast backup, after a warning; no token is lost or repeated (the target owns all state).

Notation as in the README glossary: p target, q draft, K draft tokens per round, (k, t) outcome,
F_k fan-out, B budget per row, C Saguaro factor, r miss-curve exponent, a acceptance, b batch.

    python saguaro.py --prompt "Write a haiku about cacti." --draft default --k 4 --f 3 \\
        --fan-out geometric --saguaro-c 1.0 --backup auto --target-device cpu --draft-device cpu
    python saguaro.py --prompt "Write a haiku about cacti." --k 1 --f 1   # a 2-core CPU
"""
import argparse
import atexit
import datetime
import math
import os
import signal
import socket
import threading
import time
import traceback
import warnings
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import harness
import kernels
import ssd
from speculative import check_draft, emit, one_hot, pad_vocab, verify

# ----------------------------------------------------------------------------------------------
# The new ideas, part 1: where the cache budget goes, and how the draft samples

def largest_remainder(weights, total: int) -> list:
    """Integers >= 0 proportional to `weights` that sum to exactly `total`: floor every share,
    then give the leftover units to the largest fractional parts (ties: lower k first)."""
    s = sum(weights)
    shares = [total * w / s for w in weights]
    ints = [math.floor(x) for x in shares]
    order = sorted(range(len(shares)), key=lambda i: (ints[i] - shares[i], i))
    for i in order[: total - sum(ints)]:
        ints[i] += 1
    return ints


def geometric_fan_out(budget: int, K: int, a: float, r: float) -> list:
    """Thm. 12: F_0..F_K for a budget of `budget` guesses per row. Maximizing
    sum_k P(k) p_hit(F_k) with p_hit(F) = 1 - F^-r under sum_k F_k = B gives F_k ~ P(k)^(1/(1+r)),
    P(k) = a^k (1-a) (k < K), a^K (k = K). At a -> 0 every guess goes to k = 0, at a -> 1 to
    k = K; a large r (a steep miss curve: few guesses already hit) flattens the schedule."""
    if budget < 1 or K < 1 or r <= 0 or not 0 <= a <= 1:
        raise ValueError(f"geometric fan-out needs budget >= 1, K >= 1, r > 0 and a in [0, 1]; "
                         f"got budget={budget}, K={K}, r={r}, a={a}.")
    if a <= 0 or a >= 1:  # the limits: all outcomes are k = 0, or all are k = K
        return [budget] + [0] * K if a <= 0 else [0] * K + [budget]
    e = 1.0 / (1.0 + r)
    weights = [a ** (k * e) for k in range(K)] + [a ** (K * e) * (1 - a) ** -e]
    return largest_remainder(weights, budget)


def uniform_fan_out(budget: int, K: int) -> list:
    """The same number of guesses for every k (ssd.py's F), rounded to sum to the budget."""
    return largest_remainder([1.0] * (K + 1), budget)


def saguaro_probs(logits, temperature, top_k, top_p, c: float, f: int):
    """Def. 14: q' = q with its top-(f+1) tokens (ranked by logits, as ssd.predict_outcomes ranks
    them) scaled by c, renormalized. logits (..., V) -> q' (..., V). The cache bets on the top-f
    tokens other than the one drafted, so f+1 covers them whichever token is drafted. At
    temperature 0 q is one-hot on the top token and q' = q; if c = 0 leaves no mass, q' = q."""
    q = kernels.probs_from_logits(logits, temperature, top_k, top_p)
    if c == 1.0 or f == 0:
        return q
    top = logits.topk(min(f + 1, logits.shape[-1]), dim=-1).indices
    scaled = q.scatter(-1, top, q.gather(-1, top) * c)
    mass = scaled.sum(-1, keepdim=True)
    return torch.where(mass > 0, scaled / mass.clamp_min(1e-30), q)


def saguaro_probs_fn(c: float, fanout: list, vocab: int):
    """A probs_fn for ssd.draft_branches: its j-th call (drafting step j, token y_{j+1}) uses
    f = F_j, because the next cache bets on the top-F_j tokens of q_{j+1}. Logits are cut to
    the `vocab` ids the target has (padded embeddings), so q' is exactly what is sampled."""
    steps = iter(fanout)

    def probs_fn(logits, temperature, top_k, top_p):
        return saguaro_probs(logits[..., :vocab], temperature, top_k, top_p, c, next(steps))
    return probs_fn


# ----------------------------------------------------------------------------------------------
# The new ideas, part 2: the speed model (Thm. 7) and the batch-aware backup rule

def expected_tokens(a: float, K: int) -> float:
    """E = (1 - a^(K+1)) / (1 - a): tokens per round with i.i.d. acceptance a (bonus included)."""
    return K + 1.0 if a >= 1 else (1 - a ** (K + 1)) / (1 - a)


def predicted_speedup(p_hit, e_hit, e_miss, t_p, t_b, batch: int = 1) -> float:
    """Thm. 7 over AR, times in units of one target verify (= one AR step, memory-bound).
    A hit round costs max(1, T_p): verify and cache build overlap; a miss round 1 + T_b.
    With b rows the batch waits when any row misses: P(all hit) = p_hit^b (Sec. 4.3)."""
    all_hit = p_hit ** batch
    return (p_hit * e_hit + (1 - p_hit) * e_miss) / (all_hit * max(1.0, t_p)
                                                     + (1 - all_hit) * (1 + t_b))


class Estimates:
    """What the rules above run on, measured online from the rounds (priors count as two
    observations): acceptance a of the draft (cache and JIT speculations: one network, one q')
    and of the fast backup, the miss-curve exponent r, the hit rates of caches built over the
    draft's and over the fast backup's speculations, latencies in seconds."""
    PRIOR_N = 2.0

    def __init__(self, K, budget, fan_out, backup):
        self.K, self.budget, self.fan_out, self.backup = K, budget, fan_out, backup
        self.acc = {"draft": [1.0, self.PRIOR_N], "fast": [1.0, self.PRIOR_N]}  # sum, count: a=0.5
        self.hits = {"draft": [1.0, self.PRIOR_N], "fast": [1.0, self.PRIOR_N]}  # by who made
        # the speculation the cache was built over: hits, lookups
        self.rank_counts = torch.zeros(65)   # ranks of the true bonus among the draft's guesses
        self.secs = {}                       # running means: verify, build, step, jit, fast

    def a(self, who):
        total, n = self.acc[who]
        return total / n

    def r(self) -> float:
        """Fit 1 - p_hit(F) = F^-r through the origin in log-log, F = 2..64, on the measured
        ranks plus one prior observation that follows F^-1. Capped to [0.05, 8]."""
        n = self.rank_counts.sum()
        F = torch.arange(2, 65, dtype=torch.float64)
        at_least = self.rank_counts.flip(0).cumsum(0).flip(0).double()[2:]  # ranks >= F
        miss = (at_least + F ** -1.0) / (n + 1)
        x, y = F.log(), miss.log()
        return float((-(x * y).sum() / (x * x).sum()).clamp(0.05, 8.0))

    def p_hit(self, backup="jit"):
        """The long-run hit rate under this backup. JIT: every speculation is the draft's, p_d.
        Fast: a miss makes the next speculation a fast one, whose cache hits at p_f; lookups
        then follow a two-state chain whose stationary hit share is p_f / (1 - p_d + p_f)."""
        p_d = self.hits["draft"][0] / self.hits["draft"][1]
        if backup != "fast":
            return p_d
        p_f = self.hits["fast"][0] / self.hits["fast"][1]
        return p_f / (1 - p_d + p_f)

    def learn_from_draft(self, reply, live, first_round):
        """The draft process's answer: ranks of the true bonus (for r), its latencies."""
        for rank in reply.rank[live & (reply.rank >= 0)].tolist():
            self.rank_counts[min(rank, 64)] += 1
        if not first_round:  # the first round had no cache built before it
            self.time("build", reply.build_s)
            self.time("step", reply.glue_s)
        if reply.jit_s > 0:
            self.time("jit", reply.jit_s)

    def learn_acceptance(self, p, q, from_draft, from_fast, shadow, q_shadow):
        """Acceptance at position i is sum_x min(p_i(x), q_i(x)): exact in expectation, and of
        lower variance than counting accepted tokens. The shadow proposals of the fast backup
        share the target's context at their first position only."""
        K = q.shape[1]
        overlap = torch.minimum(p[:, :K], q).sum(-1).cpu()                  # (B, K)
        for who, rows in (("draft", from_draft), ("fast", from_fast)):
            self.acc[who][0] += float(overlap[rows].sum())
            self.acc[who][1] += K * int(rows.sum())
        if bool(shadow.any()):
            self.acc["fast"][0] += float(torch.minimum(p[shadow, 0], q_shadow[shadow, 0]).sum())
            self.acc["fast"][1] += int(shadow.sum())

    def sec(self, name, default=None):
        return self.secs.get(name, default)

    def time(self, name, seconds):
        old = self.secs.get(name)
        self.secs[name] = seconds if old is None else 0.8 * old + 0.2 * seconds

    def fan_outs(self, backup):
        """(after a hit, after a miss): the cache built over a speculation bets on ITS outcome
        law, so the acceptance of whoever made that speculation sets the schedule."""
        if self.fan_out == "uniform":
            return uniform_fan_out(self.budget, self.K), uniform_fan_out(self.budget, self.K)
        a_miss = self.a("fast" if backup == "fast" else "draft")
        r = self.r()
        return (geometric_fan_out(self.budget, self.K, self.a("draft"), r),
                geometric_fan_out(self.budget, self.K, a_miss, r))

    def speed(self, backup, batch):
        verify = self.sec("verify", 1.0)
        build = self.sec("build", verify)
        # until the JIT backup has run, K draft steps (one step ~ the glue forward) stand in
        t_b = {"jit": self.sec("jit", self.K * self.sec("step", build / (self.K + 1))),
               "fast": self.sec("fast", 0.0)}
        e_hit = expected_tokens(self.a("draft"), self.K)
        e_miss = expected_tokens(self.a("fast" if backup == "fast" else "draft"), self.K)
        return predicted_speedup(self.p_hit(backup), e_hit, e_miss, build / verify,
                                 t_b[backup] / verify, batch)

    def choose_backup(self, batch):
        """The batch-aware rule: the backup with the higher predicted speed at this batch size."""
        if self.backup != "auto":
            return self.backup, f"--backup {self.backup}"
        s_jit, s_fast = self.speed("jit", batch), self.speed("fast", batch)
        return ("fast" if s_fast > s_jit else "jit"), (f"b={batch}: predicted {s_jit:.2f}x "
                                                        f"with JIT, {s_fast:.2f}x with fast")

    def b_star(self, limit=4096):
        """The critical batch size: the smallest b at which the fast backup's predicted speed
        beats the JIT backup's (None: not up to `limit`)."""
        return next((b for b in range(1, limit + 1)
                     if self.speed("fast", b) > self.speed("jit", b)), None)


# ----------------------------------------------------------------------------------------------
# The new ideas, part 3: the async draft stream (the draft in its own process)
#
# Messages, all fixed-size tensors (sizes known to both sides once a generation starts):
#   target -> draft   START   float64 (16,) header, then int64 (B, 1 + longest prompt) prompts
#   target -> draft   ROUND   int64 (2 + 3B + 2(K+1),): cmd, backup, k (B), t (B), live (B),
#                             fan-out after a hit (K+1), after a miss (K+1). cmd END ends it.
#   draft  -> target  answer  int64 (B*(K+2) + 4,): source, rank, y_1..y_K per row, then
#                             build/JIT/glue microseconds, draft forwards; float32 (B, K, V) q'
#                             (not at temperature 0: q is one-hot on y there)
#   target -> draft   backup  int64 (B, K): the fast backup's tokens (only after a miss in
#                             fast mode: the draft glues them as it would glue its own)

START, SHUTDOWN, ROUND, END = 1, 2, 3, 4
HIT, JIT, NEED_FAST = 0, 1, 2           # where a row's next speculation comes from
BACKUPS = ("jit", "fast")
_LIVE = set()                           # started workers, closed at exit
_OURS = {"group": False}                # whether torch.distributed's default group is ours


class DraftLost(RuntimeError):
    """The draft process died or did not answer in time."""


def check_seconds(name, value, low=1e-3, high=86400.0):
    """A wait bound in seconds, in [1 ms, 1 day]: torch.distributed counts whole milliseconds
    and reads 0 as "its default" (a sub-ms timeout would silently become ~60 s)."""
    if not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"{name} must be a number of seconds in [{low:g}, {high:g}] (1 ms to 1 "
                         f"day), got {value!r}.")
    return float(value)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _timed(work, seconds):
    """Wait for an isend/irecv; any failure (timeout, peer gone) becomes DraftLost."""
    try:
        work.wait(datetime.timedelta(seconds=seconds))
    except RuntimeError as e:  # gloo says "[file.cc:78] Timed out waiting 2000ms for recv ..."
        raise DraftLost(str(e).strip().split("] ", 1)[-1].split(". ")[0][:120]) from None


class DraftWorker:
    """The draft process, seen from the target. Start it once, use it for many generate() calls:
        with saguaro.DraftWorker("default", target) as worker:
            tokens, stats = saguaro.generate(target, ids, 64, draft=worker)
    `draft`: a name for drafts.load_draft (loaded in the worker beside the target's weights),
    a picklable factory returning a kernels.Model, or a kernels.Model (pickled across).
    `threads`: CPU threads of the draft process; default on a CPU: half the cores (give the
    target the other half with generate(target_threads=...): each process its own cores)."""

    def __init__(self, draft, target, *, device=None, threads=None, timeout_s=10.0,
                 load_timeout_s=300.0, _fault=None):
        if draft is None:
            raise ValueError("saguaro needs a draft: a drafts.py name ('default'), a model "
                             "folder, a factory returning a kernels.Model, or a kernels.Model.")
        if isinstance(draft, kernels.Model):
            check_draft(target, draft, 1)  # one vocabulary, checked before a process starts
        if hasattr(draft, "propose"):
            raise ValueError("saguaro's draft process needs a neural draft (a kernels.Model, its "
                             "name, or a factory): a model-free proposer cannot fill a speculation "
                             "cache. It serves as the fast backup (--backup fast) instead.")
        timeout_s = check_seconds("timeout_s (--timeout)", timeout_s)
        load_timeout_s = check_seconds("load_timeout_s", load_timeout_s)
        if any(w.alive for w in _LIVE):
            raise RuntimeError("a DraftWorker is already running in this process (torch."
                               "distributed has one default group): close() it first.")
        for stale in list(_LIVE):  # lost workers: their process is gone, free their group
            stale.close()
        _leave_process_group()
        if dist.is_initialized():
            raise RuntimeError("torch.distributed is already initialized in this process (not "
                               "by saguaro): the draft process needs the default group; start "
                               "saguaro in a process of its own.")
        tdev = target.device
        ddev = kernels.resolve_device(device) if device else tdev
        # NCCL refuses two ranks on one GPU ("Duplicate GPU detected"): one GPU talks via gloo
        two_gpus = tdev.type == ddev.type == "cuda" and (tdev.index or 0) != (ddev.index or 0)
        self.backend = "nccl" if two_gpus else "gloo"
        if tdev.type != ddev.type:
            raise ValueError("target and draft on different device types: put both on CUDA "
                             "(NCCL between two GPUs) or both on the CPU (gloo).")
        self.comm = tdev if self.backend == "nccl" else torch.device("cpu")
        self.timeout_s, self.rounds, self.process, self.in_session = timeout_s, 0, None, False
        self.estimates = {}  # generate() settings -> Estimates: learned over all its calls
        target_ref = (getattr(target, "path", None), str(target.dtype).split(".")[-1])
        # on a CPU each process gets its own cores, pinned: left free, the two processes (which
        # wake each other every round) get placed on one core by the scheduler, half speed each
        cpus = sorted(os.sched_getaffinity(0))
        if threads is None and ddev.type == "cpu":
            threads = max(1, len(cpus) // 2)
        draft_cpus, self.target_cpus = None, None
        if ddev.type == "cpu" and tdev.type == "cpu" and threads < len(cpus):
            draft_cpus, self.target_cpus = cpus[-threads:], cpus[:-threads]
        # the rendezvous store is ours: we wait for the draft process to join it while
        # watching that process, so one that dies while starting is reported at once
        store = dist.TCPStore("127.0.0.1", _free_port(), 2, True, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=60))
        self.process = mp.get_context("spawn").Process(
            target=_worker_main, daemon=True, name="saguaro-draft",
            args=(draft, target_ref, str(ddev), threads, draft_cpus, self.backend, store.port,
                  os.getpid(), _fault))
        self.process.start()
        self.started = time.monotonic()
        _LIVE.add(self)
        self.store = store
        try:
            deadline = time.monotonic() + load_timeout_s
            self._await("joined", deadline, "connect")
            dist.init_process_group(self.backend, store=store, rank=0, world_size=2,
                                    timeout=datetime.timedelta(seconds=60),
                                    device_id=tdev if self.backend == "nccl" else None)
            _OURS["group"] = True
            self._await("ready", deadline, "load its draft")  # maybe after a kernel build
            ready = int(store.get("ready"))
        except BaseException:
            self.close()
            raise
        if ready < 0:
            self.close()
            raise RuntimeError("the draft process could not load its draft (its traceback is "
                               "printed above).")
        self.vocab_size = ready
        if self.vocab_size != target.cfg.vocab_size and target.tokenizer is None:
            self.close()
            raise ValueError(f"target and draft have vocabularies of {target.cfg.vocab_size} and "
                             f"{self.vocab_size} tokens and no tokenizer to show they share ids.")

    def _await(self, key, deadline, what):
        """Wait for the draft process to set `key` in the store, polling (not blocking in C++),
        so that Ctrl-C, the process dying and the deadline are each noticed at once."""
        while not self.store.check([key]):
            if not self.process.is_alive():
                raise RuntimeError(
                    f"the draft process exited (code {self.process.exitcode}) before it could "
                    f"{what}; its error is printed above. Processes are spawned, so a script "
                    "that starts saguaro must do it under `if __name__ == '__main__':`.")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the draft process did not {what} within "
                                   f"{deadline - self.started:.0f} s.")
            time.sleep(0.02)

    def reset(self):
        """Forget what the rules learned (a, r, hit rates, latencies) over earlier calls: the
        next generate() starts from the priors, as on a fresh worker. What a seed reproduces:
        the same call on a fresh or reset worker gives the same tokens with backup "jit" or
        "fast"; a call after others on the same worker starts from what they taught the fan-out
        rule, so its tokens can differ (same law, other coins); with backup "auto" the choice
        also follows measured latencies, which no seed fixes."""
        self.estimates.clear()

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    def _send(self, tensor):
        _timed(dist.isend(tensor.to(self.comm).contiguous(), dst=1), self.timeout_s)

    def _recv(self, tensor):
        _timed(dist.irecv(tensor, src=1), self.timeout_s)
        return tensor

    def begin(self, prompts, K, vocab, max_len, temperature, top_k, top_p, c, seed):
        """Start a generation: the draft prefills its own cache with the prompts."""
        longest = max(len(p) for p in prompts)
        header = torch.zeros(16, dtype=torch.float64)
        header[:11] = torch.tensor([START, len(prompts), longest, K, vocab, max_len, seed or 0,
                                    temperature, top_k or -1, top_p or -1, c])
        table = torch.zeros(len(prompts), 1 + longest, dtype=torch.long)
        for b, p in enumerate(prompts):
            table[b, 0], table[b, 1:1 + len(p)] = len(p), torch.tensor(p)
        self.in_session = True
        self._send(header)
        self._send(table)
        self.B, self.K, self.V, self.greedy = len(prompts), K, vocab, temperature == 0

    def round(self, k, t, live, backup, fan_hit, fan_miss):
        """Send the outcome; return the answer: source (B,) (HIT, JIT or NEED_FAST), rank (B,),
        tokens y (B, K), probs q' (B, K, V), seconds of the build that made this round's cache,
        of JIT drafting and of the glue forward (about one draft step), draft forwards run."""
        B, K = self.B, self.K
        msg = torch.cat((torch.tensor([ROUND, BACKUPS.index(backup)]), k.cpu(), t.cpu(),
                         live.long().cpu(), torch.tensor(fan_hit + fan_miss)))
        self._send(msg)
        ints = self._recv(torch.zeros(B * (K + 2) + 4, dtype=torch.long, device=self.comm)).cpu()
        rows = ints[: B * (K + 2)].view(B, K + 2)
        if self.greedy:  # q is one-hot on y at temperature 0: only the tokens had to cross
            q = one_hot(rows[:, 2:], self.V)
        else:
            q = self._recv(torch.zeros(B, K, self.V, device=self.comm))
        self.rounds += 1
        build_s, jit_s, glue_s = (x / 1e6 for x in ints[-4:-1].tolist())
        return SimpleNamespace(source=rows[:, 0], rank=rows[:, 1], tokens=rows[:, 2:], probs=q,
                               build_s=build_s, jit_s=jit_s, glue_s=glue_s,
                               forwards=int(ints[-1]))

    def send_backup(self, tokens):
        self._send(tokens.long())

    def end(self):
        msg = torch.zeros(2 + 3 * self.B + 2 * (self.K + 1), dtype=torch.long)
        msg[0] = END
        self._send(msg)
        self.in_session = False

    def close(self):
        """Stop the draft process (politely, then by force) and leave torch.distributed. Never
        raises and always unregisters, so a new DraftWorker can start after any failure."""
        p, self.process = self.process, None
        try:
            if p is not None:
                if p.is_alive() and dist.is_initialized() and not self.in_session:
                    try:
                        header = torch.zeros(16, dtype=torch.float64)
                        header[0] = SHUTDOWN
                        _timed(dist.isend(header.to(self.comm), dst=1), 1.0)
                    except DraftLost:
                        pass
                    p.join(2.0)
                for stop in (p.terminate, p.kill):
                    if p.is_alive():
                        stop()
                        p.join(5.0)
                if p.is_alive():
                    warnings.warn(f"saguaro: the draft process {p.pid} survived SIGKILL for 5 s; "
                                  "left behind.", RuntimeWarning, stacklevel=2)
        finally:
            _leave_process_group()
            _LIVE.discard(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _leave_process_group():
    """destroy_process_group for the group a DraftWorker made (never a group of the caller's),
    which can raise after the peer was lost mid-message (gloo's pending work): warn and go on;
    a group still there is tried again by the next DraftWorker."""
    if dist.is_initialized() and _OURS["group"]:
        try:
            dist.destroy_process_group()
        except Exception as e:  # noqa: BLE001 -- any teardown error leaves the same state
            warnings.warn(f"saguaro: leaving torch.distributed raised {type(e).__name__}: {e}",
                          RuntimeWarning, stacklevel=3)
        _OURS["group"] = dist.is_initialized()


@atexit.register
def _close_all():
    for worker in list(_LIVE):
        worker.close()


def _exit_with_parent(parent_pid):
    """The draft process's watchdog: once the target's process is gone, leave (no orphans)."""
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os._exit(0)


def _load_draft(spec, target_ref, device):
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


def _worker_main(spec, target_ref, device, threads, cpus, backend, port, parent_pid, fault):
    """The draft process: load the draft, then serve generations until SHUTDOWN."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C belongs to the target: it closes us
    if fault and fault[0] == "boot":  # tests: die before connecting
        os._exit(3)
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()
    if cpus:
        os.sched_setaffinity(0, cpus)  # before torch starts its threads: they inherit it
    kernels.set_threads(threads)
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    store = dist.TCPStore("127.0.0.1", port, 2, False, timeout=datetime.timedelta(seconds=60))
    store.set("joined", "1")
    dist.init_process_group(backend, store=store, rank=1, world_size=2,
                            timeout=datetime.timedelta(days=7),  # idle between runs is fine
                            device_id=dev if backend == "nccl" else None)
    comm = dev if backend == "nccl" else torch.device("cpu")
    try:
        draft = _load_draft(spec, target_ref, dev)
        store.set("ready", str(draft.cfg.vocab_size))
    except Exception:
        traceback.print_exc()
        store.set("ready", "-1")
        return
    rounds = 0
    with torch.inference_mode():
        while True:
            header = torch.zeros(16, dtype=torch.float64, device=comm)
            dist.recv(header, src=0)
            if int(header[0]) != START:
                break
            side = _DraftSide(draft, header.cpu(), comm)
            while True:
                rounds += 1
                if fault and rounds > fault[1]:  # tests: die or hang mid-generation
                    if fault[0] == "exit":
                        os._exit(1)
                    time.sleep(3600)
                if not side.serve_round():
                    break
    dist.destroy_process_group()


class _DraftSide:
    """The draft process's state for one generation: its KV cache (the trunk: prompt + emitted
    tokens, then the glue of the speculation being verified), the speculation cache S built for
    that speculation, and the glue logits (to rank the true bonus among the guesses, for r)."""

    def __init__(self, draft, header, comm):
        B, longest, K, V, max_len, seed = (int(x) for x in header[1:7])
        temperature, top_k, top_p, self.c = (float(x) for x in header[7:11])
        self.sampling = (temperature, None if top_k < 0 else int(top_k),
                         None if top_p < 0 else top_p)
        self.draft, self.comm, self.B, self.K, self.V = draft, comm, B, K, V
        table = torch.zeros(B, 1 + longest, dtype=torch.long, device=comm)
        dist.recv(table, src=0)
        prompts = [row[1:1 + row[0]].tolist() for row in table.cpu()]
        self.gen = kernels.make_generator(seed + 1, draft.device)  # the draft's own coins
        self.cache = draft.new_cache(B, max_len)
        draft.prefill(prompts, self.cache)
        self.trunk = self.cache.lengths.clone()   # (B,) the trunk before the last glue
        self.S = self.glue = self.spec = None
        self.branch_logits = self.base = None  # the tree behind S: its logits, first scratch slot
        self.prefix = None  # (slots, logits) the draft already has for t, y_1..y_{K-1}, or None
        self.build_s = self.jit_s = self.glue_s = 0.0
        self.forwards = 0

    def serve_round(self) -> bool:
        """One round, as the protocol above says: outcome in, answer out at once, (the fast
        backup's tokens in), then the next cache while the target verifies. False at END."""
        B, K, comm = self.B, self.K, self.comm
        msg = torch.zeros(2 + 3 * B + 2 * (K + 1), dtype=torch.long, device=comm)
        dist.recv(msg, src=0)
        msg = msg.cpu()
        if int(msg[0]) != ROUND:
            return False
        k, t, live = msg[2:2 + B], msg[2 + B:2 + 2 * B], msg[2 + 2 * B:2 + 3 * B].bool()
        fan_hit, fan_miss = msg[2 + 3 * B:3 + 3 * B + K].tolist(), msg[3 + 3 * B + K:].tolist()
        source, rank, y, q = self.answer(k, t, live, BACKUPS[int(msg[1])], fan_hit, fan_miss)
        times = [int(self.build_s * 1e6), int(self.jit_s * 1e6), int(self.glue_s * 1e6)]
        ints = torch.cat((torch.stack((source, rank), 1), y.cpu()), 1).flatten()
        dist.send(torch.cat((ints, torch.tensor(times + [self.forwards]))).to(comm), dst=0)
        if self.sampling[0] > 0:  # greedy: q is one-hot on y, the target rebuilds it
            dist.send(q.float().to(comm), dst=0)
        if bool((live & (source == NEED_FAST)).any()):
            backup = torch.zeros(B, K, dtype=torch.long, device=comm)
            dist.recv(backup, src=0)
            y = torch.where((source == NEED_FAST)[:, None], backup.cpu(), y.cpu())
        self.build(t, y, source, fan_hit, fan_miss)
        return True

    def answer(self, k, t, live, backup, fan_hit, fan_miss):
        """1) keep t0, x_1..x_k of the last glue (all of it on a miss-free k = K; nothing of it
        before the first round, k = -1); 2) look (k, t) up; 3) the JIT backup for misses;
        4) note where the draft already holds the KV and logits of the answer's t, y_1..y_{K-1}
        (the hit branches' scratch slots, or the trunk the JIT decoded into): the glue reuses
        them (reuse_branch). Not for a mixed batch: the JIT overwrites the branches' slots."""
        dev, B, K = self.draft.device, len(k), self.K
        k, t, live = k.to(dev), t.to(dev), live.to(dev)
        self.cache.lengths.copy_(torch.where(live, self.trunk + k + 1, self.trunk))
        self.forwards, self.jit_s, self.prefix = 0, 0.0, None
        steps = torch.arange(K, device=dev)
        if self.S is None:
            hit = torch.zeros(B, dtype=torch.bool, device=dev)
            y = torch.zeros(B, K, dtype=torch.long, device=dev)
            q = torch.zeros(B, K, self.V, device=dev)
            rank = torch.full((B,), -1, device=dev)
        else:
            hit, y, q = self.S.lookup(k, t)
            rank = self.rank(k, t)
            if bool(hit.all()):
                branch = self.S.find(k, t)[1]                           # (B,) the branch hit
                N = self.S.keys.shape[1]
                slots = self.base[:, None].long() + steps * N + branch[:, None]  # step j's slot
                self.prefix = slots, self.branch_logits[torch.arange(B, device=dev), branch]
        source = torch.where(hit, HIT, JIT if backup == "jit" else NEED_FAST)
        if backup == "jit" and bool((live & ~hit).any()):
            t0 = time.perf_counter()
            y_jit, q_jit, logits = self.jit_draft(t, fan_miss)
            y = torch.where(hit[:, None], y, y_jit)
            q = torch.where(hit[:, None, None], q, q_jit)
            self.jit_s = time.perf_counter() - t0
            in_place = self.cache.lengths[:, None].long() + steps   # where the JIT wrote them
            self.prefix = (in_place, logits) if not bool(hit.any()) else None
        return source.cpu(), rank.cpu(), y, q

    def rank(self, k, t):
        """Where the true bonus t stood among the draft's candidates for it: 0 = its first
        guess. Measures the miss curve: p_hit(F) = P(rank < F)."""
        rows = torch.arange(len(k), device=k.device)
        scores = self.glue[rows, k.clamp_min(0), : self.V].clone()          # (B, V)
        x_next = self.spec[rows, k.clamp(0, self.K - 1)]
        scores[rows, x_next] = torch.where(k < self.K, float("-inf"), scores[rows, x_next])
        mine = scores[rows, t.clamp_max(self.V - 1)]
        rank = (scores > mine[:, None]).sum(-1)
        return torch.where((k >= 0) & (t < self.V), rank, -1)

    def jit_draft(self, t, fanout):
        """The JIT backup: decode K tokens now from trunk + t, one forward each; the length is
        then rolled back (the KV of t, y_1..y_{K-1} stays where the glue would write it).
        Returns y (B, K), their q (B, K, V) and the logits they were drawn from."""
        length = self.cache.lengths.clone()
        probs_fn = saguaro_probs_fn(self.c, fanout, self.V)
        inp, ys, qs, ls = t.clamp_max(self.draft.cfg.vocab_size - 1), [], [], []
        for _ in range(self.K):
            logits = self.draft(inp[:, None], self.cache)[:, -1]              # (B, V_draft)
            q = probs_fn(logits, *self.sampling)                              # (B, V)
            inp = kernels.sample(q, self.gen)
            ys.append(inp)
            qs.append(q)
            ls.append(logits)
        self.cache.lengths.copy_(length)
        self.forwards += self.K
        return torch.stack(ys, 1), torch.stack(qs, 1), torch.stack(ls, 1)

    def build(self, t, y, source, fan_hit, fan_miss):
        """ssd.py's draft side over the next speculation s = (t, y_1..y_K): the glue (a forward
        over t, y_1..y_K, or, where answer() found them, the draft's own earlier work on
        t, y_1..y_{K-1} plus one forward, see reuse_branch), outcome
        prediction with each row's schedule (after a hit or after a miss), then all branches
        drafted as one tree, sampling from Saguaro's q'."""
        t0 = time.perf_counter()
        dev = self.draft.device
        t, y, source = t.to(dev), y.to(dev), source.to(dev)
        self.trunk = self.cache.lengths.clone()
        if self.prefix is not None:
            self.glue = reuse_branch(self.draft, self.cache, *self.prefix, y)
        else:
            inp = torch.cat((t[:, None], y), 1).clamp_max(self.draft.cfg.vocab_size - 1)
            self.glue = self.draft(inp, self.cache)                          # (B, K+1, V_draft)
        self.glue_s = time.perf_counter() - t0
        keys = torch.zeros(len(t), sum(fan_hit), 2, dtype=torch.long, device=dev)
        for fan, rows in ((fan_hit, source == HIT), (fan_miss, source != HIT)):
            if bool(rows.any()):                                             # (B, N, 2)
                keys[rows] = ssd.predict_outcomes(self.glue[rows, :, : self.V], y[rows], fan)
        fork = self.trunk[:, None].long() + keys[..., 0] + 1
        probs_fn, steps = saguaro_probs_fn(self.c, fan_hit, self.V), []

        def keep_logits(logits, *sampling):  # each step's logits: the next glue on a hit
            steps.append(logits)
            return probs_fn(logits, *sampling)
        self.base = self.cache.lengths.clone()
        tokens, probs = ssd.draft_branches(self.draft, self.cache, fork, keys[..., 1], self.K,
                                           *self.sampling, self.gen, probs_fn=keep_logits)
        self.branch_logits = torch.stack(steps, 2)                           # (B, N, K, V_draft)
        self.S, self.spec = ssd.SpeculationCache(keys, tokens, probs), y
        self.forwards += 1 + self.K
        self.build_s = time.perf_counter() - t0


def reuse_branch(draft, cache, slots, logits, y):
    """NEW in this file: the glue without redoing it. After a hit, the hit branch drafted y from
    t in the tree: it already wrote the draft's KV for t, y_1..y_{K-1} (in its scratch slots
    base + j*N + branch at step j) and computed the logits after each of them; after a JIT
    backup, the JIT did the same in the trunk. slots (B, K): where that KV is; logits (B, K, V).
    Copy the KV to the trunk (cache.lengths .. + K - 1), so only y_K needs a forward: 1 token
    instead of K + 1. Returns the glue logits (B, K+1, V): after t, y_1, ..., y_K."""
    B, K = y.shape
    rows = torch.arange(B, device=y.device)[:, None]
    dst = cache.lengths[:, None].long() + torch.arange(K, device=y.device)  # (B, K) trunk slots
    for kv in (cache.k, cache.v):                                        # (L, B, S, Hk, D)
        kv[:, rows, dst] = kv[:, rows, slots]                           # a gather: no overlap
    cache.lengths += K
    last = draft(y[:, -1:].clamp_max(draft.cfg.vocab_size - 1), cache)  # (B, 1, V): after y_K
    return torch.cat((logits, last), 1)


def _fast_backup(target, prompts):
    """The fast backup: drafts.py's n-gram drafter (prompt lookup + the target's shipped n-gram
    tables); for a target without shipped tables, prompt lookup over n-grams of the prompts."""
    import drafts
    try:
        return drafts.load_draft("ngram", target)
    except ValueError:
        counts = drafts.NGramDrafter.count(prompts, [0] * len(prompts))
        return drafts.NGramDrafter.from_counts(counts, target.cfg.vocab_size)


# ----------------------------------------------------------------------------------------------
# The loop: ssd.py's round, with the draft's half running in the draft process

@torch.inference_mode()
def generate(target, prompt_ids, max_new_tokens, *, draft=None, k=4, f=3, fan_out="geometric",
             saguaro_c=1.0, backup="auto", temperature=0.0, top_k=None, top_p=None, seed=0,
             eos=True, target_threads=None, draft_threads=None, draft_device=None,
             timeout_s=10.0, fast_backup=None, budget=None):
    """prompt_ids: a list of token ids, or a batch of them (ragged is fine). draft: a running
    DraftWorker (reused), or what DraftWorker takes (a drafts.py name, a factory, a Model): then
    a draft process is started for this call and stopped after it. k: K; f: guesses per k for a
    uniform fan-out; budget: B, the guesses per row per round for both fan-outs (default
    (K+1) f; fewer branches make a cheaper build on a slow draft); saguaro_c: C; backup: auto (the
    batch-aware rule) | jit | fast; fast_backup: a proposer (default: drafts.py's n-gram).
    seed: the coins of both processes; what it reproduces on a reused worker: DraftWorker.reset.
    Returns (tokens, stats) as ssd.generate does; stats add backup_used (row-rounds per backup),
    backup_why, b_star, a, a_fast, r, p_hit, fan_out_hit/_miss, predicted_speedup (Thm. 7) and
    measured_speedup (the same quantity measured: tokens per row per target-verify time),
    draft_wait_s (target idle, waiting for the draft) and draft_lost (why, if it was lost)."""
    prompts = harness.as_batch(prompt_ids)
    kernels.check_sampling(temperature, top_k, top_p)
    if not isinstance(k, int) or k < 1 or not isinstance(f, int) or f < 1:
        raise ValueError(f"k and f must be integers >= 1, got k={k!r}, f={f!r}.")
    if fan_out not in ("geometric", "uniform") or backup not in ("auto",) + BACKUPS:
        raise ValueError(f"fan_out is geometric|uniform and backup auto|jit|fast; got "
                         f"{fan_out!r}, {backup!r}.")
    if not 0 <= saguaro_c <= 1:
        raise ValueError(f"saguaro_c (C) must lie in [0, 1], got {saguaro_c}.")
    if budget is not None and (not isinstance(budget, int) or budget < 1):
        raise ValueError(f"budget (B) must be an integer >= 1, got {budget!r}.")
    check_seconds("timeout_s", timeout_s)
    K, budget = k, budget or (k + 1) * f
    max_len = harness.check_request(target, prompts, max_new_tokens, room=K)  # verify overshoot
    B, dev, Vt = len(prompts), target.device, target.cfg.vocab_size
    if budget >= Vt:
        raise ValueError(f"the cache budget B = {budget} must stay below the vocabulary "
                         f"({Vt} tokens): lower f or --budget.")
    threads_before, cpus_before = torch.get_num_threads(), os.sched_getaffinity(0)
    kernels.set_threads(target_threads)
    own = not isinstance(draft, DraftWorker)
    worker = DraftWorker(draft, target, device=draft_device, threads=draft_threads,
                         timeout_s=timeout_s) if own else draft
    clean = False
    try:
        if worker.target_cpus:  # this thread on the target's cores (the draft has the others)
            os.sched_setaffinity(0, worker.target_cpus)
        fast = fast_backup or _fast_backup(target, prompts)
        gen = kernels.make_generator(seed, dev)
        eos_ids = set(target.cfg.eos_token_ids) if eos else set()
        # what the rules learn carries over between calls on one worker with the same settings
        est = worker.estimates.setdefault((K, budget, fan_out, backup, B, temperature, top_k,
                                           top_p, saguaro_c), Estimates(K, budget, fan_out, backup))
        stats = harness.new_stats(K)
        stats.update(hits_by_k=[0] * (K + 1), lookups_by_k=[0] * (K + 1),
                     backup_used={"jit": 0, "fast": 0}, backup_why=None, b_star=None,
                     verify_s=0.0, draft_wait_s=0.0, cache_build_s=0.0, jit_draft_s=0.0,
                     fast_backup_s=0.0, draft_lost=None)
        rows = [list(p) for p in prompts]   # prompt + tokens emitted so far, per row
        done = [False] * B

        def lose(reason):  # the draft process is gone: from here on the target works alone
            stats["draft_lost"] = reason
            warnings.warn(f"saguaro: the draft process {reason}; finishing on the target with "
                          "the fast backup (the output is unchanged; only speed drops).",
                          RuntimeWarning, stacklevel=4)
            worker.close()

        # 1) prefill: the target gives the first token; the draft process reads the prompts
        # into its own cache at the same time (it gets them first)
        t0 = time.perf_counter()
        if not worker.alive:
            lose("was not running")
        else:
            try:
                worker.begin(prompts, K, min(Vt, worker.vocab_size), max_len + 1 + K * budget,
                             temperature, top_k, top_p, saguaro_c, seed)
            except DraftLost as e:
                lose(f"failed at the start ({e})")
        cache = target.new_cache(B, max_len)
        logits = target.prefill(prompts, cache)                               # (B, V)
        token = kernels.next_token(logits, temperature, top_k, top_p, gen).tolist()  # (B,)
        for b in range(B):
            done[b] = emit(rows[b], [token[b]], max_new_tokens, eos_ids)
        kernels.sync(dev)
        stats["prefill_s"] = time.perf_counter() - t0

        # 2) decode: per round, the target verifies a speculation while the draft process
        # prepares the next one for the outcomes it predicts
        t0 = time.perf_counter()
        accepted = 0
        outcome = torch.full((B,), -1)      # (B,) k of the last round; -1: no round yet
        made = torch.full((B,), HIT)        # (B,) who made the last round's speculation
        fan_hit, fan_miss = est.fan_outs(backup)
        while not all(done):
            # 2a) NEW: the outcome (k, t) goes to the draft process, which answers at once from
            # the speculation cache it built during the last verify (a hit) or, for a miss, with
            # the backup the batch-aware rule picks: JIT drafting there, or the fast backup
            # here. Then it builds the next cache, while this process verifies.
            last = torch.tensor([r[-1] for r in rows])
            live = ~torch.tensor(done)
            choice, stats["backup_why"] = est.choose_backup(int(live.sum()))
            fan_hit, fan_miss = est.fan_outs(choice)
            x = torch.zeros(B, K, dtype=torch.long, device=dev)          # (B, K) speculation
            q = torch.zeros(B, K, Vt, device=dev)                          # (B, K, Vt) its q
            source = torch.full((B,), NEED_FAST)                           # (B,) its origin
            if not worker.alive and stats["draft_lost"] is None:  # died between two messages
                lose("exited")
            answered, tick = worker.alive, time.perf_counter()
            if answered:
                try:
                    reply = worker.round(outcome, last, live, choice, fan_hit, fan_miss)
                    source, x = reply.source, reply.tokens.to(dev)
                    q = pad_vocab(reply.probs.to(dev), Vt)
                except DraftLost as e:
                    lose(f"stopped answering ({e})")
                    answered = False
            if answered:
                stats["draft_wait_s"] += time.perf_counter() - tick
                stats["draft_calls"] += reply.forwards
                stats["cache_build_s"] += reply.build_s
                stats["jit_draft_s"] += reply.jit_s
                est.learn_from_draft(reply, live, first_round=bool(outcome.min() < 0))
            # the fast backup runs for the rows that need it, and in auto mode on a few more
            # rows as a shadow that measures its acceptance and latency for the rule
            need_fast = live & (source == NEED_FAST)
            shadow = live & ~need_fast & (live.cumsum(0) <= 4) & (backup == "auto")
            ask = torch.nonzero(need_fast | shadow)[:, 0].tolist()
            q_fast = torch.zeros(B, K, Vt, device=dev)
            if ask:
                tick = time.perf_counter()
                x_fast = torch.zeros(B, K, dtype=torch.long, device=dev)
                x_ask, q_ask = fast.propose([rows[b] for b in ask], K, temperature, gen)
                x_fast[ask], q_fast[ask] = x_ask.to(dev), pad_vocab(q_ask.to(dev).float(), Vt)
                est.time("fast", time.perf_counter() - tick)
                stats["fast_backup_s"] += time.perf_counter() - tick
                x[need_fast], q[need_fast] = x_fast[need_fast], q_fast[need_fast]
                if worker.alive and bool(need_fast.any()):
                    try:
                        worker.send_backup(x)
                    except DraftLost as e:
                        lose(f"stopped answering ({e})")
            q[~live] = one_hot(x[~live], Vt)  # finished rows ride along: any valid q will do
            for name, code in (("jit", JIT), ("fast", NEED_FAST)):
                stats["backup_used"][name] += int((live & (source == code)).sum())

            # 2b) verify: one target forward over [last token, x_1..x_K] gives p_1..p_{K+1}; a
            # draft id the target lacks (p = 0 there: always rejected) is fed as a stand-in
            tick = time.perf_counter()
            tokens_in = torch.cat((last[:, None].to(dev), x.clamp_max(Vt - 1)), 1)  # (B, K+1)
            logits = target(tokens_in, cache)                                   # (B, K+1, Vt)
            p = kernels.probs_from_logits(logits, temperature, top_k, top_p)
            n_accepted, bonus = verify(p, q, x, gen)
            stats["target_calls"] += 1
            kernels.sync(dev)
            if outcome.min() >= 0:  # not a call's first round: it may pack weights on first use,
                est.time("verify", time.perf_counter() - tick)  # a one-off kept out of the means
            stats["verify_s"] += time.perf_counter() - tick

            # 2c) accept: each live row emits x_1..x_k and the bonus t (truncated at EOS or at
            # max_new_tokens) and rolls the target cache back to keep KV through x_k; the
            # draft process rolls its own back when the outcome reaches it next round.
            hit = source == HIT
            for b in range(B):
                if done[b]:
                    continue
                n = int(n_accepted[b])
                stats["accept_counts"][n] += 1
                stats["rows_verified"] += 1
                accepted += n
                if answered and outcome[b] >= 0:  # the first round had no cache to hit
                    stats["lookups_by_k"][int(outcome[b])] += 1
                    stats["hits_by_k"][int(outcome[b])] += bool(hit[b])
                    made_by = est.hits["fast" if made[b] == NEED_FAST else "draft"]
                    made_by[0] += bool(hit[b])
                    made_by[1] += 1
                room = max_new_tokens - (len(rows[b]) - len(prompts[b]))
                done[b] = emit(rows[b], x[b, :n].tolist() + [int(bonus[b])], room, eos_ids)
            cache.lengths.copy_(torch.tensor([len(r) - 1 for r in rows]))

            # 2d) NEW: learn the acceptance of the draft and of the fast backup for the rules
            est.learn_acceptance(p, q, live & ~need_fast, need_fast, shadow, q_fast)
            outcome, made = n_accepted.cpu(), source.clone()
        if worker.alive:
            try:
                worker.end()
            except DraftLost as e:
                lose(f"stopped answering ({e})")
        kernels.sync(dev)
        stats["decode_s"] = time.perf_counter() - t0
        if stats["rows_verified"]:
            stats["acceptance_rate"] = accepted / (K * stats["rows_verified"])
        choice, _ = est.choose_backup(B)
        stats.update(a=est.a("draft"), a_fast=est.a("fast"), r=est.r(), p_hit=est.p_hit(choice),
                     b_star=est.b_star(),
                     fan_out_hit=fan_hit, fan_out_miss=fan_miss,
                     predicted_speedup=est.speed(choice, B))

        # 3) hand back each row's tokens
        tokens = [r[len(prompt):] for r, prompt in zip(rows, prompts)]
        stats = harness.finish_stats(stats, tokens)
        per_row = (stats["new_tokens"] - B) / B
        verify_s = est.sec("verify")
        stats["measured_speedup"] = (per_row / (stats["decode_s"] / verify_s)
                                     if verify_s and stats["decode_s"] > 0 else None)
        clean = True
        return tokens, stats
    finally:
        if own or not clean:  # a worker left mid-generation is out of step: stop it
            worker.close()
        torch.set_num_threads(threads_before)
        os.sched_setaffinity(0, cpus_before)


def main():
    import drafts  # the one resolver of draft names, for the --help text here
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_common_args(ap)
    ap.add_argument("--draft", default="default", help=drafts.DRAFT_HELP)
    ap.add_argument("--k", type=harness.positive_int, default=4, help="draft tokens per round (K)")
    ap.add_argument("--f", type=harness.positive_int, default=3,
                    help="guesses per k; budget B = (K+1) f")
    ap.add_argument("--budget", type=harness.positive_int, default=None,
                    help="B, guesses per row per round, whatever --f says (default (K+1) f)")
    ap.add_argument("--fan-out", default="geometric", choices=["geometric", "uniform"])
    ap.add_argument("--saguaro-c", type=float, default=1.0, help="Saguaro sampling factor C")
    ap.add_argument("--backup", default="auto", choices=["auto", "jit", "fast"])
    ap.add_argument("--target-device", default=None, help="default: --device")
    ap.add_argument("--draft-device", default=None, help="default: the target's device")
    ap.add_argument("--draft-threads", type=harness.positive_int, default=None,
                    help="CPU threads of the draft")
    ap.add_argument("--timeout", default=10.0,
                    type=harness.checked(float, lambda s: check_seconds("--timeout", s)),
                    help="seconds to wait for the draft (1 ms to 1 day)")
    ap.add_argument("--prompt", required=True, type=harness.prompt_text)
    args = ap.parse_args()
    cores = os.cpu_count() or 2  # on a CPU, each process gets its own cores: half and half
    draft_threads = args.draft_threads or max(1, cores // 2)
    target = kernels.load_model(args.model, args.target_device or args.device, args.dtype,
                                args.threads or max(1, cores - draft_threads))
    ids = kernels.encode_prompt(target, args.prompt)
    with DraftWorker(args.draft, target, device=args.draft_device, threads=draft_threads,
                     timeout_s=args.timeout) as worker:
        tokens, stats = harness.after_warm_up(lambda n: generate(
            target, ids, n, draft=worker, k=args.k, f=args.f, fan_out=args.fan_out,
            saguaro_c=args.saguaro_c, backup=args.backup, temperature=args.temperature,
            top_k=args.top_k, top_p=args.top_p, seed=args.seed, budget=args.budget),
            args.max_new_tokens)
    print(target.tokenizer.decode(tokens[0], skip_special_tokens=True))
    print(f"\n[{stats['new_tokens']} tokens, decode {stats['decode_tokens_per_s']:.1f} tokens/s, "
          f"tau {stats['tau']:.2f}, cache hit rate {stats['hit_rate'] or 0:.2f}, a "
          f"{stats['a']:.2f}, r {stats['r']:.2f}, fan-out after a hit {stats['fan_out_hit']}, "
          f"after a miss {stats['fan_out_miss']}; backups (row-rounds) {stats['backup_used']}, "
          f"rule: {stats['backup_why']}; speedup predicted (Thm. 7) "
          f"{stats['predicted_speedup']:.2f}x, measured {stats['measured_speedup'] or 0:.2f}x "
          "(both in units of one target verify)]")


if __name__ == "__main__":
    main()
