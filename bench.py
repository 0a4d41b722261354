"""bench.py: every decoding loop of this project, and the Hugging Face peers, in one table.

    python bench.py                                    # default model, a few prompts, greedy
    python bench.py --model Qwen/Qwen3-32B --draft Qwen/Qwen3-0.6B --device cuda --dtype bfloat16

Rows: ar (autoregressive.py), hf (transformers `generate`), sd (speculative.py), hf-assisted
(transformers assisted generation with the same draft and K), hf-prompt-lookup (transformers'
prompt-lookup decoding with the same K: the model-free peer of `--draft ngram`), ssd (ssd.py),
saguaro (saguaro.py), with its distance from its speed of light (speed_of_light below).
Each method is warmed up first; prompts run in turn through every method (so drift hits all rows
alike); the table reports medians over prompts of speeds and of saguaro's learned figures,
and pools counts over every round of every prompt (tau, acceptance, hit rate, histograms).
Decode tokens/s = (new tokens - 1) / (time after the first token): the first token comes out of
prefill, which is reported apart. For the HF rows prefill is timed as
`generate(max_new_tokens=1)` on the same prompt. `Match` says whether a row's greedy tokens equal
ar's, token for token: a claim in float32 only (in bfloat16/float16 forwards of different lengths
round differently, see autoregressive.py), so there it reads e.g. `False (not claimed in
bfloat16)`. The last stdout line is JSON with every figure. `--trace t.json` writes the
timeline of each of our rows' last measured run (timeline.py) to t.ar.json, t.sd.json, ...
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

import autoregressive
import draft_process
import drafts
import harness
import kernels
import kernels_cpu
import prompts as prompt_sets
import timeline
import tp

METHODS = ("ar", "hf", "sd", "hf-assisted", "hf-prompt-lookup", "ssd", "saguaro")
TP_METHODS = ("ar", "sd", "ssd", "saguaro")  # the rows that run on a tensor-parallel target
DRAFT_METHODS = ("sd", "hf-assisted", "ssd", "saguaro")  # the rows that run a draft


# ----------------------------------------------------------------------------------------------
# 1) the runners: one callable per row, prompt ids in, (tokens, stats) out

def ours(module, target, args, threads, **kw):
    def run(batch):
        kernels.set_threads(threads)
        return module.generate(target, batch, args.max_new_tokens, temperature=args.temperature,
                               top_k=args.top_k, top_p=args.top_p, seed=args.seed, **kw)
    return run


def hf_runner(hf, args, threads, assistant=None, prompt_lookup=False):
    """transformers' generate, timed the same way: prefill = generate(max_new_tokens=1)."""
    kw = {"do_sample": args.temperature > 0, "pad_token_id": hf.config.eos_token_id}
    if prompt_lookup:  # K tokens copied from the prompt after its last matching n-gram
        kw["prompt_lookup_num_tokens"] = args.k
    if args.temperature > 0:
        kw.update(temperature=args.temperature, top_k=args.top_k or 0, top_p=args.top_p or 1.0)
    if assistant is not None:
        assistant.generation_config.num_assistant_tokens = args.k
        assistant.generation_config.num_assistant_tokens_schedule = "constant"
        kw["assistant_model"] = assistant

    @torch.inference_mode()
    def run(batch):
        (prompt,) = batch  # batch 1 only: HF rows are skipped for --batch-size > 1
        kernels.set_threads(threads)
        ids = torch.tensor([prompt], device=hf.device)
        t0 = time.perf_counter()
        hf.generate(ids, max_new_tokens=1, **kw)
        kernels.sync(hf.device)
        t1 = time.perf_counter()
        out = hf.generate(ids, max_new_tokens=args.max_new_tokens, **kw)
        kernels.sync(hf.device)
        t2 = time.perf_counter()
        stats = harness.new_stats()
        stats.update(prefill_s=t1 - t0, decode_s=max(1e-9, (t2 - t1) - (t1 - t0)))
        tokens = [out[0, len(prompt):].tolist()]
        return tokens, harness.finish_stats(stats, tokens)
    return run


def load_hf(path, device, dtype):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=kernels.resolve_dtype(dtype)).to(
        kernels.resolve_device(device)).eval()


def build_rows(args, target, draft):
    """name -> runner, for the methods asked for."""
    rows = {}
    for m in args.methods:
        if m == "ar":
            rows["ar"] = ours(autoregressive, target, args, args.threads)
        elif m.startswith("hf") and args.batch_size > 1:
            print(f"[bench] {m} skipped: the HF rows run batch 1 only")
        elif m == "hf":
            rows["hf"] = hf_runner(load_hf(target.path, args.device, args.dtype), args,
                                   args.threads)
        elif m == "sd":
            import speculative
            rows["sd"] = ours(speculative, target, args, args.threads, draft=draft, k=args.k)
        elif m == "hf-assisted":
            path = getattr(draft, "path", None)
            if path is None or getattr(draft, "hf_equivalent", True) is False:
                print(f"[bench] hf-assisted skipped: draft {args.draft!r} is not a transformers "
                      "model (use --draft self or a model folder to compare with it)")
                continue
            hf = load_hf(target.path, args.device, args.dtype)
            rows["hf-assisted"] = hf_runner(hf, args, args.threads,
                                            assistant=load_hf(path, args.device, args.dtype))
        elif m == "hf-prompt-lookup":
            rows[m] = hf_runner(load_hf(target.path, args.device, args.dtype), args, args.threads,
                                prompt_lookup=True)
        elif m == "ssd":
            import ssd
            rows["ssd"] = ours(ssd, target, args, args.threads, draft=draft, k=args.k, f=args.f)
        elif m == "saguaro":
            import saguaro
            # the draft process gets its own cores: half of --threads each (1 + 1 on 2 cores)
            half, draft_threads = saguaro.draft_process.split_threads(args.threads)
            # --tp: rank 0 alone runs the loop, beside the draft process; the others follow
            worker = (saguaro.DraftWorker(args.draft, target, threads=draft_threads,
                                          device=tp.draft_device(args, target),
                                          timeout_s=args.timeout)
                      if tp.rank() == 0 else None)
            args.cleanup.append(worker.close if worker else lambda: None)
            args.saguaro_cores = (half, worker.target_cpus if worker else None)  # speed of light
            kw = dict(draft=worker, k=args.saguaro_k or args.k, fan_out=args.fan_out,
                      saguaro_c=args.saguaro_c, backup=args.backup, target_threads=half,
                      budget=args.budget, couple_bonus=args.couple_bonus)
            rows["saguaro"] = lambda batch, kw=kw: tp.led(
                lambda t: ours(saguaro, t, args, half, **kw)(batch), target)
            if args.accounting and half != args.threads:
                # the paper's accounting: AR and SD on the target's cores only, the draft's
                # device on top (its 5th H100); equal cores: AR and SD get every core
                rows[f"ar@{half}t"] = ours(autoregressive, target, args, half)
                if "sd" in args.methods:
                    import speculative
                    rows[f"sd@{half}t"] = ours(speculative, target, args, half, draft=draft,
                                               k=args.k)
        else:
            raise SystemExit(f"unknown method {m!r}: choose from {', '.join(METHODS)}")
    if not rows:  # every method asked for was skipped (the reasons are printed above)
        raise ValueError(f"nothing to measure: {', '.join(args.methods)} skipped (see above); "
                         "add a method that runs here, e.g. --methods ar,sd.")
    return rows


# ----------------------------------------------------------------------------------------------
# 2) the measurement

def measure(rows, prompts, args):
    """Warm up every row once, then run every batch of prompts through every row in turn."""
    from rich.progress import Progress
    results = {name: [] for name in rows}
    batches = [prompts[i: i + args.batch_size] for i in range(0, len(prompts), args.batch_size)]
    for run in rows.values():
        saved, args.max_new_tokens = args.max_new_tokens, 8
        with harness.warming_up():
            run([ids for _, ids in batches[0]])
        args.max_new_tokens = saved
    with Progress(transient=True) as bar:
        task = bar.add_task("benchmarking", total=len(batches) * len(rows))
        for i, batch in enumerate(batches):
            for name, run in rows.items():
                bar.update(task, description=f"{name} on {batch[0][0]}")
                if args.trace and i == len(batches) - 1:
                    timeline.start()  # the last run of each row: its timeline
                tokens, stats = run([ids for _, ids in batch])
                if timeline.recording() and (events := timeline.stop()):  # HF rows: none
                    stem, ext = os.path.splitext(args.trace)
                    timeline.write(f"{stem}.{name}{ext or '.json'}", events, method=name,
                                   command=" ".join(sys.argv))
                if stats.get("draft_lost"):  # its row would time the fallback, not saguaro
                    raise harness.RunFailed(
                        f"{name}'s draft process was lost during the benchmark "
                        f"({stats['draft_lost']}); the rest of its row would time the target "
                        "alone on the fast backup, so nothing is reported. Run bench again.")
                results[name].append({"dataset": batch[0][0], "tokens": tokens, **stats})
                bar.advance(task)
    return results


def summarize(results, args):
    table = {}
    for name, runs in results.items():
        # each row is compared with ar on the same cores (rows named "x@Nt" with "ar@Nt")
        ar = results.get("ar" + name[name.index("@"):] if "@" in name else "ar")
        med = lambda key: statistics.median(r[key] for r in runs)
        row = {"decode_tokens_per_s": med("decode_tokens_per_s"), "prefill_ms": 1e3 * med("prefill_s"),
               "new_tokens": sum(r["new_tokens"] for r in runs)}
        row["ms_per_token"] = 1e3 / row["decode_tokens_per_s"] if row["decode_tokens_per_s"] else None
        if runs[0]["target_calls"]:
            decoded = sum(r["new_tokens"] - len(r["tokens"]) for r in runs)  # minus prefill's
            row["tau"] = decoded / sum(r["rows_verified"] for r in runs)
        if runs[0]["accept_counts"]:  # pooled, as tau: accepted / proposed over every round
            counts = [sum(c) for c in zip(*(r["accept_counts"] for r in runs))]  # rounds per k
            row["accept_counts"], K = counts, len(counts) - 1
            accepted = sum(k * n for k, n in enumerate(counts))
            if runs[0]["acceptance_rate"] is not None and sum(counts):
                row["acceptance_rate"] = accepted / (K * sum(counts))
        if "hits_by_k" in runs[0]:  # ssd, saguaro: the cache hit rate per accepted count k
            row["hits_by_k"] = [sum(h) for h in zip(*(r["hits_by_k"] for r in runs))]
            row["lookups_by_k"] = [sum(n) for n in zip(*(r["lookups_by_k"] for r in runs))]
        if "predicted_speedup" in runs[0]:  # saguaro: the speed model beside the measurement
            for key in ("predicted_speedup", "measured_speedup", "p_hit", "a", "r"):
                vals = [r[key] for r in runs if r.get(key) is not None]
                row[key] = statistics.median(vals) if vals else None
            calls = sum(r["target_calls"] for r in runs)  # 0: every row ended at prefill
            per_round = lambda key: 1e3 * sum(r[key] for r in runs) / calls if calls else None
            row["verify_ms"] = per_round("verify_s")        # a verify beside the draft process
            row["round_ms"], row["wait_ms"] = per_round("decode_s"), per_round("draft_wait_s")
            row["build_ms"] = per_round("cache_build_s")    # the draft's build, beside the verify
            used = {b: sum(r["backup_used"][b] for r in runs) for b in runs[0]["backup_used"]}
            row["backup"] = ", ".join(f"{b} {n}" for b, n in used.items())
            row["backup_why"] = runs[-1]["backup_why"]
            for key in ("budget", "budget_why", "saguaro_c", "c_why"):  # the rules' last word
                row[key] = runs[-1][key]
        hits = sum(r["cache_hits"] for r in runs)
        misses = sum(r["cache_misses"] for r in runs)
        if hits + misses:
            row["hit_rate"] = hits / (hits + misses)
        if ar is not None:
            ar_speed = median_speed(ar)  # 0 when every ar row ended at prefill (EOS first)
            row["speedup_vs_ar"] = row["decode_tokens_per_s"] / ar_speed if ar_speed else None
            if args.temperature == 0:
                row["match"] = all(r["tokens"] == a["tokens"] for r, a in zip(runs, ar))
                row["match_claimed"] = kernels.resolve_dtype(args.dtype) == torch.float32
        table[name] = row
    return table


def median_speed(runs):
    return statistics.median(r["decode_tokens_per_s"] for r in runs)


def accountings(results, args):
    """Saguaro uses two devices (here: two groups of cores). Two fair comparisons:
    equal cores (ar, sd on all cores) and the paper's (ar, sd on the target's cores only)."""
    if "saguaro" not in results:
        return None
    sag = median_speed(results["saguaro"])
    half, draft_threads = draft_process.split_threads(args.threads)
    out = {}
    # at --threads 1 saguaro still runs 1 + 1: ar and sd on that one are the paper's accounting
    labels = [("equal_cores", "")] if half + draft_threads <= args.threads else []
    for label, suffix in labels + [("paper", f"@{half}t" if half != args.threads else "")]:
        ar, sd = results.get("ar" + suffix), results.get("sd" + suffix)
        out[label] = {"ar_threads": args.threads if not suffix else half,
                      "split": f"{half}+{draft_threads} threads",
                      "saguaro_vs_ar": sag / median_speed(ar) if ar else None,
                      "saguaro_vs_sd": sag / median_speed(sd) if sd else None}
    return out


@torch.inference_mode()
def step_times(target, batch, K, threads, cpus=None, reps=12):
    """Median seconds of one 1-token step and of one (K+1)-token verify of the whole `batch` (a
    list of prompt ids: b rows, as the measured run had), each alone, on `threads` threads
    (pinned to `cpus`), over a cache holding the prompts."""
    saved = os.sched_getaffinity(0)
    try:
        kernels.set_threads(threads)
        if cpus:
            os.sched_setaffinity(0, cpus)
        cache = target.new_cache(len(batch), max(map(len, batch)) + K + 1)
        target.prefill(batch, cache)
        n = cache.lengths.clone()
        tokens = torch.tensor([(ids * (K + 1))[-K - 1:] for ids in batch],
                              device=target.device)                        # (b, K+1)
        times = {1: [], K + 1: []}
        for _ in range(reps + 2):  # alternated, so drift hits both; the first two warm up
            for m in times:
                cache.lengths.copy_(n)
                t0 = time.perf_counter()
                target(tokens[:, :m], cache)
                kernels.sync(target.device)
                times[m].append(time.perf_counter() - t0)
        return [statistics.median(t[2:]) for t in times.values()]
    finally:
        os.sched_setaffinity(0, saved)


def speed_of_light(table, target, prompts, args):
    """If drafting were fully hidden, a saguaro round would cost one (K+1)-token verify of the
    batch's b rows and emit tau tokens per row: speed of light = b tau / t(verify) tokens/s (every
    row counted, as the measured decode speed), tau x t(step) / t(verify) over AR, both clocks
    read alone (the draft process idle) on the target's cores at batch b: a verify of b rows costs
    more than one of a single row. efficiency = measured speed / speed of light: what the losses
    (a slower verify beside the draft, misses, glue, messages) leave of the idea."""
    row = table.get("saguaro")
    if not row or not row.get("tau") or row.get("round_ms") is None:
        return None
    K, (threads, cpus) = args.saguaro_k or args.k, args.saguaro_cores
    batch = [ids for _, ids in prompts[:args.batch_size]]  # b rows, as the measured batches
    t1, tk = step_times(target, batch, K, threads, cpus)
    sol = args.batch_size * row["tau"] / tk  # decode tokens/s count every row, as measured
    return {"k": K, "batch": args.batch_size, "target_threads": threads, "tau": row["tau"],
            "step_ms": 1e3 * t1,
            "verify_ms": 1e3 * tk, "verify_beside_draft_ms": row["verify_ms"],
            "round_ms": row["round_ms"], "losses_ms": {  # what a round costs beyond tk
                "verify beside the draft": row["verify_ms"] - 1e3 * tk,
                "waiting for the draft": row["wait_ms"],
                "the rest (accept, fast backup, Python)": row["round_ms"] - row["verify_ms"]
                - row["wait_ms"]},
            "speed_of_light_vs_ar": row["tau"] * t1 / tk, "speed_of_light_tokens_per_s": sol,
            "efficiency": row["decode_tokens_per_s"] / sol,
            # a round lasts at least the draft's build too (measured beside the verify): the
            # ceiling this draft allows on these cores, whatever the rules choose
            "build_ms": row["build_ms"], "draft_bound_tokens_per_s":
                args.batch_size * row["tau"] / max(tk, 1e-3 * row["build_ms"]),
            "predicted_speedup": row["predicted_speedup"],
            "measured_speedup": row["measured_speedup"]}


# ----------------------------------------------------------------------------------------------
# 3) the report

def hardware(device):
    """The CPU's model name x its core count, or the GPU's name."""
    if kernels.resolve_device(device).type == "cuda":
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        names = [l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")]
        cpu = f"{names[0]} x {len(names)}" if names else cpu
    return cpu


def check_quiet(args):
    """The 1-minute load average before the benchmark (None where the OS has none), with a
    warning when other processes seem to use the cores: a step of several CPU threads waits at
    each of its ~120 parallel regions for its slowest thread, and OpenMP's waiting threads spin,
    so a shared core can slow ar and sd many times over while saguaro (one thread per process)
    slows less: the ratios then mean little."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    cores = len(os.sched_getaffinity(0))
    if load is not None and load >= 0.5 and str(args.device).startswith(("cpu", "auto")):
        print(f"[bench] warning: the 1-minute load average is {load:.2f} on {cores} core(s): "
              "other processes seem to be running, and multi-threaded CPU steps slow down many "
              "times over when a core is shared, so these timings may mean little. Run bench "
              "alone, or give every concurrent run --threads 1.", file=sys.stderr)
    return load


def conditions(args, target, draft, prompts):
    lens = [len(ids) for _, ids in prompts]
    return {"hardware": hardware(args.device), "device": str(target.device), "threads": args.threads,
            "tp": args.tp,
            "attention": kernels.ATTENTION, "model": target.name,
            "cpu_kernels": (kernels_cpu.CPU_KERNELS if target.device.type == "cpu" else None),
            "draft": args.draft if set(DRAFT_METHODS) & set(args.methods) else None,
            "dtype": args.dtype, "batch": args.batch_size, "prompts": len(prompts),
            "dataset": args.dataset, "prompt_tokens_median": statistics.median(lens),
            "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
            "k": args.k, "saguaro_k": args.saguaro_k or args.k, "f": args.f,
            "budget": args.budget if "saguaro" in args.methods else None,
            "saguaro_c": args.saguaro_c if "saguaro" in args.methods else None,
            "backup": args.backup if "saguaro" in args.methods else None,
            "couple_bonus": args.couple_bonus if "saguaro" in args.methods else None,
            "load_before": getattr(args, "load_before", None), "torch": torch.__version__}


def print_table(table, cond, acc=None, sol=None):
    from rich.console import Console
    from rich.table import Table
    console = Console(width=None if sys.stdout.isatty() else 150)
    console.print("[bold]conditions[/bold]: " + ", ".join(f"{k}={v}" for k, v in cond.items()
                                                         if v is not None))
    t = Table(title="decode speed (medians over prompts)")
    cols = [("method", None), ("tok/s", "decode_tokens_per_s"), ("vs ar", "speedup_vs_ar"),
            ("ms/tok", "ms_per_token"), ("prefill ms", "prefill_ms"), ("tau", "tau"),
            ("accept", "acceptance_rate"), ("hit rate", "hit_rate"),
            ("accept hist", "accept_counts"), ("backup", "backup"), ("Match", "match")]
    for header, _ in cols:
        t.add_column(header, justify="right")
    fmt = lambda v: "-" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))
    for name, row in table.items():
        cells = [fmt(row.get(key)) for _, key in cols[1:]]
        if row.get("match_claimed") is False:  # greedy equality holds in float32 only
            cells[-1] += f" (not claimed in {cond['dtype']})"
        t.add_row(name, *cells)
    console.print(t)
    for name, row in table.items():
        if "hits_by_k" in row:
            console.print(f"{name} cache hits / lookups by k = 0..{len(row['hits_by_k']) - 1}: "
                          + "  ".join(f"{h}/{n}" for h, n in zip(row["hits_by_k"],
                                                                 row["lookups_by_k"])))
        if "predicted_speedup" in row:
            f2 = lambda v: "-" if v is None else f"{v:.2f}"
            console.print(f"{name}: speed model (Thm. 7) {f2(row['predicted_speedup'])}x, measured "
                          f"{f2(row['measured_speedup'])}x (both: tokens per row per target-verify "
                          f"time; medians), p_hit {f2(row['p_hit'])}, a {f2(row['a'])}, r "
                          f"{f2(row['r'])}; backups (row-rounds) {row['backup']}; rule: "
                          f"{row['backup_why']}")
            console.print(f"{name}: budget B = {row['budget']} ({row['budget_why']}); C = "
                          f"{row['saguaro_c']} ({row['c_why']})")
    if acc and "equal_cores" not in acc:
        console.print("saguaro: no equal-cores comparison at --threads 1 (its draft process "
                      "takes a second core); give --threads 2 or more for one")
    for label, a in (acc or {}).items():
        fmt_x = lambda v: "-" if v is None else f"{v:.2f}x"
        console.print(f"saguaro, {label.replace('_', ' ')} accounting (ar/sd on "
                      f"{a['ar_threads']} thread(s), saguaro target+draft on {a['split']}): "
                      f"{fmt_x(a['saguaro_vs_sd'])} sd, {fmt_x(a['saguaro_vs_ar'])} ar")
    if sol:
        f2 = lambda v: "-" if v is None else f"{v:.2f}"
        console.print(
            f"saguaro speed of light (K={sol['k']}, batch {sol.get('batch', 1)}, alone on the "
            f"target's {sol['target_threads']} thread(s)): tau {sol['tau']:.2f} x step {sol['step_ms']:.1f} ms / verify "
            f"{sol['verify_ms']:.1f} ms = {sol['speed_of_light_vs_ar']:.2f}x ar = "
            f"{sol['speed_of_light_tokens_per_s']:.1f} tok/s; [bold]efficiency "
            f"{sol['efficiency']:.2f}[/bold] (measured / speed of light). In tokens per "
            f"verify time: speed model (Thm. 7) {f2(sol['predicted_speedup'])}x, measured "
            f"{f2(sol['measured_speedup'])}x, speed of light {sol['tau']:.2f}x; a verify beside "
            f"the draft took {sol['verify_beside_draft_ms']:.1f} ms")
        console.print(f"the draft's build beside it: {sol['build_ms']:.1f} ms a round, so a "
                      f"round lasts at least max(verify alone, build): at most "
                      f"{sol['draft_bound_tokens_per_s']:.1f} tok/s with this draft")
        console.print(f"saguaro's mean round: {sol['round_ms']:.1f} ms = a verify alone "
                      f"{sol['verify_ms']:.1f} ms + " + " + ".join(
                          f"{name} {ms:.1f} ms" for name, ms in sol["losses_ms"].items()))


# ----------------------------------------------------------------------------------------------
# 4) the sweep: the same measurement over a grid of K, F, batch size and temperature

SWEEPABLE = {"k": int, "f": int, "batch_size": int, "temperature": float}


def parse_sweep(text):
    """argparse type of --sweep: 'k=2,4,6;f=1,3;batch_size=1,4;temperature=0,1' ->
    {"k": [2, 4, 6], ...}; a bad part is the flag's error (exit 2, before any model loads)."""
    grid = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        key, _, values = part.partition("=")
        key = key.strip().replace("-", "_").replace("batch", "batch_size").replace(
            "batch_size_size", "batch_size")
        try:
            if key not in SWEEPABLE or not values:
                raise ValueError("unknown key or no values")
            grid[key] = [SWEEPABLE[key](v) for v in values.split(",")]
        except ValueError as e:
            raise argparse.ArgumentTypeError(
                f"bad part {part!r} ({e}); use e.g. 'k=2,4;f=1,3;batch=1,4;temperature=0,1' "
                "with keys k, f, batch (integers) and temperature (numbers)") from None
    return grid


def sweep(args, target, draft, prompts):
    import csv
    import itertools
    from rich.console import Console
    grid = args.sweep
    points = []
    for values in itertools.product(*grid.values()):
        point = dict(zip(grid, values))
        for key, v in point.items():
            setattr(args, key, v)
        args.cleanup = []
        try:
            rows = build_rows(args, target, draft)
            table = summarize(measure(rows, prompts, args), args)
        finally:
            for close in args.cleanup:
                close()
        for method, row in table.items():
            points.append({**point, "method": method,
                           **{k: v for k, v in row.items() if not isinstance(v, list)}})
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(points, f, indent=1)
    with open(args.out + ".csv", "w", newline="") as f:
        cols = sorted({k for p in points for k in p}, key=lambda k: (k not in grid, k))
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(points)
    console = Console(width=None if sys.stdout.isatty() else 150)
    top = max(p["decode_tokens_per_s"] for p in points) or 1
    console.print(f"[bold]sweep[/bold] ({args.out}.json / .csv): tokens/s, one bar per point")
    for p in points:
        label = " ".join(f"{k}={p[k]}" for k in grid) + f" {p['method']:>8}"
        x = p["decode_tokens_per_s"]
        vs = f" ({p['speedup_vs_ar']:.2f}x ar)" if p.get("speedup_vs_ar") else ""  # needs ar
        hit = f" hit {p['hit_rate']:.2f}" if p.get("hit_rate") is not None else ""
        console.print(f"{label} [green]{'#' * round(40 * x / top):<40}[/green] {x:6.2f} tok/s{vs} "
                      f"tau {p.get('tau') or 0:.2f}{hit}")
    return points


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_common_args(ap, tp=True)
    ap.set_defaults(threads=None)
    ap.add_argument("--draft", default="default", type=harness.draft_name,
                    help=drafts.DRAFT_HELP)
    # defaults fit the built-in pair on a 2-core CPU; on GPUs with a small draft use the
    # paper's --k 7 --f 3 --saguaro-k 7 and --budget 24
    ap.add_argument("--k", type=harness.positive_int, default=4, help="speculation length K")
    ap.add_argument("--f", type=harness.fanout, default=1,
                    help="ssd's fan-out F per outcome k, or F_0,...,F_K (saguaro's: --budget)")
    ap.add_argument("--methods", default=None, help=f"comma list of {', '.join(METHODS)}; "
                    f"None: all (with --tp: {','.join(TP_METHODS)})")
    ap.add_argument("--dataset", default="alpaca", choices=prompt_sets.DATASETS + ("all",),
                    help="the prompt set(s)")
    ap.add_argument("--num-prompts", type=harness.positive_int, default=4,
                    help="prompts per dataset")
    ap.add_argument("--batch-size", type=harness.positive_int, default=1,
                    help="prompts per generate call")
    # saguaro's B, C and backup: chosen by its rules from what the draft measures (the speed
    # model, Thm. 7), as saguaro.py does: a user who sets nothing gets what they predict best
    # for this pair, these cores, this temperature and batch size. README: the runs.
    harness.add_saguaro_args(ap, budget="auto", backup="auto", saguaro_c="auto")
    ap.add_argument("--saguaro-k", type=harness.positive_int, default=None,
                    help="K for the saguaro row; None: --k. Its draft process must build "
                         "K + 1 forwards within one verify, which a slow draft may not")
    ap.add_argument("--accounting", action=argparse.BooleanOptionalAction, default=True,
                    help="the ar/sd rows on the target's cores that saguaro adds")
    ap.add_argument("--json", default=None, type=harness.output_path(),
                    help="also write the results to this file")
    ap.add_argument("--sweep", default=None, type=parse_sweep,
                    help="grid, e.g. 'k=2,4,6;f=1,3;batch=1,4;temperature=0,1' (no HF rows)")
    ap.add_argument("--out", default="results/sweep", help="sweep output prefix (.json, .csv)")
    args = ap.parse_args(argv)
    methods = args.methods if args.methods is not None else ",".join(
        METHODS if args.tp == 1 else TP_METHODS)
    args.methods = [m.strip() for m in methods.split(",") if m.strip()]
    if not args.methods:
        ap.error(f"--methods {methods!r} names no method: choose from {', '.join(METHODS)}")
    for m in args.methods:
        if m not in METHODS:
            ap.error(f"unknown method {m!r}: choose from {', '.join(METHODS)}")
        if args.tp > 1 and m not in TP_METHODS:  # hf: transformers' own model
            ap.error(f"--tp: method {m!r} is not yet supported on a tensor-parallel target; "
                     f"choose from {', '.join(TP_METHODS)}")
    if args.tp > 1 and args.sweep:
        ap.error("--sweep is not yet supported with --tp")
    n_prompts = args.num_prompts * (len(prompt_sets.DATASETS) if args.dataset == "all" else 1)
    if args.batch_size > n_prompts:  # the batches would hold n, while b rows were recorded
        ap.error(f"--batch-size {args.batch_size} needs at least as many prompts: "
                 f"--num-prompts {args.num_prompts} gives {n_prompts}")
    if args.max_new_tokens < 2:  # one token is the prefill's: no decode step to time
        ap.error("bench.py times decoding: --max-new-tokens must be >= 2 (with 1, every row "
                 "ends at its prefill token)")
    if args.threads is None:
        args.threads = torch.get_num_threads()

    needs_draft = set(DRAFT_METHODS) & set(args.methods)
    target, draft = harness.load_models(args, args.draft if needs_draft else None)
    prompts = [(d, kernels.encode_prompt(target, text))
               for d, text in prompt_sets.load(args.dataset, args.num_prompts)]
    if args.sweep:
        args.methods = [m for m in args.methods if not m.startswith("hf")]
        points = sweep(args, target, draft, prompts)
        print(json.dumps({"conditions": conditions(args, target, draft, prompts),
                          "sweep": points}))
        return
    args.load_before = check_quiet(args)
    args.cleanup = []
    try:
        rows = build_rows(args, target, draft)
        results = measure(rows, prompts, args)
        table = summarize(results, args)
        sol = speed_of_light(table, target, prompts, args)  # while the draft process idles
    finally:
        for close in args.cleanup:
            close()
    cond = conditions(args, target, draft, prompts)
    acc = accountings(results, args)
    print_table(table, cond, acc, sol)
    record = {"conditions": cond, "rows": table, "accounting": acc, "speed_of_light": sol}
    if args.json and getattr(target, "tp", (0,))[0] == 0:  # tensor-parallel: rank 0 writes
        with open(args.json, "w") as f:
            json.dump({**record, "runs": results}, f, indent=1)
    print(json.dumps(record))


if __name__ == "__main__":
    harness.cli(main)
