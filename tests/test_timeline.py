"""timeline.py: recording is off by default and changes nothing, a trace holds both processes on
one clock with the draft's cache build running during the target's verify, saguaro's speed model
reads the very spans the trace shows; bench.py's model-free peer and its speed of light.

No verdict depends on the machine's speed: the one test that needs real concurrency (a verify
overlapping a cache build) asks for ANY overlapping pair over all rounds of a run."""
import functools
import json
import os
import subprocess
import sys

import pytest
import torch

import autoregressive
import bench
import kernels
import saguaro
import speculative
import ssd
import timeline
from conftest import tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING = ("_s", "per_s", "speedup", "b_star", "backup_why")   # stats read off a clock


def spans(events, name, pid=None):
    return sorted((e for e in events if e["ph"] == "X" and e["name"] == name
                   and pid in (None, e["pid"])), key=lambda e: e["ts"])


def running_mean(values):
    """Estimates.time's running mean (0.8 old + 0.2 new), over spans' lengths in seconds."""
    mean = None
    for v in values:
        mean = v if mean is None else 0.8 * mean + 0.2 * v
    return mean


def test_recording_is_off_unless_started_and_a_span_still_returns_its_seconds():
    assert not timeline.recording()
    tick = timeline.time.perf_counter()
    assert timeline.span("verify", tick) >= 0 and timeline.stop() == []
    timeline.start()
    seconds = timeline.span("verify", tick, note=1)
    timeline.lookup(1, 2)
    (x, i) = timeline.stop()
    assert not timeline.recording()
    assert x["ph"] == "X" and x["ts"] == tick * 1e6 and x["dur"] == pytest.approx(seconds * 1e6)
    assert x["tid"] == timeline.LANES["target"] and x["args"] == {"note": 1}
    assert i["ph"] == "i" and i["args"] == {"hits": 1, "misses": 1}


def test_recording_changes_no_token_and_no_count_in_any_loop():
    """The same call with recording off and on: the same tokens and every stat that is not a
    clock reading (so a trace draws no random number and moves no cache)."""
    target = tiny_model(0, vocab_size=64, scale=2.0)
    make_draft = functools.partial(tiny_model, 3, vocab_size=64, scale=2.0)
    prompts, kw = [[1, 2, 3], [4, 5]], dict(temperature=1.0, seed=0)
    with saguaro.DraftWorker(make_draft, target, threads=1) as worker:
        loops = [(autoregressive, {}), (speculative, dict(draft=make_draft(), k=3)),
                 (ssd, dict(draft=make_draft(), k=3, f=1)),
                 (saguaro, dict(draft=worker, k=3, budget=2, backup="jit", saguaro_c=1.0))]
        for module, extra in loops:
            runs = []
            for record in (False, True):
                worker.reset()
                if record:
                    timeline.start()
                tokens, stats = module.generate(target, prompts, 16, **kw, **extra)
                events = timeline.stop()
                assert bool(events) == record
                runs.append((tokens, {k: v for k, v in stats.items()
                                      if not any(k.endswith(t) for t in TIMING)}))
            assert runs[0] == runs[1], module.__name__


def crossing(events):
    """Pairs of spans of one lane (pid, tid) that overlap without one holding the other."""
    bad, lanes = [], {}
    for e in sorted((e for e in events if e["ph"] == "X"), key=lambda e: (e["ts"], -e["dur"])):
        open_ = lanes.setdefault((e["pid"], e["tid"]), [])
        while open_ and open_[-1]["ts"] + open_[-1]["dur"] <= e["ts"]:
            open_.pop()                                     # ended before this one starts
        if open_ and e["ts"] + e["dur"] > open_[-1]["ts"] + open_[-1]["dur"]:
            bad.append((open_[-1]["name"], e["name"]))
        open_.append(e)
    return bad


def test_the_spans_of_each_lane_nest_or_are_disjoint_in_every_loop():
    """Found by a newcomer: saguaro's draft lane stamped `answer` from before the end of `wait for
    target` (one lane's spans crossed in every round)."""
    target = tiny_model(0, vocab_size=64, scale=2.0)
    make_draft = functools.partial(tiny_model, 3, vocab_size=64, scale=2.0)
    with saguaro.DraftWorker(make_draft, target, threads=1) as worker:
        loops = [(autoregressive, {}), (speculative, dict(draft=make_draft(), k=3)),
                 (ssd, dict(draft=make_draft(), k=3, f=1))] + [
            (saguaro, dict(draft=worker, k=3, budget=2, backup=b)) for b in ("jit", "fast")]
        for module, extra in loops:
            timeline.start()
            module.generate(target, [[1, 2, 3], [4, 5]], 16, temperature=1.0, seed=0, **extra)
            events = timeline.stop()
            assert len({e["pid"] for e in events}) == 1 + (module is saguaro), module.__name__
            assert not crossing(events), (module.__name__, extra.get("backup"), crossing(events))


def test_saguaro_trace_has_two_processes_and_the_speed_model_reads_its_spans(tmp_path):
    """The speed model's inputs are the spans' lengths: verify (the target's), build and glue
    (the draft's, shipped with its answers), so model, table and picture read one measurement."""
    target = tiny_model(0, vocab_size=64, scale=2.0)
    make_draft = functools.partial(tiny_model, 3, vocab_size=64, scale=2.0)
    with saguaro.DraftWorker(make_draft, target, threads=1) as worker:
        timeline.start()
        _, stats = saguaro.generate(target, [1, 2, 3], 24, draft=worker, k=3, budget=2,
                                    backup="jit")
        events = timeline.stop()
        (est,) = worker.estimates.values()
    timeline.write(tmp_path / "t.json", events)
    trace = json.load(open(tmp_path / "t.json"))["traceEvents"]
    me, (other,) = os.getpid(), {e["pid"] for e in events} - {os.getpid()}
    names = {(e["pid"], e["args"]["name"]) for e in trace if e["ph"] == "M"}
    assert {(me, "target"), (other, "draft")} <= names
    assert (other, f"draft process (pid {other})") in names
    verify = [e["dur"] / 1e6 for e in spans(events, "verify", me)]
    build = [e["dur"] / 1e6 for e in spans(events, "build", other)]
    glue = [e["dur"] / 1e6 for e in spans(events, "glue", other)]
    assert len(verify) == stats["target_calls"] and len(build) == stats["target_calls"] - 1
    assert sum(verify) == pytest.approx(stats["verify_s"], rel=1e-9)
    assert sum(build) == pytest.approx(stats["cache_build_s"], rel=1e-9)
    assert est.secs["verify"] == pytest.approx(running_mean(verify[1:]), rel=1e-9)  # not round 1
    assert est.secs["build"] == pytest.approx(running_mean(build), rel=1e-9)
    assert est.secs["step"] == pytest.approx(running_mean(glue), rel=1e-9)
    jit = [e["dur"] / 1e6 for e in spans(events, "jit", other)]   # the cold start's, at least
    assert jit and sum(jit) == pytest.approx(stats["jit_draft_s"], rel=1e-9)
    lookups = [e for e in events if e["name"] == "lookup"]
    assert sum(e["args"]["hits"] for e in lookups) == stats["cache_hits"]
    assert sum(e["args"]["misses"] for e in lookups) == stats["cache_misses"]


def test_the_terminal_timeline_draws_two_lanes_and_marks_a_miss():
    us = lambda ms: ms * 1e3
    x = lambda name, tid, ts, dur: {"name": name, "ph": "X", "ts": us(ts), "dur": us(dur),
                                    "pid": 1, "tid": tid, "args": {}}
    events = [x("prefill", 1, 0, 10), x("verify", 1, 10, 30), x("build", 2, 11, 25),
              x("wait for draft", 1, 40, 10), x("verify", 1, 50, 30),
              {"name": "lookup", "ph": "i", "ts": us(41), "pid": 1, "tid": 2,
               "args": {"hits": 0, "misses": 1}}]
    console = timeline.show(events, rounds=2, width=70)
    text = console.export_text()
    target, draft = (line for line in text.splitlines() if line.strip().endswith("|"))
    assert target.strip().startswith("target |") and draft.strip().startswith("draft |")
    assert "V" in target and "w" in target and "B" in draft and "M" in draft


def test_saguaro_cli_writes_a_trace_where_a_verify_overlaps_a_cache_build_default_model(
        tmp_path):
    """The Must-show: `python saguaro.py --prompt ... --trace t.json`. Both processes stamp
    time.perf_counter (CLOCK_MONOTONIC: one clock per machine). The draft starts each build right
    after sending its answer, the target starts verifying right after receiving it, and the two
    run pinned to separate cores; a verify lasts tens of ms. So some verify overlaps some build
    unless the scheduler starved one process through a whole verify in every round: we ask for
    ANY overlapping pair over all rounds, not one per round."""
    out = subprocess.run([sys.executable, "saguaro.py", "--prompt", "Write a haiku about cacti.",
                          "--max-new-tokens", "32", "--k", "3", "--budget", "1", "--backup",
                          "jit", "--trace", str(tmp_path / "t.json")], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert " target |" in out.stdout and "  draft |" in out.stdout   # the terminal timeline
    events = json.load(open(tmp_path / "t.json"))["traceEvents"]
    pids = {e["pid"] for e in events if e["ph"] == "X"}
    assert len(pids) == 2
    verify, build = spans(events, "verify"), spans(events, "build")
    assert len({e["pid"] for e in verify + build}) == 2 and build
    assert any(v["ts"] < b["ts"] + b["dur"] and b["ts"] < v["ts"] + v["dur"]
               for v in verify for b in build)


def test_bench_runs_the_prompt_lookup_peer_by_default_and_it_matches_ar(tmp_path, capsys,
                                                                        monkeypatch,
                                                                        default_model):
    class Stop(Exception):
        pass
    seen, real = [], bench.build_rows

    def first_rows(args, *_):
        seen.append(args.methods)
        raise Stop
    monkeypatch.setattr(kernels, "load_model", lambda *a, **k: default_model)
    monkeypatch.setattr(bench, "build_rows", first_rows)
    with pytest.raises(Stop):
        bench.main([])
    assert "hf-prompt-lookup" in seen[0]
    monkeypatch.setattr(bench, "build_rows", real)
    bench.main(["--methods", "ar,hf-prompt-lookup", "--num-prompts", "1", "--max-new-tokens",
                "16", "--trace", str(tmp_path / "t.json")])
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["rows"]["hf-prompt-lookup"]["match"] is True
    assert os.path.exists(tmp_path / "t.ar.json")           # our rows' timelines; HF has none
    assert not os.path.exists(tmp_path / "t.hf-prompt-lookup.json")


def test_speed_of_light_is_tau_over_a_verify_alone_and_efficiency_the_measured_share(
        monkeypatch, capsys):
    monkeypatch.setattr(bench, "step_times", lambda *a, **k: (0.030, 0.036))
    args = type("Args", (), {"saguaro_k": 3, "k": 4, "saguaro_cores": (1, None),
                             "batch_size": 1})()
    table = {"saguaro": {"tau": 3.6, "decode_tokens_per_s": 80.0, "verify_ms": 40.0,
                         "round_ms": 45.0, "wait_ms": 3.0, "predicted_speedup": 3.0,
                         "measured_speedup": 2.9, "build_ms": 30.0}}
    sol = bench.speed_of_light(table, None, [("alpaca", [1, 2, 3])], args)
    assert sol["speed_of_light_tokens_per_s"] == pytest.approx(3.6 / 0.036)   # 100 tok/s
    assert sol["speed_of_light_vs_ar"] == pytest.approx(3.6 * 0.030 / 0.036)
    assert sol["efficiency"] == pytest.approx(0.8)
    assert sum(sol["losses_ms"].values()) == pytest.approx(45.0 - 36.0)   # a round = tk + losses
    bench.print_table({}, {"dtype": "float32"}, sol=sol)
    out = capsys.readouterr().out
    assert "efficiency 0.80" in out and "mean round: 45.0 ms = a verify alone 36.0 ms" in out
    assert sol["draft_bound_tokens_per_s"] == pytest.approx(3.6 / 0.036)  # a build within tk
    assert "build beside it: 30.0 ms a round" in out
