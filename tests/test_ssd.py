"""ssd.py: the draft side (outcome prediction, tree drafting, the speculation cache) and the loop
(lossless at every temperature, token-for-token equal to autoregressive.py at temperature 0)."""
import pytest
import torch

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
