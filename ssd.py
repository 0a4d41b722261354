"""ssd.py: speculative speculative decoding (SSD), speculative.py with the drafting taken off the
critical path.

New compared with speculative.py: in SD the target waits while the draft decodes K tokens, and
the draft waits while the target verifies them. SSD lets the draft work during verification:
while the target verifies speculation s = (x_1..x_K, with q_1..q_K) for a context ending in the
last emitted token t0, the draft

    1. predicts outcomes v = (k, t) the verification may return: for k < K a rejection of x_{k+1}
       draws the bonus from the residual at position k+1, so it bets on the top-F_k tokens of
       q_{k+1} other than x_{k+1}; for k = K it bets on the top-F_K tokens of q_{K+1};
    2. drafts the next speculation y_1..y_K from context + x_1..x_k + t for every bet, all at once:
       one "glue" forward over [t0, x_1..x_K] writes their KV into the draft's cache (the trunk)
       and gives q at every position, then K batched steps decode all sum(F_k) branches together
       under a tree attention mask (a branch sees the trunk up to its fork x_k and its own tokens);
    3. stores them in the speculation cache S: (k, t) -> (y_1..y_K, the q's they were sampled from).

When the target's outcome (k, t) arrives: a hit means the next speculation is S[(k, t)], ready at
once; a miss falls back to drafting K tokens now (just in time, as SD does). Verification is SD's
rule, unchanged, with the q each cached token was really sampled from: the output is exactly the
target's distribution, and equals autoregressive.py token for token at temperature 0 in float32.

Notation (Speculative Speculative Decoding, Kumar, Dao, May 2026): p = target, q = draft, K =
speculation length, v = (k, t) the outcome, F_k = fan-out at k (budget sum_k F_k branches per row
per round), tau = tokens per round per row. This file runs target and draft one after the other on
one device, so a reader can step through a round; its stats give the cache hit rate and, labelled
"modelled", the time two devices would take (max(verify, cache build) + the fallback on a miss).
saguaro.py runs the draft side in a process of its own, where it calls this file's
`build_speculation_cache` over its own glue and keeps S there: only the answer for the true
outcome crosses to the target.

    python ssd.py --prompt "Write a haiku about cacti." --draft default --k 4 --f 3
"""
import argparse
import time
from dataclasses import dataclass

import torch

import harness
import kernels
import timeline
from speculative import check_draft, emit, one_hot, pad_vocab, verify


# ----------------------------------------------------------------------------------------------
# The new idea: the speculation cache, and the draft side that fills it

@dataclass
class SpeculationCache:
    """S: (k, t) -> (y_1..y_K, their q rows), one table per sequence, stored as arrays so a whole
    batch is looked up at once.
    keys (B, N, 2) = (k, t) per branch; tokens (B, N, K); probs (B, N, K, V), and the logits
    (B, N, K, V) they came from (saguaro.py's glue reuses the hit branch's)."""
    keys: torch.Tensor
    tokens: torch.Tensor
    probs: torch.Tensor
    logits: torch.Tensor

    def find(self, k: torch.Tensor, t: torch.Tensor):
        """k, t (B,): each row's verification outcome -> hit (B,) bool, and the branch (B,)
        that holds it (0 when none matches)."""
        match = (self.keys[..., 0] == k[:, None]) & (self.keys[..., 1] == t[:, None])  # (B, N)
        return match.any(1), match.long().argmax(1)

    def lookup(self, k: torch.Tensor, t: torch.Tensor):
        """k, t (B,): each row's verification outcome -> hit (B,) bool, tokens (B, K),
        probs (B, K, V) (rows that missed get branch 0: garbage the caller must replace)."""
        hit, branch = self.find(k, t)
        rows = torch.arange(len(k), device=k.device)
        return hit, self.tokens[rows, branch], self.probs[rows, branch]


def fanout_list(f, K: int) -> list:
    """F as an int (the same fan-out at every k) or K+1 ints F_0..F_K -> a list of K+1 ints."""
    fs = [f] * (K + 1) if isinstance(f, int) else list(f) if isinstance(f, (list, tuple)) else []
    if len(fs) != K + 1 or any(not isinstance(x, int) or x < 0 for x in fs) or sum(fs) == 0:
        raise ValueError(f"fan-out must be an int >= 1 or K+1 = {K + 1} ints >= 0 (not all 0), "
                         f"got {f!r}.")
    return fs


def predict_outcomes(glue_logits, spec_tokens, fanout):
    """The outcomes (k, t) the draft bets on. glue_logits (B, K+1, V): the draft's logits after
    t0, x_1, ..., x_K; spec_tokens (B, K) = x; fanout: F_0..F_K, or one such list per row (all
    with the same sum N). For k < K a rejection of x_{k+1} draws the bonus from the residual at
    position k+1, which never holds x_{k+1}: guess the top-F_k tokens of q_{k+1} but x_{k+1}.
    For k = K the bonus comes from p_{K+1}: guess the top-F_K of q_{K+1}. Ranked by logits, not
    q: at temperature 0 q is one-hot, so its order says nothing, and at T > 0 the order is the
    same (top-k/top-p only zero the tail). Returns keys (B, N, 2)."""
    B, K = spec_tokens.shape
    if isinstance(fanout[0], list):  # per row: each group of rows with one fan-out at a time
        keys = torch.zeros(B, sum(fanout[0]), 2, dtype=torch.long, device=spec_tokens.device)
        for fan in map(list, {tuple(f) for f in fanout}):
            rows = torch.tensor([f == fan for f in fanout], device=spec_tokens.device)
            keys[rows] = predict_outcomes(glue_logits[rows], spec_tokens[rows], fan)
        return keys
    if max(fanout[:K], default=0) >= glue_logits.shape[-1] or fanout[K] > glue_logits.shape[-1]:
        raise ValueError(f"fan-out {fanout} asks for more guesses than the vocabulary "
                         f"({glue_logits.shape[-1]} tokens) holds.")
    keys = []
    for k, f in enumerate(fanout):
        if f == 0:
            continue
        scores = glue_logits[:, k].clone()                           # (B, V)
        if k < K:
            scores.scatter_(1, spec_tokens[:, k:k + 1], float("-inf"))  # x_{k+1} is never the bonus
        t = scores.topk(f, dim=-1).indices                           # (B, f)
        keys.append(torch.stack((torch.full_like(t, k), t), dim=-1))  # (B, f, 2)
    return torch.cat(keys, dim=1)                                    # (B, N, 2)


def draft_branches(draft, cache, fork, first, K, probs_fn, generator, vocab=None):
    """Decode K tokens on N branches per row at once. Branch (b, i) continues the trunk of row b
    cut to its first fork[b, i] tokens, then first[b, i]; it drafts y_1..y_K from there.
    The branches live in scratch slots after the trunk (cache.lengths is not moved): step j
    writes branch i at slot length + j*N + i. Tree mask: a branch sees its trunk prefix and its
    own earlier tokens, never a sibling's. probs_fn(logits, j) gives the q that drafting step j
    samples y_{j+1} from (saguaro.py reshapes it per step); `vocab` cuts padded logits to the
    vocabulary shared with the target. Returns tokens (B, N, K), probs (B, N, K, V): each y with
    the exact q it was sampled from, and the logits (B, N, K, V) that q came from."""
    B, N = first.shape
    dev = first.device
    base = cache.lengths[:, None].clone().long()                   # (B, 1): scratch starts here
    cols = torch.arange(cache.max_len, device=dev)                 # (S,)
    scratch = cols - base[:, :, None]                              # (B, 1, S) offset into scratch
    mine = (scratch >= 0) & (scratch % N == torch.arange(N, device=dev)[:, None])  # (B, N, S)
    trunk = cols < fork[:, :, None]                                # (B, N, S)
    tokens, probs, logits, y = [], [], [], first
    for j in range(K):
        slots = base + j * N + torch.arange(N, device=dev)         # (B, N)
        mask = trunk | (mine & (scratch < (j + 1) * N))            # own tokens up to step j
        logits.append(draft(y.clamp_max(draft.cfg.vocab_size - 1), cache, positions=fork + j,
                            slots=slots, mask=mask)[..., :vocab])  # (B, N, V)
        probs.append(probs_fn(logits[-1], j))                      # (B, N, V)
        y = kernels.sample(probs[-1], generator)                   # (B, N)
        tokens.append(y)
    return torch.stack(tokens, -1), torch.stack(probs, 2), torch.stack(logits, 2)


def build_speculation_cache(draft, cache, glue, spec_tokens, fanout, probs_fn, generator,
                            vocab=None):
    """The draft's work while the target verifies s = (t0, x = spec_tokens (B, K)), once the
    glue is done: the caller has written the KV of t0, x_1..x_K into the trunk (lengths += K+1)
    and passes the logits after each, glue (B, K+1, V). Predict outcomes with `fanout` (K+1 ints,
    or a list per row), draft K tokens for all of them as one tree (probs_fn: as draft_branches).
    Returns the SpeculationCache. The caller rolls the trunk back once the outcome is known."""
    K = spec_tokens.shape[1]
    keys = predict_outcomes(glue, spec_tokens, fanout)             # (B, N, 2)
    fork = cache.lengths[:, None].long() - K + keys[..., 0]        # sees t0, x_1..x_k
    return SpeculationCache(keys, *draft_branches(draft, cache, fork, keys[..., 1], K, probs_fn,
                                                  generator, vocab))


@torch.inference_mode()
def generate(target, prompt_ids, max_new_tokens, *, draft=None, k=4, f=3, temperature=0.0,
             top_k=None, top_p=None, seed=0, eos=True):
    """prompt_ids: a list of token ids, or a batch of them (ragged is fine). draft: a
    kernels.Model over the target's vocabulary; k: draft tokens per round (K); f: fan-out, an int
    (F at every k) or K+1 ints F_0..F_K. Returns (tokens, stats) as speculative.generate does;
    stats also fills cache_hits, cache_misses, hit_rate, hits_by_k / lookups_by_k (lookups per
    outcome k), cold_starts (rows drafted before any cache existed: the first round, counted
    apart from hits and misses), tau_on_hit / tau_on_miss (tokens per row-round when the
    speculation came from the cache / was drafted just in time, cold starts included), measured
    one-device times verify_s / cache_build_s / jit_draft_s, and modelled_two_device_* figures."""
    prompts = harness.as_batch(prompt_ids)
    kernels.check_sampling(temperature, top_k, top_p)
    Vd, K = check_draft(target, draft, k), k
    if hasattr(draft, "propose"):
        raise ValueError("ssd.py drafts trees of speculations with a neural draft (a kernels.Model "
                         "with its own KV cache); a model-free proposer fits speculative.py.")
    fanout = fanout_list(f, K)
    max_len = harness.check_request(target, prompts, max_new_tokens, room=K,  # verify overshoot
                                    draft=draft)
    B, dev, Vt = len(prompts), target.device, target.cfg.vocab_size
    Vc = min(Vt, Vd)  # ids past the common vocabulary are padding: q is cut to Vc
    if max(fanout) > Vc:   # F = V already caches every outcome at that k
        raise ValueError(f"fan-out F = {max(fanout)} guesses at one k is more than the "
                         f"vocabulary ({Vc} tokens): lower f.")
    harness.check_tree_memory(B, sum(fanout), K, Vc, dev, "f")
    gen = kernels.make_generator(seed, dev)
    eos_ids = set(target.cfg.eos_token_ids) if eos else set()

    def draft_q(logits, j):  # the q that drafting step j samples from: the draft's own
        return kernels.probs_from_logits(logits, temperature, top_k, top_p, f"the draft at "
                                         f"step {j + 1} of round {stats['target_calls'] + 1}")
    stats = harness.new_stats(K)
    stats.update(hits_by_k=[0] * (K + 1), lookups_by_k=[0] * (K + 1), cold_starts=0,
                 verify_s=0.0, cache_build_s=0.0, jit_draft_s=0.0, modelled_two_device_decode_s=0.0)
    rows = [list(p) for p in prompts]   # prompt + tokens emitted so far, per row
    done = [False] * B

    # 1) prefill: the target gives the first token; the draft reads the prompts too
    t0 = time.perf_counter()
    cache = target.new_cache(B, max_len)
    logits = target.prefill(prompts, cache)                               # (B, V)
    token = kernels.next_token(logits, temperature, top_k, top_p, gen,
                              "the target's prefill").tolist()  # (B,)
    draft_cache = draft.new_cache(B, max_len + K * sum(fanout))  # + the branches' scratch slots
    draft.prefill(prompts, draft_cache)
    for b in range(B):
        done[b] = emit(rows[b], [token[b]], max_new_tokens, eos_ids)
    stats["cold_starts"] = done.count(False)  # their first speculation has no cache to come from
    kernels.sync(dev)
    stats["prefill_s"] = timeline.span("prefill", t0)

    # 2) decode: per round, the target verifies a speculation while the draft prepares the next
    t0 = time.perf_counter()
    accepted, tau_sums = 0, {True: [0, 0], False: [0, 0]}   # from cache? -> [tokens, row-rounds]
    draft_tokens = torch.zeros(B, K, dtype=torch.long, device=dev)         # (B, K) x per row
    draft_probs = torch.zeros(B, K, Vc, device=dev)                        # (B, K, Vc) their q
    cached = torch.zeros(B, dtype=torch.bool, device=dev)  # row's speculation came from S
    while not all(done):
        # 2a) the speculation x_1..x_K with q_1..q_K. Invariant: both caches hold KV for a
        # row's tokens except the last one. A row whose last outcome hit the cache has it
        # already; the others (all rows in the first round, and rows that missed) get one now:
        # the JIT fallback, K draft steps from the row's context, as speculative.py drafts.
        # It is drafted as a one-branch tree in the scratch slots, so the trunk is untouched;
        # in a batch the rows that hit ride along and keep their cached speculation.
        tick = time.perf_counter()
        last = torch.tensor([r[-1] for r in rows], device=dev)
        jit = ~cached & ~torch.tensor(done, device=dev)
        if bool(jit.any()):
            y, q, _ = draft_branches(draft, draft_cache, draft_cache.lengths[:, None].long(),
                                     last[:, None], K, draft_q, gen, vocab=Vc)
            draft_tokens[jit], draft_probs[jit] = y[jit, 0], q[jit, 0]      # (B, 1, K) -> (K,)
            stats["draft_calls"] += K
        kernels.sync(dev)
        jit_s = timeline.span("jit", tick, "draft") if bool(jit.any()) else 0.0
        tick = time.perf_counter()

        # 2b) NEW: the draft bets on the outcomes of this verification and drafts the next
        # speculation for each: glue forward over [t0, x] (its KV joins the trunk), outcome
        # prediction, tree of branches -> S. On two devices this runs while the target
        # verifies (2c).
        glue_in = torch.cat((last[:, None], draft_tokens), 1).clamp_max(Vd - 1)  # (B, K+1)
        glue = draft(glue_in, draft_cache)[..., :Vc]                      # (B, K+1, Vc)
        timeline.span("glue", tick, "draft")
        S = build_speculation_cache(draft, draft_cache, glue, draft_tokens, fanout, draft_q,
                                    gen, vocab=Vc)
        stats["draft_calls"] += K + 1
        kernels.sync(dev)
        build_s, tick = timeline.span("build", tick, "draft"), time.perf_counter()

        # 2c) verify: one target forward over [last token, x_1..x_K] gives p_1..p_{K+1}; a
        # draft id the target lacks (p = 0 there: always rejected) is fed as a stand-in.
        # Finished rows ride along unchanged (some never had a speculation): any q will do
        finished = torch.tensor(done, device=dev)
        draft_probs[finished] = one_hot(draft_tokens[finished], Vc)
        tokens_in = torch.cat((last[:, None], draft_tokens.clamp_max(Vt - 1)), 1)  # (B, K+1)
        logits = target(tokens_in, cache)                                   # (B, K+1, Vt)
        p = kernels.probs_from_logits(logits, temperature, top_k, top_p,
                                      f"the target's verify in round {stats['target_calls'] + 1}")
        V = max(Vt, draft_probs.shape[-1])
        n_accepted, bonus = verify(pad_vocab(p, V), pad_vocab(draft_probs, V), draft_tokens, gen)
        stats["target_calls"] += 1
        kernels.sync(dev)
        verify_s = timeline.span("verify", tick)
        stats["jit_draft_s"] += jit_s
        stats["cache_build_s"] += build_s
        stats["verify_s"] += verify_s
        stats["modelled_two_device_decode_s"] += max(verify_s, build_s) + jit_s

        # 2d) accept: each live row emits x_1..x_k and the bonus t (truncated at EOS or at
        # max_new_tokens), then rolls both caches back to keep KV through x_k: t is fed
        # next round. The outcome (k, t) is looked up in S: a hit is next round's speculation.
        tick = time.perf_counter()
        hit, next_tokens, next_probs = S.lookup(n_accepted, bonus)
        n_accepted, bonus, x = n_accepted.tolist(), bonus.tolist(), draft_tokens.tolist()
        from_cache, in_cache = cached.tolist(), hit.tolist()
        for b in range(B):
            if done[b]:
                continue
            n, before = n_accepted[b], len(rows[b])
            stats["accept_counts"][n] += 1
            stats["rows_verified"] += 1
            accepted += n
            room = max_new_tokens - (len(rows[b]) - len(prompts[b]))
            done[b] = emit(rows[b], x[b][:n] + [bonus[b]], room, eos_ids)
            tau_sums[from_cache[b]][0] += len(rows[b]) - before
            tau_sums[from_cache[b]][1] += 1
            if not done[b]:  # a finished row needs no next speculation: no lookup counted
                stats["lookups_by_k"][n] += 1
                stats["hits_by_k"][n] += in_cache[b]
        cache.lengths.copy_(torch.tensor([len(r) - 1 for r in rows]))
        draft_cache.lengths.copy_(cache.lengths)  # the glue wrote x_1..x_K: keep through x_k
        cached = hit & ~torch.tensor(done, device=dev)
        draft_tokens[cached], draft_probs[cached] = next_tokens[cached], next_probs[cached]
        timeline.lookup(int(cached.sum()), done.count(False))  # hits, of these live rows
        timeline.span("accept", tick)
    kernels.sync(dev)
    stats["decode_s"] = time.perf_counter() - t0
    if stats["rows_verified"]:
        stats["acceptance_rate"] = accepted / (K * stats["rows_verified"])
    stats["tau_on_hit"], stats["tau_on_miss"] = (s[0] / s[1] if s[1] else None
                                                 for s in (tau_sums[True], tau_sums[False]))
    stats["draft_calls_per_round"] = stats["draft_calls"] / max(stats["target_calls"], 1)

    # 3) hand back each row's tokens
    tokens = [r[len(prompt):] for r, prompt in zip(rows, prompts)]
    stats = harness.finish_stats(stats, tokens)
    decoded, modelled = stats["new_tokens"] - B, stats["modelled_two_device_decode_s"]
    stats["modelled_two_device_tokens_per_s"] = decoded / modelled if modelled > 0 else 0.0
    return tokens, stats


def main():
    import drafts  # the one resolver of draft names (the loop itself needs no drafts.py)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_common_args(ap, tp=True)
    ap.add_argument("--draft", default="default", type=harness.draft_name,
                    help=drafts.DRAFT_HELP)
    ap.add_argument("--k", type=harness.positive_int, default=4, help="draft tokens per round (K)")
    ap.add_argument("--f", type=harness.fanout, default=3, help="fan-out F, or F_0,...,F_K")
    ap.add_argument("--prompt", required=True, type=harness.prompt_text)
    args = ap.parse_args()
    target, draft = harness.load_models(args, args.draft)
    ids = kernels.encode_prompt(target, args.prompt)
    tokens, stats = harness.after_warm_up(lambda n: generate(
        target, ids, n, draft=draft, k=args.k, f=args.f, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, seed=args.seed), args.max_new_tokens,
        trace=args.trace)
    harness.report(target, tokens, stats, "tau", "acceptance_rate", "hit_rate", "hits_by_k",
                   "lookups_by_k", "modelled_two_device_tokens_per_s")


if __name__ == "__main__":
    harness.cli(main)
