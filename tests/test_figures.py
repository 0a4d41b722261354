"""figures.py (the paper's Figs. 3-7 and Thm. 7) on tiny random models, and the two bench/saguaro
faults its issue found: the speed of light at batch b, and a uniform fan-out below K + 1."""
import argparse
import functools
import json
import os
import warnings

import pytest
import torch

import bench
import figures
import harness
from conftest import noisy_copy, tiny_model


def texts(n=3, length=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (length,), generator=g).tolist() for _ in range(n)]


def test_a_draft_equal_to_the_target_never_misses_at_f_1_when_greedy():
    target = tiny_model(0)
    fig = figures.fig3_miss_curve(target, target, texts(), max_f=8)
    assert fig["curves"]["after a miss, T=0"][0] == 0.0
    assert fig["curves"]["after a hit, T=0"] is None          # p = q: never rejected
    assert fig["curves"]["after a miss, T=1"][0] > 0          # a sample may differ from the top


def test_greedy_miss_curve_counts_the_target_token_outside_the_drafts_top_f():
    target, draft = tiny_model(0, scale=3.0), noisy_copy(tiny_model(0, scale=3.0), 0.6)
    ts = texts()
    fig = figures.fig3_miss_curve(target, draft, ts, temperatures=(0.0,), max_f=8)
    # the same rates counted one position at a time, by rank
    after_miss, after_hit, disagree = [0] * 8, [0] * 8, 0
    for ids in ts:
        lp, lq = figures.logits_over(target, ids), figures.logits_over(draft, ids)
        for t_logits, d_logits in zip(lp, lq):
            y = int(t_logits.argmax())
            rank = int((d_logits > d_logits[y]).sum())
            disagree += rank > 0
            for F in range(1, 9):
                after_miss[F - 1] += rank >= F
                after_hit[F - 1] += rank > F                 # top-(F+1) minus the top-1
    n = sum(map(len, ts))
    assert disagree > 0
    assert fig["curves"]["after a miss, T=0"] == pytest.approx([m / n for m in after_miss])
    assert fig["curves"]["after a hit, T=0"] == pytest.approx([m / disagree for m in after_hit])


def test_fit_power_finds_r_and_says_a_pure_power_law_needs_no_prefactor():
    F = list(range(1, 65))
    pure = figures.fit_power(F, [f ** -0.5 for f in F])
    assert pure["r_pure"] == pytest.approx(0.5) and pure["pure_fits"]
    scaled = figures.fit_power(F, [0.4 * f ** -0.5 for f in F])
    assert scaled["r"] == pytest.approx(0.5) and scaled["prefactor"] == pytest.approx(0.4)
    assert not scaled["pure_fits"]


@pytest.fixture(scope="module")
def pair():
    import saguaro
    args, _, _ = figures.parse_args(["--all", "--quick", "--k", "2", "--threads", "2",
                                     "--max-new-tokens", "10", "--fig7-methods", "ar,sd,saguaro"])
    target = tiny_model(0, scale=2.0)
    with saguaro.DraftWorker(functools.partial(tiny_model, 0, scale=2.0), target,
                             threads=1) as worker:
        yield figures.Pair(target, tiny_model(0, scale=2.0), worker, args)


def test_geometric_beats_uniform_when_every_round_accepts_all_k(pair):
    # draft = target at T = 1: a = 1, every round lands on k = K; uniform spends one of its
    # K + 1 guesses there, geometric nearly all of them
    prompts = [("tiny", ids[:6]) for ids in texts(2)]
    long = figures.Pair(pair.target, pair.draft, pair.worker, argparse.Namespace(
        **{**vars(pair.args), "max_new_tokens": 60}))        # ~20 rounds per prompt
    fig = figures.fig4_fan_out(long, prompts, temperatures=(1.0,), budget=3)
    (point,) = fig["points"]
    assert point["sd"]["acceptance_rate"] == pytest.approx(1.0)
    assert point["geometric"]["hit_rate"] > point["uniform"]["hit_rate"]
    # and with the coupled bonus the one bet on k = K is the target's own draw (p = q): each
    # prompt's first lookup can miss (the fan-out's prior), none after it
    coupled = point["coupled"]
    assert coupled["hit_rate"] > point["geometric"]["hit_rate"]
    assert sum(coupled["lookups_by_k"]) - sum(coupled["hits_by_k"]) <= len(prompts)


def test_quick_run_writes_every_figure_json_and_png(pair, tmp_path):
    size = dict(prompts=1, tokens=8, temperatures=(0.0, 1.0), cs=(1.0, 0.0),
                c_temperatures=(1.0,), batches=(1, 2), fig7_prompts=1)
    prompts = [(d, ids[:6]) for d, ids in zip(("alpaca", "alpaca", "gsm8k"), texts(3))]
    record = figures.run_figures(pair, figures.FIGURES, size, prompts, texts(2), str(tmp_path))
    on_disk = json.load(open(tmp_path / "figures.json"))
    assert on_disk == json.loads(json.dumps(record))
    assert {"conditions", "fig3", "fig4", "fig5", "fig6", "fig7", "thm7"} <= set(on_disk)
    for name in ("fig3", "fig4", "fig5", "fig6", "fig7", "thm7"):
        assert os.path.getsize(tmp_path / f"{name}.png") > 0
    assert on_disk["conditions"]["k"] == 2
    assert len(on_disk["thm7"]["points"]) == 2 * 3 + 2 + 3 * 2   # Figs. 4, 5, 6
    assert [p["b"] for p in on_disk["fig6"]["points"]] == [1, 2]
    assert set(on_disk["fig7"]["datasets"]) == {"alpaca", "gsm8k"}
    assert set(on_disk["fig7"]["datasets"]["gsm8k"]) == {"ar", "sd", "saguaro"}
    # a later run of one figure into the same folder keeps the others, each with its conditions
    # (it replaced the whole file: a newcomer run of --fig 7 then --fig 4 kept only fig4)
    pair.args.k = 3
    try:
        again = figures.run_figures(pair, ("3",), size, prompts, texts(2), str(tmp_path))
    finally:
        pair.args.k = 2
    merged = json.load(open(tmp_path / "figures.json"))
    assert merged["fig3"] == json.loads(json.dumps(again["fig3"]))
    assert merged["fig6"] == on_disk["fig6"] and set(on_disk) <= set(merged)
    assert merged["conditions"]["k"] == 3 and "fig3" not in merged["conditions_of_earlier_runs"]
    assert merged["conditions_of_earlier_runs"]["fig6"]["k"] == 2


@pytest.mark.parametrize("flags, message", [
    (["--dataset", "nope"], "invalid choice: 'nope'"),
    (["--fig7-methods", "ar,foo"], "--fig7-methods: foo: choose from")])
def test_figures_refuses_an_unknown_dataset_or_method_before_loading(flags, message, capsys):
    """--dataset nope ran every figure on a fallback set, and --fig7-methods foo failed after
    the model had loaded (a newcomer run)."""
    with pytest.raises(SystemExit) as exit_:
        figures.parse_args(["--all", "--quick"] + flags)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_speed_of_light_at_batch_b_times_a_verify_of_b_rows(monkeypatch):
    seen = []

    def step_times(target, batch, K, threads, cpus=None):
        seen.append(batch)
        return 0.030, 0.060                  # a verify of the 4 rows
    monkeypatch.setattr(bench, "step_times", step_times)
    args = type("Args", (), {"saguaro_k": 3, "k": 4, "saguaro_cores": (1, None),
                             "batch_size": 4})()
    table = {"saguaro": {"tau": 3.0, "decode_tokens_per_s": 160.0, "verify_ms": 70.0,
                         "round_ms": 75.0, "wait_ms": 1.0, "predicted_speedup": 2.0,
                         "measured_speedup": 2.0, "build_ms": 90.0}}
    prompts = [("alpaca", [1, 2, 3 + i]) for i in range(4)]
    sol = bench.speed_of_light(table, None, prompts, args)
    assert seen == [[ids for _, ids in prompts]]
    assert sol["speed_of_light_tokens_per_s"] == pytest.approx(4 * 3.0 / 0.060)   # every row
    assert sol["efficiency"] == pytest.approx(0.8) and sol["efficiency"] <= 1
    # a round lasts at least the draft's build (90 ms, longer than the 60 ms verify)
    assert sol["draft_bound_tokens_per_s"] == pytest.approx(4 * 3.0 / 0.090)


def test_step_times_runs_a_verify_of_every_row():
    target, shapes = tiny_model(0), []
    real = target.forward
    target.forward = lambda tokens, cache, *a, **k: shapes.append(tuple(tokens.shape)) or real(
        tokens, cache, *a, **k)
    bench.step_times(target, [[1, 2, 3], [4, 5]], 3, threads=1, reps=1)
    assert (2, 4) in shapes and (2, 1) in shapes and all(s[0] == 2 for s in shapes)


def test_uniform_fan_out_below_k_plus_1_warns_that_k_equals_k_gets_nothing():
    target = tiny_model(0)
    with pytest.warns(UserWarning, match=r"B = 4 < K \+ 1 = 5.*k = K"):
        harness.check_saguaro(target, [1, 2, 3], 8, k=4, fan_out="uniform", budget=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        harness.check_saguaro(target, [1, 2, 3], 8, k=4, fan_out="uniform", budget=5)
        harness.check_saguaro(target, [1, 2, 3], 8, k=4, fan_out="geometric", budget=4)
