"""figures.py: what each Saguaro idea buys: the paper's Figures 3-7 and Thm. 7, on our pairs.

    python figures.py --all --quick                          # the default pair, every figure
    python figures.py --all --quick --draft int4-h8k        # a weaker draft (acceptance < 0.85)
    python figures.py --fig 4 --fig 5 --out results/figures  # some figures, full size

bench.py measures the ladder at its default regime (T = 0, batch 1, where its rules mostly
choose B = 1), where the three ideas that make Saguaro more than SSD cannot show. Each figure
here isolates one:
  Fig. 3  the miss curve 1 - p_hit(F), by the paper's cheap method: one teacher-forced forward of
          target and draft over text, no decoding (timing-free), and the fitted exponent r.
  Fig. 4  geometric vs uniform fan-out (Thm. 12) at an equal budget B, per temperature, SD beside.
  Fig. 5  Saguaro sampling (Def. 14): C from 1 towards 0 moves (hit rate, acceptance).
  Fig. 6  the backup (Sec. 4.3) vs batch size b: JIT, fast, the rule's choice (auto), SD.
  Fig. 7  AR, SD, Saguaro (and the HF peers) per prompt set.
  Thm. 7  the speed model's prediction against the measurement, over every point of Figs. 4-6.
Each figure is a function returning its numbers as a dict (the JSON holds it as is); plot_*
draws it (matplotlib, Agg); the paper's values (DESIGN.md section 9) are data, in
assets/paper_figures.json, and stand beside ours in the tables. Timings reuse bench.py: its
runners, warm-up, medians and summary keys. Speeds are compared as ratios to SD or AR (the
paper's hardware runs ~10x faster than these cores). SD runs on every core; Saguaro's target and
draft share them (equal cores, bench.py's accounting).
"""
import argparse
import json
import math
import os
import statistics
import subprocess

import torch

import bench
import draft_process
import harness
import kernels
import prompts as prompt_sets

PAPER_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets",
                          "paper_figures.json")
FIGURES = ("3", "4", "5", "6", "7", "thm7")
# per-figure sizes: --quick fits every figure in ~7 minutes on 2 quiet cores with the default
# pair (~80 cache lookups per point: a hit rate's standard error ~0.05); full: ~4x that
SIZES = {
    "full": dict(prompts=12, tokens=96, temperatures=(0.0, 0.3, 0.7, 1.0), cs=(1.0, 0.7, 0.4, 0.2,
             0.1, 0.0), c_temperatures=(1.0, 0.7), batches=(1, 2, 4, 8), fig7_prompts=4),
    "quick": dict(prompts=6, tokens=64, temperatures=(0.0, 0.3, 0.7, 1.0), cs=(1.0, 0.5, 0.2, 0.0),
              c_temperatures=(1.0,), batches=(1, 2, 4, 8), fig7_prompts=3),
}


class Pair:
    """What the timed figures run on: target and draft (in this process, for SD), saguaro's
    draft process `worker` (one for every point: its rules' estimates are kept per setting), and
    `args`, the shared settings (bench.py's names: k, f, budget, temperature, threads, ...)."""

    def __init__(self, target, draft, worker, args):
        self.target, self.draft, self.worker, self.args = target, draft, worker, args


# ----------------------------------------------------------------------------------------------
# 1) the measurement: bench.py's, on rows made for one point

def sd_row(pair):
    import speculative
    return lambda a: bench.ours(speculative, pair.target, a, a.threads, draft=pair.draft, k=a.k)


def saguaro_row(pair):
    import saguaro

    def make(a):
        half = draft_process.split_threads(a.threads)[0]  # the draft process has the rest
        return bench.ours(saguaro, pair.target, a, half, draft=pair.worker, k=a.k, f=a.f,
                          fan_out=a.fan_out, saguaro_c=a.saguaro_c, backup=a.backup,
                          target_threads=half, budget=a.budget, couple_bonus=a.couple_bonus)
    return make


def run_rows(pair, rows, prompts, **settings):
    """bench.py's measurement (warm-up, every batch through every row, medians) of `rows`
    (name -> make(args) -> runner) on `prompts` [(dataset, ids)], with `settings` over the
    pair's. Returns {name: bench.summarize's row, plus b_star for saguaro}."""
    a = argparse.Namespace(**{**vars(pair.args), "trace": None, **settings})
    results = bench.measure({name: make(a) for name, make in rows.items()}, prompts, a)
    table = bench.summarize(results, a)
    for name, runs in results.items():
        if "b_star" in runs[-1]:
            table[name]["b_star"] = runs[-1]["b_star"]
    return table


def speed_point(row, **where):
    """One saguaro point for Thm. 7's scatter: the speed model's prediction and the measurement,
    both in decoded tokens per row per target-verify time (saguaro.Estimates.summary), and where
    a mean round's time went (ms: the verify beside the draft, the wait for the draft's answer,
    the whole round), to tell which term of the model is off."""
    return {**where, **{k: row.get(k) for k in ("predicted_speedup", "measured_speedup", "p_hit",
                                                 "hit_rate", "a", "verify_ms", "wait_ms",
                                                 "round_ms")}}


# ----------------------------------------------------------------------------------------------
# 2) the figures: each returns its numbers

@torch.inference_mode()
def fig3_miss_curve(target, draft, texts, temperatures=(0.0, 0.7, 1.0), max_f=64):
    """The miss curve 1 - p_hit(F), F = 1..max_f, from one teacher-forced forward of target (p)
    and draft (q) over each text (token ids), no decoding. At each position, with the draft's
    tokens ranked by its logits:
      after a miss: 1 - E[mass of p on the draft's top-F] (T = 0: is argmax p in the top-F?);
      after a hit: the bonus of a rejection follows norm(max(0, p - q)); 1 - its mass on the
      draft's top-(F+1) minus its top-1 (the drafted token at T = 0; the paper's cheap method
      keeps the top-1 at every T), over positions weighted by their rejection probability
      1 - sum min(p, q) (T = 0: positions where the argmaxes differ).
    Exact expectations, so no sampling noise. Returns {"F", "curves": {name: [miss per F]},
    "fits": {name: fit_power}, "positions"}; an after-a-hit curve is None if q never differs."""
    max_f = min(max_f, target.cfg.vocab_size - 1)  # a tiny vocabulary has fewer guesses
    acc = {T: {"miss": torch.zeros(max_f, dtype=torch.float64), "hit": torch.zeros(
        max_f, dtype=torch.float64), "rejected": 0.0, "n": 0} for T in temperatures}
    for ids in texts:
        lp, lq = (logits_over(m, ids) for m in (target, draft))
        V = min(lp.shape[-1], lq.shape[-1])
        lp, lq = lp[:, :V], lq[:, :V]                                       # (n, V)
        order = lq.topk(max_f + 1, dim=-1).indices                         # (n, F+1)
        ranked = lq.gather(-1, order) > float("-inf")  # a -inf logit is no guess at all
        for T, s in acc.items():
            p, q = kernels.probs_from_logits(lp, T), kernels.probs_from_logits(lq, T)
            s["miss"] += (p.gather(-1, order) * ranked)[:, :max_f].cumsum(-1).sum(0).double()
            residual = (p - q).clamp_min(0)                                # mass = P(reject)
            s["hit"] += (residual.gather(-1, order) * ranked)[:, 1:].cumsum(-1).sum(0).double()
            s["rejected"] += float(residual.sum())
            s["n"] += len(ids)
    F, curves = list(range(1, max_f + 1)), {}
    for T, s in acc.items():
        curves[f"after a miss, T={T:g}"] = (1 - s["miss"] / s["n"]).clamp_min(0).tolist()
        curves[f"after a hit, T={T:g}"] = ((1 - s["hit"] / s["rejected"]).clamp_min(0).tolist()
                                           if s["rejected"] > 1e-9 else None)
    return {"F": F, "curves": curves, "positions": acc[temperatures[0]]["n"],
            "fits": {name: fit_power(F, m) for name, m in curves.items() if m is not None}}


@torch.inference_mode()
def logits_over(model, ids):
    """(n, V) logits of one teacher-forced forward over the token ids."""
    cache = model.new_cache(1, len(ids))
    return model(torch.tensor([ids], device=model.device), cache)[0].float().cpu()


def fit_power(F, miss, low=2):
    """Least squares in log-log over F >= low (where the miss rate is > 0): the pure law
    miss = F^-r (through the origin, as measure.py fits r online) and miss = A F^-r (with a
    prefactor A). rms: the residual's root mean square in log units (0.1 ~ 10% off); the pure
    law fits if it is within 0.05 of the prefactor's rms (a flat curve fits neither)."""
    pts = [(math.log(f), math.log(m)) for f, m in zip(F, miss) if f >= low and m > 0]
    if len(pts) < 2:
        return None
    x, y = torch.tensor(pts, dtype=torch.float64).T
    r_pure = float(-(x * y).sum() / (x * x).sum())
    slope, log_a = torch.linalg.lstsq(torch.stack((x, torch.ones_like(x)), 1), y[:, None]
                                      ).solution.flatten().tolist()
    rms = lambda fit: float((y - fit).pow(2).mean().sqrt())
    return {"r_pure": r_pure, "rms_pure": rms(-r_pure * x), "r": -slope,
            "prefactor": math.exp(log_a), "rms": rms(slope * x + log_a),
            "pure_fits": rms(-r_pure * x) <= rms(slope * x + log_a) + 0.05}


FIG4_SERIES = {"uniform": dict(fan_out="uniform", couple_bonus=False),   # the paper's two
               "geometric": dict(fan_out="geometric", couple_bonus=False),
               "coupled": dict(fan_out="geometric", couple_bonus=True)}  # + saguaro.py's idea 7


def fig4_fan_out(pair, prompts, temperatures, budget):
    """Uniform vs geometric fan-out at one budget B (per row per round), per temperature, SD
    beside: hit rate, acceptance and decode tokens/s of each; and geometric with the coupled
    bonus (ours, not the paper's: saguaro.py idea 7). Returns {"budget", "k", "points":
    [{"T", "sd", "uniform", "geometric", "coupled"}, ...]} (each a bench.summarize row)."""
    points = []
    for T in temperatures:
        rows = {"sd": sd_row(pair)}
        point = {"T": T, **run_rows(pair, rows, prompts, temperature=T)}
        for name, series in FIG4_SERIES.items():
            row = run_rows(pair, {"saguaro": saguaro_row(pair)}, prompts, temperature=T,
                           budget=budget, **series)["saguaro"]
            point[name] = row
        points.append(point)
    return {"budget": budget, "k": pair.args.k, "points": points}


def fig5_saguaro_sampling(pair, prompts, cs, temperatures, budget):
    """C from 1 towards 0 at each temperature: hit rate, acceptance, tokens/s per C (geometric
    fan-out at budget B). Returns {"budget", "points": [{"T", "C", **saguaro row}, ...]}."""
    points = []
    for T in temperatures:
        for c in cs:
            row = run_rows(pair, {"saguaro": saguaro_row(pair)}, prompts, temperature=T,
                           saguaro_c=c, budget=budget, fan_out="geometric")["saguaro"]
            points.append({"T": T, "C": c, **row})
    return {"budget": budget, "points": points}


def fig6_backup(pair, prompts, batches, rows=2):
    """Tokens/s per sequence with the JIT backup, the fast backup, the rule's choice (auto) and
    SD at each batch size b (budget 1, as the paper's F = 1), over max(b, rows) prompts; the
    crossover observed (the first b where fast beats JIT) and the b* the rule predicts
    (saguaro.Estimates.b_star, from the auto run's estimates).
    Returns {"points": [{"b", "jit", "fast", "auto", "sd"}], "crossover_observed", ...}."""
    points = []
    for b in batches:
        n = max(b, rows)
        batch = prompts[:n - n % b]  # whole batches of b rows
        point = {"b": b, **run_rows(pair, {"sd": sd_row(pair)}, batch, batch_size=b)}
        for backup in ("jit", "fast", "auto"):
            point[backup] = run_rows(pair, {"saguaro": saguaro_row(pair)}, batch, batch_size=b,
                                     backup=backup, budget=1)["saguaro"]
        for row in (point[m] for m in ("sd", "jit", "fast", "auto")):
            row["per_sequence_tokens_per_s"] = row["decode_tokens_per_s"] / b
        points.append(point)
    crossover = next((p["b"] for p in points if p["fast"]["decode_tokens_per_s"]
                      > p["jit"]["decode_tokens_per_s"]), None)
    return {"points": points, "crossover_observed": crossover,
            "b_star_predicted": [p["auto"].get("b_star") for p in points]}


def fig7_datasets(pair, prompts, methods):
    """AR, SD, Saguaro (and the HF peers) per prompt set: decode tokens/s and speedup vs AR.
    prompts: [(dataset, ids)]. Returns {"datasets": {name: {method: row}}, "methods"}."""
    a = argparse.Namespace(**{**vars(pair.args), "trace": None,
                              "methods": [m for m in methods if m != "saguaro"]})
    a.cleanup = []
    rows = bench.build_rows(a, pair.target, pair.draft)   # ar, sd, hf, hf-assisted
    if "saguaro" in methods:
        rows["saguaro"] = saguaro_row(pair)(a)
    results = bench.measure(rows, prompts, a)
    out = {}
    for name in dict.fromkeys(d for d, _ in prompts):
        mine = {m: [r for r in runs if r["dataset"] == name] for m, runs in results.items()}
        out[name] = bench.summarize(mine, a)
    return {"datasets": out, "methods": list(rows)}


def thm7_speed_model(figs):
    """Every saguaro point of Figs. 4-6: the speed model's prediction (Thm. 7) vs the
    measurement, both in tokens per row per target-verify time, and the relative error."""
    points = []
    for p in figs.get("fig4", {}).get("points", []):
        points += [speed_point(p[m], fig="4", T=p["T"], fan_out=m) for m in FIG4_SERIES]
    for p in figs.get("fig5", {}).get("points", []):
        points.append(speed_point(p, fig="5", T=p["T"], C=p["C"]))
    for p in figs.get("fig6", {}).get("points", []):
        points += [speed_point(p[m], fig="6", b=p["b"], backup=m) for m in ("jit", "fast",
                                                                            "auto")]
    for p in points:
        pred, meas = p["predicted_speedup"], p["measured_speedup"]
        p["error"] = pred / meas - 1 if pred and meas else None
    errors = [abs(p["error"]) for p in points if p["error"] is not None]
    return {"points": points, "within_15_percent": sum(e <= 0.15 for e in errors),
            "of": len(errors), "median_abs_error": statistics.median(errors) if errors else None}


# ----------------------------------------------------------------------------------------------
# 3) the plots: labels, units and a legend only

def plot_fig3(fig, paper, path):
    import matplotlib.pyplot as plt
    ax = plt.subplots(figsize=(7, 5))[1]
    for name, miss in fig["curves"].items():
        if miss is not None:
            ax.loglog(fig["F"], miss, label=f"ours: {name}")
    for name, miss in paper["fig3"]["curves"].items():
        ax.loglog(paper["fig3"]["F"], miss, "--", marker=".", label=f"paper: {name}")
    ax.set(xlabel="F (guesses)", ylabel="miss rate 1 - p_hit(F)", title="Fig. 3: the miss curve")
    save(path, ax)


def plot_fig4(fig, paper, path):
    import matplotlib.pyplot as plt
    axes = plt.subplots(1, 2, figsize=(11, 4.5))[1]
    T = [p["T"] for p in fig["points"]]
    pp = paper["fig4"]
    for m in FIG4_SERIES:
        label = f"ours: {m}" if m != "coupled" else "ours: geometric + coupled bonus (not the paper's)"
        axes[0].plot(T, [p[m].get("hit_rate") for p in fig["points"]], marker="o", label=label)
        axes[1].plot(T, [p[m]["decode_tokens_per_s"] / p["sd"]["decode_tokens_per_s"]
                         for p in fig["points"]], marker="o", label=label)
        if m == "coupled":
            continue
        axes[0].plot(pp["T"], pp[f"{m}_hit_rate"], "--", marker=".", label=f"paper: {m}")
        axes[1].plot(pp["T"], [x / s for x, s in zip(pp[f"{m}_tokens_per_s"],
                                                      pp["sd_tokens_per_s"])],
                     "--", marker=".", label=f"paper: {m}")
    axes[0].set(xlabel="temperature T", ylabel="cache hit rate",
                title=f"Fig. 4: fan-out at budget B = {fig['budget']} (ours)")
    axes[1].set(xlabel="temperature T", ylabel="decode tokens/s / SD's", title="speed vs SD")
    save(path, *axes)


def plot_fig5(fig, paper, path):
    import matplotlib.pyplot as plt
    axes = plt.subplots(1, 2, figsize=(11, 4.5))[1]
    for T in dict.fromkeys(p["T"] for p in fig["points"]):
        pts = [p for p in fig["points"] if p["T"] == T]
        axes[0].plot([p.get("hit_rate") for p in pts], [p.get("acceptance_rate") for p in pts],
                     marker="o", label=f"ours, T={T:g} (C = {pts[0]['C']:g} .. {pts[-1]['C']:g})")
        axes[1].plot([p["C"] for p in pts], [p["decode_tokens_per_s"] for p in pts],
                     marker="o", label=f"ours, T={T:g}")
    axes[0].plot(paper["fig5"]["hit_rate"], paper["fig5"]["acceptance"], "--", marker=".",
                 label="paper (C = 1 .. towards 0)")
    axes[0].set(xlabel="cache hit rate", ylabel="acceptance rate",
                title="Fig. 5: Saguaro sampling, C from 1 towards 0")
    axes[1].set(xlabel="C", ylabel="decode tokens/s", title="speed per C (ours)")
    save(path, *axes)


def plot_fig6(fig, paper, path):
    import matplotlib.pyplot as plt
    axes = plt.subplots(1, 2, figsize=(11, 4.5))[1]
    b = [p["b"] for p in fig["points"]]
    for m in ("jit", "fast", "auto", "sd"):
        axes[0].plot(b, [p[m]["per_sequence_tokens_per_s"] for p in fig["points"]], marker="o",
                     label=m)
    pp = paper["fig6"]
    for m in ("jit", "fast", "sd"):
        axes[1].plot(pp["b"], pp[f"{m}_tokens_per_s"], "--", marker=".", label=m)
    axes[0].set(xscale="log", xlabel="batch size b", ylabel="decode tokens/s per sequence",
                title="Fig. 6: the backup vs batch size (ours)")
    axes[1].set(xscale="log", xlabel="batch size b", ylabel="decode tokens/s per sequence",
                title="the paper's (H100s)")
    save(path, *axes)


def plot_fig7(fig, paper, path):
    import matplotlib.pyplot as plt
    ax = plt.subplots(figsize=(9, 4.5))[1]
    names, methods = list(fig["datasets"]), [m for m in fig["methods"] if m != "ar"]
    width = 0.8 / (len(methods) + 2)
    for i, m in enumerate(methods):
        ax.bar([j + i * width for j in range(len(names))],
               [fig["datasets"][d][m].get("speedup_vs_ar") or 0 for d in names], width,
               label=f"ours: {m}")
    for i, m in enumerate(("sd", "saguaro")):
        ref = paper["fig7"]["datasets"]
        ax.bar([j + (len(methods) + i) * width for j in range(len(names))],
               [ref[d][m] / ref[d]["ar"] if d in ref else 0 for d in names], width,
               label=f"paper: {m}", hatch="//")
    ax.set_xticks([j + 0.4 for j in range(len(names))], names)
    ax.set(ylabel="decode speedup vs AR", title="Fig. 7: per data set")
    save(path, ax)


def plot_thm7(fig, paper, path):
    import matplotlib.pyplot as plt
    ax = plt.subplots(figsize=(5.5, 5.5))[1]
    for name in dict.fromkeys(p["fig"] for p in fig["points"]):
        pts = [p for p in fig["points"] if p["fig"] == name and p["error"] is not None]
        ax.scatter([p["measured_speedup"] for p in pts], [p["predicted_speedup"] for p in pts],
                   label=f"Fig. {name} points")
    top = max([p["measured_speedup"] or 0 for p in fig["points"]]
              + [p["predicted_speedup"] or 0 for p in fig["points"]] + [1])
    ax.plot([0, top], [0, top], "k-", label="predicted = measured")
    ax.plot([0, top], [0, 1.15 * top], "k:", label="+-15%")
    ax.plot([0, top], [0, 0.85 * top], "k:")
    ax.set(xlabel="measured (tokens per row per verify time)", ylabel="predicted by Thm. 7",
           title="Thm. 7: the speed model vs measurement")
    save(path, ax)


def save(path, *axes):
    """Every plot's end: a legend on each of its axes, then its figure written to `path`."""
    import matplotlib.pyplot as plt
    for ax in axes:
        ax.legend(fontsize=7)
    fig = axes[0].figure
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# 4) the tables: ours beside the paper's

def tables(figs, paper):
    """(title, column names, rows) per figure: ours beside the paper's numbers."""
    f2 = lambda v: "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))
    out = []
    if "fig3" in figs:
        f, ref = figs["fig3"], paper["fig3"]
        at = [F for F in ref["F"] if F <= len(f["F"])]
        fits = lambda fit: ([f2(fit["r"]), f2(fit["prefactor"]), f2(fit["r_pure"]),
                             str(fit["pure_fits"])] if fit else ["no misses to fit"] + ["-"] * 3)
        rows = [[name] + ([f2(m[F - 1]) for F in at] if m else ["never rejected"] + ["-"] * (
                len(at) - 1)) + fits(f["fits"].get(name)) for name, m in f["curves"].items()]
        rows += [[f"paper: {name}"] + [f2(m[ref["F"].index(F)]) for F in at]
                 + fits(fit_power(ref["F"], m)) for name, m in ref["curves"].items()]
        out.append(("Fig. 3: miss rate 1 - p_hit(F)", ["curve"] + [f"F={F}" for F in at]
                    + ["r", "A (A F^-r)", "r (pure F^-r)", "pure fits"], rows))
    if "fig4" in figs:
        f, ref = figs["fig4"], paper["fig4"]
        rows = []
        for p in f["points"]:
            i = ref["T"].index(p["T"]) if p["T"] in ref["T"] else None
            paper_of = lambda key: f2(ref[key][i]) if i is not None else "-"
            sd = p["sd"]["decode_tokens_per_s"]
            rows.append([f2(p["T"]), f2(p["uniform"].get("hit_rate")),
                         f2(p["geometric"].get("hit_rate")), f2(p["coupled"].get("hit_rate")),
                         f"{paper_of('uniform_hit_rate')} / {paper_of('geometric_hit_rate')}",
                         f2(sd), f2(p["uniform"]["decode_tokens_per_s"]),
                         f2(p["geometric"]["decode_tokens_per_s"]),
                         f2(p["geometric"]["decode_tokens_per_s"] / sd),
                         f2(p["coupled"]["decode_tokens_per_s"] / sd),
                         f2(ref["geometric_tokens_per_s"][i] / ref["sd_tokens_per_s"][i])
                         if i is not None else "-"])
        out.append((f"Fig. 4: uniform vs geometric at B = {f['budget']}, K = {f['k']} (coupled: "
                    "geometric + the coupled bonus, ours)",
                    ["T", "hit uniform", "hit geometric", "hit coupled", "paper hit u / g",
                     "sd tok/s", "uniform tok/s", "geometric tok/s", "geometric / sd",
                     "coupled / sd", "paper g / sd"], rows))
    if "fig5" in figs:
        ref = paper["fig5"]
        rows = [[f2(p["T"]), f2(p["C"]), f2(p.get("hit_rate")), f2(p.get("acceptance_rate")),
                 f2(p["decode_tokens_per_s"])] for p in figs["fig5"]["points"]]
        rows.append(["paper", "1 .. ->0", " ".join(f"{h:.2f}" for h in ref["hit_rate"]),
                     " ".join(f"{a:.2f}" for a in ref["acceptance"]), "-"])
        out.append((f"Fig. 5: Saguaro sampling (B = {figs['fig5']['budget']})",
                    ["T", "C", "hit rate", "acceptance", "tok/s"], rows))
    if "fig6" in figs:
        f, ref = figs["fig6"], paper["fig6"]
        rows = []
        for p in f["points"]:
            i = ref["b"].index(p["b"]) if p["b"] in ref["b"] else None
            rows.append([str(p["b"])] + [f2(p[m]["per_sequence_tokens_per_s"]) for m in
                                         ("jit", "fast", "auto", "sd")]
                        + [p["auto"].get("backup", "-"), f2(p["auto"].get("b_star"))]
                        + ([f"{ref['jit_tokens_per_s'][i]} / {ref['fast_tokens_per_s'][i]} / "
                            f"{ref['sd_tokens_per_s'][i]}"] if i is not None else ["-"]))
        out.append((f"Fig. 6: tok/s per sequence vs batch (crossover observed at b = "
                    f"{f['crossover_observed']}; paper: b* between 1 and 2)",
                    ["b", "jit", "fast", "auto", "sd", "auto chose (row-rounds)", "rule's b*",
                     "paper jit / fast / sd"], rows))
    if "fig7" in figs:
        f, ref = figs["fig7"], paper["fig7"]["datasets"]
        rows = [[d] + [f2(f["datasets"][d][m]["decode_tokens_per_s"]) + " ("
                       + f2(f["datasets"][d][m].get("speedup_vs_ar")) + "x)"
                       for m in f["methods"]]
                + ([f"{ref[d]['ar']} / {ref[d]['sd']} / {ref[d]['saguaro']}"] if d in ref
                   else ["-"]) for d in f["datasets"]]
        out.append(("Fig. 7: decode tok/s (x ar) per data set", ["dataset"] + f["methods"]
                    + ["paper ar / sd / ssd"], rows))
    if "thm7" in figs:
        f = figs["thm7"]
        rows = [[p["fig"], ", ".join(f"{k}={v}" for k, v in p.items() if k in
                                     ("T", "fan_out", "C", "b", "backup")),
                 f2(p["predicted_speedup"]), f2(p["measured_speedup"]), f2(p["error"]),
                 f2(p["p_hit"]), f2(p["hit_rate"]), f2(p["verify_ms"]), f2(p["wait_ms"]),
                 f2(p["round_ms"])] for p in f["points"]]
        out.append((f"Thm. 7: predicted vs measured ({f['within_15_percent']} of {f['of']} "
                    "within 15%)", ["fig", "point", "predicted", "measured", "error",
                                    "p_hit (model)", "hit rate", "verify ms", "wait ms",
                                    "round ms"], rows))
    return out


def print_tables(figs, paper, conditions):
    from rich.console import Console
    from rich.table import Table
    console = Console(width=160)
    console.print("[bold]conditions[/bold]: " + ", ".join(
        f"{k}={v}" for k, v in conditions.items() if k != "prompt_tokens"))  # (in the JSON)
    for title, cols, rows in tables(figs, paper):
        t = Table(title=title)
        for c in cols:
            t.add_column(c, justify="right")
        for row in rows:
            t.add_row(*row)
        console.print(t)


# ----------------------------------------------------------------------------------------------
# 5) the command

def commit():
    """The commit that made these numbers (with '+dirty' if the tree has changes)."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        git = lambda *a: subprocess.run(["git", "-C", here, *a], capture_output=True, text=True,
                                        timeout=10).stdout.strip()
        return git("rev-parse", "--short", "HEAD") + ("+dirty" if git("status", "--porcelain",
                                                                      "-uno") else "")
    except (OSError, subprocess.TimeoutExpired):
        return None


def run_figures(pair, which, size, prompts, fig3_texts, out):
    """Measure the figures in `which`, then write out/figures.json, out/fig<N>.png and print the
    tables. prompts: [(dataset, ids)] over every data set; returns the JSON's dict."""
    import matplotlib
    matplotlib.use("Agg")
    with open(PAPER_FILE) as f:
        paper = json.load(f)
    a, n = pair.args, size["prompts"]
    first = [p for p in prompts if p[0] == a.dataset][:n] or prompts[:n]
    figs = {}
    if "3" in which:
        figs["fig3"] = fig3_miss_curve(pair.target, pair.draft, fig3_texts)
    if "4" in which:
        figs["fig4"] = fig4_fan_out(pair, first, size["temperatures"], a.fig4_budget)
    if "5" in which:
        figs["fig5"] = fig5_saguaro_sampling(pair, first, size["cs"], size["c_temperatures"],
                                             a.fig4_budget)
    if "6" in which:
        same_set = [p for p in prompts if p[0] == a.dataset] or prompts
        figs["fig6"] = fig6_backup(pair, same_set, size["batches"], n)
    if "7" in which:
        per_set = [p for d in dict.fromkeys(d for d, _ in prompts)
                   for p in [q for q in prompts if q[0] == d][:size["fig7_prompts"]]]
        figs["fig7"] = fig7_datasets(pair, per_set, a.fig7_methods)
    if "thm7" in which and {"fig4", "fig5", "fig6"} & set(figs):
        figs["thm7"] = thm7_speed_model(figs)
    conditions = {"hardware": bench.hardware(a.device), "model": getattr(pair.target, "name",
                                                                          None), "draft": a.draft,
                  "k": a.k, "fig4_fig5_budget": a.fig4_budget, "fig6_budget": 1,
                  "temperature_default": a.temperature, "threads": a.threads,
                  "prompts_per_point": n, "max_new_tokens": a.max_new_tokens,
                  "dataset (figs. 4-6)": a.dataset,
                  "prompt_tokens": [[d, len(ids)] for d, ids in prompts],
                  "fig3_text_tokens": sum(map(len, fig3_texts)),  # main: prompts.GSM8K
                  "sizes": {k: list(v) if isinstance(v, tuple) else v for k, v in size.items()},
                  "dtype": a.dtype, "commit": commit(), "torch": torch.__version__}
    record = {"conditions": conditions, **figs}
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "figures.json")
    if os.path.exists(path):  # keep the figures this run did not measure, with their conditions
        with open(path) as f:
            old = json.load(f)
        kept = {k: v for k, v in old.items() if k.startswith(("fig", "thm")) and k not in figs}
        earlier = old.get("conditions_of_earlier_runs", {})
        record.update(kept)
        if kept:   # "conditions" describes this run's figures; these, the runs that made them
            record["conditions_of_earlier_runs"] = {k: earlier.get(k, old.get("conditions"))
                                                    for k in kept}
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    for name, fig in figs.items():
        globals()[f"plot_{name}"](fig, paper, os.path.join(out, f"{name}.png"))
    print_tables(figs, paper, conditions)
    return record


def parse_args(argv=None):
    """The command line -> (args with bench.py's settings filled in, figures, size)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_common_args(ap)
    ap.set_defaults(threads=None, max_new_tokens=None)
    ap.add_argument("--draft", default="default", type=harness.draft_name,
                    help="the draft (" + __import__("drafts").DRAFT_HELP + "); int4-h8k: a "
                    "weaker one (acceptance < 0.85 at T = 0), so the fan-out has a shape to find")
    ap.add_argument("--k", type=harness.positive_int, default=4, help="speculation length K")
    ap.add_argument("--fig", action="append", choices=FIGURES, help="a figure (repeatable)")
    ap.add_argument("--all", action="store_true", help="every figure")
    ap.add_argument("--quick", action="store_true",
                    help="fewer prompts, tokens and points: ~7 minutes per pair on 2 quiet cores")
    ap.add_argument("--budget", type=harness.positive_int, default=None, dest="fig4_budget",
                    help="B for Figs. 4 and 5; None: K + 1 (uniform = one guess per k)")
    ap.add_argument("--dataset", default="alpaca", choices=prompt_sets.DATASETS,
                    help="the prompt set of Figs. 4-6")
    ap.add_argument("--fig7-methods", default="ar,sd,saguaro,hf,hf-assisted",
                    help="Fig. 7's rows (bench.py's names)")
    ap.add_argument("--timeout", type=float, default=10.0,
                    help="seconds to wait for saguaro's draft process")
    ap.add_argument("--out", default="results/figures", type=harness.output_path("folder"),
                    help="folder for the PNGs and JSON")
    args = ap.parse_args(argv)
    which = FIGURES if args.all else tuple(args.fig or ())
    if not which:
        ap.error("name the figures: --all, or --fig 3 --fig 4 ...")
    if "thm7" in which and not {"4", "5", "6"} & set(which):
        ap.error("--fig thm7 plots the points of Figs. 4-6: add --fig 4, 5 or 6")
    if args.max_new_tokens is not None and args.max_new_tokens < 2:
        ap.error("figures.py times decoding: --max-new-tokens must be >= 2")
    size = SIZES["quick" if args.quick else "full"]
    args.threads = args.threads or torch.get_num_threads()
    args.max_new_tokens = args.max_new_tokens or size["tokens"]
    args.fig4_budget = args.fig4_budget or args.k + 1
    args.fig7_methods = [m.strip() for m in args.fig7_methods.split(",") if m.strip()]
    unknown = [m for m in args.fig7_methods if m not in bench.METHODS]
    if unknown or not args.fig7_methods:
        ap.error(f"--fig7-methods: {', '.join(unknown) or 'no method'}: choose from "
                 f"{', '.join(bench.METHODS)}")
    # bench.py's other settings, fixed here (each figure varies its own): SSD's F = 1, the JIT
    # backup, B = 1 (Fig. 6 keeps them: the paper's F = 1), and the bonus drawn apart as the
    # paper draws it (Fig. 4 adds saguaro.py's coupled bonus as a series of its own)
    vars(args).update(f=1, saguaro_c=1.0, backup="jit", fan_out="geometric", budget=1,
                      couple_bonus=False,
                      batch_size=1, saguaro_k=None, accounting=False, draft_device=None,
                      trace=None)
    return args, which, size


def main(argv=None):
    args, which, size = parse_args(argv)
    target, draft = harness.load_models(args, args.draft)
    n = max(size["prompts"], max(size["batches"]) if "6" in which else 0, size["fig7_prompts"])
    prompts = [(d, kernels.encode_prompt(target, t)) for d, t in prompt_sets.load("all", n)]
    texts = [kernels.encode_prompt(target, t, chat=False) for t in prompt_sets.GSM8K]
    import saguaro
    threads = draft_process.split_threads(args.threads)[1]  # as bench.py's saguaro row
    with saguaro.DraftWorker(args.draft, target, threads=threads,
                             timeout_s=args.timeout) as worker:
        run_figures(Pair(target, draft, worker, args), which, size, prompts, texts, args.out)
    print(f"[figures: {args.out}/figures.json and a PNG per figure]")


if __name__ == "__main__":
    harness.cli(main)
