"""saguaro.py: Saguaro, the optimized SSD: the draft really runs beside the target.

ssd.py shows the idea on one device, step by step. New here (Kumar, Dao, May 2026, Sec. 4):

1. The async draft: a process of its own (the plumbing: draft_process.py). Each round the target
   sends the outcome (k, t) per row; the draft answers at once from its cache (a hit: K tokens and
   their q rows) or with a backup, then builds the next cache WHILE the target verifies. Only
   tokens and q rows cross, never KV. After a hit the glue costs one token, not K + 1: the hit
   branch already computed the rest (reuse_branch). The first speculation is drafted during
   the prefill, from the draft's guess of the first token (DraftSide.draft_first).
2. Geometric fan-out (Thm. 12): with acceptance a, P(k) = a^k (1-a) for k < K and a^K for k = K;
   with the miss curve 1 - p_hit(F) = F^-r, the budget B = sum_k F_k is best spent as
   F_k ~ P(k)^(1/(1+r)); a and r are measured online (measure.py).
3. Saguaro sampling (Def. 14): the draft samples from q', its q with the top-(F+1) tokens scaled
   by C in [0, 1]: the residual max(0, p - q') then lands on the tokens the cache bet on more
   often. Exact, because verification divides by the same q'.
4. Batch-aware fallback (Sec. 4.3): a miss is served by the JIT backup (the draft decodes K tokens
   now) or the fast backup (n-gram lookup by the target, sent with the outcome: ~free, weaker); a
   batch waits if any row misses, so past a critical batch size b* the fast one wins. 5. The
   speed model (Thm. 7) decides.
6. Faults: if the draft process dies or stops answering, the target finishes alone with the fast
   backup, after a warning; no token is lost or repeated (the target owns all state).
7. Ours, not the paper's: the coupled bonus. At temperature > 0 the bonus after a full
   acceptance is a fresh draw from p_{K+1}, which one guess of the draft's top token hits about
   as often as p's top token is drawn. Here the bonus is the winner of an exponential race,
   argmax p / E with E ~ Exp(1) i.i.d. per token (the same law), and E is a function of the seed,
   the row and the position that both processes compute (kernels.race_clocks): the draft's
   first guess at k = K is argmax q_{K+1} / E, which is the target's draw whenever q and p are
   close. The first token after the prefill is drawn by the same race (the first speculation's
   guess). E is used for nothing else, so the output law is unchanged (couple_bonus=False: off).

Notation (Speculative Speculative Decoding, Kumar, Dao, May 2026): p = target, q = draft, K =
speculation length, v = (k, t) the outcome, F_k = fan-out at k (budget sum_k F_k branches per row
per round); new here: B = that budget, C = Saguaro's factor, r = the miss-curve exponent, a =
acceptance, b = batch size (README glossary).

    python saguaro.py --prompt "Write a haiku about cacti." --k 3   # B, C, backup: auto
    torchrun --nproc-per-node 4 saguaro.py --tp 4 --prompt "..."   # target on GPUs 0-3, draft on 4
"""
import argparse
import math
import time

import torch

import draft_process
import drafts
import harness
import kernels
import measure
import ssd
import timeline
import tp
from draft_process import FAST, HIT, JIT, Answer, End, Round, Start, Sync
from speculative import check_draft, check_proposal, emit, one_hot, pad_vocab, verify


# ----------------------------------------------------------------------------------------------
# The new ideas, part 1: where the cache budget goes, and how the draft samples

def largest_remainder(weights, total: int) -> list:
    """Integers >= 0 proportional to `weights` that sum to exactly `total`: floor every share,
    then give the leftover units to the largest fractional parts (ties: lower k first)."""
    shares = [total * w / sum(weights) for w in weights]
    ints = [math.floor(x) for x in shares]
    order = sorted(range(len(shares)), key=lambda i: (ints[i] - shares[i], i))
    for i in order[: total - sum(ints)]:
        ints[i] += 1
    return ints


def geometric_fan_out(budget: int, K: int, a: float, r: float) -> list:
    """Thm. 12: F_0..F_K for a budget of `budget` guesses per row. Maximizing
    sum_k P(k) p_hit(F_k) with p_hit(F) = 1 - F^-r under sum_k F_k = B gives F_k ~ P(k)^(1/(1+r)),
    P(k) = a^k (1-a) (k < K), a^K (k = K). At a -> 0 every guess goes to k = 0, at a -> 1 to
    k = K; a large r (a steep miss curve: few guesses already hit) flattens the schedule."""
    if budget < 1 or K < 1 or r <= 0 or not 0 <= a <= 1:
        raise ValueError(f"geometric fan-out needs budget >= 1, K >= 1, r > 0 and a in [0, 1]; "
                         f"got budget={budget}, K={K}, r={r}, a={a}.")
    if a <= 0 or a >= 1:  # the limits: all outcomes are k = 0, or all are k = K
        return [budget] + [0] * K if a <= 0 else [0] * K + [budget]
    e = 1.0 / (1.0 + r)
    weights = [a ** (k * e) for k in range(K)] + [a ** (K * e) * (1 - a) ** -e]
    return largest_remainder(weights, budget)


def uniform_fan_out(budget: int, K: int) -> list:
    """The same number of guesses for every k (ssd.py's F), rounded to sum to the budget."""
    return largest_remainder([1.0] * (K + 1), budget)


def saguaro_probs(logits, temperature, top_k, top_p, c: float, f: int, who="the draft"):
    """Def. 14: q' = q with its top-(f+1) tokens (ranked by logits, as ssd.predict_outcomes ranks
    them) scaled by c, renormalized. logits (..., V) -> q' (..., V). The cache bets on the top-f
    tokens other than the one drafted, so f+1 covers them whichever token is drafted. At
    temperature 0 q is one-hot on the top token and q' = q; if c = 0 leaves no mass, q' = q.
    ValueError naming `who` for NaN or inf logits (kernels.check_logits)."""
    q = kernels.probs_from_logits(logits, temperature, top_k, top_p, who)
    if c == 1.0 or f == 0:
        return q
    top = logits.topk(min(f + 1, logits.shape[-1]), dim=-1).indices
    scaled = q.scatter(-1, top, q.gather(-1, top) * c)
    mass = scaled.sum(-1, keepdim=True)
    return torch.where(mass > 0, scaled / mass.clamp_min(1e-30), q)


def saguaro_q(sampling, c: float, fanout: list):
    """q' as ssd.draft_branches' probs_fn: drafting step j (token y_{j+1}) uses f = F_j, because
    the next cache bets on the top-F_j tokens of q_{j+1}. sampling: (temperature, top_k, top_p)."""
    return lambda logits, j: saguaro_probs(logits, *sampling, c, fanout[j],
                                           f"the draft (in its process) at step {j + 1}")


# ----------------------------------------------------------------------------------------------
# The new ideas, part 2: the speed model (Thm. 7) and the batch-aware backup rule

def expected_tokens(a: float, K: int) -> float:
    """E = (1 - a^(K+1)) / (1 - a): tokens per round with i.i.d. acceptance a (bonus included)."""
    return K + 1.0 if a >= 1 else (1 - a ** (K + 1)) / (1 - a)


def predicted_speedup(p_hit, e_hit, e_miss, t_p, t_b, batch: int = 1, t_every=0.0,
                      t_answer=0.0) -> float:
    """Thm. 7 over AR, times in units of one target verify (= one AR step, memory-bound):
    [p_hit E_hit + (1 - p_hit) E_miss] / [max(1 + T_e, T_p) + T_a + (1 - P) T_b]: a round's
    verify and the draft's build of the next cache (T_p) overlap, a miss first waits for the
    backup (T_b); with b rows the batch waits when any row misses, so P = P(all hit) = p_hit^b
    (Sec. 4.3). The paper charges a miss round 1 + T_b, assuming the build hidden (T_p <= 1,
    where the two agree); here a miss round also waits for a build longer than the verify, as
    the loop does (the next answer comes after it). Ours, both 0 in the paper: T_e, the
    target's own work every round beside its verify (accepting; the fast backup's proposals,
    made before it knows who missed), and T_a, the answer's latency when the draft is ready
    (the outcome's trip, the lookup, q' back)."""
    all_hit = p_hit ** batch
    return (p_hit * e_hit + (1 - p_hit) * e_miss) / (max(1.0 + t_every, t_p) + t_answer +
                                                     (1 - all_hit) * t_b)


BUDGETS = (1, 2, 3, 4, 6, 8, 12, 16, 24)   # the budgets B the auto rule weighs (24: the paper's)
MARGIN = 0.05   # how much faster another budget must be predicted to be taken (model error)
SETTLE = 12     # verifies at a budget before the rule may leave it (a cold start's fade: 0.8^11)
EVERY, ENOUGH = (4, 16), 64   # rounds between samples beside the loop: until ENOUGH rows, after


class Estimates(measure.Measurements):
    """The rules, run on what measure.py measures online (a, r, hit rates, latencies): the
    fan-out schedules, Thm. 7's speed with each backup, and the choices of the backup, the
    budget B and Saguaro's C. budget, c: a number (fixed) or "auto" (chosen by the rules; the
    budget in use starts at 1 and C at 1 until the rules have seen a round)."""

    def __init__(self, K, budget, fan_out, backup, c=1.0, vocab=None):
        super().__init__()
        self.K, self.budget, self.fan_out, self.backup, self.c_rule = K, budget, fan_out, backup, c
        self.B = 1 if budget == "auto" else budget         # the budget in use
        self.c = 1.0 if c == "auto" else c                  # the C in use
        self.budgets = [b for b in BUDGETS if vocab is None or b < vocab]
        self.why = {"budget": f"--budget {budget}", "c": f"--saguaro-c {c}"}

    def every(self, what) -> int:
        """Rounds between two samples the rules take beside the loop, each of which costs the
        target's time: "c", the shadow evaluation of C (q sent twice, every candidate's q'_C;
        ~4 ms a round at b = 4, T = 1), and "fast", the fast backup's acceptance on a few rows.
        Every 4th round until ENOUGH rows were measured (an acceptance's standard error then
        ~0.03), then every 16th: the estimates are kept across calls, and acceptance barely
        drifts."""
        n = (min(s[3] for s in self.shadow.values()) if what == "c" else
             self.acc["fast"][1] - 2)   # less the prior's 2
        return EVERY[n >= ENOUGH]

    def p_hit(self, backup="jit"):
        """The long-run hit rate. JIT: every speculation is the draft's, p_d. Fast: a miss makes
        the next speculation a fast one, whose cache hits at p_f; the stationary hit share of
        that two-state chain is p_f / (1 - p_d + p_f)."""
        return self._p_hit(self.hit_rate("draft"), self.hit_rate("fast"), backup)

    @staticmethod
    def _p_hit(p_d, p_f, backup):
        return p_d if backup != "fast" else p_f / (1 - p_d + p_f)

    def schedule(self, budget, a):
        """F_0..F_K for `budget` guesses over a speculation whose acceptance is a."""
        if self.fan_out == "uniform":
            return uniform_fan_out(budget, self.K)
        return geometric_fan_out(budget, self.K, a, self.r())

    def fan_outs(self, backup):
        """(after a hit, after a miss): the cache built over a speculation bets on ITS outcome
        law, so the acceptance of whoever made that speculation sets the schedule."""
        a_miss = self.a("fast" if backup == "fast" else "draft")
        return self.schedule(self.B, self.a("draft")), self.schedule(self.B, a_miss)

    def hit_model(self, budget, a, anchor=False):
        """Thm. 12's objective: the hit rate of `budget` guesses spread by the schedule, with
        P(k) = a^k (1 - a) (k < K), a^K (k = K) and the fitted miss curve c F^-r per outcome.
        anchor: the model's miss rate scaled so that at the budget the draft's caches were
        looked up most at, it equals the miss rate measured there (the model gives the shape
        across budgets, the measurement its level)."""
        K, fan = self.K, self.schedule(budget, a)
        P = [a ** k * (1 - a) for k in range(K)] + [a ** K]
        p_hit = sum(P_k * (1 - self.miss(F)) for P_k, F in zip(P, fan))
        if not anchor or not self.hits_at:
            return p_hit
        b0, (hits, n) = max(self.hits_at.items(), key=lambda item: item[1][1])
        miss0 = 1 - self.hit_model(b0, a)
        return 1 - min(1.0, (1 - p_hit) * (1 - hits / n) / miss0) if miss0 > 0 else p_hit

    def t_p(self, budget=None):
        """Seconds of the draft's build of a cache of `budget` branches per row: the glue plus
        K tree steps at that width (measured cost line); budget None, or no tree timed yet:
        the measured build's mean."""
        verify = self.secs.get("verify", 1.0)
        step = None if budget is None else self.tree_step(budget)
        if step is None:
            return self.secs.get("build", verify)
        return self.secs.get("step", step) + self.K * step

    def _speed(self, p_d, p_f, a_d, t_p, backup, batch, verify=None):
        """Thm. 7's prediction for a draft whose caches hit at p_d (p_f after a fast backup),
        acceptance a_d and build time t_p (seconds), in units of a verify of `verify` seconds
        (default: the measured mean). Until the JIT backup has run, its latency is what it is
        made of, K tree steps of one branch per row (tree_step(1)), not K glue forwards (a glue
        after the fast backup decodes K tokens again, so that stand-in made the JIT look slow
        at large b, the rule kept the fast backup and never measured the JIT)."""
        verify = verify or self.secs.get("verify", 1.0)
        t_every = self.secs.get("accept", 0.0) / verify       # the target's own, every round
        t_answer = self.secs.get("answer", 0.0) / verify
        if backup == "fast":
            # the fast backup is ready when a row misses (no wait), but the target proposes for
            # every row every round, and after a round where a row took it the draft's glue
            # decodes that row's K tokens again (no KV to reuse): a longer next build
            p = self._p_hit(p_d, p_f, backup)
            t_p = t_p + (1 - p ** batch) * self.fast_glue_extra(p, batch)
            return predicted_speedup(p, expected_tokens(a_d, self.K),
                                     expected_tokens(self.a("fast"), self.K), t_p / verify, 0.0,
                                     batch, t_every + self.secs.get("fast", 0.0) / verify,
                                     t_answer)
        if "jit" in self.secs:
            t_b = self.secs["jit"]
        else:  # not run yet: no fit of the tree's cost line once the JIT is measured
            step = self.tree_step(1)
            t_b = self.K * (self.secs.get("step", t_p / (self.K + 1)) if step is None else step)
        e = expected_tokens(a_d, self.K)
        return predicted_speedup(p_d, e, e, t_p / verify, t_b / verify, batch, t_every, t_answer)

    def fast_glue_extra(self, p_hit, batch):
        """Seconds a build takes longer after a round where some row took the fast backup: the
        glue decodes those rows' K tokens again (the draft holds none of their KV), in one
        forward of the m rows that took it; of K + 1 tokens a row in place of one when all did.
        Measured (builds after such rounds against the others), else from the tree step's
        cost line: a step of width w reads w tokens a row, so m rows of K tokens are a step of
        width K m / b, with m / b = (1 - p) / (1 - p^b) the expected share given one row took
        it; at b = 1, K tree-step widths more than one. 0 before two widths were timed."""
        if "build_fast" in self.secs and "build" in self.secs:
            return max(0.0, self.secs["build_fast"] - self.secs["build"])
        if len(self.tree_points()) < 2 or p_hit >= 1:  # no cost line; or no row takes it
            return 0.0
        if batch == 1:
            return max(0.0, self.tree_step(self.K + 1) - self.tree_step(1))
        return self.tree_step(self.K * (1 - p_hit) / (1 - p_hit ** batch))

    def speed(self, backup, batch):
        """Thm. 7's prediction at the budget and C in use, from the measured hit rates."""
        return self._speed(self.hit_rate("draft"), self.hit_rate("fast"), self.a("draft"),
                           self.t_p(), backup, batch)

    def speed_at_budget(self, budget, backup, batch):
        """Thm. 7's prediction at another budget, in tokens per row per second: hit rates from
        the miss curve (hit_model), the build from the tree step's cost line, and the verify
        beside that build (verify_beside: the two processes contend, so budgets are compared
        in seconds, not in verifies of different lengths)."""
        verify = self.verify_beside(budget)
        return self._speed(self.hit_model(budget, self.a("draft"), anchor=True),
                           self.hit_model(budget, self.a("fast")), self.a("draft"),
                           self.t_p(budget), backup, batch, verify) / verify

    def speed_at_c(self, c, backup, batch):
        """Thm. 7's prediction had the draft sampled from q'_C: acceptance and the hit rate
        from the shadow evaluation (measure.learn_c; at k = K the bonus comes from p, so the
        miss curve gives its hit chance). None before any shadow round."""
        alpha, held, full, n = self.shadow[c]
        if n == 0:
            return None
        F_K = self.fan_outs(backup)[0][self.K]
        p_d = held / n + full / n * (1 - self.miss(F_K))
        return self._speed(p_d, self.hit_rate("fast"), alpha / n, self.t_p(self.B), backup, batch)

    def choose_budget(self, backup, batch):
        """The budget rule: if the candidate B of the highest predicted speed (with `backup`,
        at `batch` rows) beats the budget in use by MARGIN (the estimates are noisy: no
        switching on noise), move one candidate towards it, so that what each budget costs
        beside the verify is measured before the next step; and not before SETTLE verifies at
        the budget in use (a run's first rounds are slow, and a budget left early kept their
        mean: B = 1 then looked slower than B = 2 for the rest of the run). A fixed --budget
        stays. Sets self.B; returns it."""
        if self.budget != "auto" or not self.tree_points():  # no tree timed: nothing to weigh
            return self.B
        speeds = {b: self.speed_at_budget(b, backup, batch) for b in self.budgets}
        best = max(speeds, key=speeds.get)
        settled = self.verify_n.get(self.B, 0) >= SETTLE
        if settled and speeds[best] > (1 + MARGIN) * speeds.get(self.B, 0.0):
            i = min(range(len(self.budgets)), key=lambda i: abs(self.budgets[i] - self.B))
            self.B = self.budgets[i + (1 if best > self.B else -1)]
        self.why["budget"] = f"b={batch}, {backup}: predicted tokens/s per row " + ", ".join(
            f"B={b} {v:.3g}" for b, v in speeds.items())
        return self.B

    def choose_c(self, backup, batch, temperature):
        """Saguaro sampling's rule: the C of the highest predicted speed among
        measure.C_CANDIDATES (shadow evaluation); at temperature 0 q is one-hot and C changes
        nothing: 1. A fixed --saguaro-c stays. Sets self.c; returns it."""
        if self.c_rule != "auto":
            return self.c
        if temperature == 0:
            self.c, self.why["c"] = 1.0, "temperature 0: q is one-hot, C changes nothing"
            return self.c
        speeds = {c: self.speed_at_c(c, backup, batch) for c in measure.C_CANDIDATES}
        if None in speeds.values():
            return self.c
        self.c = max(speeds, key=speeds.get)
        self.why["c"] = f"b={batch}, {backup}: predicted " + ", ".join(
            f"C={c} {v:.2f}x" for c, v in speeds.items())
        return self.c

    def choose_backup(self, batch, lost=None):
        """The batch-aware rule: the backup with the higher predicted speed at this batch size
        (the fast one alone once the draft is lost). Returns (backup, why)."""
        if lost:
            return "fast", f"draft lost ({lost}): fast backup"
        if self.backup != "auto":
            return self.backup, f"--backup {self.backup}"
        s_jit, s_fast = self.speed("jit", batch), self.speed("fast", batch)
        return ("fast" if s_fast > s_jit else "jit"), (f"b={batch}: predicted {s_jit:.2f}x "
                                                        f"with JIT, {s_fast:.2f}x with fast")

    def b_star(self, limit=4096):
        """The critical batch size: the smallest b at which the fast backup's predicted speed
        beats the JIT backup's (None: not up to `limit`)."""
        return next((b for b in range(1, limit + 1)
                     if self.speed("fast", b) > self.speed("jit", b)), None)

    def summary(self, stats, batch, why):
        """For generate's stats: the figures above, at the backup the rule picks for `batch`
        rows, the rules' reasons `why` (as self.why, at the batch generate chose), and the
        measured speedup: decoded tokens per row per target verify."""
        choice, verify = self.choose_backup(batch)[0], self.secs.get("verify")
        fan_hit, fan_miss = self.fan_outs(choice)
        verifies = stats["decode_s"] / verify if verify else 0.0    # decode time, in verifies
        per_row = (stats["new_tokens"] - batch) / batch             # the first came at prefill
        return dict(a=self.a("draft"), a_fast=self.a("fast"), r=self.r(), p_hit=self.p_hit(choice),
                    b_star=self.b_star(), fan_out_hit=fan_hit, fan_out_miss=fan_miss,
                    budget=self.B, budget_why=why["budget"], saguaro_c=self.c,
                    c_why=why["c"],
                    predicted_speedup=self.speed(choice, batch),
                    measured_speedup=per_row / verifies if verifies > 0 else None)


# ----------------------------------------------------------------------------------------------
# The new ideas, part 3: the draft side, in its own process

class DraftSide:
    """The draft process's state for one generation (draft_process.py runs it): its KV cache
    (the trunk: prompt + emitted tokens, then the glue of the speculation being verified) and
    the speculation cache S built for that speculation. answer(Round) answers at once; work()
    then builds the next cache while the target verifies."""

    def __init__(self, draft, start: Start):
        self.draft, self.K, self.V, self.c = draft, start.K, start.vocab, start.c
        self.sampling = (start.temperature, start.top_k, start.top_p)
        self.gen = kernels.make_generator((start.seed + 1) % kernels.SEED_LIMIT,  # its own coins
                                          draft.device)
        self.seed, self.race_vocab = start.seed, start.race_vocab
        self.cache = draft.new_cache(len(start.prompts), start.max_len)
        logits = draft.prefill(start.prompts, self.cache)[:, : self.V]          # (B, V)
        self.trunk = self.cache.lengths.clone()   # (B,) the trunk before the last glue
        self.S = self.spec = self.glue = self.ranks = self.prefix = self.next = None
        self.build_s = self.glue_s = 0.0
        self.tree_s = {w: self.time_tree(w) for w in start.time_widths} or None
        self.first = self.draft_first(logits)   # while the target reads the prompts too

    def draft_first(self, logits):
        """The first speculation, drafted during the prefill (after the tree timing, which
        writes where it does): a guess of the target's first token (the draft's argmax; at
        temperature > 0 its race winner q / E when the bonus is coupled, else its top token),
        then a JIT draft from it, plain q (no schedule exists yet: any q is exact if reported).
        Returns (guess (B,), y (B, K), q (B, K, V), logits): the first Round's answer if the
        guess is the target's token."""
        q = kernels.probs_from_logits(logits, *self.sampling, "the draft (in its process) "
                                      "after the prompt")
        if self.race_vocab:   # the target draws its first token by the same race
            guess = kernels.sample(q, clocks=self.clocks(self.trunk))  # at len(prompt)
        else:
            guess = logits.argmax(-1)
        every = torch.ones_like(guess, dtype=torch.bool)
        return guess, *self.jit_draft(guess, [0] * self.K, every, c=1.0)

    def time_tree(self, width):
        """Seconds of one tree step at `width` branches per row, timed once on a throwaway
        tree at the trunk's end (its own coins: the draft's stream stays as it was); for the
        budget rule before the loop has built trees of that width."""
        first = self.trunk[:, None].new_zeros(len(self.trunk), width).long()
        fork = self.cache.lengths[:, None].long().expand(-1, width)
        q_fn, seconds = saguaro_q(self.sampling, 1.0, [0] * self.K), []
        for _ in range(2):  # the faster of two: the first call may pay a one-off (a warm-up)
            tick = time.perf_counter()
            ssd.draft_branches(self.draft, self.cache, fork, first, self.K, q_fn,
                               kernels.make_generator(0, self.draft.device), self.V)
            kernels.sync(self.draft.device)
            seconds.append((time.perf_counter() - tick) / self.K)
        return min(seconds)

    def answer(self, msg: Round) -> Answer:
        """1) keep t0, x_1..x_k of the last glue (nothing before the first round, k = -1); 2) look
        (k, t) up in S; 3) a miss takes the backup the target chose: the JIT (K draft steps now,
        on the rows that missed only) or the fast backup's speculation, which came with the
        Round; 4) note where the draft already holds each row's KV and logits of t,
        y_1..y_{K-1} (the hit branch's scratch slots, or the trunk where the first speculation
        or the JIT decoded): the glue reuses them; a row the fast backup served is decoded
        again (decode_rows), all rows in one forward when every live row took it."""
        dev, B, K = self.draft.device, len(msg.k), self.K
        self.c = self.c if msg.c is None else msg.c   # the rule may move C between rounds
        k, t, live = msg.k.to(dev), msg.t.to(dev), msg.live.to(dev)
        self.cache.lengths.copy_(torch.where(live, self.trunk + k + 1, self.trunk))
        forwards, jit_s = 1 + K, 0.0                      # the build after this answer: glue + K
        steps, rows = torch.arange(K, device=dev), torch.arange(B, device=dev)
        held = self.cache.lengths[:, None].long() + steps  # (B, K) where the KV of t, y.. lies
        hit, rank = torch.zeros(B, dtype=torch.bool, device=dev), torch.full((B,), -1, device=dev)
        y = torch.zeros(B, K, dtype=torch.long, device=dev)
        q = torch.zeros(B, K, self.V, device=dev)
        logits_y = torch.zeros(B, K, self.V, device=dev)  # behind q: the glue reuses them
        if self.S is not None:
            hit, branch = self.S.find(k, t)          # as S.lookup, keeping the branch
            y, q, logits_y = (x[rows, branch] for x in (self.S.tokens, self.S.probs, self.S.logits))
            N, base = self.S.keys.shape[1], self.trunk + K + 1
            rank = measure.bonus_rank(self.ranks, self.spec, k, t)       # for r
            timeline.lookup(int((hit & live).sum()), int(live.sum()))
            # ssd's tree keeps branch n's step-j KV at base + j N + n
            held = torch.where(hit[:, None], base[:, None].long() + steps * N + branch[:, None],
                               held)
        elif self.first is not None:   # the first round: the speculation drafted in prefill,
            guess, y, q, logits_y = self.first                     # in place at the trunk end
            hit, self.first, forwards = live & (guess == t), None, forwards + K
        miss = live & ~hit
        source = torch.where(hit, HIT, JIT if msg.backup == "jit" else FAST)
        if msg.backup == "fast":  # its q stays with the target; the draft holds none of its KV
            y = torch.where(hit[:, None], y, msg.fast.to(dev))
        elif bool(miss.any()):
            tick = time.perf_counter()
            y_jit, q_jit, logits = self.jit_draft(t, msg.fan_miss, miss)  # in place, as first
            y, q = torch.where(miss[:, None], y_jit, y), torch.where(miss[:, None, None], q_jit, q)
            logits_y = torch.where(miss[:, None, None], logits, logits_y)
            jit_s, forwards = timeline.span("jit", tick, "draft"), forwards + K
        # the fast backup's rows: the draft holds none of their KV, so the glue decodes them
        # again; when every live row took it, one forward of K + 1 tokens does (no reuse)
        redo = miss & (source == FAST)
        every = bool(redo.any()) and bool((redo | ~live).all())
        self.prefix = None if every else (held, logits_y, redo)
        self.next = (t, y, source, msg.fan_hit, msg.fan_miss)
        greedy, width = self.sampling[0] == 0, 0 if self.S is None else self.S.keys.shape[1]
        q_plain = (kernels.probs_from_logits(logits_y, *self.sampling)
                   if msg.shadow and not greedy else None)
        tree_s, self.tree_s = self.tree_s, None   # sent once
        return Answer(source.cpu(), y.cpu(), rank.cpu(), None if greedy else q,
                      self.build_s, jit_s, self.glue_s, forwards, width=width, tree_s=tree_s,
                      q_plain=q_plain)

    def jit_draft(self, t, fanout, rows, c=None):
        """The JIT backup for the rows `rows` (B,) bool (q' with C = c, default the round's):
        ssd's tree with one branch per row, forked at the trunk's end: its scratch slots are
        then the trunk's next K slots, so the KV of t, y_1..y_{K-1} lands where the glue will
        want it. When only some rows missed, it
        decodes those rows alone (KVCache.take_rows: a CPU forward costs per row) and leaves the
        others' slots, where a hit branch's KV may lie, untouched. Returns y (B, K), their q'
        (B, K, V) and the logits behind q' (zeros in the other rows)."""
        q_fn, B, K = saguaro_q(self.sampling, self.c if c is None else c, fanout), len(t), self.K
        some = torch.nonzero(rows)[:, 0] if not bool(rows.all()) else None
        cache = self.cache if some is None else self.cache.take_rows(
            some, int(self.cache.lengths[some].max()) + K)
        first = (t if some is None else t[some])[:, None]
        fork = cache.lengths[:, None].long()
        y, q, logits = ssd.draft_branches(self.draft, cache, fork, first, K, q_fn, self.gen,
                                          self.V)
        if some is None:
            return y[:, 0], q[:, 0], logits[:, 0]
        self.cache.put_rows(cache, some, fork + torch.arange(K, device=fork.device))
        out = [x.new_zeros((B,) + x.shape[2:]) for x in (y, q, logits)]
        for whole, part in zip(out, (y, q, logits)):
            whole[some] = part[:, 0]
        return out

    def work(self):
        """After the answer, while the target verifies: ssd.py's step 2b over the speculation
        answered, s = (t, y_1..y_K): the glue (a forward, or reuse_branch), then
        ssd.build_speculation_cache with each row's schedule (after a hit or after a miss),
        sampling from Saguaro's q'. A branch's speculation is used only after a hit, so q'
        follows the after-a-hit schedule."""
        (t, y, source, fan_hit, fan_miss), tick = self.next, time.perf_counter()
        self.trunk = self.cache.lengths.clone()
        if self.prefix is not None:
            held, logits_y, redo = self.prefix
            if bool(redo.any()):
                logits_y = self.decode_rows(torch.cat((t[:, None], y[:, :-1]), 1), redo, logits_y)
            glue = reuse_branch(self.draft, self.cache, held, logits_y, y)
        else:
            glue_in = torch.cat((t[:, None], y), 1).clamp_max(self.draft.cfg.vocab_size - 1)
            glue = self.draft(glue_in, self.cache)                           # (B, K+1, V_draft)
        self.glue, self.spec = glue[..., : self.V], y
        self.glue_s = timeline.span("glue", tick, "draft")
        self.ranks = self.race_ranks() if self.race_vocab else self.glue
        fanouts = [fan_hit if s == HIT else fan_miss for s in source.tolist()]
        self.S = ssd.build_speculation_cache(self.draft, self.cache, self.ranks, y, fanouts,
                                             saguaro_q(self.sampling, self.c, fan_hit), self.gen,
                                             vocab=self.V)
        self.build_s = timeline.span("build", tick, "draft")

    def decode_rows(self, tokens, rows, logits):
        """The glue's part for the rows `rows` (B,) bool that took the fast backup while others
        hit: one forward of their K tokens t, y_1..y_{K-1} alone (KVCache.take_rows), writing
        their KV at the trunk's next K slots, where reuse_branch expects it (the other rows'
        KV is reused, not decoded again: a CPU forward costs per token). tokens (B, K);
        logits (B, K, V) the others' (the hit branches'). Returns logits with theirs in."""
        some, K = torch.nonzero(rows)[:, 0], tokens.shape[1]
        part = self.cache.take_rows(some, int(self.cache.lengths[some].max()) + K)
        fork = part.lengths[:, None].clone()   # the forward moves lengths on
        out = self.draft(tokens[some].clamp_max(self.draft.cfg.vocab_size - 1), part)
        self.cache.put_rows(part, some, fork + torch.arange(K, device=fork.device))
        logits = logits.clone()
        logits[some] = out[..., : logits.shape[-1]]
        return logits

    def clocks(self, positions):
        """The target's race clocks (kernels.race_clocks) for each row's draw at token
        positions (B,), cut to the vocabulary the two models share."""
        return kernels.race_clocks(self.seed, range(len(positions)), positions.tolist(),
                                   self.race_vocab, self.draft.device)[:, : self.V]

    def race_ranks(self):
        """What ssd.predict_outcomes ranks the guesses by, (B, K+1, V): the glue's logits, but at
        k = K the draft's q_{K+1} / E with the target's race clocks E for that position (the
        coupled bonus, idea 7): its top guess is the token the target's race gives when p = q.
        Row b's bonus after k accepted lands at token len(row) + k = trunk + 1 + k."""
        q = kernels.probs_from_logits(self.glue[:, self.K], *self.sampling)     # (B, V)
        ranks = self.glue.to(torch.float64, copy=True)  # only its order is read
        ranks[:, self.K] = q.double() / self.clocks(self.trunk + 1 + self.K)  # kernels.sample's
        return ranks


def reuse_branch(draft, cache, slots, logits, y):
    """NEW in this file: the glue without redoing it. After a hit, the hit branch drafted y from
    t in the tree: it already wrote the draft's KV for t, y_1..y_{K-1} (in its scratch slots
    base + j*N + branch at step j) and computed the logits after each of them; after a JIT
    backup, the JIT did the same in the trunk. slots (B, K): where that KV is; logits (B, K, V).
    Copy the KV to the trunk (cache.lengths .. + K - 1), so only y_K needs a forward: 1 token
    instead of K + 1. Returns the glue logits (B, K+1, V): after t, y_1, ..., y_K."""
    B, K = y.shape
    rows = torch.arange(B, device=y.device)[:, None]
    dst = cache.lengths[:, None].long() + torch.arange(K, device=y.device)  # (B, K) trunk slots
    for kv in (cache.k, cache.v):                                        # (L, B, S, Hk, D)
        kv[:, rows, dst] = kv[:, rows, slots]                           # a gather: no overlap
    cache.positions[rows, dst] = cache.positions[rows, slots]  # a sliding window reads them
    cache.lengths += K
    last = draft(y[:, -1:].clamp_max(draft.cfg.vocab_size - 1), cache)  # (B, 1, V): after y_K
    return torch.cat((logits, last[..., : logits.shape[-1]]), 1)


class DraftWorker(draft_process.DraftWorker):
    """The draft process, running DraftSide (arguments: draft_process.DraftWorker). Start it
    once, use it for many generate() calls; `estimates` keeps what the rules learned per setting:
        with saguaro.DraftWorker("default", target) as worker:
            tokens, stats = saguaro.generate(target, ids, 64, draft=worker)"""
    side = DraftSide


def serve_fast(fast, rows, asked, K, temperature, gen, V, est, stats):
    """The fast backup (Sec. 4.3): its speculation for the `asked` rows (B,) bool: tokens (B, K)
    and the q (B, K, V) they were drawn from (zeros in the other rows). Its seconds go to
    stats["fast_backup_s"] and to the rule's latency estimate."""
    tick, ask = time.perf_counter(), torch.nonzero(asked)[:, 0].tolist()
    tokens, q = torch.zeros(len(rows), K, dtype=torch.long), None
    if ask:
        x, qx = fast.propose([rows[b] for b in ask], K, temperature, gen)
        check_proposal(fast, x, qx, len(ask), K)  # before its ids reach the draft or verify
        x, qx = x.cpu(), pad_vocab(qx.cpu().float(), V)
        if len(ask) == len(rows):  # every row (the fast backup's rounds): its arrays as they are
            tokens, q = x, qx
        else:
            tokens[ask], q = x, torch.zeros(len(rows), K, V)
            q[ask] = qx
        est.time("fast", timeline.span("fast backup", tick))
    stats["fast_backup_s"] += time.perf_counter() - tick
    return tokens, (torch.zeros(len(rows), K, V) if q is None else q)


# ----------------------------------------------------------------------------------------------
# The loop: ssd.py's round, with the draft's half running in the draft process

@draft_process.beside(DraftWorker, check=harness.check_saguaro)
@torch.inference_mode()
def generate(target, prompt_ids, max_new_tokens, *, draft=None, k=4, f=None, temperature=0.0,
             top_k=None, top_p=None, seed=0, eos=True, fan_out="geometric", saguaro_c="auto",
             backup="auto", budget=None, fast_backup=None, couple_bonus=True):
    """prompt_ids: a list of token ids, or a batch of them (ragged is fine). draft: a running
    DraftWorker, or what it takes (then one is started for this call; process options:
    draft_process.beside). k: K; budget: B per row per round, or "auto" (the budget rule,
    Estimates.choose_budget); f: guesses per k, B = (K+1) f when no budget is given; neither:
    "auto", as the CLIs (a user who sets nothing gets the rules); saguaro_c: C, default "auto"
    (Estimates.choose_c);
    backup: auto (the batch-aware rule) | jit | fast; fast_backup: a proposer
    (default drafts.fast_backup). seed: both processes' coins (reused worker: DraftWorker.reset).
    couple_bonus: at temperature > 0 the bonus is a race both processes' clocks share (idea 7).
    Returns (tokens, stats) as ssd.generate; stats add backup_used (row-rounds), backup_why (at
    the widest batch, or why the draft was lost), b_star, a, a_fast, r, p_hit, fan_out_hit/_miss,
    budget and saguaro_c (in use at the end) with budget_why and c_why (the rule's predicted
    speed per candidate, at the widest batch as backup_why), predicted_speedup (Thm. 7),
    measured_speedup (tokens per row per target verify), draft_wait_s, draft_lost (why) and
    couple_bonus (whether the bonus raced)."""
    prompts = harness.as_batch(prompt_ids)  # checked by harness.check_saguaro, before the draft
    K, budget = k, harness.saguaro_budget(budget, k, f)
    seed = kernels.check_seed(seed)   # None is 0, as in every loop
    max_len = harness.check_request(target, prompts, max_new_tokens, room=K,  # verify overshoot
                                    draft=draft)
    B, dev, Vt = len(prompts), target.device, target.cfg.vocab_size
    Vc = min(Vt, draft.vocab_size)  # ids past the common vocabulary are padding: q is cut to Vc
    gen = kernels.make_generator(seed, dev)
    eos_ids = set(target.cfg.eos_token_ids) if eos else set()
    fast = fast_backup or drafts.fast_backup(target, prompts)
    check_draft(target, fast, K)  # a proposer over the target's vocabulary
    race = couple_bonus and temperature > 0   # at temperature 0 the bonus is p's argmax
    settings = (K, budget, fan_out, backup, B, temperature, top_k, top_p, saguaro_c, race)
    est = draft.estimates.setdefault(settings, Estimates(K, budget, fan_out, backup, saguaro_c,
                                                         Vc))  # learned, kept across calls
    widths = est.budgets if budget == "auto" else [budget]
    to_time = tuple(w for w in sorted({widths[0], widths[len(widths) // 2], widths[-1]})
                    if budget == "auto" and w not in est.tree_points())   # the line's first points
    stats = harness.new_stats(K)
    stats.update(hits_by_k=[0] * (K + 1), lookups_by_k=[0] * (K + 1), verify_s=0.0,
                 cache_build_s=0.0, jit_draft_s=0.0, fast_backup_s=0.0, draft_wait_s=0.0,
                 backup_used={"jit": 0, "fast": 0}, backup_why=None)
    rows = [list(p) for p in prompts]   # prompt + tokens emitted so far, per row
    done = [False] * B

    # 1) prefill: the target gives the first token; the draft reads the prompts too
    t0 = time.perf_counter()
    draft.exchange(Start(prompts, K, Vc, max_len + 1 + K * max(widths), temperature, top_k,
                         top_p, est.c, seed, Vt if race else 0,
                         time_widths=to_time))  # first: the draft prefills
    cache = target.new_cache(B, max_len)
    logits = target.prefill(prompts, cache)                               # (B, V)
    # NEW: with the bonus coupled the first token is a race too (at len(prompt)), so the
    # draft's first speculation, drafted from its guess of it, can hit
    clocks = kernels.race_clocks(seed, range(B), list(map(len, prompts)), Vt, dev) if race else None
    token = kernels.next_token(logits, temperature, top_k, top_p, gen, "the target's prefill",
                               clocks).tolist()  # (B,)
    for b in range(B):
        done[b] = emit(rows[b], [token[b]], max_new_tokens, eos_ids)
    draft.exchange(Sync())  # prefill ends once both hold the prompts (as in speculative.py)
    kernels.sync(dev)
    stats["prefill_s"] = timeline.span("prefill", t0)

    # 2) decode: per round, the target verifies a speculation while the draft prepares the next
    t0 = time.perf_counter()
    accepted = 0
    widest = 0                          # the most live rows a round has had
    outcome = torch.full((B,), -1)      # (B,) k of the last round; -1: no round yet
    made = torch.full((B,), HIT)        # (B,) who made the last round's speculation
    reasons = dict(est.why)
    while not all(done):
        # 2a) NEW: the speculation x_1..x_K with q_1..q_K comes from the draft process: it gets
        # the outcome (k, t) and answers at once from the cache it built during the last verify
        # (a hit) or, for a miss, with the backup the batch-aware rule picks: JIT drafting there,
        # or the fast backup, run here and sent along (auto mode: also on a few shadow rows).
        last = torch.tensor([r[-1] for r in rows], device=dev)
        live = ~torch.tensor(done)
        b_live = int(live.sum())
        choice, why = est.choose_backup(b_live, draft.lost)
        if draft.lost or b_live >= widest:  # the reason at the full batch (or the loss) is kept
            stats["backup_why"], widest = why, b_live
        est.choose_budget(choice, b_live)               # NEW: B, C per round, from the estimates
        c = est.choose_c(choice, b_live, temperature)
        if b_live == widest:  # the rules' reasons at the widest batch, as backup_why's
            reasons = dict(est.why)
        shadow = (saguaro_c == "auto" and temperature > 0
                  and stats["target_calls"] % est.every("c") == 1)
        fan_hit, fan_miss = est.fan_outs(choice)
        # the fast backup proposes for every row when it is the backup; for the rule's estimate
        # of its acceptance, on up to 4 rows every few rounds otherwise (not every round: its
        # proposals are the target's time)
        sample_fast = backup == "auto" and stats["target_calls"] % est.every("fast") == 2
        asked = live & ((choice == "fast") | (sample_fast & (live.cumsum(0) <= 4)))
        fast_tokens, fast_probs = serve_fast(fast, rows, asked, K, temperature, gen, Vt, est, stats)
        tick = time.perf_counter()
        answer = draft.exchange(Round(outcome, last, live, choice, fan_hit, fan_miss, fast_tokens,
                                      c, shadow))
        if answer is None:
            continue  # the draft was lost just now: this round again, all on the fast backup
        if answer.forwards:  # the draft's own answer (a lost draft's stand-in: no wait, no news)
            wait_s = timeline.span("wait for draft", tick)
            stats["draft_wait_s"] += wait_s
            est.learn_answer(wait_s, tick, answer.ready_at, answer.jit_s)
            est.learn_from_draft(answer, live, first_round=bool(outcome.min() < 0),
                                 after_fast=bool((live & (made == FAST)).any()))
        source, draft_tokens = answer.source, answer.tokens.to(dev)        # (B,), (B, K)
        draft_probs = pad_vocab(one_hot(draft_tokens, Vc) if answer.probs is None  # greedy
                                else answer.probs.to(dev), Vt)             # (B, K, Vt) their q
        from_fast = live & (source == FAST)
        draft_probs[from_fast] = fast_probs[from_fast].to(dev)
        for name, code in (("jit", JIT), ("fast", FAST)):
            stats["backup_used"][name] += int((live & (source == code)).sum())

        # 2b) NEW: the draft process now builds the cache for this speculation's outcomes
        # (DraftSide.work: ssd.py's step 2b), while this process verifies it (2c)
        stats["draft_calls"] += answer.forwards
        stats["cache_build_s"] += answer.build_s
        stats["jit_draft_s"] += answer.jit_s

        # 2c) verify: one target forward over [last token, x_1..x_K] gives p_1..p_{K+1}; a
        # draft id the target lacks (p = 0 there: always rejected) is fed as a stand-in.
        # Finished rows ride along unchanged (some never had a speculation): any q will do
        tick = time.perf_counter()
        draft_probs[~live] = one_hot(draft_tokens[~live], Vt)
        tokens_in = torch.cat((last[:, None], draft_tokens.clamp_max(Vt - 1)), 1)  # (B, K+1)
        logits = target(tokens_in, cache)                                   # (B, K+1, Vt)
        p = kernels.probs_from_logits(logits, temperature, top_k, top_p,
                                      f"the target's verify in round {stats['target_calls'] + 1}")
        bonus_race = (lambda n: kernels.race_clocks(  # NEW: row b's bonus lands at len + n
            seed, range(B), [len(r) + int(m) for r, m in zip(rows, n)], Vt, dev)) if race else None
        n_accepted, bonus = verify(p, draft_probs, draft_tokens, gen, bonus_race)
        stats["target_calls"] += 1
        kernels.sync(dev)
        verify_s = timeline.span("verify", tick)
        est.time("verify", verify_s, keep=bool(outcome.min() >= 0))  # not a call's first
        est.learn_verify(est.B, verify_s, keep=bool(outcome.min() >= 0))  # beside a B-tree
        stats["verify_s"] += verify_s

        # 2d) accept: each live row emits x_1..x_k and the bonus t (truncated at EOS or at
        # max_new_tokens), then rolls both caches back to keep KV through x_k: t is fed
        # next round (the draft process rolls its own when (k, t) reaches it). NEW: the rules
        # learn the hit rates and the acceptance of the draft and of the fast backup.
        tick = time.perf_counter()
        n_accepted, bonus, x = n_accepted.tolist(), bonus.tolist(), draft_tokens.tolist()
        hit, k_last = (source == HIT).tolist(), outcome.tolist()
        for b in range(B):
            if done[b]:
                continue
            n = n_accepted[b]
            stats["accept_counts"][n] += 1
            stats["rows_verified"] += 1
            accepted += n
            room = max_new_tokens - (len(rows[b]) - len(prompts[b]))
            done[b] = emit(rows[b], x[b][:n] + [bonus[b]], room, eos_ids)
            if not draft.lost and k_last[b] >= 0:  # the first round had no cache to hit
                stats["lookups_by_k"][k_last[b]] += 1
                stats["hits_by_k"][k_last[b]] += hit[b]
                est.learn_hit(hit[b], made[b] == FAST, answer.width)
        cache.lengths.copy_(torch.tensor([len(r) - 1 for r in rows]))
        est.learn_acceptance(p, draft_probs, live & ~from_fast, from_fast, asked & ~from_fast,
                             fast_probs.to(dev))
        if answer.q_plain is not None:  # the shadow of C; a cached q' may date from an older
            # schedule than fan_hit, which stands in for it (an estimate, not the law)
            est.learn_c(p, pad_vocab(answer.q_plain.to(dev), Vt), draft_tokens, fan_hit,
                        live & ~from_fast)
        outcome, made = torch.tensor(n_accepted), source
        est.time("accept", timeline.span("accept", tick))
    draft.exchange(End())
    kernels.sync(dev)
    stats["decode_s"] = time.perf_counter() - t0
    if stats["rows_verified"]:
        stats["acceptance_rate"] = accepted / (K * stats["rows_verified"])

    # 3) hand back each row's tokens
    tokens = [r[len(prompt):] for r, prompt in zip(rows, prompts)]
    stats = harness.finish_stats(stats, tokens)
    stats.update(est.summary(stats, B, reasons), draft_lost=draft.lost, couple_bonus=race)
    return tokens, stats


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_common_args(ap, tp=True)
    ap.add_argument("--draft", default="default", type=harness.draft_name,
                    help=drafts.DRAFT_HELP)
    ap.add_argument("--k", type=harness.positive_int, default=4, help="draft tokens per round (K)")
    ap.add_argument("--f", type=harness.positive_int, default=None,
                    help="guesses per k: B = (K+1) f, in place of the budget rule")
    harness.add_saguaro_args(ap, budget=None, saguaro_c="auto")   # None: auto, or --f's B
    ap.add_argument("--prompt", required=True, type=harness.prompt_text)
    args = ap.parse_args()
    if args.f and args.budget is not None:
        ap.error(f"--f {args.f} sets B = (K+1) f and --budget {args.budget} sets B: give one")
    args.threads, draft_threads = draft_process.split_threads(args.threads)
    target, _ = harness.load_models(args)  # --tp N: this rank's shard (tp.py)
    ids = kernels.encode_prompt(target, args.prompt)

    def run(target):  # --tp N: on rank 0, beside the draft process, while the others follow
        with DraftWorker(args.draft, target, device=tp.draft_device(args, target),
                         threads=draft_threads, timeout_s=args.timeout) as w:
            return harness.after_warm_up(lambda n: generate(
                target, ids, n, draft=w, k=args.k, f=args.f, fan_out=args.fan_out,
                saguaro_c=args.saguaro_c, backup=args.backup, temperature=args.temperature,
                top_k=args.top_k, top_p=args.top_p, seed=args.seed, budget=args.budget,
                couple_bonus=args.couple_bonus),
                args.max_new_tokens, trace=args.trace)
    tokens, stats = tp.led(run, target)
    harness.report(target, tokens, stats, "tau", "hit_rate", "a", "r", "fan_out_hit",
                   "fan_out_miss", "backup_used", "backup_why", "budget", "budget_why",
                   "saguaro_c", "c_why", "predicted_speedup",
                   "measured_speedup")  # both speedups: tokens per row per target verify


if __name__ == "__main__":
    harness.cli(main)
