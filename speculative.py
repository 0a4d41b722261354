"""speculative.py: speculative decoding (SD), the loop ssd.py and saguaro.py build on.

New compared with autoregressive.py: a cheap draft proposes K tokens x_1..x_K, each sampled from
its distribution q_i; the target scores [last token, x_1..x_K] in ONE forward (K+1 positions cost
about what 1 does, since decoding is memory-bound) and reads p_1..p_{K+1}. The rule below keeps
the output distributed exactly as the target's (Leviathan et al. 2023, Chen et al. 2023):

    for i = 1..K in order: accept x_i with probability min(1, p_i(x_i) / q_i(x_i));
    at the first rejection the bonus token t ~ norm(max(0, p_i - q_i)), and the round ends;
    if all K are accepted, t ~ p_{K+1}.

A round's verification outcome is v = (k, t): k in 0..K drafted tokens accepted, then the bonus
t. Each round emits k+1 tokens for one target forward; tau = mean tokens per round per row
(bonus included). At temperature 0, p and q are one-hot and the rule becomes "accept while
x_i == argmax p_i, bonus = argmax": in float32 the output equals autoregressive.py token for
token (in bfloat16/float16 the verify and the 1-token step round differently: see
autoregressive.py for why equality is not claimed there).

Notation (Speculative Speculative Decoding, Kumar, Dao, May 2026, after Leviathan et al.):
p = the target's distribution, q = the draft's (gpt-fast names them the other way round).

Lossless needs q to be EXACTLY the distribution each proposal was sampled from, after
temperature, top-k and top-p. A proposal chosen without sampling (n-gram lookup, a fixed guess)
is verified with a one-hot q (`one_hot`): then x is accepted with probability p(x), and a
rejection resamples from p with x removed.

The draft is either a kernels.Model over the same tokenizer, driven through its own KV cache, or
a model-free proposer: any object with `vocab_size` and
`propose(contexts, k, temperature, generator) -> (draft_tokens (B, k), draft_probs (B, k, V))`.

    python speculative.py --prompt "Write a haiku about cacti." --draft default --k 4
"""
import argparse
import time

import torch
import torch.nn.functional as F

import harness
import kernels
import timeline


def verify(target_probs, draft_probs, draft_tokens, generator, bonus_race=None):
    """The verification rule, for a batch of rows (shared by ssd.py and saguaro.py).
    target_probs (B, K+1, V): p_1..p_{K+1} at the K+1 verified positions; draft_probs (B, K, V):
    q_1..q_K, exactly what draft_tokens (B, K) were sampled from. Returns n_accepted (B,) in
    0..K and bonus (B,), the token after the accepted ones. Every random draw uses `generator`,
    except the bonus's when `bonus_race` is given (saguaro.py): a function n_accepted (B,) ->
    E (B, V), kernels.race_clocks at each row's bonus position, and the bonus is the race's
    winner (kernels.sample with clocks): the same law, from randomness the draft process shares.
    ValueError for a draft token outside [0, V) or of probability 0 under its own q."""
    B, K = draft_tokens.shape
    V = target_probs.shape[-1]
    if target_probs.shape != (B, K + 1, V) or draft_probs.shape != (B, K, V):
        raise ValueError(f"verify wants target_probs (B, K+1, V), draft_probs (B, K, V) and "
                         f"draft_tokens (B, K); got {tuple(target_probs.shape)}, "
                         f"{tuple(draft_probs.shape)} and {tuple(draft_tokens.shape)}.")
    outside = (draft_tokens < 0) | (draft_tokens >= V)               # (B, K) ids past [0, V)
    x = draft_tokens.clamp(0, V - 1)[..., None]       # gathered in range; refused just below
    p_x = target_probs[:, :K].gather(-1, x)[..., 0]   # (B, K) p_i(x_i)
    q_x = draft_probs.gather(-1, x)[..., 0]          # (B, K) q_i(x_i)
    if bool((outside | (q_x <= 0)).any()):  # one host sync for both checks
        if bool(outside.any()):
            raise ValueError(f"draft token id {int(draft_tokens[outside][0])} is outside the "
                             f"vocabulary [0, {V}) that draft_probs and target_probs cover.")
        raise ValueError("a draft token has probability 0 under its own draft_probs: draft_probs "
                         "must be exactly the distribution each token was sampled from (use "
                         "speculative.one_hot for a proposal chosen deterministically).")
    # accept x_i with probability min(1, p/q): u < p/q for u ~ U[0, 1), multiplied out so that
    # p == q accepts surely, with no rounding from a division
    u = torch.rand(B, K, generator=generator, device=draft_tokens.device)
    n_accepted = (u * q_x < p_x).long().cumprod(-1).sum(-1)   # (B,) successes before the first no
    # the bonus comes from the residual norm(max(0, p - q)) at the first rejected position; a
    # zero q appended as q_{K+1} makes "all K accepted" the same formula: residual = p_{K+1}
    q = F.pad(draft_probs, (0, 0, 0, 1))                          # (B, K+1, V)
    b = torch.arange(B, device=draft_tokens.device)
    p_at = target_probs[b, n_accepted]                            # (B, V)
    residual = (p_at - q[b, n_accepted]).clamp_min(0)             # (B, V)
    mass = residual.sum(-1, keepdim=True)
    # p == q up to rounding can leave no residual mass; then p itself is the right law
    residual = torch.where(mass > 0, residual / mass.clamp_min(1e-30), p_at)
    clocks = None if bonus_race is None else bonus_race(n_accepted)
    return n_accepted, kernels.sample(residual, generator, clocks)


def check_proposal(proposer, tokens, probs, B, K) -> None:
    """What a model-free proposer's propose() returned for B rows and K tokens, checked where it
    enters a loop (speculative.generate, saguaro's fast backup), before anything indexes with
    it: tokens (B, K) integer ids in [0, V), probs (B, K, V) in [0, 1], V its vocab_size.
    ValueError naming the proposer otherwise."""
    name, V = f"{type(proposer).__name__}.propose", proposer.vocab_size
    if tuple(tokens.shape) != (B, K) or tuple(probs.shape) != (B, K, V):
        raise ValueError(f"{name} returned shapes {tuple(tokens.shape)} and "
                         f"{tuple(probs.shape)}; expected ({B}, {K}) and ({B}, {K}, {V}).")
    if tokens.is_floating_point() or tokens.is_complex():
        raise ValueError(f"{name} returned token ids of dtype {tokens.dtype}: integer ids, please.")
    outside = (tokens < 0) | (tokens >= V)
    if bool(outside.any()):
        raise ValueError(f"{name} returned token id {int(tokens[outside][0])}, outside its "
                         f"vocabulary [0, {V}) (vocab_size {V}): a proposer must propose ids "
                         "of the tokenizer it shares with the target.")
    low, high = torch.aminmax(probs) if probs.numel() else (probs.new_zeros(()),) * 2
    if not (bool(low >= 0) and bool(high <= 1)):   # one pass; NaN fails both comparisons
        raise ValueError(f"{name} returned probabilities that are negative, above 1, NaN or "
                         "inf: they must be the distribution each token was drawn from.")


def one_hot(tokens, vocab_size):
    """The q of a proposal chosen deterministically: tokens (B, k) -> (B, k, V) float32."""
    return F.one_hot(tokens, vocab_size).float()


def check_draft(target, draft, k) -> int:
    """Reject what cannot be verified; return the draft's vocabulary size. Embedding matrices
    padded to different sizes over one tokenizer (151936 vs 152064) are fine: both are cut or
    padded to a common size. Tiny test models have no tokenizer: then the sizes must agree."""
    if draft is None:
        raise ValueError("speculative decoding needs a draft: pass draft=<a kernels.Model over the "
                         "target's tokenizer> or a proposer (vocab_size + propose(...)); without "
                         "a draft use autoregressive.generate.")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k (draft tokens per round) must be an integer >= 1, got {k!r}.")
    if hasattr(draft, "propose"):
        Vd = draft.vocab_size
    elif hasattr(draft, "new_cache") and hasattr(draft, "prefill"):
        Vd = draft.cfg.vocab_size
    else:
        raise ValueError(f"draft {type(draft).__name__} is neither a kernels.Model nor a proposer "
                         "with vocab_size and propose(contexts, k, temperature, generator).")
    Vt = target.cfg.vocab_size
    tt, td = target.tokenizer, getattr(draft, "tokenizer", None)
    names = f"target {getattr(target, 'name', '?')!r} and draft " \
            f"{getattr(draft, 'name', type(draft).__name__)!r}"
    if tt is not None and td is not None:
        if tt is not td and (len(tt) != len(td) or tt.get_vocab() != td.get_vocab()):
            raise ValueError(f"{names} use different tokenizers: speculative decoding needs one "
                             "vocabulary. Pick a draft from the target's model family.")
        if len(tt) > min(Vt, Vd):
            raise ValueError(f"{names}: the tokenizer has {len(tt)} tokens but an embedding has "
                             f"only {min(Vt, Vd)} rows.")
    elif Vt != Vd:
        raise ValueError(f"{names} have vocabularies of {Vt} and {Vd} tokens and no tokenizers "
                         "to show they share ids: give them one vocabulary.")
    return Vd


def pad_vocab(probs, V):
    """Zero probability for the ids a distribution does not cover: (..., V') -> (..., V)."""
    return F.pad(probs, (0, V - probs.shape[-1]))


def emit(row, new_tokens, room, eos_ids) -> bool:
    """Append up to `room` tokens to a row, stopping after an EOS; True when the row is done."""
    for token in new_tokens[:room]:
        row.append(token)
        if token in eos_ids:
            return True
    return len(new_tokens) >= room


@torch.inference_mode()
def generate(target, prompt_ids, max_new_tokens, *, draft=None, k=4, temperature=0.0, top_k=None,
             top_p=None, seed=0, eos=True):
    """prompt_ids: a list of token ids, or a batch of them (ragged is fine). draft: a
    kernels.Model or a proposer (see the module docstring); k: draft tokens per round (K).
    Returns (tokens, stats) as autoregressive.generate does; stats also fills accept_counts
    (rounds per k = 0..K), tau, acceptance_rate and draft_calls (draft forwards, or propose
    calls for a proposer)."""
    prompts = harness.as_batch(prompt_ids)
    kernels.check_sampling(temperature, top_k, top_p)
    Vd, K = check_draft(target, draft, k), k
    max_len = harness.check_request(target, prompts, max_new_tokens, room=K,  # verify overshoot
                                    draft=draft)
    B, dev, Vt = len(prompts), target.device, target.cfg.vocab_size
    neural = not hasattr(draft, "propose")
    gen = kernels.make_generator(seed, dev)
    eos_ids = set(target.cfg.eos_token_ids) if eos else set()
    stats = harness.new_stats(K)
    rows = [list(p) for p in prompts]   # prompt + tokens emitted so far, per row
    done = [False] * B

    # 1) prefill: the target gives the first token; a neural draft reads the prompts too
    t0 = time.perf_counter()
    cache = target.new_cache(B, max_len)
    logits = target.prefill(prompts, cache)                               # (B, V)
    token = kernels.next_token(logits, temperature, top_k, top_p, gen,
                              "the target's prefill").tolist()  # (B,)
    if neural:
        draft_cache = draft.new_cache(B, max_len)
        draft.prefill(prompts, draft_cache)
    for b in range(B):
        done[b] = emit(rows[b], [token[b]], max_new_tokens, eos_ids)
    kernels.sync(dev)
    stats["prefill_s"] = timeline.span("prefill", t0)

    # 2) decode: per round, the draft proposes K tokens, the target verifies K+1 positions
    t0 = time.perf_counter()
    accepted = 0
    while not all(done):
        # 2a) draft x_1..x_K with their q_1..q_K. Invariant: each cache holds KV for a row's
        # tokens except the last one (the target) or the last two (the draft). Re-feeding the
        # second to last token costs nothing (memory-bound) and is how the draft receives x_K
        # after a round that accepted all K: x_K was sampled, never fed, so without this its
        # cache would lack one token for the rest of the generation and acceptance would decay.
        tick = time.perf_counter()
        if neural:
            Vc = min(Vt, Vd)  # ids past the common vocabulary are padding: q is cut to Vc
            draft_cache.lengths.copy_(torch.tensor([len(r) - 2 for r in rows]))
            # a padding id only the target can emit is shown to the draft as a stand-in
            inp = torch.tensor([r[-2:] for r in rows], device=draft.device).clamp_max(Vd - 1)
            draft_tokens, draft_probs = [], []
            for i in range(K):
                logits = draft(inp, draft_cache)[:, -1, :Vc].to(dev)      # (B, Vc)
                q = kernels.probs_from_logits(logits, temperature, top_k, top_p, f"the draft at "
                                               f"step {i + 1} of round {stats['target_calls'] + 1}")
                x = kernels.sample(q, gen)                                # (B,)
                draft_tokens.append(x)
                draft_probs.append(q)
                inp = x[:, None].to(draft.device)
            draft_tokens = torch.stack(draft_tokens, 1)                   # (B, K)
            draft_probs = torch.stack(draft_probs, 1)                     # (B, K, Vc)
            stats["draft_calls"] += K
        else:
            draft_tokens, draft_probs = draft.propose(rows, K, temperature, gen)
            check_proposal(draft, draft_tokens, draft_probs, B, K)
            draft_tokens, draft_probs = draft_tokens.to(dev), draft_probs.to(dev).float()
            stats["draft_calls"] += 1
        timeline.span("draft", tick, "draft")

        # 2b) verify: one target forward over [last token, x_1..x_K] gives p_1..p_{K+1}; a
        # draft id the target lacks (p = 0 there: always rejected) is fed as a stand-in
        tick = time.perf_counter()
        last = torch.tensor([r[-1] for r in rows], device=dev)
        tokens_in = torch.cat((last[:, None], draft_tokens.clamp_max(Vt - 1)), 1)  # (B, K+1)
        logits = target(tokens_in, cache)                                   # (B, K+1, Vt)
        p = kernels.probs_from_logits(logits, temperature, top_k, top_p,
                                      f"the target's verify in round {stats['target_calls'] + 1}")
        V = max(Vt, draft_probs.shape[-1])
        n_accepted, bonus = verify(pad_vocab(p, V), pad_vocab(draft_probs, V), draft_tokens, gen)
        stats["target_calls"] += 1
        timeline.span("verify", tick)

        # 2c) accept: each live row emits x_1..x_k and the bonus t (truncated at EOS or at
        # max_new_tokens), then rolls its target cache back to keep KV through x_k: t is fed
        # next round. Finished rows keep their length and ride along unchanged.
        tick = time.perf_counter()
        n_accepted, bonus, x = n_accepted.tolist(), bonus.tolist(), draft_tokens.tolist()
        for b in range(B):
            if done[b]:
                continue
            n = n_accepted[b]
            stats["accept_counts"][n] += 1
            stats["rows_verified"] += 1
            accepted += n
            room = max_new_tokens - (len(rows[b]) - len(prompts[b]))
            done[b] = emit(rows[b], x[b][:n] + [bonus[b]], room, eos_ids)
        cache.lengths.copy_(torch.tensor([len(r) - 1 for r in rows]))
        timeline.span("accept", tick)
    kernels.sync(dev)
    stats["decode_s"] = time.perf_counter() - t0
    if stats["rows_verified"]:
        stats["acceptance_rate"] = accepted / (K * stats["rows_verified"])

    # 3) hand back each row's tokens
    tokens = [r[len(prompt):] for r, prompt in zip(rows, prompts)]
    return tokens, harness.finish_stats(stats, tokens)


def main():
    import drafts  # the one resolver of draft names (the loop itself needs no drafts.py)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_common_args(ap, tp=True)
    ap.add_argument("--draft", default="default", type=harness.draft_name,
                    help=drafts.DRAFT_HELP)
    ap.add_argument("--k", type=harness.positive_int, default=4, help="draft tokens per round (K)")
    ap.add_argument("--prompt", required=True, type=harness.prompt_text)
    args = ap.parse_args()
    target, draft = harness.load_models(args, args.draft)
    ids = kernels.encode_prompt(target, args.prompt)
    tokens, stats = harness.after_warm_up(lambda n: generate(
        target, ids, n, draft=draft, k=args.k, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, seed=args.seed), args.max_new_tokens, trace=args.trace)
    harness.report(target, tokens, stats, "tau", "acceptance_rate", "accept_counts")


if __name__ == "__main__":
    harness.cli(main)
