"""tp.py: a target split over 2 ranks (gloo, CPU) computes what the whole model computes.

Each test starts 2 rank processes as torchrun would (this file, run as a script, with RANK,
WORLD_SIZE, LOCAL_RANK and a free MASTER_PORT), every wait bounded; each rank builds the same tiny
model (same seed), keeps a whole copy as the reference, shards the other and saves what it saw.
  - logits: TP=2 equals TP=1 within float32 rounding for a ragged prefill, a decode step, a
    (K+1)-token verify and a tree-masked step, in every supported family, with KV heads split
    and with one KV head replicated on both ranks;
  - greedy AR, SD and SSD on the TP=2 target emit the TP=1 tokens; both ranks emit the same;
  - SD on the TP=2 target at temperature 1 samples the target's exact law (tests/exact.py);
  - the default model: reading only a rank's shard (safetensors get_slice) gives the weights
    cutting the whole model gives, and greedy AR and SD with the shipped draft match TP=1;
  - a rank that dies makes the other fail with tp.RankLost within a bound, not hang; so does a
    rank that raises where the other waits for it in a collective (tp.led's saguaro run);
  - bad input (--tp without torchrun, N not dividing the heads, more ranks than devices).
"""
import copy
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
import kernels  # noqa: E402
import tp  # noqa: E402
from conftest import noisy_copy, tiny_model  # noqa: E402

RAGGED = [[1, 2, 3], [5], [7, 8, 9, 10, 11, 12]]
FAMILIES = {  # name: (config changes, (query heads, KV heads) on rank 0 and on rank 1)
    "llama": ({}, [(2, 1), (2, 1)]), "mistral": ({}, [(2, 1), (2, 1)]),
    "qwen2": ({}, [(2, 1), (2, 1)]), "qwen3": ({}, [(2, 1), (2, 1)]),
    "llama-kv-replicated": ({"num_key_value_heads": 1}, [(2, 1), (2, 1)]),  # 1 KV head, 2 ranks
    "llama-uneven": ({"num_attention_heads": 6, "num_key_value_heads": 3,  # as SmolLM2: 3 groups
                      "hidden_size": 48, "intermediate_size": 63}, [(2, 1), (4, 2)]),  # MLP 31+32
    "llama-biases": ({"attention_bias": True, "mlp_bias": True}, [(2, 1), (2, 1)]),  # o, down: once
    "qwen2-window": ({"use_sliding_window": True, "sliding_window": 3,  # layer 1 slides
                      "max_window_layers": 1}, [(2, 1), (2, 1)])}


# ----------------------------------------------------------------------------------------------
# the launcher: 2 rank processes, as torchrun starts them

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(case, tmp_path, world=2, timeout=120, tp_timeout=60, hung=()):
    """Run `case` on `world` ranks; -> (per-rank results, return codes, stderr texts). Each rank
    gets `timeout` seconds (a bound, not a timing: a correct run takes a few seconds); the ranks
    in `hung` are killed once the others have finished."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1",
               SSD_TP_TIMEOUT=str(tp_timeout))
    procs = [subprocess.Popen([sys.executable, __file__, case, str(tmp_path)], text=True,
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for r in range(world)]
    errs = [""] * world
    for r in sorted(range(world), key=lambda r: r in hung):
        if r in hung:
            procs[r].kill()
        try:
            errs[r] = procs[r].communicate(timeout=timeout)[1]
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"tensor-parallel case {case!r} did not finish within {timeout} s")
    codes = [p.returncode for p in procs]
    outs = [torch.load(tmp_path / f"rank{r}.pt") if os.path.exists(tmp_path / f"rank{r}.pt")
            else None for r in range(world)]
    return outs, codes, errs


def ran(case, tmp_path, **kw):
    outs, codes, errs = launch(case, tmp_path, **kw)
    assert codes == [0] * len(codes), "\n".join(errs)
    return outs


# ----------------------------------------------------------------------------------------------
# what each rank runs

def join():
    import torch.distributed as dist
    torch.set_num_threads(1)
    tp.init(int(os.environ["WORLD_SIZE"]), "cpu")
    return dist.get_rank()


def explicit_tree_step(model, cache):
    """A tree-masked step after prefill: 3 tokens per row at positions L, L+1, L+1 (a root and
    two children, each child seeing the root), in scratch slots L, L+1, L+2."""
    L = cache.lengths.clone()
    tokens = torch.tensor([[4, 6, 2]] * len(L))
    positions = L[:, None] + torch.tensor([0, 1, 1])
    slots = L[:, None] + torch.arange(3)
    S = torch.arange(cache.max_len)
    mask = (S < L[:, None, None]) | (S == slots[:, :, None])
    mask[:, 1:, :] |= (S == L[:, None, None])        # the children see the root
    return model(tokens, cache, positions=positions, slots=slots, mask=mask)


@torch.inference_mode()
def logits_on(model):
    cache = model.new_cache(len(RAGGED), 32)
    out = [model.prefill(RAGGED, cache)]                                   # ragged prefill
    out.append(model(torch.tensor([[3], [4], [5]]), cache))                # decode
    out.append(model(torch.tensor([[1, 2, 3, 4, 5]] * 3), cache))          # K+1 = 5 verify
    cache.lengths -= 2                                                     # per-row rollback
    out.append(explicit_tree_step(model, cache))                           # tree-masked
    return out


def case_logits():
    rank, result = join(), {}
    for name, (over, _) in FAMILIES.items():
        whole = tiny_model(0, name.split("-")[0], vocab_size=64, **over)
        sharded = tp.shard(copy.deepcopy(whole))
        want, got = logits_on(whole), logits_on(sharded)
        c, block = sharded.cfg, sharded.layers[0]
        result[name] = (max(float((w - g).abs().max()) for w, g in zip(want, got)),
                        max(float(w.abs().max()) for w in want), (c.num_heads, c.num_kv_heads),
                        block.wqkv.weight.shape[0] == (c.num_heads + 2 * c.num_kv_heads) * 8
                        and block.w2.linear.weight.shape[1] == c.intermediate_size)
    return result


def case_read_biases():
    """Reading a rank's shard of a checkpoint with o and MLP biases (tp.read_shard), against the
    whole model: the row-split linears' biases are added once."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from safetensors.torch import save_file
    from conftest import tiny_config
    rank = join()
    c = tiny_config("llama", attention_bias=True, mlp_bias=True, initializer_range=0.3)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(c.pop("model_type"), **c))
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.3)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    file = os.path.join(sys.argv[2], f"checkpoint{rank}.safetensors")  # the test's tmp_path
    save_file(state, file)
    cfg = kernels.ModelConfig.from_hf(hf.config)
    whole = kernels.model_from_hf_state(cfg, state).eval()
    local, shard = tp.read_shard(cfg, [file])
    sharded = tp.wrap(kernels.model_from_hf_state(local, shard).eval(), local)
    want, got = logits_on(whole), logits_on(sharded)
    return max(float((w - g).abs().max()) for w, g in zip(want, got))


def case_greedy():
    import autoregressive
    import speculative
    import ssd
    join()
    result = {}
    for family in ("llama", "qwen3"):
        whole = tiny_model(0, family, vocab_size=64)
        draft = noisy_copy(whole, 0.02)
        runs = {"ar": (autoregressive, {}), "sd": (speculative, {"draft": draft, "k": 3}),
                "ssd": (ssd, {"draft": draft, "k": 3, "f": 2})}
        want = {m: mod.generate(whole, RAGGED, 30, **kw)[0] for m, (mod, kw) in runs.items()}
        tp.shard(whole)
        for m, (mod, kw) in runs.items():
            got, stats = mod.generate(whole, RAGGED, 30, **kw)
            result[(family, m)] = (want[m], got, stats["acceptance_rate"])
    return result


def case_law():
    import exact
    import speculative
    from test_speculative import PROMPT, SAMPLES, WINDOW, tiny4
    join()
    target = tiny4(0)                        # 2 query heads, 1 KV head: 1 + 1 on two ranks
    draft = noisy_copy(target, 0.5)
    n = WINDOW[4]
    law = exact.exact_distribution(target, PROMPT, n, temperature=1.0)
    tp.shard(target)
    counts = exact.sample_sequences(speculative.generate, target, PROMPT, n, SAMPLES,
                                    draft=draft, k=2, temperature=1.0)
    return {"law": law, "counts": counts}


def case_default():
    import autoregressive
    import drafts
    import speculative
    join()
    whole = kernels.load_model("default", "cpu", "float32")
    shard_read = tp.load_model("default", "cpu", "float32")       # get_slice: this rank's only
    draft = drafts.load_draft("default", whole)
    prompts = [kernels.encode_prompt(whole, "What is the capital of France?")]
    want = autoregressive.generate(whole, prompts, 24)[0]
    tp.shard(whole)
    got = [autoregressive.generate(whole, prompts, 24)[0],
           speculative.generate(whole, prompts, 24, draft=draft, k=4)[0]]
    a, b = whole.state_dict(), shard_read.state_dict()
    same = sorted(a) == sorted(b) and all(torch.equal(a[n], b[n]) for n in a)
    return {"want": want, "got": got, "same_weights": same}


def case_death(hang=False):
    import autoregressive
    rank = join()
    target = tp.shard(tiny_model(0, vocab_size=64))
    autoregressive.generate(target, RAGGED, 5)   # both ranks in step
    if rank == 1:
        if hang:
            time.sleep(600)                      # silent, sockets open (the test kills it)
        os._exit(3)                              # dies between two generations
    t0 = time.perf_counter()
    try:
        autoregressive.generate(target, RAGGED, 5)
    except tp.RankLost as e:
        return {"error": str(e), "seconds": time.perf_counter() - t0}
    return {"error": None}


def case_hang():
    return case_death(hang=True)


def saguaro_pair():
    """The target (its whole copy) and a draft factory for the draft process: test_saguaro's
    tiny pair, whose greedy runs see both hits and misses."""
    import functools
    from test_saguaro import noisy_model
    return (tiny_model(0, vocab_size=64, scale=3.0),
            functools.partial(noisy_model, 0, 64, 0.15, 7, scale=3.0))


def case_saguaro():
    """Rank 0 leads (tp.led) two generations on one draft process: the second loses it (SIGKILL
    before its 3rd round) and finishes on the target alone; rank 1 follows. Then a call that
    rank 0 refuses (f=0): every rank raises."""
    import signal
    import warnings

    import autoregressive
    import saguaro
    from conftest import before_round
    join()
    target, draft = saguaro_pair()
    want = autoregressive.generate(target, RAGGED, 30)[0]          # TP = 1
    tp.shard(target)

    def run(leader):
        with saguaro.DraftWorker(draft, leader, threads=1, timeout_s=30.0) as worker:
            runs = [saguaro.generate(leader, RAGGED, 30, draft=worker, k=3, f=2, backup="jit")]
            before_round(worker, worker.rounds + 2, lambda: os.kill(worker.process.pid,
                                                                    signal.SIGKILL))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                runs.append(saguaro.generate(leader, RAGGED, 30, draft=worker, k=3, f=2,
                                             backup="jit"))
            return [(tokens, {k: stats[k] for k in ("cache_hits", "cache_misses", "draft_lost",
                                                     "acceptance_rate", "backup_used")})
                    for tokens, stats in runs]
    result = {"want": want, "runs": tp.led(run, target)}
    try:
        tp.led(lambda t: saguaro.generate(t, RAGGED, 30, draft=draft, k=3, f=0), target)
    except (ValueError, RuntimeError) as e:
        result["error"] = f"{type(e).__name__}: {e}"
    return result


def case_follower_death():
    """Rank 1 dies in its 6th forward, mid-generation: rank 0 fails with tp.RankLost, and its
    draft process is stopped."""
    import saguaro
    rank = join()
    target, draft = saguaro_pair()
    tp.shard(target)
    if rank == 1:
        real, calls = target.forward, []

        def dies(*a, **kw):
            calls.append(1)
            if len(calls) == 6:
                os._exit(3)
            return real(*a, **kw)
        target.forward = dies
    worker, t0 = [], time.perf_counter()

    def run(leader):
        worker.append(saguaro.DraftWorker(draft, leader, threads=1, timeout_s=30.0))
        t0 = time.perf_counter()
        try:
            saguaro.generate(leader, RAGGED, 30, draft=worker[0], k=3, f=2, backup="jit")
        finally:
            worker.append(time.perf_counter() - t0)
    try:
        tp.led(run, target)
    except tp.RankLost as e:
        return {"error": str(e), "seconds": worker[1], "draft_alive": worker[0].alive}
    return {"error": None, "seconds": time.perf_counter() - t0}


def case_fault(who, where):
    """Rank `who` raises in its 3rd call of `where` (its target's forward, or new_cache) during a
    saguaro run that rank 0 leads, with SSD_TP_TIMEOUT far above the test's bound: every rank
    must end at once."""
    import saguaro
    rank = join()
    target, draft = saguaro_pair()
    tp.shard(target)
    if rank == who:
        real, calls = getattr(target, where), []

        def faulty(*a, **kw):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError(f"a fault in rank {rank}'s {where}")
            return real(*a, **kw)
        setattr(target, where, faulty)
    t0 = time.perf_counter()

    def run(leader):
        for _ in range(3):  # new_cache: one per call
            saguaro.generate(leader, RAGGED, 30, draft=draft, k=3, f=2, backup="jit",
                             timeout_s=30.0)
    try:
        tp.led(run, target)
    except Exception as e:
        from conftest import draft_processes
        return {"error": f"{type(e).__name__}: {e}", "seconds": time.perf_counter() - t0,
                "draft_processes": len(draft_processes())}
    return {"error": None}


def case_fault_0_forward():
    return case_fault(0, "forward")


def case_fault_1_forward():
    return case_fault(1, "forward")


def case_fault_1_new_cache():
    return case_fault(1, "new_cache")


if __name__ == "__main__":
    case, folder = sys.argv[1], sys.argv[2]
    out = globals()[f"case_{case}"]()
    torch.save(out, os.path.join(folder, f"rank{os.environ['RANK']}.pt"))
    # the case is over and its result saved: leave without the interpreter's teardown, where a
    # gloo group whose peer was lost or hung can still abort the process (SIGABRT, "terminate
    # called without an active exception": a C++ thread alive at exit; seen in CI, not yet
    # fixed in tp.py). What these tests check is the case's result, not that teardown.
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)


# ----------------------------------------------------------------------------------------------
# the tests

def test_tp2_logits_equal_tp1_for_prefill_decode_verify_and_tree_steps(tmp_path):
    outs = ran("logits", tmp_path)
    for rank, result in enumerate(outs):
        assert result.keys() == FAMILIES.keys()
        for family, (diff, scale, heads, cut) in result.items():
            assert diff <= 1e-5 * max(1.0, scale), (rank, family, diff)   # float32 rounding
            assert heads == FAMILIES[family][1][rank], family
            assert cut, family                              # this rank's rows and columns only


def test_read_shard_adds_a_row_split_linear_s_bias_once(tmp_path):
    for diff in ran("read_biases", tmp_path):
        assert diff <= 1e-4, diff


def test_greedy_ar_sd_ssd_on_a_tp2_target_equal_tp1(tmp_path):
    outs = ran("greedy", tmp_path)
    for key, (want, got, acceptance) in outs[0].items():
        assert got == want, key
        assert outs[1][key][1] == got, key                  # both ranks emitted the same
        if key[1] != "ar":
            assert 0 < acceptance < 1, key                  # rollbacks happened


def test_sd_on_a_tp2_target_samples_the_exact_law(tmp_path):
    import exact
    outs = ran("law", tmp_path)
    assert outs[0]["counts"] == outs[1]["counts"]           # one draw per round, on every rank
    passed, worst, shown = exact.window_test(outs[0]["counts"], outs[0]["law"], 1e-3)
    assert passed, shown


def test_default_model_shard_read_and_greedy_ar_sd_equal_tp1(tmp_path):
    outs = ran("default", tmp_path, timeout=300)
    for result in outs:
        assert result["same_weights"]                      # get_slice read == cut in place
        assert result["got"] == [result["want"]] * 2        # ar, sd on TP=2 == ar on TP=1
    assert outs[0]["got"] == outs[1]["got"]


def test_a_rank_that_dies_is_a_clear_error_on_the_other_within_a_bound(tmp_path):
    outs, codes, errs = launch("death", tmp_path)
    assert codes[1] == 3 and codes[0] == 0, errs
    assert outs[0]["error"] and "lost its peers" in outs[0]["error"], outs[0]
    # time is the property: gloo sees the closed socket at once; 30 s is generous room, far
    # below the 60 s timeout that bounds a rank that hangs instead
    assert outs[0]["seconds"] < 30


def test_a_rank_that_hangs_is_a_clear_error_on_the_other_after_the_timeout(tmp_path):
    outs, codes, errs = launch("hang", tmp_path, tp_timeout=3, hung=(1,))
    assert codes[0] == 0, errs
    assert outs[0]["error"] and "bounded by SSD_TP_TIMEOUT = 3 s" in outs[0]["error"], outs[0]
    # time is the property: given up after the 3 s timeout, not never (20 s: generous room)
    assert 2 < outs[0]["seconds"] < 20


def test_greedy_saguaro_on_a_tp2_target_equals_tp1_and_survives_losing_its_draft(tmp_path):
    """The draft process beside 2 target ranks: rank 0 talks to it; rank 1 follows rank 0."""
    outs = ran("saguaro", tmp_path)
    (tokens, stats), (lost_tokens, lost) = outs[0]["runs"]
    assert tokens == outs[0]["want"]                        # TP = 2 saguaro == TP = 1 AR
    assert stats["cache_hits"] > 0 and stats["cache_misses"] > 0, stats   # both paths ran
    assert 0 < stats["acceptance_rate"] < 1 and stats["draft_lost"] is None, stats
    assert lost_tokens == outs[0]["want"] and lost["draft_lost"], lost     # exited or reset
    assert lost["backup_used"]["fast"] > 0, lost            # the target finished alone
    assert outs[1]["runs"] == outs[0]["runs"]               # every rank returns rank 0's result
    assert outs[0]["error"].startswith("ValueError: k and f"), outs[0]["error"]
    assert "rank 0 failed (ValueError: k and f" in outs[1]["error"], outs[1]["error"]


def test_a_follower_that_dies_is_a_clear_error_on_rank_0_within_a_bound(tmp_path):
    outs, codes, errs = launch("follower_death", tmp_path)
    assert codes[1] == 3 and codes[0] == 0, errs
    assert outs[0]["error"] and "lost its peers" in outs[0]["error"], outs[0]
    assert not outs[0]["draft_alive"]                      # the draft process was stopped
    # time is the property: gloo sees the closed socket at once (30 s: generous room, far
    # below the 60 s timeout that bounds a rank that hangs instead)
    assert outs[0]["seconds"] < 30


def test_bad_tp_requests_are_clear_errors(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    with pytest.raises(ValueError, match="torchrun --nproc-per-node 2"):
        tp.check_world(2, {}, cpu, cores=8, gpus=0)
    tp.check_world(1, {}, cpu, cores=1, gpus=0)                     # no torchrun, --tp 1: fine
    with pytest.raises(ValueError, match="started 4 processes but --tp is 2"):
        tp.check_world(2, {"WORLD_SIZE": "4"}, cpu, cores=8, gpus=0)
    with pytest.raises(ValueError, match="only 2 CUDA device"):
        tp.check_world(4, {"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4"}, gpu, cores=8, gpus=2)
    with pytest.raises(ValueError, match="only 2 CPU core"):
        tp.check_world(4, {"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4"}, cpu, cores=2, gpus=0)
    cfg = tiny_model(0).cfg                                 # 4 query heads, 2 KV heads, 64 MLP
    with pytest.raises(ValueError, match="cannot split this model's 4 query heads in 2 KV"):
        tp.plan(cfg, 0, 3)                                  # 3 ranks, 2 KV heads
    with pytest.raises(ValueError, match="cannot split"):
        tp.plan(cfg, 0, 8)                                  # 8 ranks, 4 query heads
    assert tp.plan(cfg, 3, 4).kv == (8, 16)                 # 4 ranks: KV head 1 on ranks 2, 3
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match="torchrun"):
        tp.init(2, "cpu")


def test_launches_tp_cannot_run_are_refused_and_bench_refuses_what_tp_does_not_run(monkeypatch,
                                                                                  capsys):
    import bench
    import saguaro
    monkeypatch.setattr(kernels, "load_model", lambda *a, **k: pytest.fail("loaded a model"))

    def refused(main, argv, message):
        monkeypatch.setattr(sys, "argv", [main.__module__ + ".py"] + argv)
        with pytest.raises(SystemExit) as exit_:
            main(argv) if main is bench.main else main()
        assert exit_.value.code == 2 and message in capsys.readouterr().err, argv

    refused(saguaro.main, ["--prompt", "hi", "--tp", "2"],
            "torchrun --nproc-per-node 2 saguaro.py --tp 2")
    refused(bench.main, ["--tp", "2"], "torchrun --nproc-per-node 2 bench.py --tp 2")
    monkeypatch.setenv("WORLD_SIZE", "2")                   # as if torchrun started 2 processes
    refused(bench.main, ["--methods", "ar"], "torchrun started 2 processes but --tp is 1")
    refused(saguaro.main, ["--prompt", "hi"], "torchrun started 2 processes but --tp is 1")
    refused(bench.main, ["--tp", "2", "--methods", "hf"], "method 'hf' is not yet supported")
    refused(bench.main, ["--tp", "2", "--sweep", "k=2,3"], "--sweep is not yet supported")


@pytest.mark.parametrize("who, where", [(0, "forward"), (1, "forward"), (1, "new_cache")])
def test_a_rank_that_raises_ends_every_rank_at_once_and_only_it_prints_the_error(tmp_path, who,
                                                                                  where):
    """Found by a newcomer: rank 0 raising in a forward left rank 1 inside its all-reduce while
    rank 0 waited to tell it "stop": both hung for SSD_TP_TIMEOUT, and the error never showed."""
    outs, codes, errs = launch(f"fault_{who}_{where}", tmp_path, timeout=90, tp_timeout=600)
    assert codes == [0, 0], errs
    fault = f"RuntimeError: a fault in rank {who}'s {where}"
    assert outs[who]["error"] == fault, outs[who]
    other = outs[1 - who]["error"]
    assert other.startswith("RankLost") and "lost its peers" in other, other
    assert "a fault" not in other                          # the original error shows once
    assert outs[0]["draft_processes"] == 0                  # rank 0 stopped its draft process
    # time is the property: each rank ends as soon as the fault is seen; 45 s is generous room
    # on a busy machine, far below the 600 s SSD_TP_TIMEOUT a missed fault would wait for
    assert max(o["seconds"] for o in outs) < 45, outs


def test_a_rank_that_left_its_group_ends_with_os_exit_and_the_error_s_code(monkeypatch, capsys):
    """After tp.abandon a gloo group's threads can abort the interpreter's teardown (SIGABRT,
    seen in CI), replacing the exit code: harness.cli then leaves with os._exit, the same code
    (2 bad input, 1 any other error, after its traceback). Without --tp nothing changes."""
    import harness
    codes = []
    monkeypatch.setattr(os, "_exit", codes.append)

    def fail(error):
        def main():
            raise error
        return main
    monkeypatch.setattr(tp, "_ABANDONED", True)
    harness.cli(fail(ValueError("a bad length")))
    harness.cli(fail(RuntimeError("tensor parallelism: rank 1 lost its peers")))
    assert codes == [2, 1]
    err = capsys.readouterr().err
    assert "error: a bad length" in err and "Traceback" in err and "lost its peers" in err
    monkeypatch.setattr(tp, "_ABANDONED", False)
    with pytest.raises(SystemExit) as exit_:
        harness.cli(fail(ValueError("a bad length")))
    assert exit_.value.code == 2
    with pytest.raises(RuntimeError):
        harness.cli(fail(RuntimeError("not a tp failure")))
    assert codes == [2, 1]
