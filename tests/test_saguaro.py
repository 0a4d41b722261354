"""saguaro.py: the pieces are right (geometric fan-out, Saguaro sampling, the speed model and the
batch-aware rule), and the two-process loop is lossless and survives losing its draft.

Every two-process test below is a real run: the draft lives in a spawned process joined to this
one by torch.distributed (gloo on the CPU). Statistical tests: each window test runs at
ALPHA / NUM_STAT_TESTS (tests/exact.py), so under a correct implementation the chance that any
of them fails is at most ALPHA = 1e-3 for this file (Bonferroni); seeds are fixed, so a run is
reproducible. The negative control must FAIL the same test by a wide margin.

No verdict depends on the machine's speed: where `backup="auto"` must take both backups, the
test scripts the batch-aware rule's choice (`scripted_backup`), since the rule decides from
measured latencies; latencies a test needs are injected. Real-time bounds remain only where
time is the property (a lost draft process must be noticed), and they are generous.
"""
import functools
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import pytest
import torch

import autoregressive
import exact
import harness
import kernels
import measure
import saguaro
import speculative
import timeline
from conftest import FakeTokenizer, before_round, draft_processes, tiny_model

V = 4                    # the law tests' vocabulary: 4^6 = 4096 sequences at most
PROMPT, N_TOKENS, SAMPLES = [1, 2, 0], 6, 5_000
ALPHA = 1e-3


@pytest.fixture(autouse=True)
def one_thread_each():
    """On 2 cores: 1 thread for the target (this process), 1 for the draft process."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def noisy_model(seed, vocab_size, noise, noise_seed, scale=1.0):
    """tiny_model(seed) with Gaussian noise on every weight: a draft that mostly agrees.
    Top-level, so a draft process can build it from a functools.partial."""
    model = tiny_model(seed, vocab_size=vocab_size, scale=scale)
    g = torch.Generator().manual_seed(noise_seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.add_(torch.randn(p.shape, generator=g) * noise)
    return model


class ScriptedBackup:
    """Estimates.choose_backup replaced by a fixed schedule for `backup="auto"`: JIT on even
    rounds, fast on odd ones (counted over all calls), so both backups run whatever the
    machine's speed (the real rule picks from measured latencies)."""

    def __init__(self, rule):
        self.calls, self.rule = 0, rule

    def __call__(self, est, batch, lost=None):
        if lost or est.backup != "auto":  # a lost draft, a fixed backup: the real rule
            return self.rule(est, batch, lost)
        self.calls += 1
        return ("jit", "fast")[self.calls % 2], "scripted by the test"


@pytest.fixture
def scripted_backup(monkeypatch):
    script = ScriptedBackup(saguaro.Estimates.choose_backup)
    monkeypatch.setattr(saguaro.Estimates, "choose_backup",
                        lambda est, batch, lost=None: script(est, batch, lost))
    return script


class ScriptedChoices:
    """Estimates.choose_budget and choose_c replaced, for budget / saguaro_c "auto", by a
    cycle through the candidates, one step per round: B and C change every round whatever the
    machine's speed (the real rules pick from measured latencies), so the law tests see
    caches built with one C answered after C moved."""

    def __init__(self, choose_budget, choose_c):
        self.calls, self.rules = 0, (choose_budget, choose_c)

    def budget(self, est, backup, batch):
        if est.budget != "auto":
            return self.rules[0](est, backup, batch)
        self.calls += 1
        est.B = est.budgets[self.calls % len(est.budgets)]
        return est.B

    def c(self, est, backup, batch, temperature):
        if est.c_rule != "auto":
            return self.rules[1](est, backup, batch, temperature)
        est.c = measure.C_CANDIDATES[self.calls % len(measure.C_CANDIDATES)]
        return est.c


@pytest.fixture
def scripted_choices(monkeypatch):
    script = ScriptedChoices(saguaro.Estimates.choose_budget, saguaro.Estimates.choose_c)
    monkeypatch.setattr(saguaro.Estimates, "choose_budget", lambda est, *a: script.budget(est, *a))
    monkeypatch.setattr(saguaro.Estimates, "choose_c", lambda est, *a: script.c(est, *a))
    return script


def proc_gone(pid, wait_s=5.0) -> bool:
    """True once `pid` is no running process (gone, or a zombie about to be reaped)."""
    end = time.time() + wait_s
    while time.time() < end:
        try:
            with open(f"/proc/{pid}/status") as f:
                if "State:\tZ" in f.read():
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


# ----------------------------------------------------------------------------------------------
# geometric fan-out (Thm. 12)

def real_fan_out(budget, K, a, r):
    e = 1 / (1 + r)
    w = [a ** (k * e) for k in range(K)] + [a ** (K * e) * (1 - a) ** -e]
    return [budget * x / sum(w) for x in w]


GRID = [(budget, K, a, r) for budget in (1, 5, 15, 40) for K in (1, 2, 4, 7)
        for a in (0.05, 0.3, 0.5, 0.7, 0.95) for r in (0.3, 1.0, 3.0)]


def test_geometric_fan_out_sums_to_the_budget_within_one_of_the_formula():
    for budget, K, a, r in GRID:
        F = saguaro.geometric_fan_out(budget, K, a, r)
        real = real_fan_out(budget, K, a, r)
        assert len(F) == K + 1 and sum(F) == budget and min(F) >= 0, (budget, K, a, r, F)
        assert all(abs(f - x) < 1 for f, x in zip(F, real)), (budget, K, a, r, F, real)


def test_geometric_fan_out_is_monotone_as_the_theory_says():
    for budget, K, a, r in GRID:
        real = real_fan_out(budget, K, a, r)
        F = saguaro.geometric_fan_out(1000, K, a, r)   # a big budget: rounding cannot hide it
        # fewer guesses the more tokens must be accepted first (P(k) falls with k) ...
        assert all(x >= y for x, y in zip(real[:K], real[1:K])) and F[:K] == sorted(F[:K])[::-1]
        # ... but k = K (all accepted: P = a^K, no (1 - a) factor) outgrows k = K-1 iff a > 1/2
        if a == 0.5:  # a tie, which rounding may break either way
            assert abs(real[K] - real[K - 1]) < 1e-9 and abs(F[K] - F[K - 1]) <= 1
        else:
            assert (real[K] > real[K - 1]) == (F[K] > F[K - 1]) == (a > 0.5)
    # more acceptance moves the budget from k = 0 toward k = K
    shares = [saguaro.geometric_fan_out(1000, 4, a, 1.0) for a in (0.1, 0.3, 0.5, 0.7, 0.9)]
    assert [s[0] for s in shares] == sorted(s[0] for s in shares)[::-1]
    assert [s[4] for s in shares] == sorted(s[4] for s in shares)


def test_geometric_fan_out_is_sensible_at_the_limits():
    for a in (0.0, 1e-9):      # nothing is ever accepted: every guess on k = 0
        assert saguaro.geometric_fan_out(15, 4, a, 1.0) == [15, 0, 0, 0, 0]
    for a in (1.0, 1 - 1e-9):  # everything is accepted: every guess on k = K
        assert saguaro.geometric_fan_out(15, 4, a, 1.0) == [0, 0, 0, 0, 15]
    # a steep miss curve (r -> inf: one guess already hits) spreads the budget evenly; a flat
    # one (r -> 0) follows the outcome law P(k) itself
    assert saguaro.geometric_fan_out(15, 4, 0.6, 1e6) == [3, 3, 3, 3, 3]
    law = [0.6 ** k * 0.4 for k in range(4)] + [0.6 ** 4]
    F = saguaro.geometric_fan_out(1000, 4, 0.6, 1e-6)
    assert all(abs(f - 1000 * p) < 1 for f, p in zip(F, law))


def test_uniform_fan_out_is_f_at_every_k_and_rounds_to_the_budget():
    assert saguaro.uniform_fan_out(15, 4) == [3] * 5
    assert saguaro.uniform_fan_out(7, 2) == [3, 2, 2]


@pytest.mark.parametrize("args", [(0, 4, 0.5, 1.0), (5, 0, 0.5, 1.0), (5, 4, 1.5, 1.0),
                                  (5, 4, 0.5, 0.0)])
def test_fan_out_refuses_bad_input(args):
    with pytest.raises(ValueError, match="geometric fan-out needs"):
        saguaro.geometric_fan_out(*args)


# ----------------------------------------------------------------------------------------------
# Saguaro sampling (Def. 14)

def test_saguaro_sampling_scales_the_top_f_plus_1_tokens_by_c():
    logits = torch.randn(3, 32, generator=torch.Generator().manual_seed(0)) * 2
    q = kernels.probs_from_logits(logits, 1.0)
    for c in (0.0, 0.3, 1.0):
        q2 = saguaro.saguaro_probs(logits, 1.0, None, None, c, f=2)
        top = logits.topk(3, dim=-1).indices
        in_top = torch.zeros_like(q, dtype=torch.bool).scatter(-1, top, True)
        ratio = q2 / q                                   # s * c on the top 3, s elsewhere
        s = 1 / (1 - (1 - c) * (q * in_top).sum(-1, keepdim=True))
        torch.testing.assert_close(ratio, torch.where(in_top, s * c, s))
        torch.testing.assert_close(q2.sum(-1), torch.ones(3))


def test_saguaro_sampling_leaves_one_hot_and_massless_cases_alone():
    logits = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    assert torch.equal(saguaro.saguaro_probs(logits, 0.0, None, None, 0.2, 3),
                       kernels.probs_from_logits(logits, 0.0))   # greedy stays greedy
    # top-k = f + 1 leaves no mass outside the scaled tokens: C = 0 would leave nothing
    assert torch.equal(saguaro.saguaro_probs(logits, 1.0, 4, None, 0.0, 3),
                       kernels.probs_from_logits(logits, 1.0, 4))


def test_saguaro_q_uses_f_j_at_drafting_step_j():
    logits = torch.arange(10.0).flip(0).expand(1, 10)   # token 0 is the top, then 1, 2, ...
    fn = saguaro.saguaro_q((1.0, None, None), 0.0, [0, 2, 1])
    plain = kernels.probs_from_logits(logits, 1.0)
    assert torch.equal(fn(logits, 0), plain)                                # F_0 = 0: plain q
    assert fn(logits, 1)[0, :3].sum() == 0                                  # F_1 = 2: top 3 out
    second = fn(logits, 2)[0]                                               # F_2 = 1: top 2 out
    assert second[:2].sum() == 0 and second[2] > 0


@pytest.mark.parametrize("sampling", [(0.8, 5, None), (1.2, None, 0.7), (1.0, 6, 0.9)])
def test_saguaro_sampling_keeps_top_k_and_top_p(sampling):
    """q' is q (after temperature, top-k, top-p) with its top-(f+1) tokens scaled by C: a token
    top-k or top-p removed stays removed, at every drafting step of a probs_fn too."""
    logits = torch.randn(50, 16, generator=torch.Generator().manual_seed(2)) * 2
    q = kernels.probs_from_logits(logits, *sampling)
    top = logits.topk(3, dim=-1).indices
    scaled = q.scatter(-1, top, q.gather(-1, top) * 0.3)
    want = scaled / scaled.sum(-1, keepdim=True)
    torch.testing.assert_close(saguaro.saguaro_probs(logits, *sampling, 0.3, 2), want)
    fn = saguaro.saguaro_q(sampling, 0.3, [2, 2])
    for j in range(2):
        torch.testing.assert_close(fn(logits, j), want)


# ----------------------------------------------------------------------------------------------
# the speed model (Thm. 7) and the batch-aware backup rule

def test_expected_tokens_and_speed_model_at_known_points():
    assert saguaro.expected_tokens(0.0, 4) == 1 and saguaro.expected_tokens(1.0, 4) == 5
    assert saguaro.expected_tokens(0.5, 2) == pytest.approx(1.75)
    # all hits and a draft faster than the verify: E_hit tokens per verify
    assert saguaro.predicted_speedup(1.0, 3.0, 1.0, 0.5, 9.0) == pytest.approx(3.0)
    # a slower draft makes every hit round last T_p
    assert saguaro.predicted_speedup(1.0, 3.0, 1.0, 2.0, 9.0) == pytest.approx(1.5)
    # all misses: E_miss per (verify + backup)
    assert saguaro.predicted_speedup(0.0, 3.0, 2.0, 0.5, 1.0) == pytest.approx(1.0)
    # Thm. 7 at b = 1, and P(all hit) = p^b in a batch
    p, eh, em, tp, tb = 0.7, 3.2, 2.1, 0.8, 0.6
    assert saguaro.predicted_speedup(p, eh, em, tp, tb) == pytest.approx(
        (p * eh + (1 - p) * em) / (p * 1.0 + (1 - p) * (1 + tb)))
    assert saguaro.predicted_speedup(p, eh, em, tp, tb, batch=3) == pytest.approx(
        (p * eh + (1 - p) * em) / (p ** 3 * 1.0 + (1 - p ** 3) * (1 + tb)))
    # a build longer than the verify: every round waits for it, a miss round for the backup too
    assert saguaro.predicted_speedup(0.5, 3.0, 2.0, 1.5, 1.0) == pytest.approx(2.5 / 2.0)
    # the answer's latency adds to every round; the target's own work overlaps the build
    assert saguaro.predicted_speedup(1.0, 3.0, 1.0, 0.5, 9.0, t_every=0.2,
                                     t_answer=0.3) == pytest.approx(3.0 / 1.5)
    assert saguaro.predicted_speedup(1.0, 3.0, 1.0, 1.4, 9.0, t_every=0.2,
                                     t_answer=0.1) == pytest.approx(3.0 / 1.5)


def test_the_answers_latency_leaves_out_the_build_and_the_jit_it_waited_for():
    """A round's wait for the draft = the draft's build still running when the Round left +
    its JIT + the answer's own latency; only the last is "answer" (a build outlasting the
    verify is charged by T_p already: counted twice, the model under-predicted 22-30%)."""
    est = saguaro.Estimates(4, 1, "geometric", "auto")
    est.learn_answer(0.030, sent_at=10.0, ready_at=10.025, jit_s=0.0)  # the build 25 ms late
    assert est.secs["answer"] == pytest.approx(0.005)
    est.secs.clear()
    est.learn_answer(0.020, sent_at=10.0, ready_at=9.990, jit_s=0.018)  # ready before; a JIT
    assert est.secs["answer"] == pytest.approx(0.002)
    est.learn_answer(0.020, sent_at=10.0, ready_at=10.030, jit_s=0.0)   # never below zero
    assert est.secs["answer"] == pytest.approx(0.8 * 0.002)


def test_the_speed_model_charges_what_the_loop_measured_around_its_verify():
    """Estimates charge a round the target's accept (beside the build) and the answer's latency
    (after it), both as measured, in units of the verify; the fast backup's proposals add to
    the target's own work."""
    est = saguaro.Estimates(4, 1, "geometric", "auto")
    est.secs.update(verify=0.02, build=0.01, jit=0.01, fast=0.001)
    p, e = est.hit_rate("draft"), saguaro.expected_tokens(est.a("draft"), 4)
    assert est.speed("jit", 1) == pytest.approx(saguaro.predicted_speedup(p, e, e, 0.5, 0.5))
    est.secs.update(accept=0.004, answer=0.002)
    assert est.speed("jit", 2) == pytest.approx(
        saguaro.predicted_speedup(p, e, e, 0.5, 0.5, 2, t_every=0.2, t_answer=0.1))
    assert est.speed("jit", 2) == pytest.approx(
        (p * e + (1 - p) * e) / (1.2 + 0.1 + (1 - p ** 2) * 0.5))
    assert est.speed("fast", 1) == pytest.approx(saguaro.predicted_speedup(  # no glue extra yet
        est.p_hit("fast"), e, saguaro.expected_tokens(est.a("fast"), 4), 0.5, 0.0, 1, 0.25, 0.1))


def rule(p_hit=0.8, a=0.8, a_fast=0.4, jit_s=0.3, fast_s=0.001, backup="auto"):
    est = saguaro.Estimates(K=4, budget=15, fan_out="geometric", backup=backup)
    n = 1e6  # as if measured over many rounds
    est.acc = {"draft": [a * n, n], "fast": [a_fast * n, n]}
    est.hits = {"draft": [p_hit * n, n], "fast": [p_hit * n, n]}
    est.secs = {"verify": 1.0, "build": 0.9, "jit": jit_s, "fast": fast_s}
    return est


def test_batch_aware_rule_takes_jit_below_b_star_and_fast_from_it():
    est = rule()
    b_star = est.b_star()
    assert b_star is not None and b_star > 1
    assert est.choose_backup(b_star - 1)[0] == "jit" and est.choose_backup(b_star)[0] == "fast"
    assert est.choose_backup(1000)[0] == "fast"
    assert "predicted" in est.choose_backup(1)[1]
    # a backup as slow as the draft, or a perfect cache, never makes the fast backup worth it
    assert rule(jit_s=0.001).b_star() is None and rule(p_hit=1.0).b_star() is None
    # a fast backup as good as the draft always wins
    assert rule(a_fast=0.8).b_star() == 1
    assert rule(backup="jit").choose_backup(1000) == ("jit", "--backup jit")


def test_before_any_jit_ran_the_rule_charges_it_k_one_branch_tree_steps_not_k_glues():
    """A JIT is K tree steps of one branch per row. The glue after a fast backup reads K + 1
    tokens of every row: charged for each JIT step (as before), it made the JIT look so slow
    at b = 8 that the rule kept the fast backup and never measured the JIT."""
    est = rule()
    del est.secs["jit"]
    est.secs["step"] = 2.0                   # a glue of K + 1 tokens per row, after a fast round
    est.tree = {1: 0.05, 6: 0.3}             # a tree step of one branch per row: 0.05 verifies
    assert est._speed(0.5, 0.5, 0.8, 0.9, "jit", 8) == pytest.approx(saguaro.predicted_speedup(
        0.5, saguaro.expected_tokens(0.8, 4), saguaro.expected_tokens(0.8, 4), 0.9, 4 * 0.05, 8))
    est.tree = {}                            # nothing timed: the old stand-in
    assert est._speed(0.5, 0.5, 0.8, 0.9, "jit", 8) == pytest.approx(saguaro.predicted_speedup(
        0.5, saguaro.expected_tokens(0.8, 4), saguaro.expected_tokens(0.8, 4), 0.9, 4 * 2.0, 8))


def test_fan_outs_follow_the_acceptance_of_whoever_made_the_speculation():
    """After a hit the cache was built over the draft's speculation: its acceptance a sets the
    schedule. After a miss served by the fast backup it was built over the fast one's: a_fast.
    A uniform fan-out ignores both."""
    est = rule(a=0.9, a_fast=0.1)
    r = est.r()
    after_hit, after_miss = est.fan_outs("fast")
    assert after_hit == saguaro.geometric_fan_out(15, 4, 0.9, r)
    assert after_miss == saguaro.geometric_fan_out(15, 4, 0.1, r) != after_hit
    assert est.fan_outs("jit") == (after_hit, after_hit)
    est.fan_out = "uniform"
    assert est.fan_outs("fast") == ([3] * 5, [3] * 5)


def test_a_tie_keeps_the_jit_backup_as_b_star_does():
    """A fast backup exactly as good as the JIT one (same acceptance and hit rate, both free)
    never 'beats' it: b* is None and every batch size keeps JIT."""
    est = rule(a_fast=0.8, jit_s=0.0, fast_s=0.0)
    assert est.speed("fast", 7) == est.speed("jit", 7)
    assert est.b_star(limit=64) is None
    assert {est.choose_backup(b)[0] for b in (1, 7, 64)} == {"jit"}


def test_the_fast_backup_is_charged_its_proposals_every_round_and_the_longer_build_after_it():
    """The fast backup is ready when a row misses, but the target proposes for every row every
    round (T_e), and after a round where a row took it the draft's glue decodes that row's K
    tokens again: the next build is longer, by what was measured, else by what the tree step's
    cost line says m rows of K tokens cost (at b = 1, K tokens more in the one glue forward).
    Found in Fig. 6: the rule took the fast backup at b >= 2, 8-11% slower."""
    est = rule()
    p, e, e_fast = est.p_hit("fast"), saguaro.expected_tokens(0.8, 4), saguaro.expected_tokens(0.4, 4)
    assert est.speed("fast", 8) == pytest.approx(saguaro.predicted_speedup(
        p, e, e_fast, 0.9, 0.0, 8, t_every=0.001))
    b_star = est.b_star()
    est.tree = {1: 0.1, 6: 0.35}                    # a line: 0.05 + 0.05 x width
    assert est.fast_glue_extra(p, 1) == pytest.approx(0.3 - 0.1)   # K + 1 tokens, not 1
    width = 4 * (1 - p) / (1 - p ** 8)              # K tokens of the expected rows that missed
    assert est.fast_glue_extra(p, 8) == pytest.approx(0.05 + 0.05 * width)
    assert est.speed("fast", 8) == pytest.approx(saguaro.predicted_speedup(
        p, e, e_fast, 0.9 + (1 - p ** 8) * (0.05 + 0.05 * width), 0.0, 8, t_every=0.001))
    est.secs["build_fast"] = 0.9 + 0.6                            # measured: it wins
    assert est.fast_glue_extra(p, 8) == pytest.approx(0.6)
    assert est.b_star() is None or est.b_star() > b_star
    # a measured build after the fast backup is learned apart, and the glue only from the others
    learned = saguaro.Estimates(K=4, budget=15, fan_out="geometric", backup="auto")
    answer = saguaro.Answer(torch.tensor([0]), torch.zeros(1, 4, dtype=torch.long),
                            torch.tensor([0]), None, 0.5, 0.0, 0.2, 5, width=1)
    learned.learn_from_draft(answer, torch.tensor([True]), False, after_fast=True)
    assert learned.secs == pytest.approx({"build_fast": 0.5})
    learned.learn_from_draft(answer, torch.tensor([True]), False)
    assert learned.secs == pytest.approx({"build_fast": 0.5, "build": 0.5, "step": 0.2})


def test_fast_backup_hit_rate_is_the_stationary_share_of_a_two_state_chain():
    """With the fast backup a miss makes the next speculation a fast one, whose cache hits at
    its own rate p_f: the long-run share of hits the rule uses must match a simulation."""
    est = rule(p_hit=0.85)
    n = 1e6
    est.hits["fast"] = [0.4 * n, n]
    assert est.p_hit("jit") == pytest.approx(0.85)
    g = torch.Generator().manual_seed(0)
    u = torch.rand(200_000, generator=g).tolist()
    by_draft, hits = True, 0
    for x in u:                     # who made this round's speculation decides its cache's odds
        hit = x < (0.85 if by_draft else 0.4)
        hits += hit
        by_draft = hit              # a miss is served by the fast backup
    assert est.p_hit("fast") == pytest.approx(hits / len(u), abs=0.005)
    assert est.p_hit("fast") < 0.85
    # so a weak fast backup is predicted slower than when its caches hit like the draft's
    assert est.speed("fast", 1) < rule(p_hit=0.85).speed("fast", 1)


@pytest.mark.parametrize("window", [None, 2])
@pytest.mark.parametrize("k_hit", [0, 1, 3])
def test_reuse_branch_gives_the_glue_forward_s_logits_and_kv(k_hit, window):
    """After a hit on (k, t), copying the hit branch's KV into the trunk and running y_K alone
    (reuse_branch) leaves the draft exactly where a glue forward over t, y_1..y_K would: the
    same glue logits, and the same logits for whatever comes next; with a sliding window too
    (the copied slots' positions travel with their KV)."""
    import ssd
    draft = tiny_model(seed=8, model_type="mistral" if window else "llama", sliding_window=window)
    K, prefix = 3, [1, 2, 3, 4, 5]
    cache = draft.new_cache(1, 48)
    draft.prefill([prefix], cache)
    trunk = cache.lengths.clone()
    spec = torch.tensor([[9, 10, 11]])                                 # x_1..x_K
    glue = draft(torch.tensor([[6, 9, 10, 11]]), cache)               # t0, x_1..x_K
    keys = ssd.predict_outcomes(glue, spec, [1, 1, 1, 2])              # N = 5 branches
    base = cache.lengths.clone()
    fork = trunk[:, None] + keys[..., 0] + 1
    tokens, _, logits = ssd.draft_branches(draft, cache, fork, keys[..., 1], K,
                                           lambda lg, j: kernels.probs_from_logits(lg), None)
    branch = int((keys[0, :, 0] == k_hit).nonzero()[0])
    t, y = keys[0, branch, 1], tokens[:, branch]                       # the hit: (k, t) -> y
    cache.lengths.copy_(trunk + k_hit + 1)                             # keep t0, x_1..x_k
    slots = base[:, None] + torch.arange(K) * keys.shape[1] + branch   # step j's scratch slot
    got = saguaro.reuse_branch(draft, cache, slots, logits[:, branch], y)
    fresh = draft.new_cache(1, 48)
    draft.prefill([prefix + [6] + spec[0, :k_hit].tolist()], fresh)
    want = draft(torch.cat((t.view(1, 1), y), 1), fresh)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert cache.lengths.tolist() == fresh.lengths.tolist()
    nxt = torch.tensor([[12, 13]])
    torch.testing.assert_close(draft(nxt, cache), draft(nxt, fresh), atol=1e-4, rtol=1e-4)


def test_r_estimate_recovers_a_power_law_miss_curve():
    for r in (0.5, 1.0, 2.0):
        est = saguaro.Estimates(K=4, budget=15, fan_out="geometric", backup="auto")
        u = torch.rand(50_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        ranks = (u ** (-1 / r)).floor().long().clamp_max(64)   # P(rank >= F) = F^-r
        est.rank_counts += torch.bincount(ranks, minlength=65).float()
        assert est.r() == pytest.approx(r, rel=0.15), r


def test_miss_curve_fits_its_prefactor():
    """The measured miss curves are c F^-r with c < 1 (not a pure power law): the fit recovers
    both, and the predicted miss at F guesses follows it."""
    est = saguaro.Estimates(K=4, budget="auto", fan_out="geometric", backup="jit")
    u = torch.rand(50_000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    miss_at_1, r = 0.4, 1.5    # rank 0 w.p. 0.6; past it P(rank >= F) = 0.4 F^-1.5
    ranks = torch.where(u < 1 - miss_at_1, 0, (((u - 0.6) / 0.4) ** (-1 / r)).floor().long())
    est.rank_counts += torch.bincount(ranks.clamp_max(64), minlength=65).float()
    c, r_fit = est.miss_curve()
    assert c == pytest.approx(miss_at_1, rel=0.15) and r_fit == pytest.approx(r, rel=0.15)
    assert est.miss(4) == pytest.approx(0.4 * 4 ** -1.5, rel=0.2) and est.miss(0) == 1.0


def budget_rule(tree, verify=1.0, a=0.8, r=1.0, batch=1):
    """An Estimates with budget auto, measured as if over many rounds: acceptance a, ranks
    with P(rank >= F) = (F + 1)^-r, tree step seconds per width `tree`, verify and JIT
    latencies."""
    est = saguaro.Estimates(K=4, budget="auto", fan_out="geometric", backup="jit")
    n = 1e6
    est.acc = {"draft": [a * n, n], "fast": [0.3 * n, n]}
    u = torch.rand(100_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    est.rank_counts += torch.bincount((u ** (-1 / r)).floor().long().clamp_max(65) - 1,
                                      minlength=65).float()
    est.secs = {"verify": verify, "step": tree[1], "jit": 0.5 * verify}
    for width, seconds in tree.items():
        est.learn_tree(width, seconds)
    return est


def verified(est, rounds=saguaro.SETTLE):
    """`rounds` verifies at the budget in use, each as long as the estimates already say a
    verify beside that budget lasts (the world the test set up)."""
    for _ in range(rounds):
        est.learn_verify(est.B, est.verify_beside(est.B))
    return est


def settle(est, backup="jit", batch=1):
    """The budget rule asked after SETTLE rounds at each budget, with these estimates: it
    moves one candidate at a time, towards the best predicted; returns where it stays (and
    the steps it took)."""
    steps = [est.B]
    for _ in saguaro.BUDGETS:
        steps.append(verified(est).choose_budget(backup, batch))
    return est.B, steps


def test_budget_rule_climbs_to_the_largest_budgets_when_the_tree_is_free():
    """A tree step that costs (next to) nothing at any width: every guess more is a hit more
    at no cost, so the best predicted budget is the largest; the rule climbs there one
    candidate a round (each step measured) and stops where the next promises less than
    MARGIN more; and says what it weighed."""
    for r in (0.5, 3.0):   # a shallow miss curve (every guess counts) and a steep one
        est = budget_rule({1: 1e-4, 8: 1e-4}, r=r)
        speeds = [est.speed_at_budget(b, "jit", 1) for b in saguaro.BUDGETS]
        assert speeds == sorted(speeds)   # more guesses, more hits, same time
        assert verified(est, saguaro.SETTLE - 1).choose_budget("jit", 1) == 1  # not yet settled
        assert verified(est, 1).choose_budget("jit", 1) == 2
        B, steps = settle(est)
        assert steps == sorted(steps) and B > (8 if r < 1 else 1), steps
        assert est.speed_at_budget(B, "jit", 1) * (1 + saguaro.MARGIN) >= speeds[-1]
        assert all(f"B={b}" in est.why["budget"] for b in saguaro.BUDGETS)


def test_budget_rule_takes_one_guess_when_a_tree_step_is_expensive():
    """A tree step whose cost grows with its width past what a verify hides: B = 1."""
    est = budget_rule({1: 0.2, 8: 1.6})
    assert est.tree_step(4) == pytest.approx(0.2 + 3 * 0.2)   # the cost line through both
    assert settle(est)[0] == 1
    est.B = 8
    assert settle(est)[0] == 1   # and from a larger budget, back down
    fixed = budget_rule({1: 1e-4, 8: 1e-4})
    fixed.budget = fixed.B = 3   # a fixed --budget stays whatever the model says
    assert fixed.choose_budget("jit", 1) == 3


def test_budget_rule_charges_the_verify_the_draft_slows_beside_a_larger_tree():
    """The two processes contend: a verify beside a big tree can take longer than beside a
    small one. The speed model counts in verifies, so the rule must compare budgets with the
    verify measured beside each (linear between those measured): a free tree that slows the
    verify threefold is no longer worth it."""
    est = budget_rule({1: 1e-4, 8: 1e-4}, r=0.5)
    assert settle(est)[0] >= 12   # no slowdown seen yet
    est.verify_at.clear()         # now a verify beside the largest tree measures 3x
    est.learn_verify(1, 1.0)
    est.learn_verify(max(saguaro.BUDGETS), 3.0)
    assert settle(est)[0] < 12
    assert est.verify_beside(1) == 1.0 and 1.0 < est.verify_beside(8) < 3.0


def test_budget_rule_anchors_the_miss_curve_where_it_measured_hits():
    """The fitted curve gives the shape across budgets, the hit rate measured at the budget
    in use its level: a cache of B = 1 that always hit leaves a larger tree nothing to win,
    so the rule keeps B = 1 even where the tree would be hidden under the verify (without the
    measurement, the curve's prior alone promises hits from more guesses)."""
    est = budget_rule({1: 0.05, 8: 0.2}, a=0.97)
    assert settle(est)[0] > 1   # the curve alone: more guesses, more hits
    est.B = 1
    for _ in range(1000):
        est.learn_hit(True, False, 1)
    assert est.hit_model(1, est.a("draft"), anchor=True) == pytest.approx(1001 / 1002)
    assert settle(est)[0] == 1
    assert est.hit_model(1, est.a("draft")) < 0.95   # the model alone, unanchored


def test_budget_rule_follows_the_batch_size():
    """In a batch any row's miss holds every row: P(all hit) = p_hit^b. A tree worth its
    cost at b = 1 buys almost no miss-free round at b = 8, where the rule keeps one guess; as
    rows finish, the loop asks again with the live rows' b."""
    est = budget_rule({1: 0.05, 8: 0.3})
    assert settle(est)[0] > 1
    est.B = 1
    assert settle(est, batch=8)[0] == 1
    assert est.why["budget"].startswith("b=8, jit: predicted tokens/s")


def shadow_by_hand(p, q, x, F, c):
    """K = 1: q'_C (the top F+1 of q scaled by c), alpha = sum min(p, q'), and the residual's
    share on the top F+1 but x."""
    top = sorted(range(len(q)), key=lambda i: -q[i])[: F + 1]
    qc = [qi * (c if i in top else 1) for i, qi in enumerate(q)]
    qc = [v / sum(qc) for v in qc]
    alpha = sum(min(a, b) for a, b in zip(p, qc))
    residual = [max(0.0, a - b) for a, b in zip(p, qc)]
    held = sum(residual[i] for i in top if i != x) / sum(residual)
    return alpha, held


def test_shadow_evaluation_of_c_matches_the_formulas():
    """learn_c's sums for one row, K = 1: the acceptance with q'_C, the chance of a rejection
    whose bonus the cache holds, and of a full acceptance; a smaller C moves residual mass
    onto the tokens the cache bets on (Def. 14), which the shadow sees."""
    p, q, x, F = [0.1, 0.5, 0.4], [0.6, 0.3, 0.1], 0, 1
    est = saguaro.Estimates(K=1, budget="auto", fan_out="geometric", backup="jit", c="auto")
    P = torch.tensor([p + [1 / 3, 1 / 3, 1 / 3]]).view(1, 2, 3)   # p_1, then p_2 (unused)
    est.learn_c(P, torch.tensor([[q]]), torch.tensor([[x]]), [F, 1], torch.tensor([True]))
    for c in measure.C_CANDIDATES:
        alpha, held = shadow_by_hand(p, q, x, F, c)
        s_alpha, s_held, s_full, n = est.shadow[c]
        assert n == 1 and s_alpha == pytest.approx(alpha) and s_full == pytest.approx(alpha)
        assert s_held == pytest.approx((1 - alpha) * held)
    held = {c: sums[1] / (1 - sums[0]) for c, sums in est.shadow.items()}  # given a rejection
    assert held[0.3] > held[1.0]


def test_c_rule_takes_one_at_temperature_0_and_the_best_predicted_c_above():
    """At temperature 0 q is one-hot and C changes nothing: C = 1. Above it, the C of the
    highest predicted speed, once a shadow round was seen (before: the C in use)."""
    est = budget_rule({1: 0.01, 8: 0.02})
    est.c_rule = "auto"
    assert est.choose_c("jit", 1, 0.0) == 1.0 and "temperature 0" in est.why["c"]
    assert est.choose_c("jit", 1, 1.0) == 1.0   # no shadow round yet
    est.secs["jit"] = 2.0   # a miss costs two verifies: hits matter
    for c, sums in est.shadow.items():   # C = 0.5: the best hit rate at a small acceptance cost
        sums[:] = [0.8 - 0.02 * (1 - c), 0.1 + (0.3 if c == 0.5 else 0.0), 0.3, 1]
    assert est.choose_c("jit", 1, 1.0) == 0.5 == est.c
    speeds = {c: est.speed_at_c(c, "jit", 1) for c in measure.C_CANDIDATES}
    assert max(speeds, key=speeds.get) == 0.5 and f"C=0.5 {speeds[0.5]:.2f}x" in est.why["c"]
    fixed = budget_rule({1: 0.01, 8: 0.02})
    fixed.c_rule, fixed.c = 0.7, 0.7
    assert fixed.choose_c("jit", 1, 1.0) == 0.7


def test_the_draft_times_its_tree_widths_once_and_says_its_build_width():
    """With budget auto the rule needs a tree step's cost against its width before it has
    built trees of every width: the draft times the widths the Start names (its own coins:
    the stream it drafts from is untouched) and sends them with its first answer only; each
    answer names the width of the build that made its cache."""
    draft, K = tiny_model(0, vocab_size=64, scale=3.0), 2
    args = ([[1, 2, 3], [5, 6]], K, 64, 64, 0.7, None, None, 1.0, 0)
    timed = saguaro.DraftSide(draft, saguaro.Start(*args, time_widths=(1, 8)))
    plain = saguaro.DraftSide(draft, saguaro.Start(*args))
    live, fan = torch.tensor([True, True]), [1, 1, 2]
    first = saguaro.Round(torch.full((2,), -1), torch.tensor([4, 7]), live, "jit", fan, fan)
    a1, b1 = timed.answer(first), plain.answer(first)
    assert set(a1.tree_s) == {1, 8} and all(v > 0 for v in a1.tree_s.values())
    assert b1.tree_s is None and torch.equal(a1.tokens, b1.tokens) and a1.width == 0
    timed.work()
    again = saguaro.Round(torch.zeros(2, dtype=torch.long), torch.tensor([3, 3]), live, "jit",
                          fan, fan, shadow=True)
    a2 = timed.answer(again)
    assert a2.tree_s is None and a2.width == sum(fan)
    torch.testing.assert_close(a2.q_plain.sum(-1), torch.ones(2, K))


# ----------------------------------------------------------------------------------------------
# two processes, temperature 0: token for token equal to autoregressive.py

_RUNNING = {}


def worker_for(name, draft, target):
    """One draft process at a time (each start costs seconds on 2 cores): reuse
    the running one if it serves `name`, else close it and start this one. What the worker
    learned in earlier tests is dropped, so no test's outcome depends on the order they ran.
    Its timeout is long: these tests are not about losing the draft, and a round of a law test
    (thousands of rows) on a machine busy with other jobs may take seconds."""
    if _RUNNING.get("name") != name or not _RUNNING["worker"].alive:
        close_worker()
        _RUNNING.update(name=name, worker=saguaro.DraftWorker(draft, target, threads=1,
                                                              timeout_s=120.0))
    _RUNNING["worker"].estimates.clear()
    return _RUNNING["worker"]


def close_worker():
    if _RUNNING:
        _RUNNING.pop("worker").close()
        _RUNNING.clear()


@pytest.fixture(scope="module", autouse=True)
def no_worker_left_behind():
    yield
    close_worker()


@pytest.fixture
def tiny_pair():
    target = tiny_model(0, vocab_size=64, scale=3.0)
    draft = functools.partial(noisy_model, 0, 64, 0.15, 7, scale=3.0)  # mostly agrees
    return target, worker_for("tiny", draft, target)


RAGGED = [[1, 2, 3, 4, 5, 6], [7, 8, 9], [10, 11, 12, 13]]
CONFIGS = [dict(k=3, f=2), dict(k=2, f=1, fan_out="uniform", backup="jit"),
           dict(k=4, f=3, backup="fast", saguaro_c=0.5), dict(k=1, f=4, backup="auto"),
           dict(k=3, f=1, budget=1, backup="jit"),
           dict(k=3, budget="auto", saguaro_c="auto", backup="jit")]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in
                                                                  c.items()))
def test_greedy_output_equals_autoregressive_in_two_processes(tiny_pair, config, scripted_backup):
    target, worker = tiny_pair
    ref, _ = autoregressive.generate(target, RAGGED, 40)
    out, stats = saguaro.generate(target, RAGGED, 40, draft=worker, **config)
    assert out == ref
    assert stats["cache_hits"] > 0 and stats["cache_misses"] > 0, stats  # both paths ran
    assert stats["draft_lost"] is None and worker.alive
    # a backup serves the cold start of each row and every miss, nothing else
    assert sum(stats["backup_used"].values()) == len(RAGGED) + stats["cache_misses"], stats
    if config.get("backup", "auto") == "auto":  # the scripted rule: both backups served
        assert min(stats["backup_used"].values()) > 0, stats["backup_used"]


def test_top_k_1_at_temperature_above_0_is_greedy(tiny_pair):
    target, worker = tiny_pair
    ref, _ = autoregressive.generate(target, RAGGED, 20)
    out, _ = saguaro.generate(target, RAGGED, 20, draft=worker, k=2, f=1, backup="jit",
                              temperature=1.0, top_k=1, saguaro_c=0.5, seed=3)
    assert out == ref


def test_same_seed_same_tokens_at_temperature_above_0(tiny_pair):
    """Every random draw, the draft process's included, comes from a generator seeded by
    `seed`: the same seed gives the same tokens on a reset worker, another seed others (the
    geometric schedule follows the acceptance learned by earlier calls: DraftWorker.reset)."""
    target, worker = tiny_pair
    runs = []
    for s in (4, 4, 5):
        worker.reset()
        runs.append(saguaro.generate(target, RAGGED, 20, draft=worker, k=2, f=1, backup="jit",
                                     temperature=1.0, saguaro_c=0.5, seed=s)[0])
    assert runs[0] == runs[1] != runs[2]
    # seed=None is seed 0, as in every loop (kernels.make_generator); the draft process once
    # failed on it (None + 1) and the run finished on the fast backup, with a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        none, zero = (saguaro.generate(target, RAGGED, 20, draft=worker, k=2, f=1, backup="jit",
                                       temperature=1.0, saguaro_c=1.0, seed=s) for s in (None, 0))
    assert none[0] == zero[0] and none[1]["backup_used"]["fast"] == 0


@pytest.mark.parametrize("draft_vocab", [7, 10])
def test_padded_vocabularies_over_one_tokenizer(draft_vocab):
    """A tokenizer of 6 ids over a target embedding of 8 rows and a draft of 7 or 10: greedy
    output equals autoregressive.py's, and sampled rows that reach the padding ids (which only
    the target has) run through hits and JIT misses alike."""
    target = tiny_model(3, vocab_size=8)
    target.tokenizer = FakeTokenizer(6)
    worker = worker_for(f"padded{draft_vocab}", functools.partial(
        tiny_model, 4, vocab_size=draft_vocab), target)
    prompts = [[1, 2, 3], [5], [0, 4, 2, 1]]
    ref, _ = autoregressive.generate(target, prompts, 12)
    out, _ = saguaro.generate(target, prompts, 12, draft=worker, k=2, f=1, backup="jit")
    assert out == ref
    out, stats = saguaro.generate(target, [[1, 2, 3]] * 300, 6, draft=worker, k=2, f=1,
                                  backup="jit", temperature=1.5, saguaro_c=0.5, seed=1)
    assert {6, 7} <= {t for row in out for t in row} and all(len(row) == 6 for row in out)
    assert stats["cache_hits"] > 0 and stats["cache_misses"] > 0 and stats["draft_lost"] is None


@pytest.mark.parametrize("temperature,backup", [(0.0, "jit"), (1.0, "jit"), (1.0, "fast")])
def test_the_glue_reuses_the_kv_of_hit_branches_and_jit_rows_in_a_mixed_batch(monkeypatch,
                                                                              temperature, backup):
    """The glue costs one token a row (reuse_branch): a hit row's KV of t, y_1..y_{K-1} lies in
    its branch's scratch slots, a JIT row's in place (the JIT decodes the rows that missed
    alone, KVCache.take_rows, so it cannot overwrite a hit branch); a row the fast backup
    served is decoded again alone (K tokens, decode_rows), and only when every row took it does
    one forward read K + 1 tokens of each. The draft side runs in this process with made-up
    outcomes, some rows hitting and some missing in the same round; each round its glue logits
    must equal a plain forward over the row's whole context, which also checks every KV slot
    the trunk keeps (the glue's last forward reads them all)."""
    draft, K, V = tiny_model(0, vocab_size=64, scale=3.0), 3, 64
    prompts = [[1, 2, 3], [5, 6], [7, 8, 9, 10]]
    B = len(prompts)
    side = saguaro.DraftSide(draft, saguaro.Start(prompts, K, V, 96, temperature, None, None,
                                                  1.0, 0))
    glue_lengths, forward = [], draft.forward

    def counting(tokens, cache, *args, **kwargs):
        if kwargs.get("slots") is None and "positions" not in kwargs:
            glue_lengths.append(tokens.shape[1])
        return forward(tokens, cache, *args, **kwargs)
    monkeypatch.setattr(draft, "forward", counting)
    live, fan, coin = torch.tensor([True] * B), [1] * (K + 1), torch.Generator().manual_seed(3)
    context = [list(p) for p in prompts]        # what the trunk holds before the glue
    k, t = torch.full((B,), -1), side.first[0].clone()
    t[1] = (t[1] + 1) % V                       # row 1 misses the first speculation
    mixed = 0
    missed = saguaro.JIT if backup == "jit" else saguaro.FAST
    for step in range(8):
        glue_lengths.clear()
        fast = torch.randint(V, (B, K), generator=coin)      # the fast backup's speculation
        answer = side.answer(saguaro.Round(k, t, live, backup, fan, fan, fast))
        side.work()
        source, y = answer.source, answer.tokens
        mixed += bool((source == saguaro.HIT).any() and (source == missed).any())
        served = source == saguaro.FAST
        assert glue_lengths == ([K + 1] if bool(served.all()) else [K, 1] if bool(served.any())
                                else [1])
        assert bool((source != saguaro.FAST).all()) or backup == "fast"
        assert torch.equal(y[served], fast[served])
        for b in range(B):
            whole = torch.tensor([context[b] + [int(t[b])] + y[b].tolist()])
            ref = draft(whole, draft.new_cache(1, 96))[0, -(K + 1):, :V]
            torch.testing.assert_close(side.glue[b], ref, atol=2e-4, rtol=1e-4)
        # next outcome per row: a key of the cache just built (a hit), or a pair it lacks
        keys, glued, k, t = side.S.keys, t, torch.zeros(B, dtype=torch.long), t.clone()
        for b in range(B):
            context[b] += [int(glued[b])]        # the glued t0 stays; x_1..x_k below
            n = int(torch.randint(keys.shape[1], (1,), generator=coin))
            k[b], t[b] = keys[b, n]
            if (step + b) % 2:                  # a miss: a token no branch guessed at this k
                t[b] = next(x for x in range(V) if not ((keys[b, :, 0] == k[b])
                                                        & (keys[b, :, 1] == x)).any())
            context[b] += y[b, : int(k[b])].tolist()
    assert mixed >= 3


def test_estimates_carry_over_between_calls_with_the_same_settings(tiny_pair):
    """What the rules learn (a, r, hit rates, latencies) is kept per worker and settings: a
    second call goes on from the first call's observations; other settings start afresh."""
    target, worker = tiny_pair
    worker.estimates.clear()
    saguaro.generate(target, RAGGED, 20, draft=worker, k=3, f=1)
    (est,) = worker.estimates.values()
    lookups = est.hits["draft"][1] + est.hits["fast"][1]
    saguaro.generate(target, RAGGED, 20, draft=worker, k=3, f=1)
    assert list(worker.estimates.values()) == [est]
    assert est.hits["draft"][1] + est.hits["fast"][1] > lookups
    saguaro.generate(target, RAGGED, 20, draft=worker, k=2, f=1)
    assert len(worker.estimates) == 2


class VirtualClock:
    """A stand-in for the time module inside saguaro.generate: time passes only in the target's
    forward (`cost(call number)` seconds each), so the latencies the estimates learn are set by
    the test, not by the machine."""

    def __init__(self, target, cost):
        self.now, self.calls, self.cost = 0.0, 0, cost
        forward = target.forward

        def timed_forward(*args, **kwargs):
            self.calls += 1
            self.now += cost(self.calls)
            return forward(*args, **kwargs)
        target.forward = timed_forward

    def perf_counter(self):
        return self.now

    def __getattr__(self, name):  # sleep, monotonic, ...: the real ones
        return getattr(time, name)


def test_a_cold_first_verify_stays_out_of_the_latency_means(tiny_pair, monkeypatch):
    """The first verify of a call may pack weights (a one-off): kept out of the running mean,
    which later calls inherit, it cannot inflate the speed model or the measured speedup. On a
    virtual clock the first verify takes 100 s and every later one 1 s: the mean must be 1 s."""
    target, worker = tiny_pair
    worker.estimates.clear()
    clock = VirtualClock(target, lambda call: 100.0 if call == 1 else 1.0)
    monkeypatch.setattr(saguaro, "time", clock)
    monkeypatch.setattr(timeline, "time", clock)  # a span's end: the loop's latencies are spans
    try:
        _, stats = saguaro.generate(target, RAGGED[:1], 8, draft=worker, k=2, f=1, backup="jit")
    finally:
        del target.forward
    (est,) = worker.estimates.values()
    assert clock.calls == stats["target_calls"] >= 3
    assert est.secs["verify"] == pytest.approx(1.0)
    # tokens per row per verify-time, where the decode took 100 + (calls - 1) s
    decoded = stats["new_tokens"] - 1
    assert stats["measured_speedup"] == pytest.approx(decoded / (100.0 + clock.calls - 1))


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores to split")
def test_each_process_gets_its_own_cores_and_the_caller_gets_its_own_back(tiny_pair):
    target, worker = tiny_pair
    before = os.sched_getaffinity(0)
    draft_cpus = os.sched_getaffinity(worker.process.pid)
    assert draft_cpus and not draft_cpus & set(worker.target_cpus)
    saguaro.generate(target, RAGGED, 5, draft=worker, k=2, f=1)
    assert os.sched_getaffinity(0) == before
    # only the draft's compute thread (and torch's, which inherit it) is pinned: its link's
    # I/O threads may run on any core (pinned beside the busy compute thread, each message
    # waited a time slice to be read; tests/ cannot time that reliably, so the fact is checked)
    task = f"/proc/{worker.process.pid}/task"
    threads = {int(t): open(f"{task}/{t}/comm").read().strip() for t in os.listdir(task)}
    gloo = [t for t, name in threads.items() if "gloo" in name]
    assert gloo and all(os.sched_getaffinity(t) == before for t in gloo), threads
    assert os.sched_getaffinity(worker.process.pid) == draft_cpus  # its main thread
    # torch's threads for the target's cores (draft_process._borrow: lent while the target
    # waits for an answer) are pinned there and run only when those cores are idle
    lent = [t for t in threads if os.sched_getaffinity(t) == set(worker.target_cpus)]
    assert lent and all(os.sched_getscheduler(t) == os.SCHED_IDLE for t in lent), threads
    assert os.sched_getscheduler(worker.process.pid) != os.SCHED_IDLE


def test_eos_inside_an_accepted_block_ends_the_row(self_pair):
    """draft = target at temperature 0: every round accepts all K = 3, so tokens 2-4, 6-8, ...
    of a row arrive as accepted draft tokens. The EOS is a token that first appears there in
    row 0: the row must stop right after it, as autoregressive.py does."""
    target, worker = self_pair
    free, _ = autoregressive.generate(target, RAGGED, 30, eos=False)
    K = 3
    at = next(i for i in range(1, 30) if i % (K + 1) != 0 and free[0][i] not in free[0][:i])
    target.cfg.eos_token_ids = (free[0][at],)
    ref, _ = autoregressive.generate(target, RAGGED, 30)
    out, stats = saguaro.generate(target, RAGGED, 30, k=K, f=1, backup="jit", draft=worker)
    assert out == ref and len(out[0]) == at + 1 and out[0][-1] == free[0][at]
    assert stats["acceptance_rate"] == 1.0     # the EOS came accepted, not as a bonus


def test_eos_and_max_new_tokens_end_rows_like_autoregressive(tiny_pair):
    target, worker = tiny_pair
    ref, _ = autoregressive.generate(target, RAGGED, 30)
    target.cfg.eos_token_ids = (ref[1][5],)      # row 1 meets it early, others maybe never
    try:
        for n in (1, 2, 17):
            ref, _ = autoregressive.generate(target, RAGGED, n)
            out, _ = saguaro.generate(target, RAGGED, n, draft=worker, k=3, f=2)
            assert out == ref, n
    finally:
        target.cfg.eos_token_ids = ()


@pytest.fixture
def self_pair():
    """draft = target (in the draft process): at temperature 0 every speculation the draft
    makes from the right context is accepted in full, so acceptance is exactly 1."""
    target = tiny_model(0, vocab_size=64, scale=3.0)
    return target, worker_for("self", functools.partial(tiny_model, 0, vocab_size=64, scale=3.0),
                              target)


def test_draft_equal_to_target_hits_every_time_at_temperature_0(self_pair):
    """The hit path, with the glue reusing the hit branch's KV (reuse_branch) every round."""
    target, worker = self_pair
    ref, _ = autoregressive.generate(target, RAGGED, 30)
    out, stats = saguaro.generate(target, RAGGED, 30, k=3, f=2, backup="jit", draft=worker)
    assert out == ref and stats["hit_rate"] == 1.0
    assert stats["backup_used"]["jit"] == 0   # the first speculation too: drafted in prefill
    assert stats["acceptance_rate"] == 1.0 and stats["accept_counts"][:3] == [0, 0, 0]
    assert stats["fan_out_hit"][-1] == max(stats["fan_out_hit"])  # a -> 1: bet on k = K
    (est,) = worker.estimates.values()   # the rank of every looked-up bonus was learned (for r)
    assert est.rank_counts.sum() == sum(stats["lookups_by_k"]) and est.rank_counts[0] > 0


@pytest.mark.parametrize("top_p", [None, 0.9])
def test_at_temperature_1_a_draft_equal_to_the_target_predicts_every_coupled_bonus(self_pair,
                                                                                   top_p):
    """The coupled bonus (idea 7): with q = p every draft token is accepted, so every round
    ends at k = K with a bonus drawn from p_{K+1}; the draft's one guess, argmax q / E with the
    target's clocks E for that row and position, is that draw every time. Uncoupled, one guess
    hits only when p's draw is its top token. A clock off by one position or row, or another
    vocabulary slice, would be a different race: it would hit no more than the uncoupled guess.
    Only each row's first lookup may miss: its cache was built before any acceptance was
    measured, when the fan-out's prior put the one guess on k = 0."""
    target, worker = self_pair
    misses = {}
    for couple in (True, False):
        _, stats = saguaro.generate(target, RAGGED, 80, k=3, budget=1, backup="jit",
                                    draft=worker, temperature=1.0, top_p=top_p, seed=5,
                                    couple_bonus=couple, saguaro_c=1.0)   # q' = q = p
        assert stats["acceptance_rate"] == 1.0 and stats["lookups_by_k"][:3] == [0, 0, 0]
        misses[couple] = stats["cache_misses"]
        if couple:  # the first token is a race too: the speculation drafted in prefill hit
            assert stats["backup_used"]["jit"] == misses[couple], stats["backup_used"]
    # uncoupled, ~1 lookup in 5 misses here (6-15 of ~57 over seeds 0-7)
    assert misses[True] <= len(RAGGED) and misses[False] > 2 * len(RAGGED), misses


def test_draft_calls_count_every_draft_forward(self_pair):
    """draft_calls: the first speculation (K forwards, drafted during the prefill from a guess
    of the first token; a wrong guess adds a JIT), then per round the glue and K tree steps,
    plus K for every JIT backup."""
    target, worker = self_pair
    for budget, jit_per_round in ((8, 0), (1, 3)):   # all hits; all JIT misses
        _, stats = saguaro.generate(target, RAGGED, 30, k=3, budget=budget, fan_out="uniform",
                                    backup="jit", draft=worker)
        cold = 3 if jit_per_round == 0 else 0
        assert stats["draft_calls"] == cold + stats["target_calls"] * (1 + 3 + jit_per_round)


class GreedyOracle:
    """A fast backup that proposes the target's own greedy continuation (one-hot q)."""

    def __init__(self, target):
        self.target, self.vocab_size = target, target.cfg.vocab_size

    def propose(self, contexts, k, temperature, generator):
        tokens, _ = autoregressive.generate(self.target, contexts, k, eos=False)
        x = torch.tensor(tokens)
        return x, speculative.one_hot(x, self.vocab_size)


class WrongFirst(GreedyOracle):
    """A fast backup whose first token is never the target's greedy one: always rejected."""

    def propose(self, contexts, k, temperature, generator):
        x, _ = super().propose(contexts, k, temperature, generator)
        x[:, 0] = (x[:, 0] + 1) % self.vocab_size
        return x, speculative.one_hot(x, self.vocab_size)


@pytest.mark.parametrize("backup", ["jit", "fast"])
def test_every_miss_is_served_at_full_speed_by_either_backup(self_pair, backup, monkeypatch):
    """A uniform budget of 1 bets on k = 0 only, and draft = target accepts all K: every lookup
    misses and every round after the first is served by a backup (the first by the speculation
    the draft made during the prefill, from its right guess of the first token). The JIT one
    (the draft decoding from the row's context, its KV then reused by the glue) and a fast
    backup that knows the target's greedy tokens (given each row's own context) must both be
    accepted in full, each at one message each way per round (the fast backup's speculation
    rides on the Round)."""
    target, worker = self_pair
    ref, _ = autoregressive.generate(target, RAGGED, 30)
    sent, exchange = [], worker.exchange
    monkeypatch.setattr(worker, "exchange", lambda msg: sent.append(type(msg).__name__)
                        or exchange(msg))
    out, stats = saguaro.generate(target, RAGGED, 30, k=3, budget=1, fan_out="uniform",
                                  backup=backup, draft=worker, fast_backup=GreedyOracle(target))
    assert sent == ["Start", "Sync"] + ["Round"] * stats["target_calls"] + ["End"]
    assert out == ref and stats["fan_out_miss"] == [1, 0, 0, 0]
    assert stats["cache_hits"] == 0
    assert stats["backup_used"][backup] == stats["rows_verified"] - len(RAGGED)
    assert stats["acceptance_rate"] == 1.0, stats["accept_counts"]


def test_the_cache_after_a_fast_backup_is_built_over_its_tokens(self_pair):
    """Budget 3 bets on k = 0, 1, 2 (not k = K = 3). draft = target: its own speculations are
    accepted in full and miss; the fast backup's first token is always rejected, so the lookup
    after a fast speculation is (0, the target's greedy token): the draft's cache, built over
    the fast backup's tokens, must hold it. Built over anything else, it would miss."""
    target, worker = self_pair
    ref, _ = autoregressive.generate(target, RAGGED, 30)
    out, stats = saguaro.generate(target, RAGGED, 30, k=3, budget=3, fan_out="uniform",
                                  backup="fast", draft=worker, fast_backup=WrongFirst(target))
    assert out == ref and stats["fan_out_miss"] == [1, 1, 1, 0]
    hits, lookups = stats["hits_by_k"], stats["lookups_by_k"]
    assert lookups[0] > 5 and hits[0] == lookups[0] and lookups[1:3] == [0, 0], stats
    assert hits[3] == 0 and lookups[3] > 5  # the draft's own speculations, accepted in full


def default_model_draft():
    return kernels.load_model("default", "cpu")


def test_greedy_equals_autoregressive_on_the_default_model(default_model, default_prompts):
    """The default target with itself as the draft, in its own process: exact, and every
    lookup hits."""
    close_worker()
    ref, _ = autoregressive.generate(default_model, default_prompts[:2], 10)
    out, stats = saguaro.generate(default_model, default_prompts[:2], 10, draft=default_model_draft,
                                  k=2, f=1, draft_threads=1)
    assert out == ref and stats["hit_rate"] == 1.0


# ----------------------------------------------------------------------------------------------
# temperature > 0: the exact law of a window of 6 tokens (V = 4, K = 2), with Saguaro sampling
# (C < 1) on the cache path and on both backups. The window holds the prefill token, the first
# round (always a backup: no cache exists yet), and the round after it (from the cache built
# over the backup's speculation, or another backup), every position of it when the first round
# accepted at most one token.

LAW_CASES = {
    # name: generate kwargs (k = 2; budget 3 = one guess at each k)
    "C=0.3 jit uniform": dict(saguaro_c=0.3, backup="jit", f=1, fan_out="uniform"),
    "C=0.3 fast uniform": dict(saguaro_c=0.3, backup="fast", f=1, fan_out="uniform"),
    "C=0 auto (scripted) top-k 3 top-p 0.95": dict(saguaro_c=0.0, backup="auto", f=1,
                                                   temperature=1.2, top_k=3, top_p=0.95),
    "C=0.5 jit geometric, EOS live": dict(saguaro_c=0.5, backup="jit", f=1, eos=True),
    "C=0.5 fast uniform, EOS live": dict(saguaro_c=0.5, backup="fast", f=1, fan_out="uniform",
                                         eos=True),
    "B, C auto (scripted: both move every round) jit, EOS live": dict(
        budget="auto", saguaro_c="auto", backup="jit", eos=True),
    "B, C auto (scripted) fast": dict(budget="auto", saguaro_c="auto", backup="fast"),
    "C=0.5 jit, the bonus drawn apart (not coupled), EOS live": dict(
        saguaro_c=0.5, backup="jit", f=1, eos=True, couple_bonus=False),
}
NUM_STAT_TESTS = len(LAW_CASES) + 6   # + the PIT tests of the draft's answers


@pytest.fixture
def law_pair():
    target = tiny_model(3, vocab_size=V)
    return target, worker_for("law", functools.partial(noisy_model, 3, V, 0.1, 5), target)


def law_test(target, generate, alpha=ALPHA / NUM_STAT_TESTS, **kwargs):
    totals = {"cache_hits": 0, "cache_misses": 0, "jit": 0, "fast": 0}

    def run(*args, **kw):
        tokens, stats = generate(*args, **kw)
        totals["cache_hits"] += stats["cache_hits"]
        totals["cache_misses"] += stats["cache_misses"]
        for name, n in stats.get("backup_used", {}).items():
            totals[name] += n
        return tokens, stats
    sampling = {"temperature": 1.0, **{n: kwargs.pop(n) for n in ("temperature", "top_k", "top_p")
                                       if n in kwargs}}
    law = exact.exact_distribution(target, PROMPT, N_TOKENS, **sampling)
    counts = exact.sample_sequences(run, target, PROMPT, N_TOKENS, SAMPLES, batch_size=SAMPLES,
                                    **sampling, **kwargs)
    passed, worst, shown = exact.window_test(counts, law, alpha)
    shown = f"{totals}; {shown}"
    print(shown)
    return passed, worst, totals, shown


@pytest.mark.parametrize("case", list(LAW_CASES))
def test_sampled_output_follows_the_exact_target_law(law_pair, case, scripted_backup,
                                                    scripted_choices):
    target, worker = law_pair
    kwargs = dict(LAW_CASES[case])
    if kwargs.pop("eos", False):  # the likeliest second token ends a row (often mid-round)
        second = torch.zeros(V, dtype=torch.float64)
        for s, prob in exact.exact_distribution(target, PROMPT, 2, eos_ids=()).items():
            second[s[1]] += prob
        target.cfg.eos_token_ids = (int(second.argmax()),)
    passed, worst, totals, shown = law_test(target, saguaro.generate, draft=worker, k=2,
                                            **kwargs)
    lookups = totals["cache_hits"] + totals["cache_misses"]
    assert min(totals["cache_hits"], totals["cache_misses"]) > 0.1 * lookups, shown
    for backup in ("jit", "fast"):   # "auto" ran both, as scripted
        if kwargs["backup"] in (backup, "auto"):
            assert totals[backup] > 0.1 * (SAMPLES + totals["cache_misses"]), shown
    if kwargs.get("budget") == "auto":  # B and C moved every round, as scripted
        assert scripted_choices.calls >= N_TOKENS // 3, scripted_choices.calls
    assert passed, shown


def pit_counts(tokens, probs, generator, bins=10):
    """The randomized probability integral transform of draws `tokens` (N,) against the laws
    `probs` (N, V) each was reported to come from: F(y-) + U q(y), U ~ U[0, 1). If each token
    was drawn from its q (given everything before it), these are i.i.d. uniform: counts per bin."""
    below = probs.cumsum(-1).gather(-1, tokens[:, None])[:, 0] - probs.gather(-1, tokens[:, None])[:, 0]
    pit = below + torch.rand(len(tokens), generator=generator, dtype=probs.dtype) * \
        probs.gather(-1, tokens[:, None])[:, 0]
    return dict(enumerate(torch.bincount((pit * bins).long().clamp(0, bins - 1),
                                         minlength=bins).tolist()))


@pytest.mark.parametrize("backup", ["jit", "fast"])
def test_every_token_the_draft_hands_over_is_drawn_from_the_q_it_reports(law_pair, backup):
    """Saguaro sampling is exact because the q' the target verifies with is the law the draft
    process drew the token from, at EVERY position of a cached speculation (and of a JIT one).
    The conditional law, checked directly: every answer of the draft process is recorded, and
    for each position j the randomized PIT of y_j under the reported q'_j must be uniform
    (chi-square over 10 bins, per source and position), with C = 0.3 and a uniform fan-out
    (one guess at every k, so q' != q at every drafting step), at temperature 2.5 (this pair is
    sharp at 1: scaling its top tokens would move little mass)."""
    target, worker = law_pair
    answers, real_exchange = [], worker.exchange

    def recording_exchange(msg):
        reply = real_exchange(msg)
        if isinstance(msg, saguaro.Round):
            answers.append((reply.source.clone(), reply.tokens.clone(), reply.probs.clone(),
                            msg.live.clone()))
        return reply
    worker.exchange = recording_exchange
    try:
        saguaro.generate(target, [[1, 2, 0], [3, 1]] * 1500, 10, draft=worker, k=2, f=1,
                         fan_out="uniform", backup=backup, saguaro_c=0.3, temperature=2.5,
                         seed=1)
    finally:
        del worker.exchange
    gen = kernels.make_generator(0, "cpu")
    checked = 0
    for code, name in ((saguaro.HIT, "hit"), (saguaro.JIT, "jit")):
        rows = [(y[m], q[m]) for source, y, q, live in answers for m in [live & (source == code)]]
        y, q = torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows]).double()
        if backup == "fast" and code == saguaro.JIT:
            assert len(y) == 0
            continue
        assert len(y) > 1000, (name, len(y))
        torch.testing.assert_close(q.sum(-1), torch.ones_like(q[..., 0]))
        for j in range(2):
            counts = pit_counts(y[:, j], q[:, j], gen)
            passed, stat, threshold = exact.chi_square_test(counts, {b: 0.1 for b in range(10)},
                                                            ALPHA / NUM_STAT_TESTS)
            assert passed, f"{name} speculations, position {j + 1}: chi2 {stat:.1f} > {threshold:.1f}"
            checked += 1
    assert checked == (4 if backup == "jit" else 2)


class SaguaroDraftLyingAboutQ:
    """WRONG: samples from Saguaro's q' (its top-(f+1) tokens scaled by C) but reports the plain
    q for verification."""

    def __init__(self, model, c, f=1):
        self.model, self.c, self.f, self.vocab_size = model, c, f, model.cfg.vocab_size

    def propose(self, contexts, k, temperature, generator):
        seqs, xs, qs = [list(c) for c in contexts], [], []
        for _ in range(k):
            cache = self.model.new_cache(len(seqs), max(map(len, seqs)) + 1)
            logits = self.model.prefill(seqs, cache)                          # (B, V)
            q_scaled = saguaro.saguaro_probs(logits, temperature, None, None, self.c, self.f)
            x = kernels.sample(q_scaled, generator)                            # from q' ...
            xs.append(x)
            qs.append(kernels.probs_from_logits(logits, temperature))          # ... but q told
            for seq, t in zip(seqs, x.tolist()):
                seq.append(t)
        return torch.stack(xs, 1), torch.stack(qs, 1)


def test_negative_control_verifying_with_q_instead_of_q_prime_fails():
    """Saguaro sampling is lossless only because verification divides by the same q'. Verifying
    q'-samples with the unscaled q (through speculative.py, in one process) must fail, by a wide
    margin: the draft is the target itself and C = 0, so the reported q equals p and every
    proposal is accepted, yet none is ever one of p's two likeliest tokens."""
    target = tiny_model(3, vocab_size=V)
    draft = SaguaroDraftLyingAboutQ(tiny_model(3, vocab_size=V), c=0.0)
    passed, worst, _, shown = law_test(target, speculative.generate, draft=draft, k=2)
    assert not passed and worst > 5, shown


def test_negative_control_race_clocks_shared_by_rows_fail(law_pair, monkeypatch):
    """The coupled bonus is exact only because each draw has fresh clocks E: a function of
    (seed, row, position) that nothing else reads. Clocks that leave the row out of their key
    make every row of a batch run the same race at a position: rows with the same context then
    draw the same bonus, so the law test (each sample is a row of one batch) must fail, by a
    wide margin, on the pair and window that pass with the real clocks."""
    target, worker = law_pair
    real = kernels.race_clocks
    monkeypatch.setattr(kernels, "race_clocks", lambda seed, rows, positions, vocab, device="cpu":
                        real(seed, [0] * len(rows), positions, vocab, device))
    passed, worst, _, shown = law_test(target, saguaro.generate, draft=worker, k=2, f=1,
                                       backup="jit")
    assert not passed and worst > 3, shown


# ----------------------------------------------------------------------------------------------
# faults: losing the draft costs speed, never tokens

def fault_run(worker, kill_at_round=None, backup="jit"):
    target = tiny_model(0, vocab_size=64, scale=3.0)
    ref, _ = autoregressive.generate(target, RAGGED, 50)
    if kill_at_round is not None:  # SIGKILL the draft process just before this round's message
        before_round(worker, kill_at_round, lambda: os.kill(worker.process.pid, signal.SIGKILL))
    pid, t0 = worker.process.pid, time.time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, stats = saguaro.generate(target, RAGGED, 50, draft=worker, k=3, f=2, backup=backup)
    return out, ref, stats, [str(w.message) for w in caught], time.time() - t0, pid


@pytest.mark.parametrize("backup", ["jit", "fast"])
def test_killing_the_draft_process_mid_generation_loses_no_token(backup):
    close_worker()
    target = tiny_model(0, vocab_size=64, scale=3.0)
    worker = saguaro.DraftWorker(functools.partial(noisy_model, 0, 64, 0.15, 7, scale=3.0),
                                 target, threads=1, timeout_s=5.0)
    out, ref, stats, caught, seconds, pid = fault_run(worker, kill_at_round=4, backup=backup)
    assert out == ref                                   # complete, nothing lost or repeated
    assert stats["draft_lost"] and any("draft process" in w for w in caught), caught
    assert stats["backup_why"].startswith("draft lost"), stats["backup_why"]
    # time is the property here: a lost draft is noticed within its timeout (5 s), not never.
    # 30 s is 6x that, room for a busy machine; a hang would run until pytest is killed
    assert stats["backup_used"]["fast"] > 0 and seconds < 30
    assert not worker.alive and proc_gone(pid) and not saguaro.draft_process._LIVE


def test_a_draft_that_stops_answering_times_out_and_the_target_finishes():
    close_worker()
    target = tiny_model(0, vocab_size=64, scale=3.0)
    worker = saguaro.DraftWorker(functools.partial(noisy_model, 0, 64, 0.15, 7, scale=3.0),
                                 target, threads=1, timeout_s=1.0)
    before_round(worker, 3, lambda: os.kill(worker.process.pid, signal.SIGSTOP))  # never answers
    out, ref, stats, caught, seconds, pid = fault_run(worker)
    assert out == ref and "Timed out" in stats["draft_lost"], stats["draft_lost"]
    # time is the property: a silent draft is given up after its 1 s timeout, once (30x room)
    assert any("stopped answering" in w for w in caught) and seconds < 30
    assert proc_gone(pid)
    # a dead worker passed again: a warning, and the target still does the whole job
    with pytest.warns(RuntimeWarning, match="not running"):
        again, _ = saguaro.generate(target, RAGGED, 50, draft=worker, k=3, f=2)
    assert again == ref


def slow_to_prefill(seconds, *args, **kwargs):
    """noisy_model whose prefill first sleeps `seconds`: a long prompt, as the draft sees it."""
    model = noisy_model(*args, **kwargs)
    prefill = model.prefill

    def slow(*a, **k):
        time.sleep(seconds)
        return prefill(*a, **k)
    model.prefill = slow
    return model


def test_a_draft_still_reading_a_long_prompt_is_waited_for_not_lost():
    """The wait for the draft's prefill (the Sync after the target's) is bounded by
    load_timeout_s, not timeout_s: a 3 s prefill beside a 1 s answer timeout loses nothing.
    And it counts as prefill, as speculative.py's prefill includes its draft's, not as decode."""
    close_worker()
    target = tiny_model(0, vocab_size=64, scale=3.0)
    draft = functools.partial(slow_to_prefill, 3.0, 0, 64, 0.15, 7, scale=3.0)
    with saguaro.DraftWorker(draft, target, threads=1, timeout_s=1.0) as worker:
        out, ref, stats, caught, _, _ = fault_run(worker)
        assert out == ref and stats["draft_lost"] is None and not caught, caught
        assert stats["backup_used"]["fast"] == 0
        assert stats["prefill_s"] >= 3.0, stats["prefill_s"]  # a lower bound: no timing luck


def test_a_draft_with_a_shorter_context_than_the_request_is_refused_naming_both_limits():
    """The draft process reports its draft's context: a request past it is refused, naming
    the draft's limit (32) and the target's (256), before any round runs."""
    close_worker()
    target = tiny_model(0, vocab_size=64)
    draft = tiny_model(1, vocab_size=64, max_position_embeddings=32)
    with saguaro.DraftWorker(draft, target, threads=1) as worker:
        assert worker.max_positions == 32
        with pytest.raises(ValueError, match="draft's context of 32 .*target's is 256"):
            saguaro.generate(target, list(range(1, 21)), 20, draft=worker, k=2, f=1)


class DiesWhenUnpacked:
    """A draft spec whose unpickling in the new process exits it with code 3: a process that
    dies while starting, before it could connect (as one failing an import would)."""

    def __reduce__(self):
        return os._exit, (3,)


def kill_self():
    os.kill(os.getpid(), signal.SIGKILL)


class KilledWhileStarting:
    """... and one SIGKILLed while starting (by a user, the OOM killer): it prints nothing."""

    def __reduce__(self):
        return kill_self, ()


@pytest.mark.parametrize("spec, message", [
    (DiesWhenUnpacked(), r"exited \(code 3\) before it could connect; its error is printed"),
    (KilledWhileStarting(), r"killed by signal 9 \(SIGKILL\) before it could connect; start")])
def test_a_draft_process_that_dies_while_starting_is_reported_at_once(spec, message):
    close_worker()
    target = tiny_model(0, vocab_size=64)
    t0 = time.time()
    with pytest.raises(harness.StartFailed, match=message):
        saguaro.DraftWorker(spec, target, threads=1)
    # time is the property: the death is seen at once, not after the 300 s load timeout
    assert time.time() - t0 < 30 and not draft_processes()


def test_a_cli_ends_on_one_line_when_the_draft_process_fails_to_start(monkeypatch, capsys):
    """A draft killed while loading ended saguaro.py with a traceback of the target's frames
    under the one useful line (a newcomer run): now that line alone, exit code 1."""
    def main():
        raise harness.StartFailed("the draft process was killed by signal 9 (SIGKILL) before "
                                  "it could load its draft; start the run again.")
    monkeypatch.setattr(sys, "argv", ["saguaro.py"])
    with pytest.raises(SystemExit) as exit_:
        harness.cli(main)
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and "Traceback" not in err
    assert err == ("saguaro.py: error: the draft process was killed by signal 9 (SIGKILL) before "
                   "it could load its draft; start the run again.\n")


CTRL_C_SCRIPT = textwrap.dedent("""
    import functools, signal, sys
    # Ctrl-C as in a terminal, even where the suite runs as a background job (nohup ... &), whose
    # processes start with SIGINT ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.path[:0] = [{tests!r}, {root!r}]
    import saguaro
    from conftest import FakeTokenizer, tiny_model
    if __name__ == "__main__":
        target = tiny_model(0, vocab_size=64)
        with saguaro.DraftWorker(functools.partial(tiny_model, 1, vocab_size=64), target,
                                 threads=1) as worker:
            print(worker.process.pid, flush=True)
            while True:
                saguaro.generate(target, [[1, 2, 3]], 200, draft=worker, k=3, f=2)
""")


def test_ctrl_c_leaves_no_orphan_process(tmp_path):
    tests = os.path.dirname(os.path.abspath(__file__))
    script = tmp_path / "ctrl_c.py"
    script.write_text(CTRL_C_SCRIPT.format(tests=tests, root=os.path.dirname(tests)))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        worker_pid = int(proc.stdout.readline())
        time.sleep(1.0)                                  # let it generate for a while
        os.killpg(proc.pid, signal.SIGINT)               # what Ctrl-C in a terminal sends
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0 and "KeyboardInterrupt" in proc.stderr.read()
    assert proc_gone(worker_pid)


# ----------------------------------------------------------------------------------------------
# bad input

def missing_draft(name):
    """A draft factory that fails as drafts.load_draft does on a name that is no draft."""
    raise FileNotFoundError(f"no such folder: {name!r}")


def test_bad_arguments_are_refused_with_clear_errors():
    close_worker()
    target = tiny_model(0, vocab_size=64)
    draft = functools.partial(tiny_model, 1, vocab_size=64)
    cases = [(dict(f=0), "k and f"), (dict(k=0), "k and f"), (dict(fan_out="cone"), "fan_out"),
             (dict(budget=0), "budget"), (dict(budget="lots"), "integer >= 1 or 'auto'"),
             (dict(saguaro_c="high"), r"\[0, 1\]"),
             (dict(backup="maybe"), "backup"), (dict(saguaro_c=1.5), r"\[0, 1\]"),
             (dict(k=7, f=8), "budget"), (dict(seed=-1), r"seed .*\[0, 2\^63 - 1\)"),
             (dict(seed=2 ** 64 - 1), "seed"), (dict(seed=1.5), "seed")]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            saguaro.generate(target, [1, 2], 4, draft=draft, **kwargs)
    ngram = type("Proposer", (), {"vocab_size": 64, "propose": lambda self, *a: None})()
    with pytest.raises(ValueError, match="neural draft"):
        saguaro.DraftWorker(ngram, target)
    with pytest.raises(ValueError, match="neural draft"):  # by name: refused before a process
        saguaro.DraftWorker("ngram", target)
    with pytest.raises(ValueError, match="could not load draft .*no such folder: 'nowhere'"):
        saguaro.DraftWorker(functools.partial(missing_draft, "nowhere"), target, threads=1)
    with pytest.raises(ValueError, match="needs a draft"):
        saguaro.generate(target, [1, 2], 4)
    with pytest.raises(ValueError, match="vocabularies of 64 and 80"):
        saguaro.DraftWorker(tiny_model(1, vocab_size=80), target)
    with pytest.raises(ValueError, match="vocabularies of 64 and 80"):  # found in the process
        saguaro.DraftWorker(functools.partial(tiny_model, 1, vocab_size=80), target, threads=1)
    assert not draft_processes()


def test_reuse_branch_after_a_jit_backup_keeps_the_kv_the_jit_wrote():
    """A JIT backup decodes t, y_1..y_{K-1} into the trunk, one forward each, then rolls the
    length back: reuse_branch with those slots in place equals a glue forward."""
    draft, prefix, K = tiny_model(seed=9), [1, 2, 3, 4, 5], 3
    cache = draft.new_cache(1, 32)
    draft.prefill([prefix], cache)
    start, inp, ys, logits = cache.lengths.clone(), torch.tensor([7]), [], []
    for _ in range(K):                                                 # as DraftSide.jit_draft
        out = draft(inp[:, None], cache)[:, -1]
        inp = out.argmax(-1)
        ys.append(inp)
        logits.append(out)
    cache.lengths.copy_(start)
    y = torch.stack(ys, 1)
    got = saguaro.reuse_branch(draft, cache, start[:, None] + torch.arange(K),
                               torch.stack(logits, 1), y)
    fresh = draft.new_cache(1, 32)
    draft.prefill([prefix], fresh)
    want = draft(torch.cat((torch.tensor([[7]]), y), 1), fresh)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(draft(torch.tensor([[11]]), cache),
                               draft(torch.tensor([[11]]), fresh), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("sender", [0, 1])
def test_every_record_crosses_the_link_whole(sender):
    """draft_process.send/recv over a real two-rank gloo link: small tensors ride in the one
    fixed-size header as their bytes (any dtype, 0-d and empty ones too), a long pickle (a Start
    with long prompts) spills into a second transfer, a q' larger than RAW elements travels raw,
    or, from the draft (rank 1), through the shared slab while it fits (a q' too large for it
    takes the group); every field comes back equal, dtypes and shapes included, and a slab
    written over after a recv leaves what that recv returned as it was."""
    import datetime
    import pickle
    import threading
    dp = saguaro.draft_process
    store = dp.dist.HashStore()
    links, slab = [None, None], dp.new_slab(1 << 20)

    def connect(rank):
        links[rank] = dp.Link(store, rank, "gloo", "cpu", datetime.timedelta(seconds=30), slab)
    threads = [threading.Thread(target=connect, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    long_prompts = [list(range(3000)), [5, 6]]   # pickles to more than HEADER bytes
    probs = torch.rand(2, 3, dp.RAW)             # 2 * 3 * RAW elements: raw
    records = [dp.Start(long_prompts, 3, 64, 999, 0.7, 5, 0.9, 0.5, 11),
               dp.Round(torch.tensor([-1, 2]), torch.tensor([7, 8]), torch.tensor([True, False]),
                        "jit", [0, 1, 2, 3], [1, 1, 1, 1]),
               dp.Answer(torch.tensor([0, 2]), torch.tensor([-1, 4]), torch.tensor([[1, 2, 3]] * 2),
                         probs, 0.25, 0.0, 0.125, 4, [{"name": "glue"}]),
               dp.Answer(torch.tensor([1]), torch.tensor([0]), torch.tensor([[9, 9, 9]]), None,
                         0.0, 0.5, 0.0, 7),
               dp.Answer(torch.tensor(2), torch.tensor([], dtype=torch.long),
                         torch.zeros(0, 3, dtype=torch.long), None,
                         q_plain=torch.rand(1, 2, 3).to(torch.bfloat16)),
               dp.Round(torch.tensor([3]), torch.tensor([9]), torch.tensor([True]), "fast",
                        [0, 0, 0, 1], [1, 0, 0, 0], torch.tensor([[4, 5, 6]])), dp.Sync(),
               dp.Answer(torch.tensor([1]), torch.tensor([0]), torch.tensor([[9, 9, 9]]),
                         torch.rand(1, 3, 1 << 17), q_plain=torch.rand(2, 3, dp.RAW).double()),
               dp.End()]
    assert len(pickle.dumps(long_prompts)) > dp.HEADER
    assert records[-2].probs.numel() * 4 > len(slab) > records[-2].q_plain.numel() * 8
    got = []
    reader = threading.Thread(
        target=lambda: got.extend(dp.recv(links[1 - sender], 30) for _ in records))
    reader.start()
    for i, msg in enumerate(records):  # one at a time, as the processes' records go (each
        dp.send(msg, links[sender], 30)  # is answered before the next is sent)
        deadline = time.monotonic() + 30
        while len(got) <= i and time.monotonic() < deadline:
            time.sleep(0.001)
    reader.join(60)
    assert len(got) == len(records)
    if sender == 1:
        assert slab.any()
    slab.fill_(0)   # what a later answer would do: the records received stay as they were
    for sent, back in zip(records, got):
        assert type(back) is type(sent)
        for field in sent.__dataclass_fields__:
            a, b = getattr(sent, field), getattr(back, field)
            if isinstance(a, torch.Tensor):
                assert b.dtype == a.dtype and b.shape == a.shape and torch.equal(a, b), field
            else:
                assert a == b, field
    for link in links:
        link.close()


def test_two_workers_in_one_process_each_serve_their_own_calls():
    """Each DraftWorker has its own link (a private process group on its own store), so two can
    live in one process and take turns, each call exact."""
    close_worker()
    target = tiny_model(0, vocab_size=64, scale=3.0)
    ref, _ = autoregressive.generate(target, RAGGED, 16)
    draft = functools.partial(noisy_model, 0, 64, 0.15, 7, scale=3.0)
    with saguaro.DraftWorker(draft, target, threads=1) as one, \
            saguaro.DraftWorker(draft, target, threads=1) as two:
        assert one.process.pid != two.process.pid
        for worker in (one, two, one):
            out, stats = saguaro.generate(target, RAGGED, 16, draft=worker, k=3, f=1,
                                          backup="jit")
            assert out == ref and not stats["draft_lost"]
    assert not draft_processes()


def test_the_largest_seed_keeps_the_draft_process(tiny_pair):
    """The draft seeds its own coins with seed + 1: at the largest seed allowed, 2^63 - 2, that
    was out of range, the draft process died with a traceback and the run fell back to the
    target alone (a newcomer run)."""
    target, worker = tiny_pair
    _, stats = saguaro.generate(target, RAGGED, 6, draft=worker, k=2, f=1, temperature=1.0,
                                seed=kernels.SEED_LIMIT - 1, backup="jit")
    assert not stats["draft_lost"] and worker.lost is None


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_greedy_answers_carry_no_q_rows(temperature):
    """At temperature 0 q is one-hot on each drafted token: the target builds it from the tokens,
    so the answer leaves q out (a (B, K, V) transfer per round saved); above 0 every answer
    carries the q' each token was drawn from (top_k = 5 set, so a rule that reads top_k for
    the temperature shows)."""
    draft, K = tiny_model(0, vocab_size=64, scale=3.0), 3
    side = saguaro.DraftSide(draft, saguaro.Start([[1, 2, 3], [5, 6]], K, 64, 64, temperature, 5,
                                                  None, 1.0, 0))
    fan, live = [1, 1, 1, 1], torch.tensor([True, True])
    for k, t in ((torch.full((2,), -1), torch.tensor([4, 7])), (torch.tensor([3, 0]),
                                                                 torch.tensor([9, 9]))):
        answer = side.answer(saguaro.Round(k, t, live, "jit", fan, fan))
        side.work()
        if temperature == 0:
            assert answer.probs is None
        else:
            assert answer.probs.shape == (2, K, 64)
            assert torch.allclose(answer.probs.sum(-1), torch.ones(2, K))


def test_a_caller_who_sets_nothing_gets_the_rules_as_the_clis_do(tiny_pair):
    """saguaro.generate's defaults were ssd's (B = (K+1) 3 = 15 guesses a row, C = 1), the
    slowest setting on a CPU, while every CLI defaulted to the rules: now the API does too;
    f alone still sets B = (K+1) f."""
    target, worker = tiny_pair
    ref, _ = autoregressive.generate(target, RAGGED, 12)
    out, stats = saguaro.generate(target, RAGGED, 12, draft=worker)
    assert out == ref
    assert stats["budget_why"] == "--budget auto" or stats["budget_why"].startswith("b=")
    assert stats["c_why"].startswith("temperature 0")            # C's rule ran (auto)
    _, stats = saguaro.generate(target, RAGGED, 12, draft=worker, k=3, f=2)
    assert stats["budget"] == 8 and stats["budget_why"] == "--budget 8"


def test_widths_timed_at_a_start_are_charged_the_slowdown_seen_in_the_loop():
    """A Start times a few tree widths while the target only prefills; in the loop a tree step
    runs beside a verify, slower. Mixed into one cost line, the fast Start timings made every
    untried width look cheap: the budget rule moved to B = 2 at T = 0, b = 1 and 4, where B = 1
    ran 10-30% faster (two bench passes of the same code). A Start's width is now charged the
    ratio of loop to Start timings at the widths that have both."""
    est = saguaro.Estimates(K=4, budget="auto", fan_out="geometric", backup="jit")
    live = torch.tensor([True])
    first = saguaro.Answer(torch.tensor([0]), torch.zeros(1, 4, dtype=torch.long),
                           torch.tensor([0]), None, 0.0, 0.0, 0.0, 5, width=0,
                           tree_s={1: 0.010, 8: 0.040, 24: 0.100})
    est.learn_from_draft(first, live, True)
    assert est.tree == {} and est.tree_points() == {1: 0.010, 8: 0.040, 24: 0.100}
    loop = saguaro.Answer(torch.tensor([0]), torch.zeros(1, 4, dtype=torch.long),
                          torch.tensor([0]), None, 0.002 + 4 * 0.015, 0.0, 0.002, 5, width=1)
    est.learn_from_draft(loop, live, False)                # one step at width 1: 0.015 s
    assert est.tree == pytest.approx({1: 0.015})
    assert est.tree_points() == pytest.approx({1: 0.015, 8: 0.060, 24: 0.150})   # x 1.5
    assert est.tree_step(2) > 0.015 + (0.060 - 0.015) / 7 * 0.99   # on the loop's line


def test_the_rules_sample_beside_the_loop_less_often_once_they_have_measured_enough():
    """C's shadow evaluation and the fast backup's acceptance cost the target's time (~4 ms a
    shadow round at b = 4, T = 1, every fourth round): every 4th round until ENOUGH rows were
    measured, then every 16th."""
    est = saguaro.Estimates(K=4, budget="auto", fan_out="geometric", backup="auto", c="auto")
    assert est.every("c") == est.every("fast") == 4
    for sums in est.shadow.values():
        sums[3] = saguaro.ENOUGH - 1
    est.acc["fast"][1] += saguaro.ENOUGH
    assert est.every("c") == 4 and est.every("fast") == 16
    est.shadow[1.0][3] = est.shadow[0.3][3] = saguaro.ENOUGH
    assert est.every("c") == 4                      # every candidate needs its rows
    for sums in est.shadow.values():
        sums[3] = saguaro.ENOUGH
    assert est.every("c") == 16
