"""measure.py: what saguaro.py's rules run on, measured online while it decodes.

saguaro.py spends its cache budget (geometric fan-out, Thm. 12) and picks its backup (the speed
model, Thm. 7; the batch-aware rule, Sec. 4.3) from figures it cannot know in advance: the
acceptance a of the draft and of the fast backup, the hit rates of the caches built over each
one's speculations, the miss curve 1 - p_hit(F) = c F^-r, latencies (the cost of a tree step
against its width among them) and, for Saguaro sampling's C, what each candidate C would give
(a shadow evaluation on the p and q rows of each verify). This file measures them; the rules
stay in saguaro.py (its Estimates extend Measurements).
"""
import statistics

import torch

C_CANDIDATES = (1.0, 0.7, 0.5, 0.3)   # Saguaro's C the auto rule weighs


class Measurements:
    """Online estimates (each prior: two observations of 0.5): acceptance a of the draft (cache
    and JIT speculations: one network, one q') and of the fast backup, the hit rates of caches
    built over each one's speculations, the ranks of the true bonus among the draft's guesses
    (for r), and latencies in seconds (running means: verify, build, step, jit, fast)."""

    def __init__(self):
        self.acc = {"draft": [1.0, 2.0], "fast": [1.0, 2.0]}    # [sum, count] per proposer
        self.hits = {"draft": [1.0, 2.0], "fast": [1.0, 2.0]}   # [hits, lookups] per proposer
        self.rank_counts, self.secs = torch.zeros(65), {}
        self.tree = {}    # width (branches per row) -> running mean seconds of one tree step
        self.tree_alone = {}  # width -> seconds of one tree step timed at a Start, not beside
        #                       a verify (the cost line charges it the slowdown seen in the loop)
        self.verify_at = {}   # budget B -> running mean seconds of a verify beside its build
        self.verify_n = {}    # budget B -> how many verifies that mean has seen
        self.hits_at = {}     # budget B -> [hits, lookups] of the draft's caches of B branches
        self.ranks_seen = 0
        self.curve = (None, None, None)  # (ranks_seen at the fit, (c, r), ranks >= F per F)
        self.shadow = {c: [0.0, 0.0, 0.0, 0] for c in C_CANDIDATES}  # see learn_c

    def a(self, who) -> float:
        """The acceptance of "draft" or "fast": the mean of alpha_i over its proposals."""
        return self.acc[who][0] / self.acc[who][1]

    def hit_rate(self, who) -> float:
        """The hit rate of caches built over speculations made by "draft" or "fast"."""
        return self.hits[who][0] / self.hits[who][1]

    def miss_curve(self):
        """(c, r) of 1 - p_hit(F) = c F^-r: a least-squares line in log-log over the fan-outs
        a budget can give, F = 1..32 (up to the largest F some measured rank reached), on the
        measured ranks plus one prior observation that follows F^-1. The prefactor c is fitted
        too, because the measured curves are not a pure power law (the paper's neither).
        r capped to [0.05, 8], c to (0, 1] (c is the miss at F = 1)."""
        if self.curve[0] == self.ranks_seen:  # the rules ask many times a round: fit once
            return self.curve[1]
        tail = self.rank_counts.flip(0).cumsum(0).flip(0).double()   # [F]: ranks >= F
        at_least = tail[1:33]
        top = max(2, int((at_least > 0).sum()))
        F = torch.arange(1, top + 1, dtype=torch.float64)
        x = F.log()
        y = ((at_least[:top] + F ** -1.0) / (self.rank_counts.sum() + 1)).log()
        slope = ((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum()
        r = float((-slope).clamp(0.05, 8.0))
        fit = min(1.0, float((y.mean() + r * x.mean()).exp())), r
        self.curve = (self.ranks_seen, fit, tail.tolist())
        return fit

    def r(self) -> float:
        """The miss curve's exponent r (miss_curve)."""
        return self.miss_curve()[1]

    def miss(self, F: int) -> float:
        """1 - p_hit(F) for F guesses at one outcome: the share of measured ranks >= F, with
        the fit's prior observation (F^-1); past the ranks counted, the fitted curve c F^-r.
        The budgets' fan-outs are small F, where a line in log-log misses the curve's bend:
        there the ranks themselves say it (F = 0: 1)."""
        c, r = self.miss_curve()
        if F < 1 or F > 64:
            return 1.0 if F < 1 else min(1.0, c * F ** -r)
        tail = self.curve[2]
        return min(1.0, (tail[F] + F ** -1.0) / (tail[0] + 1))

    def learn_from_draft(self, answer, live, first_round, after_fast=False):
        """The draft process's Answer: ranks of the true bonus (for r), its latencies, the
        seconds of a tree step at the width its build used (and at the widths it timed once).
        after_fast: the build followed a round where some row took the fast backup (its glue
        decoded that row's K tokens again): kept apart, as "build_fast"."""
        for rank in answer.rank[live & (answer.rank >= 0)].tolist():
            self.rank_counts[min(rank, 64)] += 1
            self.ranks_seen += 1
        if after_fast and not first_round:
            self.time("build_fast", answer.build_s)
        elif not first_round:  # the first round had no cache built before it
            self.time("build", answer.build_s)
            self.time("step", answer.glue_s)
            if answer.width:  # the build's tree: K steps of `width` branches per row
                K = answer.tokens.shape[1]
                self.learn_tree(answer.width, (answer.build_s - answer.glue_s) / K)
        self.tree_alone.update(answer.tree_s or {})
        if answer.jit_s > 0:
            self.time("jit", answer.jit_s)

    def learn_tree(self, width, seconds):
        """One tree step's seconds at `width` branches per row in the loop (the draft's build
        after its glue, over K steps; a Start's timings go to tree_alone)."""
        self.tree[width] = 0.8 * self.tree.get(width, seconds) + 0.2 * seconds   # as time()

    def tree_points(self) -> dict:
        """width -> seconds of one tree step in the loop: measured there (beside a verify), else
        timed at a Start times the loop's slowdown (the mean ratio of loop to Start timings
        at the widths that have both; 1 before any). A Start's timing, taken while the target
        only prefills, is faster than the loop's: mixed into one line with them it made every
        untried width look cheap, and the budget rule moved to B = 2 where B = 1 was faster."""
        both = [w for w in self.tree if w in self.tree_alone]
        slow = statistics.fmean(self.tree[w] / self.tree_alone[w] for w in both) if both else 1.0
        return {**{w: s * slow for w, s in self.tree_alone.items()}, **self.tree}

    def tree_step(self, width) -> float:
        """Seconds of one tree step at `width` branches per row: the least-squares line
        s_0 + s_1 width through tree_points (one width: its own time; none: None)."""
        points = self.tree_points()
        if len(points) < 2:
            return next(iter(points.values()), None)
        slope, intercept = statistics.linear_regression(list(points), list(points.values()))
        return max(0.0, intercept + slope * width)

    def learn_answer(self, wait_s, sent_at, ready_at, jit_s):
        """The answer's own latency (the outcome's trip, the lookup, q' back) into "answer": a
        round's wait for the draft less the draft's build still running when the Round left
        (ready_at - sent_at, time.perf_counter() readings: both processes read one clock,
        CLOCK_MONOTONIC on Linux) and less its JIT."""
        self.time("answer", max(0.0, wait_s - max(0.0, ready_at - sent_at) - jit_s))

    def learn_verify(self, budget, seconds, keep=True):
        """A verify's seconds while the draft built a cache of `budget` branches per row."""
        if keep:
            self.verify_at[budget] = 0.8 * self.verify_at.get(budget, seconds) + 0.2 * seconds
            self.verify_n[budget] = self.verify_n.get(budget, 0) + 1

    def verify_beside(self, budget) -> float:
        """Seconds of a verify while the draft builds `budget` branches per row: the draft's
        work slows the verify it runs beside (the processes contend for memory bandwidth and,
        on a shared machine, for cores). Linear between the budgets measured, flat past them
        (a budget beyond those tried is not charged a slowdown unseen: the rule tries it and
        learns); the mean verify (1.0) before any."""
        if not self.verify_at:
            return self.secs.get("verify", 1.0)
        below = max((b for b in self.verify_at if b <= budget), default=min(self.verify_at))
        above = min((b for b in self.verify_at if b >= budget), default=max(self.verify_at))
        if below == above:
            return self.verify_at[below]
        share = (budget - below) / (above - below)
        return (1 - share) * self.verify_at[below] + share * self.verify_at[above]

    def learn_c(self, p, q, x, fanout, rows):
        """The shadow evaluation of Saguaro sampling's C: for each candidate C, what the round
        just verified would have given had the draft sampled from q'_C. p (B, K+1, V): the
        target's rows; q (B, K, V): the draft's plain q (before C); x (B, K): the tokens
        drafted; fanout: F_0..F_K (drafting step j scaled the top-(F_j+1) tokens); rows (B,)
        bool: the rows to count. Per candidate it adds up the mean acceptance alpha_i =
        sum_x min(p_i, q'_i), and, with P(k) = alpha_1..alpha_k (1 - alpha_{k+1}), the chance
        that the round ends at k < K with a bonus the cache holds (the residual
        max(0, p - q')'s mass on the top-F_k tokens but x_{k+1}) and the chance of k = K."""
        K = q.shape[1]
        p, q, x = p[rows].float(), q[rows].float(), x[rows]
        if len(x) == 0:
            return
        alpha = {c: torch.zeros(len(x), K) for c in self.shadow}
        held = {c: torch.zeros(len(x), K) for c in self.shadow}
        for j in range(K):
            top = q[:, j].topk(min(fanout[j] + 1, q.shape[-1]), dim=-1).indices  # scaled by C
            bet = top.clone()
            bet[top == x[:, j:j + 1]] = -1         # the cache's bets: the top but x_{j+1}
            for c in self.shadow:
                qc = q[:, j].scatter(-1, top, q[:, j].gather(-1, top) * c)
                qc = qc / qc.sum(-1, keepdim=True).clamp_min(1e-30)
                alpha[c][:, j] = torch.minimum(p[:, j], qc).sum(-1)
                residual = (p[:, j] - qc).clamp_min(0)
                on_bets = torch.where(bet >= 0, residual.gather(-1, bet.clamp_min(0)), 0.0)
                held[c][:, j] = on_bets.sum(-1) / residual.sum(-1).clamp_min(1e-30)
        for c, sums in self.shadow.items():
            alpha_c, held_c = alpha[c], held[c]
            before = torch.cat((torch.ones(len(x), 1), alpha_c.cumprod(1)), 1)  # P(k >= j)
            sums[0] += float(alpha_c.sum()) / K
            sums[1] += float((before[:, :K] * (1 - alpha_c) * held_c).sum())
            sums[2] += float(before[:, K].sum())
            sums[3] += len(x)

    def learn_acceptance(self, p, q, from_draft, from_fast, shadow, q_shadow):
        """Acceptance at position i is alpha_i = sum_x min(p_i(x), q_i(x)): exact in expectation,
        and of lower variance than counting accepted tokens. p (B, K+1, V), q (B, K, V); the
        fast backup's shadow proposals (q_shadow, rows `shadow`) share the target's context at
        their first position only. Positions past the first rejection count too (each is a
        proposal scored on a context the draft made): they are finite, since a verify whose
        logits hold NaN or inf anywhere stops the loop first (kernels.check_logits), as a
        fast backup's q outside [0, inf) does (speculative.check_proposal)."""
        overlap = torch.minimum(p[:, : q.shape[1]], q).sum(-1).cpu()            # (B, K)
        for who, rows in (("draft", from_draft), ("fast", from_fast)):
            self.acc[who][0] += float(overlap[rows].sum())
            self.acc[who][1] += q.shape[1] * int(rows.sum())
        self.acc["fast"][0] += float(torch.minimum(p[shadow, 0], q_shadow[shadow, 0]).sum())
        self.acc["fast"][1] += int(shadow.sum())

    def learn_hit(self, hit, made_by_fast, budget=None):
        """One lookup of a cache built over a speculation made by the draft or the fast backup
        (with `budget` branches per row, when known)."""
        counts = self.hits["fast" if made_by_fast else "draft"]
        counts[0], counts[1] = counts[0] + hit, counts[1] + 1
        if budget and not made_by_fast:
            at = self.hits_at.setdefault(budget, [1.0, 2.0])   # the same prior as above
            at[0], at[1] = at[0] + hit, at[1] + 1

    def time(self, name, seconds, keep=True):
        """A latency in seconds into the running mean `name` (0.8 old + 0.2 new); keep=False
        leaves out a one-off (a call's first verify may pack weights on first use)."""
        if keep:
            self.secs[name] = 0.8 * self.secs.get(name, seconds) + 0.2 * seconds


def bonus_rank(glue, spec, k, t):
    """Where the true bonus t stood among the draft's guesses for it (ssd.predict_outcomes'
    ranking): 0 = its first guess; this measures the miss curve, p_hit(F) = P(rank < F).
    glue (B, K+1, V): the draft's logits over the speculation spec (B, K); k, t (B,): the
    outcome. Returns (B,) ranks, -1 where unknown (no round yet, or t outside the vocabulary)."""
    (B, K), V = spec.shape, glue.shape[-1]
    rows = torch.arange(B, device=k.device)
    scores = glue[rows, k.clamp_min(0)].clone()                          # (B, V)
    x_next = spec[rows, k.clamp(0, K - 1)]
    scores[rows, x_next] = torch.where(k < K, float("-inf"), scores[rows, x_next])
    mine = scores[rows, t.clamp_max(V - 1)]
    rank = (scores > mine[:, None]).sum(-1)
    return torch.where((k >= 0) & (t < V), rank, -1)
