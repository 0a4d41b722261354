"""measure.py: what saguaro.py's rules run on, measured online while it decodes.

saguaro.py spends its cache budget (geometric fan-out, Thm. 12) and picks its backup (the speed
model, Thm. 7; the batch-aware rule, Sec. 4.3) from figures it cannot know in advance: the
acceptance a of the draft and of the fast backup, the hit rates of the caches built over each
one's speculations, the exponent r of the miss curve 1 - p_hit(F) = F^-r, and latencies. This
file measures them; the rules stay in saguaro.py (its Estimates extend Measurements).
"""
import torch


class Measurements:
    """Online estimates (each prior: two observations of 0.5): acceptance a of the draft (cache
    and JIT speculations: one network, one q') and of the fast backup, the hit rates of caches
    built over each one's speculations, the ranks of the true bonus among the draft's guesses
    (for r), and latencies in seconds (running means: verify, build, step, jit, fast)."""

    def __init__(self):
        self.acc = {"draft": [1.0, 2.0], "fast": [1.0, 2.0]}    # [sum, count] per proposer
        self.hits = {"draft": [1.0, 2.0], "fast": [1.0, 2.0]}   # [hits, lookups] per proposer
        self.rank_counts, self.secs = torch.zeros(65), {}

    def a(self, who) -> float:
        """The acceptance of "draft" or "fast": the mean of alpha_i over its proposals."""
        return self.acc[who][0] / self.acc[who][1]

    def hit_rate(self, who) -> float:
        """The hit rate of caches built over speculations made by "draft" or "fast"."""
        return self.hits[who][0] / self.hits[who][1]

    def r(self) -> float:
        """Fit 1 - p_hit(F) = F^-r through the origin in log-log, F = 2..64, on the measured
        ranks plus one prior observation that follows F^-1. Capped to [0.05, 8]."""
        F = torch.arange(2, 65, dtype=torch.float64)
        at_least = self.rank_counts.flip(0).cumsum(0).flip(0).double()[2:]  # ranks >= F
        x, y = F.log(), ((at_least + F ** -1.0) / (self.rank_counts.sum() + 1)).log()
        return float((-(x * y).sum() / (x * x).sum()).clamp(0.05, 8.0))

    def learn_from_draft(self, answer, live, first_round):
        """The draft process's Answer: ranks of the true bonus (for r), its latencies."""
        for rank in answer.rank[live & (answer.rank >= 0)].tolist():
            self.rank_counts[min(rank, 64)] += 1
        if not first_round:  # the first round had no cache built before it
            self.time("build", answer.build_s)
            self.time("step", answer.glue_s)
        if answer.jit_s > 0:
            self.time("jit", answer.jit_s)

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

    def learn_hit(self, hit, made_by_fast):
        """One lookup of a cache built over a speculation made by the draft or the fast backup."""
        counts = self.hits["fast" if made_by_fast else "draft"]
        counts[0], counts[1] = counts[0] + hit, counts[1] + 1

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
