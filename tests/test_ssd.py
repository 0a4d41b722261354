"""ssd.py: the draft side (outcome prediction, tree drafting, the speculation cache) and the loop
(lossless at every temperature, token-for-token equal to autoregressive.py at temperature 0)."""
import dataclasses

import pytest
import torch
from torch import nn

import autoregressive
import exact
import kernels
import ssd
from conftest import FakeTokenizer, tiny_model


def build(model, cache, t0, x, fanout, temperature, generator=None):
    """ssd.py's step 2b as generate runs it: the glue forward over [t0, x], then the build."""
    glue = model(torch.cat((t0[:, None], x), 1), cache)                  # (B, K+1, V)
    return ssd.build_speculation_cache(
        model, cache, glue, x, ssd.fanout_list(fanout, x.shape[1]),
        lambda logits, j: kernels.probs_from_logits(logits, temperature), generator)


def test_tree_drafted_branches_equal_each_branch_drafted_alone():
    """Every (k, t) branch of one batched tree pass gives the q rows a plain forward of
    prompt + t0 + x_1..x_k + t + y_1..y_{K-1} gives (teacher-forced on the tree's own samples),
    on ragged rows, with uneven fan-out including a zero."""
    model = tiny_model(seed=1, vocab_size=32)
    prompts = [[1, 2, 3, 4], [5, 6]]
    cache = model.new_cache(2, 64)
    model.prefill(prompts, cache)
    t0, x = torch.tensor([13, 14]), torch.tensor([[7, 8, 9], [10, 11, 12]])
    S = build(model, cache, t0, x, [2, 0, 1, 3], 1.0, kernels.make_generator(0, "cpu"))
    assert S.keys.shape == (2, 6, 2) and S.tokens.shape == (2, 6, 3)
    assert S.probs.shape == (2, 6, 3, 32)
    assert cache.lengths.tolist() == [8, 6]  # the glue wrote the trunk; branches are scratch
    for b, p in enumerate(prompts):
        context = p + [int(t0[b])] + x[b].tolist()
        for n in range(S.keys.shape[1]):
            k, t = S.keys[b, n].tolist()
            alone = model.new_cache(1, 64)
            model.prefill([context[: len(p) + 1 + k]], alone)
            fed = torch.tensor([[t] + S.tokens[b, n, :-1].tolist()])
            q = kernels.probs_from_logits(model(fed, alone)[0], 1.0)     # (K, V)
            torch.testing.assert_close(S.probs[b, n], q, atol=1e-5, rtol=1e-5)


def test_tree_drafting_at_temperature_0_equals_greedy_decoding_per_branch():
    model = tiny_model(seed=2, vocab_size=48)
    cache = model.new_cache(1, 64)
    model.prefill([[3, 1, 4, 1, 5]], cache)
    t0, x = torch.tensor([9]), torch.tensor([[2, 6, 5, 3]])
    S = build(model, cache, t0, x, 2, 0.0)
    for n in range(S.keys.shape[1]):
        k, t = S.keys[0, n].tolist()
        context = [3, 1, 4, 1, 5, 9] + x[0, :k].tolist() + [t]
        alone = model.new_cache(1, 64)
        logits = model.prefill([context], alone)
        greedy = []
        for _ in range(4):
            greedy.append(int(logits.argmax(-1)))
            logits = model(torch.tensor([[greedy[-1]]]), alone)[:, -1]
        assert S.tokens[0, n].tolist() == greedy
        assert torch.equal(S.probs[0, n].argmax(-1), S.tokens[0, n])  # one-hot q at T = 0
        assert torch.all(S.probs[0, n].sum(-1) == 1)


def test_outcome_prediction_with_a_fan_out_per_row_equals_each_row_alone():
    """saguaro's draft side gives each row its own schedule (after a hit, after a miss): the
    keys of a batch with per-row fan-outs are each row's keys predicted alone."""
    logits = torch.randn(3, 4, 16, generator=torch.Generator().manual_seed(0))  # (B, K+1, V)
    x = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    fans = [[2, 1, 0, 1], [0, 0, 1, 3], [2, 1, 0, 1]]                   # each sums to N = 4
    keys = ssd.predict_outcomes(logits, x, fans)
    assert keys.shape == (3, 4, 2)
    for b in range(3):
        assert torch.equal(keys[b], ssd.predict_outcomes(logits[b:b + 1], x[b:b + 1], fans[b])[0])


def test_the_same_seed_gives_the_same_tokens_at_temperature_1():
    """Every coin comes from the generator seeded by `seed` (the draft's tree included), none
    from torch's global one: two runs with one seed agree, and the global RNG state is moot."""
    target = tiny_model(seed=3, vocab_size=32)
    draft = perturbed(tiny_model(seed=3, vocab_size=32), 5, 0.5)
    runs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        runs.append(ssd.generate(target, [[1, 2, 3], [4]], 12, draft=draft, k=2, f=2,
                                 temperature=1.0, seed=7)[0])
    assert runs[0] == runs[1]


def test_outcome_prediction_takes_top_f_by_logits_and_never_the_drafted_token():
    # row 0, position k: logits rank tokens 0 > 1 > 2 > ...; x_{k+1} = 1 must be skipped for k < K
    logits = torch.arange(8, 0, -1).float().repeat(1, 3, 1)           # (1, K+1=3, V=8)
    x = torch.tensor([[1, 0]])
    keys = ssd.predict_outcomes(logits, x, [2, 3, 1])
    assert keys[0].tolist() == [[0, 0], [0, 2],            # k=0: top-2 without x_1 = 1
                                [1, 1], [1, 2], [1, 3],    # k=1: top-3 without x_2 = 0
                                [2, 0]]                    # k=K: top-1 of q_{K+1}, nothing skipped


def test_speculation_cache_lookup_returns_the_branch_stored_under_the_outcome():
    keys = torch.tensor([[[0, 5], [0, 6], [2, 5]],
                         [[1, 7], [2, 3], [2, 4]]])                       # (B=2, N=3, 2)
    tokens = torch.arange(2 * 3 * 2).view(2, 3, 2)                       # (B, N, K=2)
    probs = torch.rand(2, 3, 2, 10)
    S = ssd.SpeculationCache(keys, tokens, probs, logits=None)
    hit, y, q = S.lookup(torch.tensor([2, 2]), torch.tensor([5, 4]))
    assert hit.tolist() == [True, True]
    assert y.tolist() == [tokens[0, 2].tolist(), tokens[1, 2].tolist()]
    assert torch.equal(q, torch.stack([probs[0, 2], probs[1, 2]]))
    # same t under another k, same k with another t, a key of the other row: all misses
    hit, _, _ = S.lookup(torch.tensor([1, 0]), torch.tensor([5, 3]))
    assert hit.tolist() == [False, False]
    hit, _, _ = S.lookup(torch.tensor([1, 0]), torch.tensor([7, 5]))
    assert hit.tolist() == [False, False]


def test_outcome_prediction_refuses_more_guesses_than_the_vocabulary_holds():
    logits = torch.arange(4, 0, -1).float().repeat(1, 3, 1)          # (1, K+1=3, V=4)
    x = torch.tensor([[1, 0]])
    keys = ssd.predict_outcomes(logits, x, [3, 3, 4])   # every outcome: V-1 at k < K, V at K
    assert keys.shape == (1, 10, 2) and len(set(map(tuple, keys[0].tolist()))) == 10
    for bad in ([4, 0, 0], [0, 4, 1], [1, 1, 5]):
        with pytest.raises(ValueError, match="more guesses than the vocabulary"):
            ssd.predict_outcomes(logits, x, bad)


@pytest.mark.parametrize("bad", [0, -1, [1, 2], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0], 1.5])
def test_bad_fanout_is_refused_with_a_clear_error(bad):
    with pytest.raises(ValueError, match="fan-out"):
        ssd.fanout_list(bad, 4)


# ----------------------------------------------------------------------------------------------
# the loop: lossless

def perturbed(model, seed, noise):
    """A draft that agrees with `model` part of the time: its weights plus Gaussian noise."""
    draft = tiny_model(seed=0, vocab_size=model.cfg.vocab_size)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for (_, p), (_, ref) in zip(draft.named_parameters(), model.named_parameters()):
            spread = ref.std() if ref.numel() > 1 else 0.0
            p.copy_(ref + noise * spread * torch.randn(ref.shape, generator=g))
    return draft


@pytest.mark.parametrize("k, f", [(4, 3), (2, 1), (3, [2, 0, 1, 3])])
def test_greedy_equals_autoregressive_on_tiny_models(k, f):
    target = tiny_model(seed=1, vocab_size=64, scale=3.0)
    prompts = [[1, 2, 3, 4], [5, 6], [7, 8, 9, 10, 11, 12]]
    ref, _ = autoregressive.generate(target, prompts, 20)
    hit_rates = []
    for draft in (target, perturbed(target, 7, 0.05), tiny_model(seed=2, vocab_size=64)):
        tokens, stats = ssd.generate(target, prompts, 20, draft=draft, k=k, f=f)
        assert tokens == ref
        assert stats["cold_starts"] == 3
        # every row-round but a row's last one looks its outcome up in S
        assert sum(stats["lookups_by_k"]) == stats["rows_verified"] - 3
        hit_rates.append(stats["hit_rate"])
        # two devices: the cache build overlaps the verify, a JIT draft does not
        v, b, j = stats["verify_s"], stats["cache_build_s"], stats["jit_draft_s"]
        m = stats["modelled_two_device_decode_s"]
        assert max(v, b) + j <= m * (1 + 1e-9) and m <= (v + b + j) * (1 + 1e-9)
        if draft is target:  # JIT drafting only for the cold start: K + the glue and K tree steps
            assert stats["draft_calls"] == k + stats["target_calls"] * (k + 1)
            # each cached speculation is the target's own greedy tokens: all K accepted
            assert stats["accept_counts"] == [0] * k + [stats["rows_verified"]]
    # self-draft: the bonus is the draft's own top guess, always in S; a random draft misses
    assert hit_rates[0] == 1.0 and 0 < hit_rates[1] < 1 and hit_rates[2] < 0.5, hit_rates



def first_layers(target, n):
    """A weak neural draft: the target's first n layers, embedding, final norm and head (shared
    tensors, no copy): it agrees with the target sometimes, so hits and misses both happen."""
    cfg = dataclasses.replace(target.cfg, num_layers=n)
    with torch.device("meta"):
        draft = kernels.Model(cfg)
    draft.embed, draft.norm, draft.head = target.embed, target.norm, target.head
    draft.layers = nn.ModuleList(target.layers[:n])
    draft.inv_freq, draft.tokenizer, draft.name = target.inv_freq, target.tokenizer, f"first{n}"
    return draft


def test_greedy_equals_autoregressive_on_default_model(default_model, default_prompts):
    """Ragged batch of 2 prompts x 16 tokens, K = 3, F = 2: draft = the target itself (the hit
    rate must be 100%) and the target's first 24 of 30 layers (hits and misses)."""
    prompts = default_prompts[:2]
    ref, _ = autoregressive.generate(default_model, prompts, 16)
    tokens, stats = ssd.generate(default_model, prompts, 16, draft=default_model, k=3, f=2)
    assert tokens == ref
    assert stats["hit_rate"] == 1.0 and stats["cache_misses"] == 0
    tokens, stats = ssd.generate(default_model, prompts, 16, draft=first_layers(default_model, 24),
                                 k=3, f=2)
    assert tokens == ref
    assert stats["cache_hits"] > 0 and stats["cache_misses"] > 0, stats


def test_each_row_stops_at_eos_and_at_max_new_tokens_like_autoregressive():
    target = tiny_model(seed=4, vocab_size=16, scale=2.0)
    prompts = [[1, 2], [3, 4, 5], [6]]
    free, _ = autoregressive.generate(target, prompts, 30, eos=False)
    stop = free[0][4]                      # pretend this token is EOS
    target.cfg.eos_token_ids = (stop,)
    try:
        ref, _ = autoregressive.generate(target, prompts, 30)
        for max_new in (1, 2, 7, 30):
            for draft in (target, perturbed(target, 3, 0.05)):
                tokens, _ = ssd.generate(target, prompts, max_new, draft=draft, k=3, f=2)
                assert tokens == [r[:max_new] for r in ref]
    finally:
        target.cfg.eos_token_ids = ()
    assert len(ref[0]) == free[0].index(stop) + 1 <= 5


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_the_just_in_time_draft_sees_the_whole_context(temperature):
    """A miss is served by a JIT draft from the row's context. With draft = target and no bet on
    k = K (F_K = 0), every round accepts all K and misses: every speculation is a JIT one, and
    it must be the target's own (all accepted: exactly at T = 0; at T = 1 p and q differ only by
    float rounding). A JIT that lost a context token would still be lossless, but slow."""
    target = tiny_model(seed=1, vocab_size=64)
    prompts = [[1, 2, 3, 4], [5, 6], [7, 8, 9, 10, 11, 12]]
    tokens, stats = ssd.generate(target, prompts, 30, draft=target, k=3, f=[1, 1, 1, 0],
                                 temperature=temperature, seed=2)
    assert stats["cache_hits"] == 0 and stats["cache_misses"] == stats["rows_verified"] - 3
    assert stats["tau_on_hit"] is None
    if temperature == 0:
        assert tokens == autoregressive.generate(target, prompts, 30)[0]
        assert stats["acceptance_rate"] == 1.0 and stats["accept_counts"][:3] == [0, 0, 0]
    else:
        assert stats["acceptance_rate"] > 0.98, stats["accept_counts"]


def test_top_k_1_at_temperature_above_0_is_greedy():
    """top_k = 1 is greedy at any temperature, for the target and for every speculation the
    draft makes (JIT and cached): with draft = target all are accepted."""
    target = tiny_model(seed=1, vocab_size=64, scale=3.0)
    prompts = [[1, 2, 3, 4], [5, 6]]
    ref, _ = autoregressive.generate(target, prompts, 20)
    for draft in (perturbed(target, 7, 0.3), target):
        tokens, stats = ssd.generate(target, prompts, 20, draft=draft, k=3, f=2,
                                     temperature=1.0, top_k=1, seed=3)
        assert tokens == ref
    assert stats["acceptance_rate"] == 1.0 and stats["hit_rate"] == 1.0


@pytest.mark.parametrize("draft_vocab", [7, 10])
def test_padded_vocabularies_over_one_tokenizer(draft_vocab):
    """A tokenizer of 6 ids over a target embedding of 8 rows and a draft of 7 or 10: the draft
    never proposes an id the target lacks (q is cut to the shared ids) and is shown a stand-in
    for a padding id only the target emits. Greedy output equals autoregressive.py's; sampled
    rows reach the padding ids and every step still runs."""
    tok = FakeTokenizer(6)
    target = tiny_model(seed=3, vocab_size=8)
    draft = tiny_model(seed=4, vocab_size=draft_vocab)
    target.tokenizer = draft.tokenizer = tok
    prompts = [[1, 2, 3], [5], [0, 4, 2, 1]]
    ref, _ = autoregressive.generate(target, prompts, 12)
    tokens, _ = ssd.generate(target, prompts, 12, draft=draft, k=2, f=1)
    assert tokens == ref
    tokens, stats = ssd.generate(target, [[1, 2, 3]] * 300, 6, draft=draft, k=2, f=2,
                                 temperature=1.5, seed=1)
    emitted = {t for row in tokens for t in row}
    assert {6, 7} <= emitted and all(len(row) == 6 for row in tokens)
    assert stats["cache_hits"] > 0 and stats["cache_misses"] > 0


def test_same_seed_same_tokens_at_temperature_above_0():
    target = tiny_model(seed=5, vocab_size=32)
    draft = perturbed(target, 2, 0.3)
    runs = [ssd.generate(target, [[1, 2], [3]], 20, draft=draft, k=3, f=2, temperature=1.0,
                         seed=s)[0] for s in (4, 4, 5)]
    assert runs[0] == runs[1] != runs[2]


def test_not_a_neural_draft_or_bad_k_is_refused_with_a_clear_error():
    target = tiny_model(seed=1)

    class Proposer:
        vocab_size = 64

        def propose(self, contexts, k, temperature, generator):
            raise AssertionError("never called")
    with pytest.raises(ValueError, match="neural draft"):
        ssd.generate(target, [1, 2], 4, draft=Proposer())
    with pytest.raises(ValueError, match="needs a draft"):
        ssd.generate(target, [1, 2], 4)
    with pytest.raises(ValueError, match="k"):
        ssd.generate(target, [1, 2], 4, draft=target, k=0)
    with pytest.raises(ValueError, match="fan-out"):
        ssd.generate(target, [1, 2], 4, draft=target, k=2, f=[1, 1])


# ----------------------------------------------------------------------------------------------
# exact distribution at temperature > 0 (tests/exact.py): a window of 6 tokens over a 4-token
# vocabulary with K = 2 holds the prefill token, a round that accepted both (bonus included) and
# every position of the speculation served after it, from the cache or from the JIT draft. The
# fan-out decides which outcomes are cached: F = (3, 3, 4) bets on every outcome there is (a
# rejected x_{k+1} is never the bonus), so every lookup hits; F_k = 0 makes every outcome with
# that k a miss. The chi-square tests that must pass run at ALPHA each, so the file's
# false-failure rate is at most 1e-3.

V, N, K = 4, 6, 2
PROMPT = [1, 2, 0]
NUM_SAMPLES = 5000
EVERY_OUTCOME = [V - 1] * K + [V]


def with_eos(target, first_excluded):
    """The EOS: with first_excluded, the token top-k 3 never lets come first (the first
    position's least likely), else the likeliest second token."""
    law = exact.exact_distribution(target, PROMPT, 2, eos_ids=())
    by_position = torch.zeros(2, V, dtype=torch.float64)
    for s, prob in law.items():
        for i in range(2):
            by_position[i, s[i]] += prob
    eos = by_position[0].argmin() if first_excluded else by_position[1].argmax()
    target.cfg.eos_token_ids = (int(eos),)
    return target


CASES = {  # target, draft noise (None: an unrelated draft), fan-out and sampling
    "every outcome cached: all hits": dict(noise=0.3, f=EVERY_OUTCOME),
    "no bet on k >= 1: those all miss": dict(noise=0.5, f=[V - 1, 0, 0]),
    "T=1.2, top-k 3, top-p 0.95, F=1": dict(noise=0.5, f=1, temperature=1.2, top_k=3,
                                            top_p=0.95),
    "T=1.3, unrelated random draft, F=(2,0,1)": dict(noise=None, f=[2, 0, 1], temperature=1.3),
    "EOS live (never first), every outcome cached": dict(noise=0.5, f=EVERY_OUTCOME, top_k=3,
                                                        eos="not first"),
    "EOS live (may come first), F=1": dict(noise=0.5, f=1, eos="second"),
}
ALPHA = 1e-3 / len(CASES)


def ssd_samples(target, num_samples, **kwargs):
    """exact.sample_sequences over ssd.generate, also summing the cache counters of all runs."""
    totals = {"cache_hits": 0, "cache_misses": 0, "hits_by_k": [0] * (K + 1),
              "lookups_by_k": [0] * (K + 1)}

    def run(*args, **kw):
        tokens, stats = ssd.generate(*args, **kw)
        for key in totals:
            totals[key] = ([a + b for a, b in zip(totals[key], stats[key])]
                           if isinstance(totals[key], list) else totals[key] + stats[key])
        return tokens, stats
    counts = exact.sample_sequences(run, target, PROMPT, N, num_samples, **kwargs)
    return counts, totals


@pytest.mark.parametrize("case", CASES)
def test_window_follows_the_targets_exact_law(case):
    target = tiny_model(seed=3, vocab_size=V)
    kwargs = dict(CASES[case], temperature=CASES[case].get("temperature", 1.0))
    noise, eos = kwargs.pop("noise"), kwargs.pop("eos", None)
    if eos:
        with_eos(target, first_excluded=eos == "not first")
    draft = perturbed(target, 5, noise) if noise else tiny_model(seed=9, vocab_size=V)
    sampling = {n: kwargs[n] for n in ("temperature", "top_k", "top_p") if n in kwargs}
    law = exact.exact_distribution(target, PROMPT, N, **sampling)
    counts, totals = ssd_samples(target, NUM_SAMPLES, draft=draft, k=K, **kwargs)
    passed, worst, shown = exact.window_test(counts, law, ALPHA)
    shown = f"{case}: {totals}; {shown}"
    print(shown)
    # which outcomes hit is set by the fan-out: all where it bets on every outcome there is, none
    # where F_k = 0; elsewhere the draft's predictions decide, and both must be common. Every k
    # is looked up in >= 3% of lookups (~50 of them: with EOS allowed first, rows end early)
    lookups, f = sum(totals["lookups_by_k"]), ssd.fanout_list(kwargs["f"], K)
    for k, (fk, hits, n) in enumerate(zip(f, totals["hits_by_k"], totals["lookups_by_k"])):
        assert n > 0.03 * lookups and hits == (n if fk == EVERY_OUTCOME[k] else 0 if fk == 0
                                               else hits), (k, shown)
    if f != EVERY_OUTCOME:
        assert min(totals["cache_hits"], totals["cache_misses"]) > 0.2 * lookups, shown
    assert passed, shown


def test_negative_control_cache_handing_back_another_branchs_q_fails(monkeypatch):
    """The same test must catch a cache whose tokens are verified with a q they were not sampled
    from (here: the q rows of the neighbouring branch). Every outcome is cached, so the wrong q
    verifies every round after the first, whatever the draft predicts."""
    target = tiny_model(seed=3, vocab_size=V)
    lookup = ssd.SpeculationCache.lookup

    def wrong_q(self, k, t):
        hit, tokens, _ = lookup(self, k, t)
        _, _, probs = lookup(ssd.SpeculationCache(self.keys, self.tokens,
                                                  self.probs.roll(1, dims=1), None), k, t)
        return hit, tokens, probs
    monkeypatch.setattr(ssd.SpeculationCache, "lookup", wrong_q)
    law = exact.exact_distribution(target, PROMPT, N, temperature=1.0)
    counts, totals = ssd_samples(target, NUM_SAMPLES, k=K, f=EVERY_OUTCOME, temperature=1.0,
                                 draft=perturbed(target, 5, 0.5))
    passed, worst, shown = exact.window_test(counts, law, ALPHA)
    print(f"negative control: {totals}; {shown}")
    assert totals["cache_misses"] == 0 and not passed and worst > 5, shown
