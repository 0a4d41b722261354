"""tp.py: a tensor-parallel target over torch.distributed, applied to kernels.py's model from outside.

The paper runs its 70B target on 4 GPUs at once (and the draft on a fifth). This file splits one
kernels.Model over N ranks in the Megatron pattern (the one gpt-fast's tp.py and vLLM use), so
each rank holds about 1/N of the weights and of the KV cache:
  - q/k/v and gate/up are split by output columns: each rank computes its own attention heads
    (about H/N query heads and the KV heads they read: see `plan`; with fewer KV heads than
    ranks each KV head is replicated on the ranks whose queries read it) and its own slice of
    the MLP;
  - o and down are split by input rows: each rank's product is a partial sum of the true
    output, so ONE all-reduce after each (`AllReduce`) gives every rank the full residual;
  - embedding, norms and head are replicated; the KV cache follows the heads (kernels.KVCache
    is sized from the per-rank config).
A sharded rank is just a smaller kernels.Model (its cfg says H/N heads, I/N MLP columns) whose wo
and w2 end in an all-reduce: kernels.py's forward runs unchanged and stays the reference.

Every rank runs the same loop on the same inputs with the same seed and must make the same draws.
The head's input is broadcast from rank 0 (`FromRank0`, one (B, T, C) message per forward), so the
logits, and everything sampled from them, agree bit for bit by construction, not by trusting that
an all-reduce rounds alike on every rank. The draft, small, runs replicated on every rank.
Saguaro's loop cannot run on every rank: rank 0 alone talks to the draft process (on a device
of its own, beside the N target ranks, as in the official code). There rank 0 leads (`led`):
it runs the loop with a `Leader` target that announces each forward to the other ranks, which
`follow` (run the same forward on their shard) until rank 0 stops.

Launch with torchrun (`init` reads its RANK / WORLD_SIZE / LOCAL_RANK): gloo on CPUs, NCCL on GPUs,
one GPU per rank; ranks > 0 print nothing. Every collective is bounded by TIMEOUT_S: a rank that
dies closes its sockets and the others fail at once with `RankLost`; one that hangs, after TIMEOUT_S.
A rank that raises while the others wait in a collective for it leaves the group (`abandon`), which
closes its sockets too: they fail at once, and only the failing rank prints the original error.
The CPU's fused layer stack (kernels_cpu.Stack) cannot run an all-reduce between its layers, so a
sharded model runs layer by layer with kernels_cpu's fused steps and packed linears.

    torchrun --nproc-per-node 2 bench.py --tp 2 --methods ar,sd,saguaro
    torchrun --nproc-per-node 2 saguaro.py --tp 2 --prompt "Write a haiku about cacti."
"""
from __future__ import annotations

import atexit
import dataclasses
import datetime
import os
import pickle
import sys
import weakref

import torch
import torch.distributed as dist
from torch import nn

import kernels
import kernels_cpu

TIMEOUT_S = float(os.environ.get("SSD_TP_TIMEOUT", 600))  # a slow peer still loading is not dead


class RankLost(RuntimeError):
    """A collective failed: another rank died, hung, or raised."""


# ----------------------------------------------------------------------------------------------
# 1) joining the ranks torchrun started

def check_world(n: int, env: dict, device=None, cores: int = 0, gpus: int = 0) -> None:
    """ValueError for a --tp that cannot run here (pure: the tests call it with a fake env);
    device None: the launch only (argparse checks it before the device is known)."""
    if n < 1:
        raise ValueError(f"--tp must be >= 1, got {n}.")
    script = os.path.basename(sys.argv[0]) or "bench.py"
    if "WORLD_SIZE" not in env:
        if n > 1:
            raise ValueError(f"--tp {n} runs as {n} processes started by torchrun: "
                             f"torchrun --nproc-per-node {n} {script} --tp {n} ...")
        return
    world = int(env["WORLD_SIZE"])
    if world != n:
        raise ValueError(f"torchrun started {world} processes but --tp is {n}: give "
                         f"--nproc-per-node {n} (one process per tensor-parallel rank).")
    local = int(env.get("LOCAL_WORLD_SIZE", world))
    if device is None:
        return
    if device.type == "cuda" and local > gpus:
        raise ValueError(f"--tp {n}: {local} ranks on this machine but only {gpus} CUDA "
                         "device(s); each rank needs a GPU of its own.")
    if device.type == "cpu" and local > cores:
        raise ValueError(f"--tp {n}: {local} ranks on this machine but only {cores} CPU "
                         "core(s); each rank needs a core of its own.")


def init(n: int, device: str = "auto") -> torch.device:
    """Join the process group torchrun started for `n` ranks (n = 1 without torchrun: nothing
    to join) and return this rank's device: cuda:LOCAL_RANK on GPUs, the CPU otherwise."""
    dev = kernels.resolve_device(device)
    gpus = torch.cuda.device_count() if dev.type == "cuda" else 0
    check_world(n, os.environ, dev, len(os.sched_getaffinity(0)), gpus)
    if n == 1:
        return dev
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=TIMEOUT_S),
                                device_id=dev if dev.type == "cuda" else None)
        # left to the interpreter's exit, the group's C++ threads can outlive Python and abort
        # the process (SIGABRT, "terminate called without an active exception"): close it first
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    if dist.get_rank() > 0:
        sys.stdout = open(os.devnull, "w")  # rank 0 prints; errors (stderr) show from every rank
    return dev


def draft_device(args, target):
    """saguaro's draft device: --draft-device if given; with --tp N on GPUs, the GPU after the
    N target GPUs (the paper's 5th H100 beside 4); else None (the target's device)."""
    if args.draft_device or args.tp == 1 or target.device.type != "cuda":
        return args.draft_device
    if torch.cuda.device_count() <= args.tp:
        raise ValueError(f"--tp {args.tp}: the draft process goes on cuda:{args.tp}, after the "
                         f"target's {args.tp} GPUs, but there are {torch.cuda.device_count()}: "
                         "give --draft-device.")
    return f"cuda:{args.tp}"


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def abandon() -> None:
    """Leave the process group at once, after a failure the other ranks cannot be told about in
    step (they wait inside a collective that no message of ours will match): destroying the
    group closes this rank's connections, so a rank waiting for it fails now with RankLost
    instead of after TIMEOUT_S. (gloo sees the closed sockets; NCCL ranks still wait for their
    own timeout.) Any later collective on this rank raises RankLost."""
    global _ABANDONED
    if dist.is_initialized():
        dist.destroy_process_group()
        _ABANDONED = True


_ABANDONED = False


def abandoned() -> bool:
    """Whether this rank left its group after a failure (abandon). Its process must then end
    with os._exit (harness.cli does): a gloo group whose peer was lost or hung can still hold
    C++ threads that abort the interpreter's teardown (SIGABRT, "terminate called without an
    active exception"), which would replace the error's exit code."""
    return _ABANDONED


def _collective(fn, tensor, what):
    try:
        fn(tensor)
    except Exception as e:  # gloo: RuntimeError; NCCL: DistBackendError (a RuntimeError)
        raise RankLost(f"tensor parallelism: rank {rank()} lost its peers during {what}: another "
                       f"rank died, hung or raised (its own error says why; every wait here is "
                       f"bounded by SSD_TP_TIMEOUT = {TIMEOUT_S:.0f} s). {type(e).__name__}: "
                       f"{str(e)[:300]}") from e
    return tensor


class AllReduce(nn.Module):
    """A row-split linear (o or down): each rank's product is a partial sum; the all-reduce
    adds them, so every rank holds the full output."""

    def __init__(self, linear: nn.Module):
        super().__init__()
        self.linear = linear

    def forward(self, x):
        return _collective(dist.all_reduce, self.linear(x), "an all-reduce")


class FromRank0(nn.Module):
    """The replicated head, fed rank 0's input: identical logits on every rank, bit for bit."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, x):
        return self.head(_collective(lambda t: dist.broadcast(t, 0), x.contiguous(), "a broadcast"))


# ----------------------------------------------------------------------------------------------
# 2) which rows and columns are this rank's

@dataclasses.dataclass
class Plan:
    """This rank's slices of the full model's features, each a (start, stop) range: q (its
    query heads' rows), kv (its KV heads' rows), ffn (its MLP columns); and its config."""
    q: tuple
    kv: tuple
    ffn: tuple
    cfg: kernels.ModelConfig


def plan(cfg: kernels.ModelConfig, rank: int, world: int) -> Plan:
    """Query heads travel with the KV head they read (a group of G = H/Hk): with at least as many
    KV heads as ranks, each rank takes whole groups, as evenly as they go (SmolLM2's 3 groups of
    3 on 2 ranks: 3 + 6 query heads; an uneven split is correct, only less balanced); with fewer,
    each KV head is replicated on world/Hk ranks that split its group. MLP columns: as evenly
    as they go."""
    H, Hk, D, I = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    G = H // Hk
    even = lambda n: (rank * n // world, (rank + 1) * n // world)  # noqa: E731
    if Hk >= world:
        kv = even(Hk)
        q = (kv[0] * G, kv[1] * G)
    elif world % Hk == 0 and G % (world // Hk) == 0:
        per = world // Hk                    # ranks sharing one KV head
        kv = (rank // per, rank // per + 1)
        q = (kv[0] * G + rank % per * (G // per), kv[0] * G + (rank % per + 1) * (G // per))
    else:
        raise ValueError(f"--tp {world} cannot split this model's {H} query heads in {Hk} KV "
                         f"groups: N must be at most the number of KV heads, or a multiple of it "
                         f"that divides each group's {G} query heads.")
    if I < world:
        raise ValueError(f"--tp {world} exceeds this model's {I} MLP columns.")
    local = dataclasses.replace(cfg, num_heads=q[1] - q[0], num_kv_heads=kv[1] - kv[0],
                                intermediate_size=even(I)[1] - even(I)[0])
    return Plan((q[0] * D, q[1] * D), (kv[0] * D, kv[1] * D), even(I), local)


def _rows(p: Plan, cfg) -> tuple:
    """Rows of the fused wqkv and w13 (q | k | v and gate | up stacked) that are this rank's."""
    H, Hk, D, I = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    r = lambda lo_hi, at=0: torch.arange(lo_hi[0] + at, lo_hi[1] + at)  # noqa: E731
    return (torch.cat((r(p.q), r(p.kv, H * D), r(p.kv, (H + Hk) * D))),
            torch.cat((r(p.ffn), r(p.ffn, I))))


# ----------------------------------------------------------------------------------------------
# 3) sharding a model: in place, or while reading a checkpoint

def _cut(linear: nn.Module, rows=None, cols=None) -> nn.Module:
    """A linear of the same kind (nn.Linear or kernels_cpu.PackedLinear) keeping these rows
    of its weight (output features) or columns (input features). A column cut is a row-split
    linear whose partial sums are all-reduced: its bias stays on rank 0 only (zeros elsewhere),
    so the sum holds it once."""
    w, b = linear.weight, linear.bias
    if rows is not None:
        w, b = w[rows], (b[rows] if b is not None else None)
    else:
        w = w[:, cols[0]:cols[1]]
        b = b if b is None or dist.get_rank() == 0 else torch.zeros_like(b)
    new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta")
    new.weight = nn.Parameter(w.contiguous(), requires_grad=False)
    if b is not None:
        new.bias = nn.Parameter(b.contiguous(), requires_grad=False)
    return kernels_cpu.PackedLinear(new) if isinstance(linear, kernels_cpu.PackedLinear) else new


def wrap(model: kernels.Model, cfg: kernels.ModelConfig) -> kernels.Model:
    """Give a model whose weights are already this rank's its per-rank config, the all-reduces
    after o and down, and the head fed from rank 0."""
    for block in model.layers:
        block.cfg, block.shape = cfg, (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_eps)
        block.wo, block.w2 = AllReduce(block.wo), AllReduce(block.w2)
    model.cfg, model.head = cfg, FromRank0(model.head)
    model.tp = (dist.get_rank(), dist.get_world_size())
    return model


@torch.no_grad()
def shard(model: kernels.Model) -> kernels.Model:
    """Cut a full model, loaded on every rank, down to this rank's slices, in place (the
    removed rows and columns are freed unless something else holds them, e.g. a draft)."""
    if getattr(model, "tp", None):
        raise ValueError("this model is sharded already.")
    p = plan(model.cfg, dist.get_rank(), dist.get_world_size())
    qkv, w13 = _rows(p, model.cfg)
    for block in model.layers:
        block.wqkv, block.w13 = _cut(block.wqkv, rows=qkv), _cut(block.w13, rows=w13)
        block.wo, block.w2 = _cut(block.wo, cols=p.q), _cut(block.w2, cols=p.ffn)
    return wrap(model, p.cfg)


def read_shard(cfg: kernels.ModelConfig, files: list) -> tuple:
    """kernels.load_model's `read` hook: (this rank's config, a transformers-named state dict
    holding only this rank's slices), read with safetensors' get_slice, so a rank never holds
    the other ranks' parts of the split matrices in memory."""
    from safetensors import safe_open
    p = plan(cfg, dist.get_rank(), dist.get_world_size())
    rows = {"q_proj": p.q, "k_proj": p.kv, "v_proj": p.kv, "gate_proj": p.ffn, "up_proj": p.ffn}
    cols = {"o_proj": p.q, "down_proj": p.ffn}
    state = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                part, kind = name.split(".")[-2:]  # e.g. model.layers.0.mlp.up_proj.weight
                t = f.get_slice(name)
                if part in rows:
                    state[name] = t[rows[part][0]:rows[part][1]]
                elif part in cols and kind == "weight":
                    state[name] = t[:, cols[part][0]:cols[part][1]]
                elif part in cols:  # a row-split linear's bias: once in the all-reduced sum
                    state[name] = t[:] if dist.get_rank() == 0 else torch.zeros_like(t[:])
                else:
                    state[name] = t[:]
    return p.cfg, state


def load_model(name: str, device, dtype: str = "float32", threads=None) -> kernels.Model:
    """kernels.load_model reading only this rank's shard of each split tensor, then wrapped."""
    model = kernels.load_model(name, str(device), dtype, threads, read=read_shard)
    return wrap(model, model.cfg)


# ----------------------------------------------------------------------------------------------
# 4) one rank leads: a loop that runs on rank 0 alone (saguaro.py)

class Leader:
    """Rank 0's view of a sharded target, for a loop that runs on rank 0 only: saguaro's, where
    rank 0 alone talks to the draft process and samples, so no draw has to agree across ranks.
    Each forward first tells the other ranks (`follow`) what to run, then runs rank 0's shard:
    every rank computes every forward (the all-reduces need them all), one rank runs the loop.
    A loop may change cache.lengths between forwards (rollback): they travel with each call.
    Anything else (cfg, device, tokenizer, path) is the model's."""

    def __init__(self, model: kernels.Model):
        self.model, self.caches, self.count = model, weakref.WeakValueDictionary(), 0
        self.in_step = False  # a message or forward under way: the followers may be inside it

    def __getattr__(self, name):
        return getattr(self.model, name)

    def new_cache(self, batch_size: int, max_len: int) -> kernels.KVCache:
        cache, self.count = self.model.new_cache(batch_size, max_len), self.count + 1
        cache.tp_key = self.count  # the followers' cache for the same rows: freed with this one
        self._announced(("new_cache", cache.tp_key, (batch_size, max_len), list(self.caches)),
                        lambda: None)
        self.caches[cache.tp_key] = cache
        return cache

    def __call__(self, tokens, cache, **kw):
        return self._announced(("forward", cache.tp_key, cache.lengths.cpu(), tokens.cpu(),
                                _to(kw, "cpu")), self.model, tokens, cache, **kw)

    def prefill(self, prompts, cache):
        return self._announced(("prefill", cache.tp_key, cache.lengths.cpu(), prompts, {}),
                               self.model.prefill, prompts, cache)

    def _announced(self, message, run, *args, **kw):
        """Tell the followers `message`, then run rank 0's part of it. Until both are done the
        followers may wait inside a collective that only this step can match (`in_step`): a
        failure there cannot be told to them, so `led` abandons the group instead."""
        self.in_step = True
        _tell(message, self.device)
        out = run(*args, **kw)
        self.in_step = False
        return out

    def close(self, result=None):
        """Release the followers, handing them rank 0's result (what `led` returns everywhere)."""
        _tell(("stop", result), self.device)


@torch.inference_mode()
def follow(model: kernels.Model):
    """Ranks > 0 while rank 0 leads: run each forward rank 0 announces on this rank's shard,
    with caches of its own that mirror rank 0's, until rank 0 stops; -> rank 0's result."""
    caches = {}
    while True:
        op, *rest = _hear(model.device)
        if op == "stop":
            return rest[0]
        if op == "new_cache":
            key, shape, alive = rest
            caches = {k: c for k, c in caches.items() if k in alive}  # rank 0's are gone
            caches[key] = model.new_cache(*shape)
            continue
        key, lengths, x, kw = rest
        cache = caches[key]
        cache.lengths.copy_(lengths)
        if op == "prefill":
            model.prefill(x, cache)
        else:
            model(x.to(model.device), cache, **_to(kw, model.device))


def led(run, model):
    """run(target) -> result on rank 0 with Leader(model) while the other ranks follow; every
    rank returns rank 0's result. --tp 1: run(model). If any rank raises, every rank raises at
    once: rank 0 between steps tells the followers why; a rank failing where the others wait
    for it in a collective (any follower; rank 0 inside a step) leaves the group (`abandon`),
    so they fail with RankLost."""
    if not getattr(model, "tp", None):
        return run(model)
    if rank() > 0:
        try:
            result, error = follow(model)
        except BaseException:
            abandon()                        # rank 0 waits in a collective for this rank
            raise
        if error:
            raise RuntimeError(f"tensor parallelism: rank 0 failed ({error}); see its error.")
        return result
    leader = Leader(model)
    try:
        result = run(leader)
    except BaseException as e:
        if isinstance(e, RankLost) or leader.in_step:
            abandon()                        # the followers are gone, or inside a step
        else:
            leader.close((None, f"{type(e).__name__}: {e}"))
        raise
    leader.close((result, None))
    return result


def _to(kw, device):
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in kw.items()}


def _tell(message, device):
    """Rank 0: one pickled message to every other rank (its length, then its bytes), through
    `device` (NCCL sends GPU tensors only)."""
    data = torch.frombuffer(bytearray(pickle.dumps(message)), dtype=torch.uint8).to(device)
    for x in (torch.tensor([len(data)], device=device), data):
        _collective(lambda t: dist.broadcast(t, 0), x, "a broadcast from rank 0")


def _hear(device):
    """Ranks > 0: rank 0's next message (_tell)."""
    from0 = lambda t: dist.broadcast(t, 0)  # noqa: E731
    size = _collective(from0, torch.zeros(1, dtype=torch.long, device=device), "waiting for rank 0")
    data = _collective(from0, torch.zeros(int(size), dtype=torch.uint8, device=device),
                       "waiting for rank 0")
    return pickle.loads(data.cpu().numpy().tobytes())
