"""speculative.py is lossless: greedy output equals autoregressive.py token for token, sampled
output follows the target's exact law, and the bookkeeping (rollback, EOS, max_new_tokens,
vocabularies) is right.

Statistical tests: every case of `LAW_CASES` (a window of 6 tokens over a 4-token vocabulary,
or 4 over 8: with K = 2 the window holds a round that accepted all K, its bonus, and every
position of the next round) plus the one-round tests of `verify` runs Pearson's chi-square test
(tests/exact.py) at ALPHA / NUM_STAT_TESTS, so under a correct implementation the chance that
any of them fails is at most ALPHA = 1e-3 for this file (Bonferroni); seeds are fixed, so a run
is reproducible. The negative controls (deliberately wrong rules) must FAIL the same test, by
a margin of at least MARGIN x its threshold, for a reason each control states.
"""
import copy
import dataclasses

import pytest
import torch
from torch import nn

import autoregressive
import exact
import kernels
import speculative
from conftest import FakeTokenizer, noisy_copy, tiny_model

ALPHA = 1e-3
V = 8                 # vocabulary of the verify tests and the short-window law cases
PROMPT = [1, 2, 0]    # ids every vocabulary here has (the padded cases have 3 real tokens)
SAMPLES = 6_000
MARGIN = 5.0          # a negative control's chi-square must exceed its threshold this many times
RAGGED = [[1, 2, 3], [5], [7, 8, 9, 10, 11, 12]]


# ----------------------------------------------------------------------------------------------
# drafts for the tests

def negated_head(model):
    """A draft that prefers what the target avoids: near-disjoint q and p (disjoint at top_k=2)."""
    draft = copy.deepcopy(model)
    with torch.no_grad():
        draft.head.weight.neg_()
    return draft


def first_layers(model, n):
    """A poor neural draft sharing the target's weights: its first n layers, then the head."""
    with torch.device("meta"):
        draft = kernels.Model(dataclasses.replace(model.cfg, num_layers=n))
    draft.embed, draft.layers, draft.head = model.embed, nn.ModuleList(model.layers[:n]), model.head
    draft.norm, draft.inv_freq = model.norm, model.inv_freq
    draft.tokenizer, draft.name = model.tokenizer, f"{model.name} (first {n} layers)"
    return draft


class CyclingProposer:
    """Deterministic guesses (a function of the last token), verified with one-hot q."""

    def __init__(self, vocab_size):
        self.vocab_size = vocab_size

    def propose(self, contexts, k, temperature, generator):
        rows = []
        for c in contexts:
            last, row = c[-1], []
            for _ in range(k):
                last = (3 * last + 1) % self.vocab_size
                row.append(last)
            rows.append(row)
        x = torch.tensor(rows)
        return x, speculative.one_hot(x, self.vocab_size)


class RandomTokenProposer:
    """Uniformly random guesses verified with one-hot q (a guess not sampled from a q)."""

    def __init__(self, vocab_size):
        self.vocab_size = vocab_size

    def propose(self, contexts, k, temperature, generator):
        x = torch.randint(self.vocab_size, (len(contexts), k), generator=generator)
        return x, speculative.one_hot(x, self.vocab_size)


class ContextFreeProposer:
    """Samples every guess from one fixed distribution r, whatever the context; q = r."""

    def __init__(self, r):
        self.r, self.vocab_size = r, len(r)

    def propose(self, contexts, k, temperature, generator):
        q = self.r.expand(len(contexts), k, -1).clone()
        return kernels.sample(q, generator), q


class GreedyDraftWithSoftmaxQ:
    """A KNOWN BUG, for a negative control: a greedy draft verified with its softmax."""

    def __init__(self, model):
        self.model, self.vocab_size = model, model.cfg.vocab_size

    def propose(self, contexts, k, temperature, generator):
        rows, xs, qs = [list(c) for c in contexts], [], []
        for _ in range(k):
            cache = self.model.new_cache(len(rows), max(map(len, rows)))
            q = kernels.probs_from_logits(self.model.prefill(rows, cache), temperature)
            x = q.argmax(-1)
            xs.append(x)
            qs.append(q)
            for r, t in zip(rows, x.tolist()):
                r.append(t)
        return torch.stack(xs, 1), torch.stack(qs, 1)


def with_tokenizer(model, tokenizer):
    model.tokenizer = tokenizer
    return model


# the distribution tests draw SAMPLES sequences per case: a one-layer model keeps that cheap
SMALL = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
         "num_key_value_heads": 1, "intermediate_size": 32}


def tiny8(seed, scale=0.5, vocab_size=V):
    return tiny_model(seed, vocab_size=vocab_size, scale=scale, **SMALL)


def target8():
    return tiny8(0)


# ----------------------------------------------------------------------------------------------
# the rule itself

def random_probs(shape, seed, sharp=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * sharp).softmax(-1)


def test_verify_accepts_every_token_when_p_equals_q_and_draws_the_bonus_from_p_k_plus_1():
    B, K = 20_000, 3
    p = random_probs((B, K + 1, V), 0)
    p[:, K] = random_probs(V, 9, sharp=2.0)         # one law for p_{K+1}, unlike p_1..p_K
    x = kernels.sample(p[:, :K], kernels.make_generator(1, "cpu"))
    n, bonus = speculative.verify(p, p[:, :K].clone(), x, kernels.make_generator(2, "cpu"))
    assert n.tolist() == [K] * B
    counts = dict(enumerate(torch.bincount(bonus, minlength=V).tolist()))
    passed, stat, threshold = exact.chi_square_test(counts, dict(enumerate(p[0, K].tolist())),
                                                    ALPHA / NUM_STAT_TESTS)
    assert passed, f"the bonus after K accepted is not ~ p_(K+1): chi2 {stat:.1f} > {threshold:.1f}"


def test_verify_rejects_everything_with_disjoint_supports():
    B, K = 500, 2
    p = torch.zeros(B, K + 1, V)
    p[..., :4] = 0.25                  # the target lives on tokens 0..3
    q = torch.zeros(B, K, V)
    q[..., 4:] = 0.25                  # the draft on 4..7
    x = kernels.sample(q, kernels.make_generator(1, "cpu"))
    n, bonus = speculative.verify(p, q, x, kernels.make_generator(2, "cpu"))
    assert n.tolist() == [0] * B
    counts = dict(enumerate(torch.bincount(bonus, minlength=V).tolist()))
    passed, stat, threshold = exact.chi_square_test(counts, dict(enumerate(p[0, 0].tolist())),
                                                    ALPHA / NUM_STAT_TESTS)
    assert passed, f"the residual max(0, p - q) is p itself here: chi2 {stat:.1f} > {threshold:.1f}"


def test_verify_at_temperature_zero_is_exact_match_and_argmax():
    p = speculative.one_hot(torch.tensor([[3, 5, 1, 2]]), V)   # target's greedy: 3 5 1 | 2
    for draft, n_want, bonus_want in (([3, 5, 1], 3, 2), ([3, 4, 1], 1, 5), ([0, 5, 1], 0, 3)):
        x = torch.tensor([draft])
        n, bonus = speculative.verify(p, speculative.one_hot(x, V), x,
                                      kernels.make_generator(0, "cpu"))
        assert (n.item(), bonus.item()) == (n_want, bonus_want)


def test_verify_refuses_bad_shapes_and_a_token_its_q_never_proposes():
    p, q = random_probs((4, 3, V), 0), random_probs((4, 2, V), 1)
    x = torch.zeros(4, 2, dtype=torch.long)
    gen = kernels.make_generator(0, "cpu")
    for bad_p, bad_q in ((p[:, :2], q), (p, q[:, :1]), (p[..., :5], q)):
        with pytest.raises(ValueError, match="verify wants"):
            speculative.verify(bad_p, bad_q, x, gen)
    q[1, 1, 0] = 0.0                           # row 1's second token (id 0) has q = 0
    with pytest.raises(ValueError, match="probability 0 under its own draft_probs"):
        speculative.verify(p, q, x, gen)


def test_verify_draws_from_its_generator_only():
    p, q = random_probs((300, 3, V), 2), random_probs((300, 2, V), 3)
    x = kernels.sample(q, kernels.make_generator(1, "cpu"))
    runs = []
    for global_seed in (10, 11):
        torch.manual_seed(global_seed)       # the global generator must not matter
        runs.append(speculative.verify(p, q, x, kernels.make_generator(5, "cpu")))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_verify_draws_the_bonus_from_p_when_the_residual_has_no_mass():
    """q above p everywhere (p == q up to rounding, exaggerated here: q = 1.5 p) leaves
    max(0, p - q) = 0 after a rejection: the bonus then comes from p. Rows with a true residual
    (disjoint supports) in the same batch keep theirs."""
    B = 20_000
    p = torch.zeros(B, 2, V)
    p[:, :, :4] = torch.tensor([0.4, 0.3, 0.2, 0.1])
    q = torch.zeros(B, 1, V)
    q[::2, 0, :4] = 1.5 * p[0, 0, :4]           # even rows: no residual mass
    q[1::2, 0, 4:] = 0.25                       # odd rows: residual = p
    x = kernels.sample(q, kernels.make_generator(1, "cpu"))
    n, bonus = speculative.verify(p, q, x, kernels.make_generator(2, "cpu"))
    assert 0.25 < float((n[::2] == 0).float().mean()) < 0.42   # rejected with prob 1/3
    assert bool((n[1::2] == 0).all())
    law = dict(enumerate(p[0, 0].tolist()))
    for rows in (bonus[::2][n[::2] == 0], bonus[1::2]):
        counts = dict(enumerate(torch.bincount(rows, minlength=V).tolist()))
        passed, stat, threshold = exact.chi_square_test(counts, law, ALPHA / NUM_STAT_TESTS)
        assert passed, f"chi2 {stat:.1f} > {threshold:.1f}"
    # a residual of tiny mass (1e-30 on token 7, which q lacks) is still a law: the bonus
    p[:, 0, 7] = 1e-30
    n, bonus = speculative.verify(p[::2], q[::2], x[::2], kernels.make_generator(3, "cpu"))
    assert (n == 0).any() and bool((bonus[n == 0] == 7).all())


@pytest.mark.parametrize("q_kind", ["sampled", "one_hot"])
def test_verify_one_round_follows_p(q_kind):
    """The first token a round emits (x_1 if accepted, else the bonus) is distributed as p_1."""
    B = 200_000
    p1 = torch.tensor([0.05, 0.4, 0.3, 0.15, 0.1])
    q1 = torch.tensor([0.5, 0.1, 0.1, 0.2, 0.1]) if q_kind == "sampled" else None
    gen = kernels.make_generator(0, "cpu")
    target_probs = torch.stack((p1, random_probs(5, 1)))[None].expand(B, 2, 5)
    if q_kind == "sampled":
        x = kernels.sample(q1.expand(B, 5), gen)[:, None]
        q = q1.expand(B, 1, 5)
    else:  # a deterministic guess: always token 1, the most likely one
        x = torch.ones(B, 1, dtype=torch.long)
        q = speculative.one_hot(x, 5)
    n, bonus = speculative.verify(target_probs, q, x, gen)
    first = torch.where(n > 0, x[:, 0], bonus)
    counts = dict(enumerate(torch.bincount(first, minlength=5).tolist()))
    passed, stat, threshold = exact.chi_square_test(counts, dict(enumerate(p1.tolist())),
                                                    ALPHA / NUM_STAT_TESTS)
    assert passed, f"chi2 {stat:.1f} > {threshold:.1f}"


def test_a_bonus_drawn_by_race_clocks_follows_the_residual_and_the_clocks_are_exp_1():
    """verify(..., bonus_race): the bonus is argmax residual / E with kernels.race_clocks' E,
    which must be i.i.d. Exp(1) per token and a function of (seed, row, position) alone, so
    the same law as the generator's draw: the rejected rows' bonus follows the residual
    norm(max(0, p - q)), the accepted rows' p_2 (chi-square, 40,000 rows, one race each)."""
    B, V = 40_000, 5
    E = kernels.race_clocks(3, range(4), [7, 7, 8, 8], 1000)
    assert torch.equal(E, kernels.race_clocks(3, range(4), [7, 7, 8, 8], 1000))   # recomputed
    assert not torch.equal(E[0], E[1]) and not torch.equal(E[0], E[2])           # row, position
    assert bool((E > 0).all()) and abs(float(E.mean()) - 1) < 0.05               # Exp(1): mean 1
    p = torch.tensor([[0.05, 0.4, 0.3, 0.15, 0.1], [0.3, 0.1, 0.1, 0.2, 0.3]])[None].expand(B, 2, V)
    q1 = torch.tensor([0.5, 0.1, 0.1, 0.2, 0.1])
    x = kernels.sample(q1.expand(B, V), kernels.make_generator(0, "cpu"))[:, None]
    seen = []

    def race(n):
        seen.append(n.clone())
        return kernels.race_clocks(9, range(B), (10 + n).tolist(), V)
    n, bonus = speculative.verify(p, q1.expand(B, 1, V), x, kernels.make_generator(1, "cpu"), race)
    assert torch.equal(seen[0], n)
    residual = (p[0, 0] - q1).clamp_min(0)
    for rows, law in ((n == 0, residual / residual.sum()), (n == 1, p[0, 1])):
        counts = dict(enumerate(torch.bincount(bonus[rows], minlength=V).tolist()))
        passed, stat, threshold = exact.chi_square_test(counts, dict(enumerate(law.tolist())),
                                                        ALPHA / NUM_STAT_TESTS)
        assert passed, f"chi2 {stat:.1f} > {threshold:.1f}"


# ----------------------------------------------------------------------------------------------
# temperature 0: token for token the autoregressive output

@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("k", [1, 3, 6])
def test_greedy_equals_autoregressive_on_tiny_models(family, k):
    target = tiny_model(0, family, vocab_size=64)
    want, _ = autoregressive.generate(target, RAGGED, 40)
    got, stats = speculative.generate(target, RAGGED, 40, draft=noisy_copy(target, 0.02), k=k)
    assert got == want
    assert 0 < stats["acceptance_rate"] < 1                 # per-row partial acceptance happened
    # a round that accepted k emits k + 1 tokens; only a row's last round may be cut short
    emitted = sum((n + 1) * c for n, c in enumerate(stats["accept_counts"]))
    assert emitted - k * len(RAGGED) <= stats["new_tokens"] - len(RAGGED) <= emitted


@pytest.mark.parametrize("proposer", [CyclingProposer, RandomTokenProposer])
def test_greedy_equals_autoregressive_with_model_free_proposers(proposer):
    target = tiny_model(0, vocab_size=64)
    want, _ = autoregressive.generate(target, RAGGED, 30)
    got, stats = speculative.generate(target, RAGGED, 30, draft=proposer(64), k=3)
    assert got == want
    assert stats["draft_calls"] == stats["target_calls"]    # one propose() per round


def test_greedy_equals_autoregressive_on_default_model(default_model, default_prompts):
    prompts = default_prompts[:2]
    want, _ = autoregressive.generate(default_model, prompts, 32)
    # draft = target: every draft token is the target's own greedy choice
    got, stats = speculative.generate(default_model, prompts, 32, draft=default_model, k=4)
    assert got == want
    assert stats["acceptance_rate"] > 0.95
    # a poor draft (the first 2 of 30 layers): almost nothing accepted, output unchanged
    got, stats = speculative.generate(default_model, prompts, 32,
                                      draft=first_layers(default_model, 2), k=3)
    assert got == want
    assert stats["acceptance_rate"] < 0.5


def test_greedy_equals_autoregressive_with_the_shipped_int4_draft(default_model, default_prompts):
    """The default draft (int4 layers, shortlist head: drafts.py) is a different model from the
    target: output still equals ar's, and it agrees with the target most of the time."""
    import drafts
    prompts = default_prompts[:2]
    want, _ = autoregressive.generate(default_model, prompts, 32)
    draft = drafts.load_draft("default", default_model)
    assert isinstance(draft.head, drafts.ShortlistHead)
    got, stats = speculative.generate(default_model, prompts, 32, draft=draft, k=4)
    assert got == want
    assert stats["acceptance_rate"] > 0.8


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_acceptance_does_not_decay_over_long_generations(temperature):
    """draft = target accepts all K every round, for 250 tokens. If the draft's cache missed x_K
    after a fully accepted round, its context would be wrong from then on and rounds would fail."""
    target = tiny_model(0, vocab_size=64, max_position_embeddings=512)
    K, rounds = 4, 50
    tokens, stats = speculative.generate(target, [[1, 2, 3], [9]], 1 + rounds * (K + 1),
                                         draft=target, k=K, temperature=temperature)
    assert stats["accept_counts"] == [0] * K + [2 * rounds]
    assert stats["tau"] == K + 1 and stats["acceptance_rate"] == 1.0
    assert [len(t) for t in tokens] == [1 + rounds * (K + 1)] * 2


def test_eos_inside_accepted_tokens_ends_the_row():
    target = tiny_model(0, vocab_size=64)
    free, _ = autoregressive.generate(target, RAGGED, 30, eos=False)
    eos_id = free[0][6]                # a token row 0 emits mid-way: it becomes the EOS
    target.cfg.eos_token_ids = (eos_id,)
    want, _ = autoregressive.generate(target, RAGGED, 30)
    got, _ = speculative.generate(target, RAGGED, 30, draft=target, k=5)   # EOS arrives accepted
    assert got == want
    assert got[0][-1] == eos_id and len(got[0]) <= 7 and eos_id not in got[0][:-1]
    got_noeos, _ = speculative.generate(target, RAGGED, 30, draft=target, k=5, eos=False)
    assert got_noeos == free


@pytest.mark.parametrize("n", [1, 2, 7])
def test_rows_never_exceed_max_new_tokens(n):
    target = tiny_model(0, vocab_size=64)
    want, _ = autoregressive.generate(target, RAGGED, n)
    got, _ = speculative.generate(target, RAGGED, n, draft=target, k=5)
    assert got == want and [len(t) for t in got] == [n] * len(RAGGED)


def test_top_k_1_at_temperature_above_0_is_greedy():
    """top_k = 1 leaves one token at every position, whatever the temperature: the output is
    the greedy one, and a draft equal to the target has every token accepted."""
    target = tiny_model(0, vocab_size=64)
    want, _ = autoregressive.generate(target, RAGGED, 20)
    got, stats = speculative.generate(target, RAGGED, 20, draft=target, k=3, temperature=1.0,
                                      top_k=1, seed=4)
    assert got == want and stats["acceptance_rate"] == 1.0
    got, _ = speculative.generate(target, RAGGED, 20, draft=noisy_copy(target, 0.3), k=3,
                                  temperature=1.5, top_k=1, seed=5)
    assert got == want


# ----------------------------------------------------------------------------------------------
# rollback

class Recorder:
    """Wraps a Model and records every plain forward: (tokens, lengths before, logits)."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, tokens, cache):
        before = cache.lengths.clone()
        logits = self.model(tokens, cache)
        self.calls.append((tokens.clone(), before, logits))
        return logits


def test_rollback_never_leaks_a_rejected_token():
    """Every verify forward sees exactly the row's emitted context: its logits equal a fresh
    prefill of prompt + emitted tokens, at the last token and at every accepted draft token."""
    target = tiny_model(0, vocab_size=64)
    recorder = Recorder(target)
    tokens, stats = speculative.generate(recorder, RAGGED, 24, draft=noisy_copy(target, 0.02),
                                         k=3, temperature=1.0, seed=3)
    assert stats["accept_counts"][0] > 0 and stats["acceptance_rate"] > 0.1  # mixed rollbacks
    checked = 0
    for tokens_in, before, logits in recorder.calls:
        for b, prompt in enumerate(RAGGED):
            seq, L = prompt + tokens[b], int(before[b])
            assert tokens_in[b, 0] == seq[L]
            for i in range(tokens_in.shape[1]):    # the last token, then matching draft tokens
                if L + i >= len(seq) or tokens_in[b, i] != seq[L + i]:
                    break
                fresh = target.prefill([seq[: L + i + 1]], target.new_cache(1, L + i + 1))
                torch.testing.assert_close(logits[b, i], fresh[0], atol=1e-4, rtol=1e-4)
                checked += 1
    assert checked > len(recorder.calls) * len(RAGGED)


# ----------------------------------------------------------------------------------------------
# temperature > 0: the exact law of a window of tokens

WINDOW = {4: 6, 8: 4}  # V -> n: V^n <= 4096 sequences; with K = 2, 6 tokens hold the prefill
# token, a round that accepted both (x_1, x_2, bonus) and every position of the next round


def tiny4(seed, scale=1.0, vocab_size=4):
    return tiny_model(seed, vocab_size=vocab_size, scale=scale, **SMALL)


def target4():
    return tiny4(0)


def with_eos_second(target):
    """Make the target's likeliest second token its EOS: EOS then often arrives inside a round
    (accepted, or as a bonus), and sometimes first."""
    law = exact.exact_distribution(target, PROMPT, 2, eos_ids=())
    second = torch.zeros(target.cfg.vocab_size, dtype=torch.float64)
    for s, prob in law.items():
        second[s[1]] += prob
    target.cfg.eos_token_ids = (int(second.argmax()),)
    return target


def padded_target8():
    """A tokenizer of 6 real tokens over an embedding of 8 rows (ids 6, 7 are padding)."""
    return with_tokenizer(target8(), FakeTokenizer(6))


def padded_target4():
    """A tokenizer of 3 real tokens over an embedding of 4 rows (id 3 is padding)."""
    return with_tokenizer(target4(), FakeTokenizer(3))


LAW_CASES = {
    # name: (make target, make draft from the target, k, sampling kwargs beyond temperature=1)
    "draft_equals_target": (target4, lambda t: t, 2, {}),     # full acceptance: every bonus ~ p_3
    "noisy_draft": (target4, lambda t: noisy_copy(t, 0.5), 2, {}),
    "independent_random_draft": (target4, lambda t: tiny4(1), 3, {}),
    "near_disjoint_negated_head": (target4, negated_head, 2, {}),
    "disjoint_supports_top_k": (target4, negated_head, 2, {"top_k": 2}),
    "sharp_target_flat_draft": (lambda: tiny4(0, scale=2.5), lambda t: tiny4(1, scale=0.1), 2, {}),
    "one_hot_cycling_proposer": (target4, lambda t: CyclingProposer(4), 2, {}),
    "one_hot_random_tokens": (target4, lambda t: RandomTokenProposer(4), 1, {}),
    "context_free_proposer": (target4, lambda t: ContextFreeProposer(random_probs(4, 5, 2.0)),
                              2, {}),
    "top_k": (target4, lambda t: noisy_copy(t, 0.5), 2, {"temperature": 0.8, "top_k": 3}),
    "top_p": (target4, lambda t: noisy_copy(t, 0.5), 2, {"temperature": 1.3, "top_p": 0.7}),
    "eos_inside_rounds": (lambda: with_eos_second(target4()), lambda t: noisy_copy(t, 0.3), 2, {}),
    "padded_vocab_larger_draft": (padded_target4,
                                  lambda t: with_tokenizer(tiny4(1, vocab_size=5), t.tokenizer),
                                  2, {}),
    "padded_vocab_smaller_draft": (padded_target4,
                                   lambda t: with_tokenizer(tiny4(1, vocab_size=3), t.tokenizer),
                                   2, {}),
    "V8_top_k_top_p": (target8, lambda t: noisy_copy(t, 0.5), 1,
                       {"temperature": 0.8, "top_k": 3, "top_p": 0.9}),
}
NUM_STAT_TESTS = len(LAW_CASES) + 8   # + the chi-square tests of verify above


def law_test(target, draft, k, sampling, seed=0, alpha=ALPHA / NUM_STAT_TESTS):
    """(passed, worst statistic / threshold, shown) for SAMPLES runs over the window."""
    sampling = {"temperature": 1.0, **sampling}
    n = WINDOW[target.cfg.vocab_size]
    law = exact.exact_distribution(target, PROMPT, n, **sampling)
    counts = exact.sample_sequences(speculative.generate, target, PROMPT, n, SAMPLES,
                                    draft=draft, k=k, seed=seed, **sampling)
    return exact.window_test(counts, law, alpha)


@pytest.mark.parametrize("case", list(LAW_CASES))
def test_sampled_output_follows_the_exact_target_law(case):
    make_target, make_draft, k, sampling = LAW_CASES[case]
    target = make_target()
    draft = make_draft(target)
    passed, worst, shown = law_test(target, draft, k, sampling)
    assert passed, f"{case}: {shown}"


def verify_greedy_acceptance(target_probs, draft_probs, draft_tokens, generator):
    """WRONG at temperature > 0: accept while x_i is the argmax of p_i; bonus ~ p."""
    B, K = draft_tokens.shape
    ok = draft_tokens == target_probs[:, :K].argmax(-1)
    n = ok.long().cumprod(-1).sum(-1)
    return n, kernels.sample(target_probs[torch.arange(B), n], generator)


def verify_without_residual(target_probs, draft_probs, draft_tokens, generator):
    """WRONG: the right acceptance test, but the bonus after a rejection drawn from p_i, not
    from norm(max(0, p_i - q_i))."""
    B, K = draft_tokens.shape
    p_x = target_probs[:, :K].gather(-1, draft_tokens[..., None])[..., 0]
    q_x = draft_probs.gather(-1, draft_tokens[..., None])[..., 0]
    u = torch.rand(B, K, generator=generator)
    n = (u * q_x < p_x).long().cumprod(-1).sum(-1)
    return n, kernels.sample(target_probs[torch.arange(B), n], generator)


# Each control's draft is chosen so that its bug acts on most rounds, whatever the weights:
#   greedy_acceptance: a uniform context-free draft; every accepted token becomes an argmax
#     and a non-argmax proposal is never accepted (the law of each round changes);
#   no_residual: the same draft: a rejection (about half the rounds) draws the bonus from p,
#     not from max(0, p - 1/4), moving mass onto the tokens the draft already offered;
#   greedy_draft_softmax_q: the target drafts for itself greedily and reports its softmax:
#     p = q, so every argmax proposal is accepted and K of every K+1 tokens are greedy.
NEGATIVE_CONTROLS = {
    "greedy_acceptance": (verify_greedy_acceptance, lambda t: ContextFreeProposer(
        torch.full((4,), 0.25))),
    "no_residual": (verify_without_residual, lambda t: ContextFreeProposer(torch.full((4,), 0.25))),
    "greedy_draft_softmax_q": (None, GreedyDraftWithSoftmaxQ),
}


@pytest.mark.parametrize("bug", list(NEGATIVE_CONTROLS))
def test_negative_control_wrong_rules_fail_the_law_test(bug, monkeypatch):
    wrong_verify, make_draft = NEGATIVE_CONTROLS[bug]
    if wrong_verify is not None:
        monkeypatch.setattr(speculative, "verify", wrong_verify)
    target = target4()
    passed, worst, shown = law_test(target, make_draft(target), 2, {})
    print(f"{bug}: {shown}")
    assert not passed and worst > MARGIN, f"{bug} is not caught by a wide margin: {shown}"


# ----------------------------------------------------------------------------------------------
# bad input

def test_missing_draft_and_bad_k_are_clear_errors():
    target = tiny_model(0, vocab_size=64)
    with pytest.raises(ValueError, match="needs a draft"):
        speculative.generate(target, [1, 2], 4)
    for k in (0, -2, 2.5):
        with pytest.raises(ValueError, match="k .* must be an integer >= 1"):
            speculative.generate(target, [1, 2], 4, draft=target, k=k)
    with pytest.raises(ValueError, match="neither a kernels.Model nor a proposer"):
        speculative.generate(target, [1, 2], 4, draft=object())


def test_a_draft_with_a_shorter_context_than_the_request_is_refused_naming_both_limits():
    """A draft whose max_position_embeddings (32) is below the target's (256) serves requests
    that fit it, and refuses, naming both limits, the ones that would run it past them."""
    import ssd
    target = tiny_model(0, vocab_size=64)
    draft = tiny_model(1, vocab_size=64, max_position_embeddings=32)
    for mod in (speculative, ssd):
        with pytest.raises(ValueError, match="draft's context of 32 .*target's is 256"):
            mod.generate(target, list(range(1, 21)), 20, draft=draft, k=2)
        tokens, _ = mod.generate(target, list(range(1, 21)), 12, draft=draft, k=2, eos=False)
        assert len(tokens[0]) == 12


def test_vocabulary_mismatches_are_clear_errors():
    target = tiny_model(0, vocab_size=64)
    with pytest.raises(ValueError, match="64 and 80 tokens"):
        speculative.generate(target, [1, 2], 4, draft=tiny_model(1, vocab_size=80))
    t = with_tokenizer(tiny_model(0, vocab_size=64), FakeTokenizer(64))
    d = with_tokenizer(tiny_model(1, vocab_size=64), FakeTokenizer(64, salt="x"))
    t.name, d.name = "target-model", "draft-model"
    with pytest.raises(ValueError, match="'target-model' and draft 'draft-model' use different"):
        speculative.generate(t, [1, 2], 4, draft=d)
    d = with_tokenizer(tiny_model(1, vocab_size=40), FakeTokenizer(64))
    with pytest.raises(ValueError, match="tokenizer has 64 tokens but an embedding has only 40"):
        speculative.generate(t, [1, 2], 4, draft=d)


def test_padded_vocabularies_over_one_tokenizer_are_accepted():
    for draft_vocab in (7, 10):
        target = padded_target8()
        draft = with_tokenizer(tiny8(1, vocab_size=draft_vocab), target.tokenizer)
        prompts = [[1, 2, 3], [5], [0, 4, 2, 1]]
        want, _ = autoregressive.generate(target, prompts, 12)
        got, _ = speculative.generate(target, prompts, 12, draft=draft, k=3)
        assert got == want


def test_broken_proposers_are_clear_errors():
    class WrongShape(CyclingProposer):
        def propose(self, contexts, k, temperature, generator):
            x, q = super().propose(contexts, k, temperature, generator)
            return x[:, :1], q[:, :1]

    class ZeroQ(CyclingProposer):
        def propose(self, contexts, k, temperature, generator):
            x, q = super().propose(contexts, k, temperature, generator)
            return x, speculative.one_hot((x + 1) % self.vocab_size, self.vocab_size)

    target = tiny_model(0, vocab_size=64)
    with pytest.raises(ValueError, match=r"propose returned shapes \(1, 1\)"):
        speculative.generate(target, [1, 2], 4, draft=WrongShape(64), k=2)
    with pytest.raises(ValueError, match="probability 0 under its own draft_probs"):
        speculative.generate(target, [1, 2], 4, draft=ZeroQ(64), k=2)
