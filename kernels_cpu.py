"""kernels_cpu.py: the CPU's speed path for kernels.py's model, kept apart from the readable one.

kernels.Block.forward is the reference: what a decoder layer computes. On the CPU the same layer
runs faster in two ways, both tested against that reference (tests/test_kernels.py):
  1. the small steps between a layer's matmuls (RMS norms, q/k norm + RoPE + the KV-cache write,
     SiLU * up) run fused in C++ (kernels_cpu.cpp, compiled once per machine), and all layers of
     a step run in one C++ call (`Stack`), with no Python between them;
  2. each linear reads a weight pre-packed for the matmul a small step runs (`PackedLinear`).
A decode step is bound by streaming the weights; these remove the per-call overhead around them.
SSD_CPU_KERNELS=eager keeps everything in PyTorch ops. Nothing here changes what is computed
beyond rounding; the model knows nothing of this file: `speed_up(model)` swaps its linears and
`run_layers` is what kernels.Model calls instead of its layer loop when `available()`.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import weakref

import torch
import torch.nn.functional as F
from torch import nn

CPU_KERNELS = (os.environ.get("SSD_CPU_KERNELS") or "fused").strip().lower()  # unset, empty: fused
if CPU_KERNELS not in ("fused", "eager"):
    raise ValueError(f"SSD_CPU_KERNELS={CPU_KERNELS!r}: use 'fused' or 'eager'.")
_cpu_ops = None  # the compiled kernels_cpu module, once cpu_ops() has loaded it
_CPU_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels_cpu.cpp")
CPU_BUILD_FLAGS = ["-O3", "-fopenmp"]
BUILD_WAIT_S = 900.0  # how long a process waits for another one's build before running eager


# ----------------------------------------------------------------------------------------------
# 1) building kernels_cpu.cpp: once per machine, one process at a time

def cache_dir() -> str:
    return os.environ.get("SSD_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "ssd-ref"))


@contextlib.contextmanager
def exclusive(path: str, what: str):
    """Hold an OS file lock on `path` (filelock: released when its holder dies, even by
    SIGKILL). When another process holds it, say so and wait at most BUILD_WAIT_S (then
    filelock.Timeout)."""
    from filelock import FileLock, Timeout
    lock = FileLock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"kernels: another process is {what}; waiting for it (at most {BUILD_WAIT_S:.0f} "
              "s) ...", file=sys.stderr, flush=True)
        lock.acquire(timeout=BUILD_WAIT_S)
    try:
        yield
    finally:
        lock.release()


def cpu_build_dir() -> str:
    """Where kernels_cpu.cpp is built: keyed by its content, the flags and torch's version, so
    checkouts with different sources never build over each other, and an edit rebuilds."""
    with open(_CPU_SOURCE, "rb") as f:
        key = hashlib.sha256(f.read() + repr((CPU_BUILD_FLAGS, torch.__version__,
                                              sys.version_info[:2])).encode()).hexdigest()
    return os.path.join(cache_dir(), "build", f"kernels_cpu-{key[:16]}")


def cpu_ops():
    """The fused CPU kernels (kernels_cpu.cpp): compiled on first use on this machine (~30 s,
    with a message), imported from the build cache after that. None when
    SSD_CPU_KERNELS=eager, or when the build failed (a warning says why; the eager PyTorch
    layer then runs). A build runs under an OS file lock (released when its holder dies, even
    by SIGKILL; a second process waits, with a message, at most BUILD_WAIT_S) in a folder of
    its own, renamed into place when complete: a build killed midway (whose compiler may even
    run on as an orphan) leaves only its own folder, never a stale lock or half a library in
    the one that is loaded."""
    global _cpu_ops, CPU_KERNELS
    if _cpu_ops is None and CPU_KERNELS == "fused":
        try:
            _cpu_ops = _import_or_build()
        except Exception as e:  # no compiler, no ninja, a build that never ends: slower, correct
            import warnings
            warnings.warn(f"kernels_cpu.cpp did not build ({type(e).__name__}: {e}); the CPU "
                          "runs the eager PyTorch layer instead (install a C++ compiler and "
                          "ninja for the fused one, or set SSD_CPU_KERNELS=eager to silence this).")
            CPU_KERNELS = "eager"
    return _cpu_ops


def clear_leftovers(path: str) -> None:
    """Remove `path` and every `path`.tmp* beside it: what builds or conversions killed midway
    left (each writes `path`.tmp<pid>, renamed into place when complete). Call it holding
    exclusive(path + ".lock"): then none of them is running."""
    import glob
    import shutil
    for old in glob.glob(glob.escape(path) + ".tmp*") + [path]:
        shutil.rmtree(old, ignore_errors=True)


def _import_or_build():
    import importlib.util
    build = cpu_build_dir()
    library = os.path.join(build, "ssd_kernels_cpu.so")
    if not os.path.exists(library):
        os.makedirs(os.path.dirname(build), exist_ok=True)
        with exclusive(build + ".lock", f"building kernels_cpu.cpp into {build}"):
            if not os.path.exists(library):  # nobody finished it while we waited
                from torch.utils.cpp_extension import load
                print("kernels: compiling kernels_cpu.cpp once for this machine (~30 s) ...",
                      file=sys.stderr, flush=True)
                tmp = f"{build}.tmp{os.getpid()}"
                clear_leftovers(build)  # of killed builds, or of an older scheme
                os.makedirs(tmp)
                module = load("ssd_kernels_cpu", [_CPU_SOURCE], extra_cflags=CPU_BUILD_FLAGS,
                              build_directory=tmp)
                os.rename(tmp, build)  # complete, in one step
                return module
    spec = importlib.util.spec_from_file_location("ssd_kernels_cpu", library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def available() -> bool:
    return cpu_ops() is not None


# ----------------------------------------------------------------------------------------------
# 2) the layers of a step in C++

def fused_layer(block, x, layer, cache, cos, sin, attn):
    """kernels.Block.forward on the CPU with the steps between the matmuls in C++: the same
    layer, the same rounding steps, ~100 us less per layer. SDPA path only."""
    B, T, _ = x.shape
    H, Hk, D, eps = block.shape
    ops, (_, slots, mask, S) = _cpu_ops, attn
    qkv = block.wqkv(ops.rms_norm(x, block.attn_norm, eps)).view(B, T, H + 2 * Hk, D)
    q = ops.rope_store(qkv, cos, sin, cache.k[layer], cache.v[layer], slots, H, Hk,
                       block.q_norm if block.qk_norm else None,
                       block.k_norm if block.qk_norm else None, eps)  # (B, Hk, T*G, D)
    y = cache.grouped_sdpa(layer, q, mask, S, T)                       # (B, T, H, D)
    x = x + block.wo(y.reshape(B, T, H * D))
    return x + block.w2(ops.silu_mul(block.w13(ops.rms_norm(x, block.mlp_norm, eps))))


_STACKS = weakref.WeakKeyDictionary()  # model -> {dtype: (Stack or None, key, parts)}


def _layers_parts(model):
    """What a Stack is built from: every module and parameter of every layer (a swapped
    linear or norm makes another list; a record keeps its list alive, so no id is reused)."""
    return [v for b in model.layers for d in (b._modules, b._parameters) for v in d.values()]


def cpu_stack(model, dtype):
    """The layers as one kernels_cpu.Stack for steps of any number of tokens: each linear runs
    the kernel it would run from Python (PackedLinear's choice for this dtype: one packed
    weight serves every row count), everything else as in fused_layer. Built once per dtype,
    rebuilt when a layer changed or the weights moved (.to()); None if a linear is of a kind
    the Stack cannot run."""
    parts = _layers_parts(model)
    key = (model.embed.weight.data_ptr(), *map(id, parts))  # ~200 ids: tens of us, per step
    stacks = _STACKS.setdefault(model, {})
    hit = stacks.get(dtype)
    if hit is not None and hit[1] == key:
        return hit[0]
    none, tensors, kinds = torch.empty(0, dtype=dtype), [], []
    for b in model.layers:
        tensors += [b.attn_norm, b.q_norm if b.qk_norm else none,
                    b.k_norm if b.qk_norm else none, b.mlp_norm]
        for lin in (b.wqkv, b.wo, b.w13, b.w2):
            spec = linear_spec(lin, dtype)
            if spec is None:
                stacks[dtype] = (None, key, parts)
                return None
            kind, param, a, b2 = spec
            tensors += [a, none if b2 is None else b2, none if lin.bias is None else lin.bias]
            kinds += [kind, param]
    H, Hk, _, eps = model.layers[0].shape
    stack = _cpu_ops.Stack(tensors, kinds, H, Hk, eps)
    stacks[dtype] = (stack, key, parts)
    return stack


def run_layers(model, x, cache, cos, sin, attn):
    """kernels.Model's layer loop on the CPU, attn[i] being layer i's: all layers in one C++
    call when they share one mask (the Stack takes one) and every linear is of a kind the
    Stack runs, else layer by layer with the fused steps (some layers with a sliding window)."""
    one_mask = all(a is attn[0] for a in attn)
    stack = cpu_stack(model, x.dtype) if one_mask else None
    if stack is None:
        for i, block in enumerate(model.layers):
            x = fused_layer(block, x, i, cache, cos, sin, attn[i])
        return x
    return stack.forward(x, cache.k, cache.v, cos, sin, attn[0][1], attn[0][2], attn[0][3])


# ----------------------------------------------------------------------------------------------
# 3) pre-packed weights

class PackedLinear(nn.Module):
    """A CPU linear whose weight is pre-packed by oneDNN, on first use, into its own blocked
    layout: oneDNN's matmul reads it faster than F.linear reads the plain weight at every row
    count M (the tokens of a step) we timed, from decode steps to long prefills, in float32 and
    bfloat16 (README, "Where the time goes"). It is packed with no row-count hint: packed for
    M = 1, float32 steps of several rows ran much slower. Same math as F.linear (differences at
    rounding level). One packed copy per dtype serves every M, so a model holds its weights
    plus ONE packed copy whatever the step widths. Every loop shares this kernel, the
    autoregressive baseline included: a faster kernel for the target belongs to the baseline
    too, or every speedup is inflated. Other dtypes and devices stay on F.linear."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.packed = {}  # dtype -> the packed weight, made on first use
        self.plans = {}   # (dtype, M) -> the function that runs this linear for them

    def forward(self, x):
        M = x.numel() // x.shape[-1]  # rows: tokens in the step
        kernel = self.plans.get((x.dtype, M))
        if kernel is None:  # first call with this dtype and M: choose (and pack) once
            kernel = self.plans[(x.dtype, M)] = self._choose(x.dtype, M)
        return kernel(x)

    def spec(self, dt):
        """(kind, param, a, b): the kernel for rows of dtype dt (any number), packing the weight
        on the first use of dt. Kinds as kernels_cpu.cpp numbers them: PLAIN (a = weight),
        ONEDNN_PACKED (a = packed); param and b are unused by both."""
        w = self.weight
        if dt != w.dtype or w.device.type != "cpu" or not PACKED.get(dt):
            return PLAIN, 0, w, None
        if dt not in self.packed:  # no batch-size hint: see the class docstring
            self.packed[dt] = torch.ops.mkldnn._reorder_linear_weight(w)
        return ONEDNN_PACKED, 0, self.packed[dt], None

    def _choose(self, dt, M):
        kind, _, packed, _ = self.spec(dt)
        if kind == ONEDNN_PACKED:
            b = self.bias
            return lambda x: torch.ops.mkldnn._linear_pointwise(
                x.reshape(M, -1), packed, b, "none", [], "").view(*x.shape[:-1], -1)
        return self._plain

    def _plain(self, x):
        return F.linear(x, self.weight, self.bias)

    def _apply(self, fn, recurse=True):  # .to(dtype/device): the packed weights are stale
        self.packed, self.plans = {}, {}
        return super()._apply(fn, recurse)

    def __getstate__(self):  # deepcopy/pickle: oneDNN's packed tensors are opaque, re-pack later
        state = self.__dict__.copy()
        state["packed"], state["plans"] = {}, {}
        return state


PLAIN, ONEDNN_PACKED, INT4, INT4_BF16 = 0, 1, 2, 3  # linear kinds, as in kernels_cpu.cpp


def linear_spec(lin: nn.Module, dtype):
    """How kernels_cpu.Stack runs this linear: (kind, param, a, b), or None if it cannot."""
    if isinstance(lin, PackedLinear):
        return lin.spec(dtype)
    if type(lin) is nn.Linear:
        return PLAIN, 0, lin.weight, None
    return lin.stack_spec(dtype) if hasattr(lin, "stack_spec") else None


_ONEDNN = (torch.backends.mkldnn.is_available()
           and hasattr(torch.ops.mkldnn, "_linear_pointwise"))
_ONEDNN_BF16 = _ONEDNN and torch.ops.mkldnn._is_mkldnn_bf16_supported()
# the dtypes PackedLinear packs (bf16 only where the CPU has native bf16 instructions;
# elsewhere F.linear runs)
PACKED = {torch.float32: _ONEDNN, torch.bfloat16: _ONEDNN_BF16}


def pack_linears(model):
    """Swap every linear of a CPU float32 or bfloat16 model for a PackedLinear."""
    if model.device.type != "cpu" or model.dtype not in (torch.float32, torch.bfloat16):
        return model
    for block in model.layers:
        for name in ("wqkv", "wo", "w13", "w2"):
            if isinstance(getattr(block, name), nn.Linear):
                setattr(block, name, PackedLinear(getattr(block, name)))
    if isinstance(model.head, nn.Linear):
        model.head = PackedLinear(model.head)
    return model


def speed_up(model):
    """The CPU speed path for a loaded model: packed linears, and the C++ kernels built (or
    loaded) now rather than inside the first timed step. Returns the model."""
    if model.device.type == "cpu":
        pack_linears(model)
        cpu_ops()
    return model


# ----------------------------------------------------------------------------------------------
# 4) int4 weights x bfloat16 activations (the int4 drafts)

def int4_available() -> bool:
    """Whether kernels_cpu.cpp's int4_mm runs here (built, and a CPU with AVX512-BF16)."""
    ops = cpu_ops()
    return ops is not None and ops.int4_supported()


def int4_pack(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor):
    """int4_mm's layout of the weight w = d q + m: q (N, K) integers 0..15, d and m (N, K/32)
    per group of 32 inputs (N % 16 == 0, K % 32 == 0). Returns w (N/16, K/4, 32) uint8, byte
    2c + h of block n, chunk j holding q[16n + c, 4j + h] | q[16n + c, 4j + 2 + h] << 4, and dz
    (N/16, K/32, 2, 16) float16: d, then m. Raises ValueError if d or m is past float16's range."""
    N, K = q.shape
    dz = torch.stack((d.float(), m.float()), 0).half()                  # (2, N, G)
    if not torch.isfinite(dz).all():
        raise ValueError("int4_pack: a group's scale or minimum is past float16's range")
    dz = dz.view(2, N // 16, 16, K // 32).permute(1, 3, 0, 2)          # [n, g, d|m, c]
    q = q.to(torch.uint8).view(N // 16, 16, K // 4, 4)                  # [n, c, j, i]
    w = (q[..., :2] | (q[..., 2:] << 4)).permute(0, 2, 1, 3)            # [n, j, c, h]
    return w.reshape(N // 16, K // 4, 32).contiguous(), dz.contiguous()
