"""Exactness by statistics: the true law of a tiny model's first tokens, samples from any loop,
and a test that can tell them apart. Shared by the tests of speculative.py, ssd.py, saguaro.py.

    probs = exact_distribution(target, prompt, n=3, temperature=1.0)     # {tokens: probability}
    counts = sample_sequences(speculative.generate, target, prompt, 3, 20_000, temperature=1.0,
                              draft=d, k=2)
    passed, stat, threshold = chi_square_test(counts, probs, alpha=1e-3 / number_of_tests)

`exact_distribution` enumerates every sequence of n new tokens (V <= 8, n <= 3: at most 512),
scoring each prefix with our own forward and kernels.probs_from_logits, so temperature, top-k,
top-p and EOS mean exactly what they mean in the loops. `chi_square_test` is Pearson's test:
under the null hypothesis (the loop samples the exact law) it fails with probability alpha, so
a file running m such tests at alpha / m each has a false-failure rate of at most alpha
(Bonferroni). A sequence the exact law gives probability 0 fails the test outright.
"""
import os
import sys
from collections import Counter

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import kernels  # noqa: E402

MAX_SEQUENCES = 4096


@torch.inference_mode()
def exact_distribution(model, prompt, n, temperature=1.0, top_k=None, top_p=None,
                       eos_ids=None) -> dict:
    """{new tokens (a tuple of length n, or shorter ending in an EOS id): probability} for the
    model's first n tokens after `prompt` (a list of ids). eos_ids: default the model's own."""
    V = model.cfg.vocab_size
    if V ** n > MAX_SEQUENCES:
        raise ValueError(f"enumerating {V}^{n} sequences is too many: use a model with a vocab "
                         f"of <= 8 and n <= 3 (at most {MAX_SEQUENCES} sequences).")
    eos_ids = set(model.cfg.eos_token_ids if eos_ids is None else eos_ids)
    final, frontier = {}, {(): 1.0}   # finished sequences; live prefixes of the current length
    for _ in range(n):
        prefixes = list(frontier)
        cache = model.new_cache(len(prefixes), len(prompt) + n)
        logits = model.prefill([list(prompt) + list(s) for s in prefixes], cache)   # (P, V)
        p = kernels.probs_from_logits(logits, temperature, top_k, top_p).double()
        nxt = {}
        for i, s in enumerate(prefixes):
            for t in torch.nonzero(p[i])[:, 0].tolist():
                seq, prob = s + (t,), frontier[s] * float(p[i, t])
                (final if t in eos_ids else nxt)[seq] = prob
        frontier = nxt
    final.update(frontier)
    return final


def sample_sequences(generate, target, prompt, n, num_samples, *, temperature, batch_size=5000,
                     seed=0, **kwargs) -> Counter:
    """Counter of the new-token tuples of `num_samples` runs of a generate-shaped function
    (temperature is required: generate's default of 0 would draw one sequence forever).
    Rows of a batch are independent samples, so one call on `batch_size` copies of the prompt
    draws that many at once; successive calls use seeds seed, seed+1, ..."""
    counts = Counter()
    while sum(counts.values()) < num_samples:
        b = min(batch_size, num_samples - sum(counts.values()))
        tokens, _ = generate(target, [list(prompt)] * b, n, temperature=temperature, seed=seed,
                             **kwargs)
        counts.update(tuple(t) for t in tokens)
        seed += 1
    return counts


def chi2_quantile(q, df) -> float:
    """The q-quantile of the chi-square law with df degrees of freedom (bisection on its CDF,
    the regularized lower incomplete gamma function; no scipy needed)."""
    a = torch.tensor(df / 2.0, dtype=torch.float64)
    lo, hi = 0.0, max(10.0, 10.0 * df)
    while float(torch.special.gammainc(a, torch.tensor(hi / 2.0, dtype=torch.float64))) < q:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if float(torch.special.gammainc(a, torch.tensor(mid / 2.0, dtype=torch.float64))) < q:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def chi_square_test(counts, probs, alpha, min_expected=5.0):
    """Pearson's chi-square goodness of fit of observed `counts` {outcome: count} to the exact
    `probs` {outcome: probability}. Cells expecting fewer than `min_expected` samples are pooled
    into one (the usual validity condition). Returns (passed, statistic, threshold): passed is
    False with probability alpha when the samples do follow `probs`."""
    N = sum(counts.values())
    impossible = [s for s in counts if probs.get(s, 0.0) <= 0.0]
    big = sorted((s for s in probs if probs[s] * N >= min_expected), key=probs.get)
    small = [s for s in probs if probs[s] * N < min_expected]
    if sum(probs[s] for s in small) * N < min_expected and big and small:
        small.append(big.pop(0))   # a pooled cell must itself expect enough samples
    cells = [[s] for s in big] + ([small] if small else [])
    threshold = chi2_quantile(1.0 - alpha, max(len(cells) - 1, 1))
    if impossible:
        return False, float("inf"), threshold
    stat = 0.0
    for cell in cells:
        expected = N * sum(probs[s] for s in cell)
        observed = sum(counts.get(s, 0) for s in cell)
        stat += (observed - expected) ** 2 / expected
    return stat <= threshold, stat, threshold


def total_variation(counts, probs) -> float:
    """Total-variation distance between the empirical law of `counts` and `probs` (to report)."""
    N = sum(counts.values())
    keys = set(counts) | set(probs)
    return 0.5 * sum(abs(counts.get(s, 0) / N - probs.get(s, 0.0)) for s in keys)
