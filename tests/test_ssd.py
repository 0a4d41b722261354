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
from conftest import tiny_model


def test_tree_drafted_branches_equal_each_branch_drafted_alone():
    """Every (k, t) branch of one batched tree pass gives the q rows a plain forward of
    prompt + t0 + x_1..x_k + t + y_1..y_{K-1} gives (teacher-forced on the tree's own samples),
    on ragged rows, with uneven fan-out including a zero."""
    model = tiny_model(seed=1, vocab_size=32)
    prompts = [[1, 2, 3, 4], [5, 6]]
    cache = model.new_cache(2, 64)
    model.prefill(prompts, cache)
    t0, x = torch.tensor([13, 14]), torch.tensor([[7, 8, 9], [10, 11, 12]])
    S = ssd.build_speculation_cache(model, cache, t0, x, [2, 0, 1, 3], 1.0, None, None,
                                    kernels.make_generator(0, "cpu"))
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
    S = ssd.build_speculation_cache(model, cache, t0, x, 2, 0.0, None, None, None)
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
    S = ssd.SpeculationCache(keys, tokens, probs)
    hit, y, q = S.lookup(torch.tensor([2, 2]), torch.tensor([5, 4]))
    assert hit.tolist() == [True, True]
    assert y.tolist() == [tokens[0, 2].tolist(), tokens[1, 2].tolist()]
    assert torch.equal(q, torch.stack([probs[0, 2], probs[1, 2]]))
    # same t under another k, same k with another t, a key of the other row: all misses
    hit, _, _ = S.lookup(torch.tensor([1, 0]), torch.tensor([5, 3]))
    assert hit.tolist() == [False, False]
    hit, _, _ = S.lookup(torch.tensor([1, 0]), torch.tensor([7, 5]))
    assert hit.tolist() == [False, False]


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
        assert stats["new_tokens"] == 60 and stats["cold_starts"] == 3
        assert stats["cache_hits"] + stats["cache_misses"] == sum(stats["lookups_by_k"]) > 0
        hit_rates.append(stats["hit_rate"])
        if draft is target:  # JIT drafting only for the cold start: K + the glue and K tree steps
            assert stats["draft_calls"] == k + stats["target_calls"] * (k + 1)
            assert stats["tau_on_hit"] > 1 and stats["modelled_two_device_decode_s"] > 0
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
# exact distribution at temperature > 0 (tests/exact.py): the chi-square tests below that must
# pass run at alpha = 1e-3 / 3 each, so the file's false-failure rate is at most 1e-3

ALPHA = 1e-3 / 3
NUM_SAMPLES = 8000


def ssd_samples(target, prompt, num_samples, **kwargs):
    """exact.sample_sequences over ssd.generate, also summing the cache counters of all runs."""
    totals = {"cache_hits": 0, "cache_misses": 0, "cold_starts": 0}

    def run(*args, **kw):
        tokens, stats = ssd.generate(*args, **kw)
        for key in totals:
            totals[key] += stats[key]
        return tokens, stats
    counts = exact.sample_sequences(run, target, prompt, 3, num_samples, **kwargs)
    return counts, totals


CASES = {  # draft, fan-out and sampling; all chosen so that both hits and misses are common
    "T=1, noisy draft, F=1": dict(noise=0.7, f=1, temperature=1.0),
    "T=0.7, top-k 5, top-p 0.9, F=(2,0,1)": dict(noise=0.5, f=[2, 0, 1], temperature=0.7,
                                                 top_k=5, top_p=0.9),
    "T=1.3, unrelated random draft, F=2": dict(noise=None, f=2, temperature=1.3),
}


@pytest.mark.parametrize("case", list(CASES))
def test_first_three_tokens_follow_the_targets_exact_law(case):
    """V = 8, 3 new tokens (at most 512 sequences), prompt [1, 2, 3], K = 2. The third token comes
    from the round after the first (when it accepted nothing): from the cache on a hit, from the
    JIT draft on a miss. Both must happen often (asserted and shown)."""
    target = tiny_model(seed=3, vocab_size=8)
    kwargs = dict(CASES[case])
    noise = kwargs.pop("noise")
    draft = perturbed(target, 5, noise) if noise else tiny_model(seed=9, vocab_size=8)
    sampling = {n: kwargs[n] for n in ("temperature", "top_k", "top_p") if n in kwargs}
    probs = exact.exact_distribution(target, [1, 2, 3], 3, **sampling)
    counts, totals = ssd_samples(target, [1, 2, 3], NUM_SAMPLES, draft=draft, k=2, **kwargs)
    passed, stat, threshold = exact.chi_square_test(counts, probs, ALPHA)
    shown = (f"{case}: hits {totals['cache_hits']}, misses {totals['cache_misses']}, cold starts "
             f"{totals['cold_starts']}; chi2 {stat:.1f} vs {threshold:.1f}, TV "
             f"{exact.total_variation(counts, probs):.4f}")
    print(shown)
    assert totals["cache_hits"] > 500 and totals["cache_misses"] > 500, shown
    assert passed, shown


def test_negative_control_cache_handing_back_another_branchs_q_fails(monkeypatch):
    """The same test must catch a cache whose tokens are verified with a q they were not sampled
    from (here: the q rows of the neighbouring branch)."""
    target = tiny_model(seed=3, vocab_size=8)
    lookup = ssd.SpeculationCache.lookup

    def wrong_q(self, k, t):
        hit, tokens, _ = lookup(self, k, t)
        _, _, probs = lookup(ssd.SpeculationCache(self.keys, self.tokens,
                                                  self.probs.roll(1, dims=1)), k, t)
        return hit, tokens, probs
    monkeypatch.setattr(ssd.SpeculationCache, "lookup", wrong_q)
    probs = exact.exact_distribution(target, [1, 2, 3], 3, temperature=1.0)
    counts, totals = ssd_samples(target, [1, 2, 3], NUM_SAMPLES, k=2, f=1, temperature=1.0,
                                 draft=perturbed(target, 5, 0.7))
    passed, stat, threshold = exact.chi_square_test(counts, probs, ALPHA)
    print(f"negative control: hits {totals['cache_hits']}, chi2 {stat:.1f} vs {threshold:.1f}")
    assert totals["cache_hits"] > 500 and not passed
