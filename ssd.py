"""ssd.py: speculative speculative decoding (SSD) -- work in progress (draft side first)."""
import argparse
import time
from dataclasses import dataclass

import torch

import kernels

# ----------------------------------------------------------------------------------------------
# The new idea: the speculation cache, and the draft side that fills it

@dataclass
class SpeculationCache:
    """S: (k, t) -> (y_1..y_K, their q rows), one table per sequence, stored as arrays so a whole
    batch is looked up at once (and saguaro.py can send it between processes).
    keys (B, N, 2) = (k, t) per branch; tokens (B, N, K); probs (B, N, K, V)."""
    keys: torch.Tensor
    tokens: torch.Tensor
    probs: torch.Tensor

    def lookup(self, k: torch.Tensor, t: torch.Tensor):
        """k, t (B,): each row's verification outcome -> hit (B,) bool, tokens (B, K),
        probs (B, K, V) (rows that missed get branch 0: garbage the caller must replace)."""
        match = (self.keys[..., 0] == k[:, None]) & (self.keys[..., 1] == t[:, None])  # (B, N)
        branch = match.long().argmax(1)          # the matching branch, 0 when none matches
        rows = torch.arange(len(k), device=k.device)
        return match.any(1), self.tokens[rows, branch], self.probs[rows, branch]


def fanout_list(f, K: int) -> list:
    """F as an int (the same fan-out at every k) or K+1 ints F_0..F_K -> a list of K+1 ints."""
    fs = [f] * (K + 1) if isinstance(f, int) else list(f) if isinstance(f, (list, tuple)) else []
    if len(fs) != K + 1 or any(not isinstance(x, int) or x < 0 for x in fs) or sum(fs) == 0:
        raise ValueError(f"fan-out must be an int >= 1 or K+1 = {K + 1} ints >= 0 (not all 0), "
                         f"got {f!r}.")
    return fs


def predict_outcomes(glue_logits, spec_tokens, fanout):
    """The outcomes (k, t) the draft bets on. glue_logits (B, K+1, V): the draft's logits after
    t0, x_1, ..., x_K; spec_tokens (B, K) = x. For k < K a rejection of x_{k+1} draws the bonus
    from the residual at position k+1, which never holds x_{k+1}: guess the top-F_k tokens of
    q_{k+1} but x_{k+1}. For k = K the bonus comes from p_{K+1}: guess the top-F_K of q_{K+1}.
    Ranked by logits, not q: at temperature 0 q is one-hot, so its order says nothing, and at
    T > 0 the order is the same (top-k/top-p only zero the tail). Returns keys (B, N, 2)."""
    B, K1, V = glue_logits.shape
    keys = []
    for k, f in enumerate(fanout):
        if f == 0:
            continue
        scores = glue_logits[:, k].clone()                           # (B, V)
        if k < K1 - 1:
            scores.scatter_(1, spec_tokens[:, k:k + 1], float("-inf"))  # x_{k+1} is never the bonus
        t = scores.topk(f, dim=-1).indices                           # (B, f)
        keys.append(torch.stack((torch.full_like(t, k), t), dim=-1))  # (B, f, 2)
    return torch.cat(keys, dim=1)                                    # (B, N, 2)


def draft_branches(draft, cache, fork, first, K, temperature, top_k, top_p, generator,
                   probs_fn=kernels.probs_from_logits):
    """Decode K tokens on N branches per row at once. Branch (b, i) continues the trunk of row b
    cut to its first fork[b, i] tokens, then first[b, i]; it drafts y_1..y_K from there.
    The branches live in scratch slots after the trunk (cache.lengths is not moved): step j
    writes branch i at slot length + j*N + i. Tree mask: a branch sees its trunk prefix and its
    own earlier tokens, never a sibling's. Returns tokens (B, N, K), probs (B, N, K, V): each
    y with the exact q it was sampled from."""
    B, N = first.shape
    dev = first.device
    base = cache.lengths[:, None].clone().long()                        # (B, 1): scratch starts here
    cols = torch.arange(cache.max_len, device=dev)                 # (S,)
    scratch = cols - base[:, :, None]                              # (B, 1, S) offset into scratch
    mine = (scratch >= 0) & (scratch % N == torch.arange(N, device=dev)[:, None])  # (B, N, S)
    trunk = cols < fork[:, :, None]                                # (B, N, S)
    tokens, probs, y = [], [], first
    for j in range(K):
        slots = base + j * N + torch.arange(N, device=dev)         # (B, N)
        mask = trunk | (mine & (scratch < (j + 1) * N))            # own tokens up to step j
        logits = draft(y, cache, positions=fork + j, slots=slots,
                       mask=mask)                                  # (B, N, V)
        q = probs_fn(logits, temperature, top_k, top_p)            # (B, N, V)
        y = kernels.sample(q, generator)                           # (B, N)
        tokens.append(y)
        probs.append(q)
    return torch.stack(tokens, -1), torch.stack(probs, 2)


def build_speculation_cache(draft, cache, last_token, spec_tokens, fanout, temperature, top_k,
                            top_p, generator, probs_fn=kernels.probs_from_logits):
    """The draft's work while the target verifies s = (t0 = last_token (B,), x = spec_tokens
    (B, K)): one glue forward over [t0, x_1..x_K] writes their KV into the trunk (lengths += K+1)
    and gives q at every position; predict outcomes; draft K tokens for all of them as one tree.
    Returns the SpeculationCache. The caller rolls the trunk back once the outcome is known."""
    K = spec_tokens.shape[1]
    L = cache.lengths.clone().long()                               # (B,) trunk before the glue
    glue = draft(torch.cat((last_token[:, None], spec_tokens), 1), cache)   # (B, K+1, V)
    keys = predict_outcomes(glue, spec_tokens, fanout_list(fanout, K))  # (B, N, 2)
    fork = L[:, None] + keys[..., 0] + 1                           # sees t0, x_1..x_k
    tokens, probs = draft_branches(draft, cache, fork, keys[..., 1], K, temperature, top_k,
                                   top_p, generator, probs_fn)
    return SpeculationCache(keys, tokens, probs)
