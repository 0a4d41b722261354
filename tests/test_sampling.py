"""kernels.py section 7, the sampling helpers every loop shares, against their definitions.

The law tests of the loops compare samples with tests/exact.reference_probs, a plain
implementation of temperature, top-k and top-p written for the tests; here that reference is
checked against transformers' own logits warpers, and kernels.probs_from_logits against both.
The semantics, stated once (the README's loops and transformers agree):
  temperature T > 0: softmax(logits / T); T = 0: one-hot on the argmax (the first of a tie);
  top-k (applied first): keep the tokens whose logit is >= the k-th largest: exactly k with
    distinct logits, every token tied with the k-th otherwise; top_k = 1 is greedy at any T;
  top-p (applied after top-k, on the renormalized survivors): keep the smallest set of most
    likely tokens whose mass reaches p (>= p), i.e. a token survives iff the mass of the tokens
    more likely than it is < p.
"""
import collections
import math

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

import exact
import kernels

SETTINGS = [(t, k, p) for t in (0.3, 1.0, 2.5) for k in (None, 1, 2, 7)
            for p in (None, 0.3, 0.9, 1.0)]


def random_logits(rows, V, seed, scale=2.0):
    """Distinct logits (ties have probability 0), float64."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, V, generator=g, dtype=torch.float64) * scale


def transformers_probs(logits, temperature, top_k, top_p):
    """transformers' warpers in generate's order (temperature, top-k, top-p), then softmax."""
    scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k is not None:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p is not None:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores.softmax(-1)


@pytest.mark.parametrize("V", [5, 50])
def test_reference_equals_transformers_logits_warpers(V):
    logits = random_logits(300, V, seed=V)
    for t, k, p in SETTINGS:
        want = transformers_probs(logits, t, k, p).numpy()
        got = exact.reference_probs(logits, t, k, p)
        assert ((got > 0) == (want > 0)).all(), (t, k, p)         # the same survivors
        np.testing.assert_allclose(got, want, atol=1e-12, err_msg=str((t, k, p)))


@pytest.mark.parametrize("V", [5, 50])
def test_probs_from_logits_equals_the_reference(V):
    logits = random_logits(300, V, seed=V + 1)
    for t, k, p in SETTINGS + [(0.0, None, None), (0.0, 3, 0.5)]:
        got = kernels.probs_from_logits(logits.float(), t, k, p)
        want = exact.reference_probs(logits.float(), t, k, p)
        assert got.dtype == torch.float32 and got.shape == logits.shape
        assert ((got > 0).numpy() == (want > 0)).all(), (t, k, p)
        np.testing.assert_allclose(got.double().numpy(), want, atol=2e-6, err_msg=str((t, k, p)))


def test_probs_from_logits_treats_each_row_of_a_3d_batch_alone():
    """The loops pass (B, K+1, V) logits: every row follows the same rule as a 2-D batch."""
    logits = random_logits(40, 8, seed=6).float().view(20, 2, 8)
    for t, k, p in ((0.8, 3, 0.9), (1.0, 2, None), (1.3, None, 0.5), (0.0, None, None)):
        got = kernels.probs_from_logits(logits, t, k, p)
        assert got.shape == (20, 2, 8)
        torch.testing.assert_close(got.view(40, 8), kernels.probs_from_logits(logits.view(40, 8),
                                                                            t, k, p))
        np.testing.assert_allclose(got.double().numpy(), exact.reference_probs(logits, t, k, p),
                                   atol=2e-6)


def test_the_default_temperature_is_greedy_and_bad_settings_are_refused():
    logits = random_logits(10, 6, seed=7).float()
    assert torch.equal(kernels.probs_from_logits(logits), kernels.probs_from_logits(logits, 0.0))
    assert torch.equal(kernels.probs_from_logits(logits).argmax(-1), logits.argmax(-1))
    for bad, match in (((-0.5,), "temperature"), ((1.0, 0), "top_k"), ((1.0, -2), "top_k"),
                       ((1.0, None, 0.0), "top_p"), ((1.0, None, 1.5), "top_p")):
        with pytest.raises(ValueError, match=match):
            kernels.probs_from_logits(logits, *bad)


def test_temperature_divides_the_logits():
    logits = torch.tensor([[0.0, math.log(2.0), math.log(4.0)]])
    for t, want in ((1.0, [1 / 7, 2 / 7, 4 / 7]), (0.5, [1 / 21, 4 / 21, 16 / 21]),
                    (2.0, [1 / (1 + 2 ** .5 + 2), 2 ** .5 / (3 + 2 ** .5), 2 / (3 + 2 ** .5)])):
        got = kernels.probs_from_logits(logits, t)[0]
        torch.testing.assert_close(got, torch.tensor(want), atol=1e-6, rtol=0)
    assert kernels.probs_from_logits(logits, 0.0)[0].tolist() == [0.0, 0.0, 1.0]


@pytest.mark.parametrize("temperature", [1e-30, 1e-38])
def test_a_near_zero_temperature_is_greedy_not_nan(temperature):
    """logits / T overflows for T near 0: only the gaps to the largest logit may be divided
    (they are <= 0, so they go to -inf, never to +inf), which leaves the argmax with all mass."""
    logits = torch.tensor([[5.0, 1.0, 4.999], [-3.0, 2.0, 40.0]])
    probs = kernels.probs_from_logits(logits, temperature)
    assert torch.equal(probs, torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]))
    assert kernels.sample(probs).tolist() == [0, 2]


def test_top_k_keeps_exactly_the_k_largest():
    logits = random_logits(200, 12, seed=3).float()
    full = kernels.probs_from_logits(logits, 0.7)
    for k in range(1, 13):
        p = kernels.probs_from_logits(logits, 0.7, top_k=k)
        assert ((p > 0).sum(-1) == k).all(), k                          # exactly k survive
        top = logits.topk(k, dim=-1).indices
        assert (p.gather(-1, top) > 0).all(), k                          # ... the k largest
        kept = full.gather(-1, top)
        torch.testing.assert_close(p.gather(-1, top), kept / kept.sum(-1, keepdim=True))


def test_top_k_keeps_every_token_tied_with_the_kth():
    logits = torch.tensor([[3.0, 2.0, 2.0, 1.0, 0.0], [2.0, 2.0, 1.0, 0.0, -1.0]])
    p = kernels.probs_from_logits(logits, 1.0, top_k=2)
    assert (p > 0).tolist() == [[True, True, True, False, False], [True, True, False, False, False]]
    p = kernels.probs_from_logits(logits, 1.0, top_k=1)           # a tie for the top: both stay
    assert (p > 0).tolist() == [[True, False, False, False, False], [True, True, False, False, False]]
    assert p[1, 0] == p[1, 1] == 0.5
    for row in range(2):
        np.testing.assert_allclose(exact.reference_probs(logits, 1.0, 2)[row],
                                   kernels.probs_from_logits(logits, 1.0, top_k=2)[row].double(),
                                   atol=1e-6)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 5.0])
def test_top_k_1_is_greedy_at_any_temperature(temperature):
    logits = random_logits(100, 30, seed=4).float()
    p = kernels.probs_from_logits(logits, temperature, top_k=1)
    assert torch.equal(p, kernels.probs_from_logits(logits, 0.0))
    assert torch.equal(kernels.sample(p, kernels.make_generator(0, "cpu")), logits.argmax(-1))


def test_top_p_keeps_the_smallest_set_that_reaches_p():
    probs = torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.0625])
    logits = probs.log()[None]
    for top_p, survivors in ((0.01, 1), (0.49, 1), (0.51, 2), (0.74, 2), (0.76, 3), (0.9, 4),
                             (0.99, 5), (1.0, 5)):
        p = kernels.probs_from_logits(logits, 1.0, top_p=top_p)[0]
        assert (p > 0).tolist() == [True] * survivors + [False] * (5 - survivors), top_p
        kept = probs[:survivors]
        torch.testing.assert_close(p[:survivors], kept / kept.sum())
    shuffled = logits[:, [3, 0, 4, 2, 1]]                      # the order of the ids is irrelevant
    p = kernels.probs_from_logits(shuffled, 1.0, top_p=0.74)[0]
    assert (p > 0).tolist() == [False, True, False, False, True]


def test_top_p_reached_exactly_keeps_no_more():
    """Four equal logits: masses 1/4 each, exactly representable. top_p = 1/2 is reached by two
    tokens: the third, with exactly 1/2 before it, is dropped (the tied tokens that stay are
    the lowest ids, as argmax picks); 0.75 keeps three."""
    logits = torch.zeros(3, 4)
    for top_p, survivors in ((0.25, 1), (0.5, 2), (0.75, 3), (0.76, 4)):
        p = kernels.probs_from_logits(logits, 1.0, top_p=top_p)
        assert ((p > 0).sum(-1) == survivors).all() and (p[:, :survivors] > 0).all(), top_p
        assert ((exact.reference_probs(logits, 1.0, None, top_p) > 0).sum(-1) == survivors).all()


def test_top_k_comes_before_top_p_and_top_p_sees_the_renormalized_survivors():
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()
    # top-2 leaves (4/7, 3/7); top-p 0.5 then keeps the first alone (4/7 >= 0.5). Top-p first
    # would have kept two (0.4 < 0.5).
    assert kernels.probs_from_logits(logits, 1.0, top_k=2, top_p=0.5)[0].tolist() == [1, 0, 0, 0]
    assert exact.reference_probs(logits, 1.0, 2, 0.5)[0].tolist() == [1, 0, 0, 0]
    p = kernels.probs_from_logits(logits, 1.0, top_k=3, top_p=0.5)[0]   # (4/9, 3/9, 2/9): two
    torch.testing.assert_close(p, torch.tensor([4 / 7, 3 / 7, 0, 0]))


def test_sample_follows_each_rows_own_law_and_needs_no_normalized_input():
    """One call, rows of different laws, one of them scaled by 3 (sample normalizes by the
    row's total): each row's draws follow its own law (chi-square, 1e-3 each)."""
    laws = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.0], [0.0, 0.5, 0.0, 0.25, 0.25],
                         [0.6, 0.0, 0.1, 0.1, 0.2]])
    n = 6000
    rows = torch.cat([laws[0:1] * 3.0, laws[1:3]]).repeat(n, 1).view(n, 3, 5)     # (n, 3, V)
    draws = kernels.sample(rows, kernels.make_generator(5, "cpu"))
    assert draws.shape == (n, 3)
    for r in range(3):
        counts = collections.Counter(draws[:, r].tolist())
        assert all(laws[r, t] > 0 for t in counts), r                    # never a zero
        passed, stat, threshold = exact.chi_square_test(counts, dict(enumerate(laws[r].tolist())),
                                                        1e-3 / 3)
        assert passed, (r, stat, threshold)


def test_sample_draws_a_token_whose_mass_is_all_at_the_end_of_the_row():
    probs = torch.zeros(4, 7)
    probs[:, -1] = 1.0                      # all mass on the last id
    probs[1, -1], probs[1, 0] = 0.5, 0.5    # or split between the first and the last
    draws = kernels.sample(probs.repeat(50, 1), kernels.make_generator(2, "cpu")).view(50, 4)
    assert (draws[:, [0, 2, 3]] == 6).all()
    assert set(draws[:, 1].tolist()) == {0, 6}


@pytest.mark.parametrize("u, want", [(0.0, [1, 2, 0]), (1.0 - 2.0 ** -53, [2, 3, 1])])
def test_sample_never_draws_a_zero_at_the_ends_of_the_uniform_draw(monkeypatch, u, want):
    """u ~ U[0, 1) takes the value 0 (and values just below 1): even there no token of
    probability 0 is drawn, whether the zeros lead, trail or sit between."""
    probs = torch.tensor([[0.0, 0.5, 0.5, 0.0], [0.0, 0.0, 0.25, 0.75], [0.5, 0.5, 0.0, 0.0]])
    rand = torch.rand
    monkeypatch.setattr(torch, "rand", lambda *shape, **kw: torch.full_like(
        rand(*shape, **kw), u))
    assert kernels.sample(probs).tolist() == want


def test_sample_uses_the_generator_it_is_given():
    probs = torch.full((200, 10), 0.1)
    a = kernels.sample(probs, kernels.make_generator(1, "cpu"))
    torch.manual_seed(123)   # the global generator must not matter
    b = kernels.sample(probs, kernels.make_generator(1, "cpu"))
    assert torch.equal(a, b) and len(set(a.tolist())) > 5
