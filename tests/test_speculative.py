"""speculative.py is lossless: greedy output equals autoregressive.py token for token, sampled
output follows the target's exact law, and the bookkeeping (rollback, EOS, max_new_tokens,
vocabularies) is right.

Statistical tests: every case of `LAW_CASES` plus `test_verify_one_round_follows_p` runs
Pearson's chi-square test (tests/exact.py) at ALPHA / NUM_STAT_TESTS, so under a correct
implementation the chance that any of them fails is at most ALPHA = 1e-3 for this file
(Bonferroni); seeds are fixed, so a run is reproducible. The negative controls (deliberately
wrong rules) must FAIL the same test at the same level.
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
from conftest import tiny_model

ALPHA = 1e-3
V = 8                 # vocabulary of the distribution tests: V^3 = 512 sequences to enumerate
PROMPT = [1, 2, 3]
N_TOKENS = 3          # the first token comes from prefill, the next two from verify rounds
SAMPLES = 8_000
RAGGED = [[1, 2, 3], [5], [7, 8, 9, 10, 11, 12]]


# ----------------------------------------------------------------------------------------------
# drafts for the tests

def noisy_copy(model, noise, seed=1):
    """The target with Gaussian noise on every weight: a draft that agrees with it partly."""
    draft = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=g) * noise)
    return draft


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


class FakeTokenizer:
    def __init__(self, n, salt=""):
        self.vocab = {f"tok{i}{salt}": i for i in range(n)}

    def get_vocab(self):
        return dict(self.vocab)

    def __len__(self):
        return len(self.vocab)


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


def test_verify_accepts_every_token_when_p_equals_q():
    B, K = 500, 3
    p = random_probs((B, K + 1, V), 0)
    x = kernels.sample(p[:, :K], kernels.make_generator(1, "cpu"))
    n, bonus = speculative.verify(p, p[:, :K].clone(), x, kernels.make_generator(2, "cpu"))
    assert n.tolist() == [K] * B


def test_verify_rejects_everything_with_disjoint_supports():
    B, K = 500, 2
    p = torch.zeros(B, K + 1, V)
    p[..., :4] = 0.25                  # the target lives on tokens 0..3
    q = torch.zeros(B, K, V)
    q[..., 4:] = 0.25                  # the draft on 4..7
    x = kernels.sample(q, kernels.make_generator(1, "cpu"))
    n, bonus = speculative.verify(p, q, x, kernels.make_generator(2, "cpu"))
    assert n.tolist() == [0] * B
    assert bool((bonus < 4).all())     # the residual max(0, p - q) is p itself


def test_verify_at_temperature_zero_is_exact_match_and_argmax():
    p = speculative.one_hot(torch.tensor([[3, 5, 1, 2]]), V)   # target's greedy: 3 5 1 | 2
    for draft, n_want, bonus_want in (([3, 5, 1], 3, 2), ([3, 4, 1], 1, 5), ([0, 5, 1], 0, 3)):
        x = torch.tensor([draft])
        n, bonus = speculative.verify(p, speculative.one_hot(x, V), x,
                                      kernels.make_generator(0, "cpu"))
        assert (n.item(), bonus.item()) == (n_want, bonus_want)


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
    assert sum(stats["accept_counts"]) == stats["rows_verified"]


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
    got, stats = speculative.generate(target, RAGGED, n, draft=target, k=5)
    assert got == want and [len(t) for t in got] == [n] * len(RAGGED)
    assert stats["new_tokens"] == n * len(RAGGED)


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
# temperature > 0: the exact law of the first N_TOKENS tokens

def eos_target8():
    """A V=8 target whose EOS is its likeliest second token: EOS often arrives inside a round."""
    target = target8()
    law = exact.exact_distribution(target, PROMPT, N_TOKENS, eos_ids=())
    second = torch.zeros(V, dtype=torch.float64)
    for s, prob in law.items():
        second[s[1]] += prob
    target.cfg.eos_token_ids = (int(second.argmax()),)
    return target


def padded_target8():
    """A tokenizer of 6 real tokens over an embedding of 8 rows (ids 6, 7 are padding)."""
    return with_tokenizer(target8(), FakeTokenizer(6))


LAW_CASES = {
    # name: (make target, make draft from the target, k, sampling kwargs beyond temperature=1)
    "draft_equals_target": (target8, lambda t: t, 2, {}),
    "independent_random_draft": (target8, lambda t: tiny8(1), 3, {}),
    "near_disjoint_negated_head": (target8, negated_head, 2, {}),
    "disjoint_supports_top_k": (target8, negated_head, 2, {"top_k": 2}),
    "sharp_target_flat_draft": (lambda: tiny8(0, scale=2.0), lambda t: tiny8(1, scale=0.1), 3, {}),
    "one_hot_cycling_proposer": (target8, lambda t: CyclingProposer(V), 2, {}),
    "one_hot_random_tokens": (target8, lambda t: RandomTokenProposer(V), 1, {}),
    "context_free_proposer": (target8, lambda t: ContextFreeProposer(random_probs(V, 5, 2.0)),
                              2, {}),
    "top_k": (target8, lambda t: tiny8(1), 2, {"temperature": 0.8, "top_k": 3}),
    "top_p": (target8, lambda t: tiny8(1), 2, {"temperature": 1.3, "top_p": 0.7}),
    "eos_inside_rounds": (eos_target8, lambda t: noisy_copy(t, 0.3), 3, {}),
    "padded_vocab_larger_draft": (padded_target8,
                                  lambda t: with_tokenizer(tiny8(1, vocab_size=10), t.tokenizer),
                                  2, {}),
    "padded_vocab_smaller_draft": (padded_target8,
                                   lambda t: with_tokenizer(tiny8(1, vocab_size=7), t.tokenizer),
                                   2, {}),
}
NUM_STAT_TESTS = len(LAW_CASES) + 2   # + test_verify_one_round_follows_p's two cases


def law_test(target, draft, k, sampling, seed=0):
    sampling = {"temperature": 1.0, **sampling}
    law = exact.exact_distribution(target, PROMPT, N_TOKENS, **sampling)
    counts = exact.sample_sequences(speculative.generate, target, PROMPT, N_TOKENS, SAMPLES,
                                    draft=draft, k=k, seed=seed, **sampling)
    return exact.chi_square_test(counts, law, ALPHA / NUM_STAT_TESTS)


@pytest.mark.parametrize("case", list(LAW_CASES))
def test_sampled_output_follows_the_exact_target_law(case):
    make_target, make_draft, k, sampling = LAW_CASES[case]
    target = make_target()
    draft = make_draft(target)
    passed, stat, threshold = law_test(target, draft, k, sampling)
    assert passed, f"{case}: chi2 {stat:.1f} > threshold {threshold:.1f}"


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


@pytest.mark.parametrize("bug", ["greedy_acceptance", "no_residual", "greedy_draft_softmax_q"])
def test_negative_control_wrong_rules_fail_the_law_test(bug, monkeypatch):
    target, draft = target8(), tiny8(1)
    if bug == "greedy_acceptance":
        monkeypatch.setattr(speculative, "verify", verify_greedy_acceptance)
    elif bug == "no_residual":
        monkeypatch.setattr(speculative, "verify", verify_without_residual)
    else:
        draft = GreedyDraftWithSoftmaxQ(draft)
    passed, stat, threshold = law_test(target, draft, 2, {})
    assert not passed, f"{bug} went undetected: chi2 {stat:.1f} <= {threshold:.1f}"


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
