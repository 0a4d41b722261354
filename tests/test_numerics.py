"""Issue 25, D, H2, H3, H6: numbers a loop must not turn into tokens silently.

D: a NaN or inf logit is an error naming the model and the step in every loop and dtype (an
argmax over a row holding NaN used to emit the NaN's id), and never reaches saguaro's learned
estimates. H2: tied logits resolve to the lowest id in greedy and top-p alike. H3: bench's
acceptance is the pooled one its tau and histogram use. H6: a proposer's ids outside [0, V)
are refused by name where they enter verification."""
import functools
import math

import pytest
import torch

import autoregressive
import kernels
import saguaro
import speculative
import ssd
from conftest import noisy_copy, tiny_model

BAD = 5  # the token id whose logit a sick model makes non-finite


def sick(model, value=float("nan"), when=lambda T: True):
    """Make `model`'s plain forward (decode, verify, drafting; not prefill) put `value` at the
    logit of token BAD in the last position of calls with T tokens where when(T)."""
    forward = model.forward

    def wrapped(tokens, cache, *args, **kwargs):
        logits = forward(tokens, cache, *args, **kwargs)
        if when(tokens.shape[1]):
            logits[..., -1, BAD] = value
        return logits
    model.forward = wrapped
    return model


def sick_draft(value):
    """A draft whose every logit of token BAD is `value` (top-level: a draft process builds
    it from a functools.partial)."""
    model = tiny_model(0, vocab_size=64, scale=3.0)
    with torch.no_grad():
        model.head.weight[BAD] = value
    return model


def loop(name):
    return {"ar": (autoregressive.generate, {}), "sd": (speculative.generate, dict(k=3)),
            "ssd": (ssd.generate, dict(k=2, f=2)),
            "saguaro": (saguaro.generate, dict(k=2, f=1, backup="jit", draft_threads=1,
                                               target_threads=1))}[name]


PROMPTS = [[1, 2, 3, 4], [5, 6, 7]]


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("name", ["ar", "sd", "ssd", "saguaro"])
def test_a_non_finite_target_logit_is_an_error_naming_the_target_and_the_step(name, temperature,
                                                                              value):
    generate, kw = loop(name)
    target = sick(tiny_model(0, vocab_size=64, scale=3.0), value)
    draft = functools.partial(tiny_model, 0, vocab_size=64, scale=3.0) if name == "saguaro" \
        else tiny_model(0, vocab_size=64, scale=3.0)
    step = "the target at decode step 1" if name == "ar" else "the target's verify in round 1"
    with pytest.raises(ValueError, match=f"{step} produced non-finite logits"):
        generate(target, PROMPTS, 12, draft=draft, temperature=temperature, **kw)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("name", ["sd", "ssd"])
def test_a_nan_draft_logit_is_an_error_naming_the_draft(name, temperature):
    generate, kw = loop(name)
    target = tiny_model(0, vocab_size=64, scale=3.0)
    draft = sick(noisy_copy(target, 0.1))
    with pytest.raises(ValueError, match="the draft at step 1 of round 1 produced non-finite"):
        generate(target, PROMPTS, 12, draft=draft, temperature=temperature, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_check_holds_in_every_dtype_and_in_prefill(dtype):
    target = tiny_model(0, vocab_size=64).to(dtype)
    with torch.no_grad():
        target.head.weight[BAD] = float("nan")
    for temperature in (0.0, 1.0):
        with pytest.raises(ValueError, match="the target's prefill produced non-finite"):
            autoregressive.generate(target, PROMPTS, 4, temperature=temperature)


def test_minus_inf_beside_finite_logits_is_a_zero_probability_not_an_error():
    logits = torch.tensor([[0.0, float("-inf"), 1.0]])
    assert kernels.probs_from_logits(logits, 1.0)[0, 1] == 0
    assert kernels.next_token(logits).tolist() == [2]
    with pytest.raises(ValueError, match="the draft produced non-finite logits"):
        kernels.probs_from_logits(torch.full((1, 3), float("-inf")), 1.0, who="the draft")


def test_a_nan_draft_in_saguaro_s_process_is_named_and_the_target_finishes_alone(capfd):
    """The draft process raises the same error (its traceback, on stderr, names the draft);
    saguaro then finishes on the target alone, as for any lost draft: the output stays the
    target's, and the warning and stats["draft_lost"] carry the draft's error (they said only
    that the connection closed)."""
    target = tiny_model(0, vocab_size=64, scale=3.0)
    ref, _ = autoregressive.generate(target, PROMPTS, 12)
    with pytest.warns(RuntimeWarning, match="the draft process"):
        out, stats = saguaro.generate(target, PROMPTS, 12,
                                      draft=functools.partial(sick_draft, float("nan")),
                                      **loop("saguaro")[1])
    assert out == ref and stats["draft_lost"]
    error = "the draft (in its process) after the prompt produced non-finite logits"
    assert error in capfd.readouterr().err
    assert error in stats["draft_lost"]  # the warning and the stats say why, not just "lost"


def test_a_nan_past_the_first_rejection_never_reaches_saguaro_s_estimates():
    """From round 3 on, the target's verify puts NaN only at its last position, p_{K+1}, which
    verification reads only when all K are accepted. The loop still computed it, from a sick
    model: the call stops with the error before the estimates learn from that round, so what
    they learned in rounds 1-2 stays finite (a NaN used to reach them: a later call raised
    "geometric fan-out needs ... a=nan", or reported a = nan and "predicted nanx")."""
    target = tiny_model(0, vocab_size=64, scale=3.0)
    verifies = []
    sick(target, when=lambda T: T > 1 and len(verifies.append(T) or verifies) >= 3)
    for fan_out in ("geometric", "uniform"):
        worker = saguaro.DraftWorker(functools.partial(tiny_model, 1, vocab_size=64, scale=3.0),
                                     target, threads=1)
        verifies.clear()
        with worker, pytest.raises(ValueError, match="verify in round 3 produced non-finite"):
            saguaro.generate(target, PROMPTS, 20, draft=worker, k=2, f=1, fan_out=fan_out,
                             backup="auto")
        (est,) = worker.estimates.values()
        assert est.acc["draft"][1] + est.acc["fast"][1] > 4  # it learned from rounds 1-2 ...
        assert all(math.isfinite(x) for x in (est.a("draft"), est.a("fast"), est.r()))  # finitely


# ----------------------------------------------------------------------------------------------
# H2. tied logits: the lowest id wins wherever only some of them can stay

def test_a_tie_keeps_the_lowest_id_in_greedy_and_top_p_alike():
    """Two tied maxima at ids 60 and 504 over the default model's vocabulary, bfloat16-rounded
    like its logits: a tiny top_p keeps exactly one token, the one argmax and greedy pick (an
    unstable sort kept 504 in some rows). top_k keeps every token tied with the k-th, as
    transformers' TopKLogitsWarper does, so top_k = 1 keeps both."""
    logits = torch.randn(8, 49152, generator=torch.Generator().manual_seed(0)).bfloat16().float()
    logits[:, [60, 504]] = 10.0
    greedy = kernels.next_token(logits)
    assert greedy.tolist() == [60] * 8 == logits.argmax(-1).tolist()
    assert kernels.probs_from_logits(logits, 0.0).argmax(-1).tolist() == [60] * 8
    for temperature in (1e-3, 1.0, 5.0):
        p = kernels.probs_from_logits(logits, temperature, top_p=1e-6)
        assert ((p > 0).sum(-1) == 1).all() and p[:, 60].eq(1).all(), temperature
        p = kernels.probs_from_logits(logits, temperature, top_k=1)
        assert (p[:, [60, 504]] == 0.5).all(), temperature



def test_a_tiny_top_p_on_the_default_model_in_bfloat16_keeps_greedy_s_token():
    """The issue's input: two tied bfloat16 logits after this prompt; top_p = 1e-6 kept id 504
    where greedy (and argmax) give 60."""
    target = kernels.load_model("default", "cpu", "bfloat16")
    ids = kernels.encode_prompt(target, "What is the capital of France?")
    greedy, _ = autoregressive.generate(target, ids, 2)
    sampled, _ = autoregressive.generate(target, ids, 2, temperature=1.0, top_p=1e-6)
    assert greedy[0][0] == 60 and sampled == greedy

# ----------------------------------------------------------------------------------------------
# H3. bench pools acceptance over rounds, as its tau and histogram do

def test_bench_acceptance_is_pooled_over_rounds_like_tau_and_the_histogram():
    import argparse

    import bench
    target = tiny_model(0, vocab_size=64, scale=3.0)
    draft = noisy_copy(target, 0.05)
    runs = []
    for prompts, n in (([[1, 2, 3]], 30), ([[9, 8], [7, 6, 5]], 12)):  # rounds of unequal counts
        tokens, stats = speculative.generate(target, prompts, n, draft=draft, k=3)
        runs.append({"dataset": "x", "tokens": tokens, **stats})
    assert runs[0]["acceptance_rate"] != runs[1]["acceptance_rate"]
    row = bench.summarize({"sd": runs}, argparse.Namespace(temperature=0.0, dtype="float32"))["sd"]
    accepted = sum(r["acceptance_rate"] * 3 * r["rows_verified"] for r in runs)
    assert row["acceptance_rate"] == pytest.approx(accepted / (3 * sum(r["rows_verified"]
                                                                       for r in runs)))
    counts = row["accept_counts"]
    assert row["acceptance_rate"] == pytest.approx(
        sum(k * c for k, c in enumerate(counts)) / (3 * sum(counts)))


# ----------------------------------------------------------------------------------------------
# H6. a proposer's ids outside [0, V) are refused by name where they enter a loop

class OutOfRange:
    """A proposer that proposes token id `bad` once in every call."""

    def __init__(self, vocab_size, bad):
        self.vocab_size, self.bad = vocab_size, bad

    def propose(self, contexts, k, temperature, generator):
        x = torch.ones(len(contexts), k, dtype=torch.long)
        x[0, -1] = self.bad
        return x, speculative.one_hot(x.clamp(0, self.vocab_size - 1), self.vocab_size)


@pytest.mark.parametrize("bad", [64, -1])
def test_a_proposer_s_ids_outside_the_vocabulary_are_refused_by_name(bad):
    target = tiny_model(0, vocab_size=64)
    match = f"OutOfRange.propose returned token id {bad}, outside its vocabulary"
    with pytest.raises(ValueError, match=match):
        speculative.generate(target, PROMPTS, 8, draft=OutOfRange(64, bad), k=3)
    with pytest.raises(ValueError, match=match):  # saguaro's fast backup
        saguaro.generate(target, PROMPTS, 8, fast_backup=OutOfRange(64, bad), backup="fast",
                         draft=functools.partial(tiny_model, 1, vocab_size=64), k=3, f=1,
                         draft_threads=1, target_threads=1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.25, 1.5])
def test_a_proposer_s_q_that_is_no_distribution_is_refused_by_name(bad):
    """speculative.check_proposal, where a proposer's q enters sd and saguaro's fast backup:
    NaN, inf, a negative or a value above 1 anywhere in (B, K, V), named."""
    class P:
        vocab_size = 8
    q = torch.zeros(2, 3, 8)
    q[1, 2, 5] = bad
    with pytest.raises(ValueError, match="P.propose returned probabilities that are negative"):
        speculative.check_proposal(P(), torch.zeros(2, 3, dtype=torch.long), q, 2, 3)
    speculative.check_proposal(P(), torch.zeros(2, 3, dtype=torch.long), q.clamp(0, 1).nan_to_num(0), 2, 3)


def test_verify_refuses_ids_outside_its_vocabulary():
    p, q = torch.full((1, 3, 8), 1 / 8), torch.full((1, 2, 8), 1 / 8)
    with pytest.raises(ValueError, match=r"draft token id 8 is outside the vocabulary \[0, 8\)"):
        speculative.verify(p, q, torch.tensor([[1, 8]]), kernels.make_generator(0, "cpu"))
