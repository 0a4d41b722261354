"""drafts.py: where a draft comes from when all you have is the target.

Speculative decoding needs a draft that shares the target's tokenizer and costs much less per
token. For the offline default target (SmolLM2-135M-Instruct) no such model exists here, so this
file makes drafts out of the target itself, two ways:

  1. model-free: `NGramDrafter`. Prompt lookup (find the last 3, then 2 tokens earlier in the
     context and propose what followed them) backed by n-gram count tables (4-gram, backing off
     to 3-, 2-, 1-gram) counted once over the target's own greedy answers to our own build
     prompts (assets/build_prompts.txt). Its q is exact: normalized counts at the matched order
     (sampled from at temperature > 0; at temperature 0 the argmax, with a one-hot q), or a
     one-hot q for a lookup hit. Cost: microseconds per token, c ~ 0.002.
  2. neural: `self_draft`. The target's own weights in a cheaper forward: weight-only int4 or
     int8 linears whose matmuls read bf16 activations (norms, attention, KV cache stay float32),
     a full head that scans the vocabulary in int4 and rescores its 16 best tokens with the
     target's float32 rows (`ShortlistHead`, the default draft's) or a vocabulary-truncated head
     (the H tokens the target emits most; logits put back into the full vocabulary with -inf
     elsewhere, so q = 0 there and verification stays exact), and fewer layers. The target's
     weights come from a 4-bit GGUF (Q4_1, groups of 32 with a scale and a minimum):
     `Int4Linear` recovers them exactly, and runs them in kernels_cpu.int4_mm where the CPU
     has AVX512-BF16 (scale and minimum in float16, as the GGUF has them), in torch's int4
     kernel elsewhere.

TRAP, stated plainly. The int4/int8 drafts ARE the target's own weights, run with bf16 matmul
inputs. The int4 kernel with float32 inputs reproduces the float32 target (max logit difference
~1e-4) but is 4-8x SLOWER than the float32 matmul on this CPU (`eval` checks it): so float32
dense is the target's fastest exact kernel, AR uses it, and against it these drafts are real
drafts (SD with them is lossless). But whoever accepts bf16 matmul inputs for the target should
run AR itself in bf16 (`--dtype bfloat16`: oneDNN-packed bf16 linears, 1.34x float32 AR on 2
threads, 1.47x on 1, at fb529f2) or in the int4 kernel (about 1/c x float32 AR; c = 0.35 then),
which beats SD with any draft here: in that setting every int4/int8 draft falls into the trap,
and only the n-gram draft (and the layer-skipping drafts, which lose) is a draft at all.

Notation as in the README: p = target distribution, q = draft distribution, K = draft tokens per
round, c = draft/target cost per token, a = acceptance; with i.i.d. acceptance SD's speedup is
S_K = (1 - a^(K+1)) / ((1 - a)(K c + 1)).

Shipped in assets/ (< 1 MB, nothing of the target's weights): the build prompts, the n-gram
tables, the target's token ranking (for truncated heads) and a fingerprint of the target's
weights; the layer lists are the CANDIDATES below. `load_draft(name, target)` rebuilds a draft
from the target plus these, after checking the fingerprint.

    python draft_lab.py build  # target answers -> assets/ (the build and its measuring tools)
    python draft_lab.py eval   # candidate table: c, greedy agreement, alpha, S_4 (held-out)
"""
import copy
import dataclasses
import hashlib
import json
import os
import weakref

import numpy as np
import torch
from torch import nn

import kernels
import kernels_cpu

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
PROMPTS_FILE = os.path.join(ASSETS, "build_prompts.txt")

# The neural candidates, all made from the target (eval measures each). bits: 4 or 8 for
# weight-only quantized linears whose matmuls read bf16, 32 for the target's own float32 ones;
# head: size H of a truncated head (None: the full vocabulary); skip: layers left out;
# shortlist: a full head that scans in int4 and rescores its best `shortlist` tokens exactly
# (ShortlistHead; otherwise the full head is int8 for an int4 draft).
CANDIDATES = {
    "head8k": dict(bits=32, head=8192, skip=()),
    "int8": dict(bits=8, head=None, skip=()),
    "int8-h8k": dict(bits=8, head=8192, skip=()),
    "int4-h8k": dict(bits=4, head=8192, skip=()),
    "int4-h16k": dict(bits=4, head=16384, skip=()),
    "int4-int8head": dict(bits=4, head=None, skip=()),
    "int4": dict(bits=4, head=None, skip=(), shortlist=16),
    "int4-h8k-skip6": dict(bits=4, head=8192, skip=tuple(range(12, 18))),
    "int4-h8k-skip12": dict(bits=4, head=8192, skip=tuple(range(9, 21))),
}
DEFAULT_DRAFT = "int4"  # the best measured SD speedup on the float32 default target


# ----------------------------------------------------------------------------------------------
# 1) the model-free draft: prompt lookup backed by n-gram tables

class NGramDrafter:
    """Model-free proposer. `tables[n]` maps a context of n tokens (n = 3, 2, 1) to the tokens
    seen after it and their normalized counts; `unigram` is the last resort.
    propose(contexts, k, temperature, generator) -> draft_tokens (B, k), draft_probs (B, k, V)."""

    LOOKUP = (3, 2)      # prompt lookup: match the last 3, then the last 2 tokens
    WINDOW = 4096        # search only the most recent tokens of a context

    def __init__(self, tables: dict, unigram: tuple, vocab_size: int):
        self.tables, self.unigram, self.vocab_size = tables, unigram, vocab_size
        self.name = "ngram"

    # -- counting (the build) and storage ------------------------------------------------------
    @staticmethod
    def count(sequences, starts, order: int = 4) -> dict:
        """Count n-grams of the target's answers. sequences: token lists (prompt + answer);
        starts[i]: where the answer begins (only answer tokens are counted as 'next', the
        prompt serves as left context). Returns arrays {f"ctx{n}", f"next{n}", f"count{n}"}
        sorted, so the same sequences always give the same bytes."""
        out = {}
        for n in range(order - 1, -1, -1):
            counts = {}
            for seq, start in zip(sequences, starts):
                for i in range(max(start, n), len(seq)):
                    key = tuple(seq[i - n: i + 1])  # n context tokens, then the next one
                    counts[key] = counts.get(key, 0) + 1
            keys = sorted(counts)
            arr = np.array(keys, dtype=np.int32).reshape(len(keys), n + 1)
            out[f"ctx{n}"], out[f"next{n}"] = arr[:, :n], arr[:, n]
            out[f"count{n}"] = np.array([counts[k] for k in keys], dtype=np.int32)
        return out

    @classmethod
    def from_counts(cls, arrays: dict, vocab_size: int) -> "NGramDrafter":
        tables, unigram = {}, None
        for n in range(0, 16):
            if f"ctx{n}" not in arrays:
                continue
            ctx, nxt, cnt = arrays[f"ctx{n}"], arrays[f"next{n}"], arrays[f"count{n}"]
            grouped = {}
            for key, t, c in zip(map(tuple, ctx.tolist()), nxt.tolist(), cnt.tolist()):
                grouped.setdefault(key, []).append((-c, t))
            table = {}
            for key, pairs in grouped.items():
                pairs.sort()  # most frequent first, ties by lower id: a deterministic argmax
                ids = np.array([t for _, t in pairs], dtype=np.int64)
                w = np.array([-c for c, _ in pairs], dtype=np.float64)
                table[key] = (ids, (w / w.sum()).astype(np.float32))
            if n == 0:
                unigram = table[()]
            else:
                tables[n] = table
        if unigram is None or int(unigram[0].max()) >= vocab_size:
            raise ValueError("n-gram tables need a unigram row and token ids below the "
                             f"vocabulary size {vocab_size}.")
        return cls(tables, unigram, vocab_size)

    # -- one position ---------------------------------------------------------------------------
    def distribution(self, context) -> tuple:
        """-> (ids, q, how): the tokens q gives mass to, their probabilities, and which rule
        produced them ('lookup3', 'lookup2', 'ngram4'..'ngram2', 'unigram')."""
        a = np.asarray(context[-self.WINDOW:], dtype=np.int64)
        for n in self.LOOKUP:
            if len(a) > n:
                # windows a[s:s+n] that end before the last token, so a[s+n] exists
                win = np.lib.stride_tricks.sliding_window_view(a[:-1], n)
                hit = np.flatnonzero((win == a[-n:]).all(1))
                if hit.size:  # the most recent match: what followed it, one-hot
                    return a[hit[-1] + n: hit[-1] + n + 1], np.ones(1, np.float32), f"lookup{n}"
        for n in sorted(self.tables, reverse=True):
            if len(context) >= n:
                entry = self.tables[n].get(tuple(int(t) for t in context[-n:]))
                if entry is not None:
                    return entry[0], entry[1], f"ngram{n + 1}"
        return self.unigram[0], self.unigram[1], "unigram"

    # -- the model-free draft interface ---------------------------------------------------------
    def propose(self, contexts, k: int, temperature: float, generator=None):
        """contexts[b] = prompt + tokens emitted so far. Drafts k tokens per row, each from the
        distribution above given the context and the tokens drafted before it.
        Returns draft_tokens (B, k) long and draft_probs (B, k, V) float32, where
        draft_probs[b, i] is exactly the law draft_tokens[b, i] was drawn from."""
        kernels.check_sampling(temperature)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}.")
        dev = generator.device if generator is not None else torch.device("cpu")
        B, V = len(contexts), self.vocab_size
        draft_tokens = torch.zeros(B, k, dtype=torch.long)
        draft_probs = torch.zeros(B, k, V, dtype=torch.float32, device=dev)
        for b, ctx in enumerate(contexts):
            seq = list(ctx)
            for i in range(k):
                ids, q, _ = self.distribution(seq)
                if temperature == 0 or len(ids) == 1:
                    x = int(ids[0])                       # argmax; q becomes one-hot below
                    draft_probs[b, i, x] = 1.0
                else:
                    support = torch.as_tensor(ids, device=dev)
                    draft_probs[b, i, support] = torch.as_tensor(q, device=dev)
                    x = int(kernels.sample(draft_probs[b, i], generator))
                draft_tokens[b, i] = x
                seq.append(x)
        return draft_tokens.to(dev), draft_probs


# ----------------------------------------------------------------------------------------------
# 2) the neural self-draft: quantized linears, a truncated head, fewer layers

class QuantLinear(nn.Module):
    """Weight-only quantized linear: the weights stream at 8 or 4 bits, the matmul reads its
    input in `compute` dtype (bf16: torch's fast CPU path; float32 works but is 5-20x slower
    here) and returns the caller's dtype. Everything around the matmuls (norms, RoPE, attention,
    KV cache) stays in the target's dtype (float32 by default)."""

    def forward(self, x):                                          # x (..., K) -> (..., N)
        y = self.matmul(x.reshape(-1, x.shape[-1]).to(self.compute))
        y = y.view(*x.shape[:-1], -1).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def _set_bias(self, bias):
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), False)


class Int8Linear(QuantLinear):
    """int8, one scale per output channel (torch._weight_int8pack_mm)."""

    def __init__(self, weight, bias=None, compute=torch.bfloat16):
        super().__init__()
        w = weight.detach().float()
        scale = w.abs().amax(1).clamp_min(1e-12) / 127
        self.register_buffer("q", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(compute))
        self.compute = compute
        self._set_bias(bias)

    def matmul(self, x):
        return torch._weight_int8pack_mm(x, self.q, self.scale)


class Int4Linear(QuantLinear):
    """int4 in groups of 32 along the input, asymmetric: w = d*q + m per group, q in 0..15: the
    GGUF Q4_1 layout, so the default target's weights are recovered EXACTLY (it is the target's
    own grid). torch's CPU kernel computes (q - 8) * scale + zero, hence zero = m + 8 d."""

    GROUP = 32

    def __init__(self, weight, bias=None, compute=torch.bfloat16):
        super().__init__()
        w = weight.detach().float()
        N, Kin = w.shape
        if Kin % self.GROUP or N % 16:
            raise ValueError(f"Int4Linear needs in_features divisible by {self.GROUP} and "
                             f"out_features by 16 (torch's int4 layout), got {Kin}, {N}: use an "
                             "int8 draft (bits=8) for this model.")
        g = w.view(N, Kin // self.GROUP, self.GROUP)                 # (N, groups, 32)
        lo, hi = g.amin(-1), g.amax(-1)
        d = ((hi - lo) / 15).clamp_min(1e-12)
        q = torch.round((g - lo[..., None]) / d[..., None]).clamp(0, 15).to(torch.int32)
        self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(q.view(N, Kin), 2))
        zeros = lo + 8 * d
        scales_zeros = torch.stack((d.T, zeros.T), -1)              # (groups, N, 2)
        self.register_buffer("scales_zeros", scales_zeros.to(compute).contiguous())
        self.compute = compute
        self._set_bias(bias)
        # where the CPU has AVX512-BF16, kernels_cpu.int4_mm instead: the same weights (scale
        # and minimum in float16, as a GGUF keeps them), the bf16 input, far less arithmetic
        self.ours = None
        if compute == torch.bfloat16 and kernels_cpu.int4_available():
            try:
                self.ours = kernels_cpu.int4_pack(q.view(N, Kin), d, lo)
            except ValueError:  # a scale past float16's range: torch's kernel runs this one
                pass

    def matmul(self, x):
        ops = kernels_cpu.cpu_ops()  # None in SSD_CPU_KERNELS=eager: torch's kernel then
        if self.ours is not None and ops is not None:
            return ops.int4_mm(x, *self.ours)
        return torch._weight_int4pack_mm_for_cpu(x, self.packed, self.GROUP, self.scales_zeros)

    def stack_spec(self, dtype):  # kernels_cpu.Stack runs this same kernel
        if self.ours is not None:
            return kernels_cpu.INT4_BF16, 0, *self.ours
        return kernels_cpu.INT4, self.GROUP, self.packed, self.scales_zeros


class CastLinear(QuantLinear):
    """Plain weights in `compute` dtype (bf16 on a GPU, where the int kernels above do not run)."""

    def __init__(self, weight, bias=None, compute=torch.bfloat16):
        super().__init__()
        self.register_buffer("weight", weight.detach().to(compute))
        self.compute = compute
        self._set_bias(bias)

    def matmul(self, x):
        return x @ self.weight.T


class TruncatedHead(nn.Module):
    """The head restricted to H token ids; returns full-vocabulary logits (..., V) float32 with
    -inf outside, so softmax gives q = 0 there: the draft never proposes those tokens, and
    verification (which divides by q only at proposed tokens) stays exact."""

    def __init__(self, proj: nn.Module, token_ids: torch.Tensor, vocab_size: int):
        super().__init__()
        self.proj, self.vocab_size = proj, vocab_size
        self.register_buffer("token_ids", token_ids.long())

    def forward(self, x):
        y = self.proj(x).float()                                     # (..., H)
        out = y.new_full((*y.shape[:-1], self.vocab_size), float("-inf"))
        out[..., self.token_ids] = y
        return out                                                   # (..., V)


class ShortlistHead(nn.Module):
    """The full-vocabulary head in two passes: a cheap int4 scan scores every token, then the k
    best are scored again with the target's own float32 rows (k dot products). Greedy drafting
    so picks the float32 head's argmax whenever the scan ranks it in its top k (the scan's error
    is ~1 logit, the rescore's ~1e-6), while streaming 5/8 of an int8 head's bytes (4-bit codes
    plus a bf16 scale and zero per 32): a draft forward ~1.4-1.8 ms faster on one core here. At
    temperature > 0 the draft samples from the softmax of these mixed logits: any q is allowed,
    because verification divides by the very q the draft sampled from."""

    def __init__(self, weight, k=16, compute=torch.bfloat16):
        super().__init__()
        self.scan, self.k = Int4Linear(weight, None, compute), k
        self.register_buffer("rows", weight.detach().float(), persistent=False)  # shared storage

    def forward(self, x):
        xs = x.reshape(-1, x.shape[-1]).float()                      # (N, C)
        logits = self.scan(xs).float()                               # (N, V), approximate
        best = logits.topk(self.k, dim=-1).indices                   # (N, k)
        exact = torch.einsum("nc,nkc->nk", xs, self.rows[best])      # (N, k), float32
        return logits.scatter_(-1, best, exact).view(*x.shape[:-1], -1)


def _linear(weight, bias, bits, compute):
    if bits == 32:
        lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        lin.weight = nn.Parameter(weight.detach().float(), False)
        if bias is not None:
            lin.bias = nn.Parameter(bias.detach().float(), False)
        return lin
    return {8: Int8Linear, 4: Int4Linear, 16: CastLinear}[bits](weight, bias, compute)


@torch.inference_mode()
def self_draft(target: kernels.Model, bits: int = 8, head=None, skip=(), head_rank=None,
               name="self-draft", compute=torch.bfloat16, shortlist=None) -> kernels.Model:
    """A float32 kernels.Model made of the target's weights: the layers not in `skip`, linears
    stored in `bits` (8, 4: weight-only quantized; 16: bf16; 32: the target's float32) whose
    matmuls run in `compute` dtype, and a head cut to the first `head` tokens of `head_rank`
    (None: the full vocabulary). shortlist=k (with bits 4 and a full head): a ShortlistHead
    instead of the int8 head. The target is left unchanged."""
    if bits not in (4, 8, 16, 32):
        raise ValueError(f"bits must be 4, 8, 16 or 32, got {bits}.")
    if bits in (4, 8) and target.device.type != "cpu":
        bits = 16  # the int8/int4 kernels used here are CPU ones; a GPU gets a plain bf16 draft
    # the head's rows are the target's 8-bit embedding (Q8_0): int8 keeps them nearly exact
    head_bits = 8 if bits == 4 else bits
    if compute == torch.float32 and bits == 4:
        head_bits = 32  # the exactness check: the target's weights, float32 math throughout
    keep = [i for i in range(target.cfg.num_layers) if i not in set(skip)]
    cfg = dataclasses.replace(target.cfg, num_layers=len(keep), tie_embeddings=False,
                              windows=tuple(target.layers[i].window for i in keep))
    with torch.device("meta"):
        draft = kernels.Model(cfg)
    draft.embed = nn.Embedding.from_pretrained(target.embed.weight.detach().float(), freeze=True)
    draft.layers = nn.ModuleList()
    for i in keep:
        block = copy.copy(target.layers[i])          # shallow: same config, own modules below
        block._modules = dict(block._modules)
        block._parameters = {n: nn.Parameter(p.detach().float(), False)
                             for n, p in block._parameters.items()}
        for n in ("wqkv", "wo", "w13", "w2"):
            lin = getattr(target.layers[i], n)
            block._modules[n] = _linear(lin.weight, lin.bias, bits, compute)
        draft.layers.append(block)
    draft.norm = nn.Parameter(target.norm.detach().float(), False)
    W, V = target.head.weight, target.cfg.vocab_size
    if head is None and shortlist and bits == 4 and compute != torch.float32:
        draft.head = ShortlistHead(W, shortlist, compute)
    elif head is None:
        draft.head = _linear(W, None, head_bits, compute)
    else:
        if head_rank is None:
            raise ValueError("a truncated head needs the target's token ranking (head_rank).")
        ids = torch.as_tensor(np.asarray(head_rank[:head], dtype=np.int64), device=W.device)
        draft.head = TruncatedHead(_linear(W[ids], None, head_bits, compute), ids, V)
    draft.inv_freq = kernels._rope_inv_freq(cfg).to(W.device)
    draft.tokenizer, draft.name = target.tokenizer, name
    return draft.eval()


# ----------------------------------------------------------------------------------------------
# 3) belonging: a draft built for one target must refuse another

def fingerprint(model: kernels.Model) -> str:
    """A short hash of the architecture and of the signs of a strided sample of every weight.
    Signs, not values: rounding to any dtype keeps a number's sign (an underflow gives a signed
    zero, an overflow a signed inf), so the same target gives the same fingerprint in every
    dtype (float32, bfloat16, float16), while values rounded to one dtype differ from another
    dtype's at rounding boundaries."""
    c = model.cfg
    h = hashlib.sha256(repr((c.model_type, c.vocab_size, c.hidden_size, c.num_layers,
                             c.num_heads, c.num_kv_heads, c.intermediate_size)).encode())
    for name, t in sorted(model.state_dict().items()):
        if t.is_floating_point():
            sample = t.detach().reshape(-1)[::4099][:512]
            h.update(name.encode())
            h.update(np.packbits(torch.signbit(sample).cpu().numpy()).tobytes())
    return h.hexdigest()[:20]


def _manifest_for(target) -> tuple:
    """-> (manifest dict, its folder) of the shipped assets built for this target."""
    fp, found = fingerprint(target), []
    for fname in sorted(os.listdir(ASSETS)) if os.path.isdir(ASSETS) else []:
        if fname.startswith("drafts-") and fname.endswith(".json"):
            with open(os.path.join(ASSETS, fname)) as f:
                m = json.load(f)
            if m.get("target_fingerprint") == fp:
                return m, ASSETS
            found.append(f"{m.get('target_name')} ({m.get('target_fingerprint')})")
    raise ValueError(
        f"no shipped draft belongs to target {getattr(target, 'name', '?')!r} (weights "
        f"fingerprint {fp}); assets/ holds drafts for: {', '.join(found) or 'nothing'}. Build "
        f"drafts for this target with `python draft_lab.py build --model <target>`, or pass a draft "
        f"model name/folder that shares its tokenizer.")


# ----------------------------------------------------------------------------------------------
# 4) loading: a drafts.py name, or a model name/path

DRAFT_NAMES = ("default", "ngram", "self")  # and CANDIDATES, a model folder or a hub id
DRAFT_HELP = ("default (the target's int4 self-draft), ngram (model-free), self (the target "
              "itself), another drafts.py candidate, or a model folder / hub id")


_FAST_BACKUPS = weakref.WeakKeyDictionary()  # target -> its shipped n-gram drafter


def fast_backup(target: kernels.Model, prompts: list):
    """saguaro.py's fast backup: the n-gram drafter (prompt lookup + the target's shipped n-gram
    tables, read once per target: ~0.4 s a call before); for a target without shipped tables,
    prompt lookup over n-grams of the prompts."""
    try:
        if target not in _FAST_BACKUPS:
            _FAST_BACKUPS[target] = load_draft("ngram", target)
        return _FAST_BACKUPS[target]
    except ValueError:
        counts = NGramDrafter.count(prompts, [0] * len(prompts))
        return NGramDrafter.from_counts(counts, target.cfg.vocab_size)


def load_draft(name: str, target: kernels.Model):
    """The one resolver of draft names, for every CLI, bench.py and saguaro's draft process:
    'ngram' -> NGramDrafter; 'default' or a CANDIDATES name -> the neural self-draft rebuilt
    from the target and the shipped artifacts (after checking they belong to this target);
    'self' (or the target's own name or folder) -> the target itself (each loop gives it its
    own KV cache); anything else -> kernels.load_model(name) on the target's device and dtype.
    Errors: FileNotFoundError for an unknown name, ValueError for a target without drafts."""
    if name == "ngram" or name == "default" or name in CANDIDATES:
        manifest, folder = _manifest_for(target)
        if name == "ngram":
            with np.load(os.path.join(folder, manifest["ngram_file"])) as z:
                return NGramDrafter.from_counts(dict(z), target.cfg.vocab_size)
        name = DEFAULT_DRAFT if name == "default" else name
        rank = np.load(os.path.join(folder, manifest["head_rank_file"]))
        return self_draft(target, head_rank=rank, name=name, **CANDIDATES[name])
    if name == "self" or name in (getattr(target, "name", None), getattr(target, "path", None)):
        return target
    dtype = str(target.dtype).removeprefix("torch.")
    try:
        return kernels.load_model(name, str(target.device), dtype)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"draft {name!r} is neither one of drafts.py's names ("
                                f"{', '.join(DRAFT_NAMES + tuple(CANDIDATES))}) nor a model "
                                f"({e})") from e
