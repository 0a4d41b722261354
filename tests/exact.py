"""Exactness by statistics: the true law of a tiny model's first tokens, samples from any loop,
and a test that can tell them apart. Shared by the tests of speculative.py, ssd.py, saguaro.py.

    law = exact_distribution(target, prompt, n=6, temperature=1.0)      # {tokens: probability}
    counts = sample_sequences(speculative.generate, target, prompt, 6, 8_000, temperature=1.0,
                              draft=d, k=2)
    passed, worst, shown = window_test(counts, law, alpha=1e-3 / number_of_tests)

The reference shares no sampling code with the loops: `reference_probs` writes temperature,
top-k and top-p from their definitions (numpy, float64) and is checked against transformers' own
logits warpers in tests/test_sampling.py; the loops use kernels.probs_from_logits. Only the
model's forward (checked against transformers' in tests/test_kernels.py) is shared.

`exact_distribution` enumerates every sequence of n new tokens (at most MAX_SEQUENCES: V = 4
and n = 6, or fewer live prefixes when EOS ends some early). `window_test` runs Pearson's test
(`chi_square_test`) on the law of the first j tokens for every j = 1..n, and on the law of each
pair of neighbouring tokens, so a bug that only touches the 5th token is not drowned in a
4096-cell table. Under the null hypothesis (the loop samples the exact law) each of those 2n - 2
tests fails with probability alpha / (2n - 2), so the window fails with probability at most
alpha; a file running m windows at alpha / m each has a false-failure rate of at most alpha
(Bonferroni). A sequence the exact law gives probability 0 fails the test outright.
"""
import os
import sys
from collections import Counter

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MAX_SEQUENCES = 4096


def reference_probs(logits, temperature=0.0, top_k=None, top_p=None) -> np.ndarray:
    """The law a loop must sample, from the definitions, for the tests only: logits (..., V)
    (a tensor or nested lists) -> probabilities (..., V), float64.
      temperature 0: all mass on the largest logit (the first one of a tie, as argmax).
      temperature T > 0: softmax(logits / T), then
      top-k = k: keep the tokens whose logit is >= the k-th largest: with distinct logits
        exactly k survive; tokens tied with the k-th largest all survive (transformers' rule);
      top-p = p (after top-k): sort the survivors by probability, largest first, and keep the
        smallest prefix whose mass reaches p (>= p): a token survives iff the mass before it
        is < p. Which of several tokens tied at that boundary survive is not specified (the
        tests avoid such ties); then renormalize."""
    x = np.asarray(logits.detach().double().cpu() if torch.is_tensor(logits) else logits,
                   dtype=np.float64)
    out = np.zeros_like(x)
    for index in np.ndindex(x.shape[:-1]):
        out[index] = _reference_row(x[index], temperature, top_k, top_p)
    return out


def _reference_row(logits, temperature, top_k, top_p):
    V = len(logits)
    p = np.zeros(V)
    if temperature == 0:
        p[int(np.argmax(logits))] = 1.0
        return p
    z = logits / temperature
    keep = np.ones(V, dtype=bool)
    if top_k is not None and top_k < V:
        kth = sorted(z, reverse=True)[top_k - 1]
        keep = z >= kth
    w = np.where(keep, np.exp(z - z[keep].max()), 0.0)
    p = w / w.sum()
    if top_p is not None and top_p < 1.0:
        order = sorted(range(V), key=lambda i: -p[i])
        before = 0.0
        for i in order:
            mass, before = before, before + p[i]
            if mass >= top_p:
                p[i] = 0.0
        p = p / p.sum()
    return p


@torch.inference_mode()
def exact_distribution(model, prompt, n, temperature=1.0, top_k=None, top_p=None,
                       eos_ids=None) -> dict:
    """{new tokens (a tuple of length n, or shorter ending in an EOS id): probability} for the
    model's first n tokens after `prompt` (a list of ids), from `reference_probs` over the
    model's logits. eos_ids: default the model's own."""
    V = model.cfg.vocab_size
    eos_ids = set(model.cfg.eos_token_ids if eos_ids is None else eos_ids)
    final, frontier = {}, {(): 1.0}   # finished sequences; live prefixes of the current length
    for _ in range(n):
        if len(final) + len(frontier) * V > MAX_SEQUENCES:
            raise ValueError(f"enumerating {n} tokens over a vocabulary of {V} gives more than "
                             f"{MAX_SEQUENCES} sequences: use V = 4 with n <= 6, V = 8 with "
                             "n <= 4, or an EOS that ends many of them.")
        prefixes = list(frontier)
        cache = model.new_cache(len(prefixes), len(prompt) + n)
        logits = model.prefill([list(prompt) + list(s) for s in prefixes], cache)   # (P, V)
        p = reference_probs(logits, temperature, top_k, top_p)
        nxt = {}
        for i, s in enumerate(prefixes):
            for t in np.nonzero(p[i])[0].tolist():
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
    impossible = [s for s, c in counts.items() if c > 0 and probs.get(s, 0.0) <= 0.0]
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


def project(law_or_counts, key) -> dict:
    """The law (or the counts) of key(sequence): sums over the sequences with the same key."""
    out = {}
    for s, x in law_or_counts.items():
        out[key(s)] = out.get(key(s), 0) + x
    return out


def window_keys(n):
    """The views `window_test` checks: the first j tokens (j = 1..n; a sequence that ended in EOS
    earlier is itself), and the pair of tokens j-1, j (j = 3..n; "end" past an EOS)."""
    keys = {f"first {j}": (lambda s, j=j: s[:j]) for j in range(1, n + 1)}
    for j in range(3, n + 1):
        keys[f"pair {j - 1},{j}"] = lambda s, j=j: tuple(s[j - 2:j]) + ("end",) * (len(s) < j)
    return keys


def window_test(counts, law, alpha, n=None):
    """chi_square_test on every view of window_keys(n) at alpha / (number of views) each.
    Returns (passed, worst, shown): worst = the largest statistic / threshold over the views
    (> 1 fails), shown = one line per view, for the failure message."""
    n = n or max(len(s) for s in law)
    keys = window_keys(n)
    worst, lines, passed = 0.0, [], True
    for name, key in keys.items():
        ok, stat, threshold = chi_square_test(project(counts, key), project(law, key),
                                              alpha / len(keys))
        passed &= ok
        worst = max(worst, stat / threshold)
        lines.append(f"{name}: chi2 {stat:.1f} vs {threshold:.1f}")
    shown = f"worst chi2/threshold {worst:.2f}, TV {total_variation(counts, law):.4f}; " + \
        "; ".join(lines)
    return passed, worst, shown


def total_variation(counts, probs) -> float:
    """Total-variation distance between the empirical law of `counts` and `probs` (to report)."""
    N = sum(counts.values())
    keys = set(counts) | set(probs)
    return 0.5 * sum(abs(counts.get(s, 0) / N - probs.get(s, 0.0)) for s in keys)
