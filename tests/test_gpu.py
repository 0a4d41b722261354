"""GPU only: every CUDA path of this repository against its CPU-proven twin, on tiny random models
of every supported family (nothing downloaded). Marked `gpu`, skipped without CUDA; run them all,
with the speed probe, in one command on any GPU machine: `python gpu_check.py`.

  1. flash-attn (flash_attn_with_kvcache) equals SDPA: prefill, decode, (K+1)-token verify,
     ragged rows, a per-row rollback (skipped, with the reason, when flash-attn does not import)
  2. CUDA-graph replay of decode and verify equals eager: ragged rows, rollbacks, the cache
     filled to its end, a second capture over a longer cache
  3. tree-masked drafting (ssd.build_speculation_cache) on CUDA equals the CPU reference
  4. AR, SD, SSD, Saguaro on CUDA give autoregressive.py's tokens at temperature 0 (Saguaro:
     draft process on the target's GPU over gloo, and on a second GPU over NCCL when there is one)
  5. SD samples the target's exact law at temperature > 0 on CUDA (tests/exact.py), and a wrong
     rule fails the same test there (the test has power on this device)
  6. a draft process killed mid-run on CUDA: exact output, no hang (run in a child process with
     a deadline, so a hang is a failed check, not a stuck run)

Tolerances, for two kernels computing the same logits (the logits here are ~N(0, 1)):
  float32  atol 1e-4, rtol 1e-4   kernel order only
  bfloat16 atol 5e-2, rtol 2e-2   bf16 keeps 8 bits: these models in bf16 are ~0.035 off fp32 (CPU)
  float16  atol 1e-2, rtol 5e-3   ~0.0045 off fp32 (CPU)
A wrong mask, position or cache slot moves logits by O(1). Token equality and the law test run
in float32, as the CPU tests do: in 16 bits a verify and a decode round differently, and greedy
outputs may then differ at near-ties without anything being wrong.
"""
import contextlib
import copy
import functools
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch

import autoregressive
import exact
import kernels
import kernels_cpu
import saguaro
import speculative
import ssd
from conftest import before_round, tiny_config, tiny_model
from test_speculative import PROMPT, negated_head, noisy_copy, tiny8

CUDA = torch.cuda.is_available()
GPUS = torch.cuda.device_count() if CUDA else 0
# SSD_GPU_TEST_DEVICE=cpu: a dry run of these tests' own logic on the CPU (the flash and graph
# tests skip); it proves nothing about a GPU, only that the tests are sound before one is at hand
DEV = os.environ.get("SSD_GPU_TEST_DEVICE", "cuda")
NO_GPU = DEV == "cuda" and not CUDA  # every test skips, with this reason
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    NO_GPU, reason=f"needs a CUDA GPU; torch {torch.__version__} sees none (CUDA build: "
                   f"{torch.version.cuda}). On a GPU machine: python gpu_check.py")]
needs_cuda = pytest.mark.skipif(not NO_GPU and not CUDA, reason="needs CUDA (this is a dry run)")

FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=5e-2, rtol=2e-2),
       torch.float16: dict(atol=1e-2, rtol=5e-3)}
RAGGED = [[1, 2, 3, 4, 5, 6], [7, 8, 9], [10, 11, 12, 13]]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def flash_status():
    """(True, version) when flash_attn_with_kvcache imports, else (False, why not)."""
    if importlib.util.find_spec("flash_attn") is None:
        return False, ("flash-attn is not installed (optional: pip install flash-attn "
                       "--no-build-isolation): the flash path is not checked")
    if not CUDA:
        return False, "flash-attn needs CUDA"
    try:
        import flash_attn
        from flash_attn import flash_attn_with_kvcache  # noqa: F401
        return True, flash_attn.__version__
    except Exception as e:  # installed for another torch/CUDA: an undefined symbol, typically
        return False, f"flash-attn is installed but does not import: {type(e).__name__}: {e}"


FLASH_OK, FLASH_WHY = flash_status()
needs_flash = pytest.mark.skipif(not NO_GPU and not FLASH_OK, reason=str(FLASH_WHY))


@contextlib.contextmanager
def attention(backend):
    """kernels.py with this attention backend (chosen once at import otherwise). Make caches
    inside: their lengths are int32 for flash-attn."""
    before = kernels.ATTENTION
    if backend == "flash":
        from flash_attn import flash_attn_with_kvcache
        kernels.flash_attn_with_kvcache = flash_attn_with_kvcache
    kernels.ATTENTION = backend
    try:
        yield
    finally:
        kernels.ATTENTION = before


@pytest.fixture(autouse=True)
def eager_cpu_reference(monkeypatch):
    """CPU references run the readable eager layer: no 30 s build of kernels_cpu.cpp here."""
    if kernels_cpu._cpu_ops is None:
        monkeypatch.setattr(kernels_cpu, "CPU_KERNELS", "eager")


def scaled_model(family, seed=0, head_dim=64, heads=4, kv_heads=2, vocab_size=256, **over):
    """A 2-layer random model of real head sizes, initialized so activations and logits stay
    ~N(0, 1) (std 1/sqrt(fan_in)): tolerances then mean the same in every family."""
    hidden = heads * head_dim
    cfg = kernels.ModelConfig.from_hf(tiny_config(
        family, vocab_size, hidden_size=hidden, num_attention_heads=heads,
        num_key_value_heads=kv_heads, head_dim=head_dim, intermediate_size=2 * hidden,
        max_position_embeddings=1024, **over))
    g, model = torch.Generator().manual_seed(seed), kernels.Model(cfg)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            std = 1.0 if pname.startswith("embed") else 1 / math.sqrt(p.shape[-1])
            p.copy_(torch.ones_like(p) if "norm" in pname else torch.randn(p.shape, generator=g)
                    * (std if p.dim() > 1 else 0.02))
    return model.eval().requires_grad_(False)


def noisy_model(seed, vocab_size, noise, noise_seed, scale=1.0):
    """tiny_model(seed) plus Gaussian noise on every weight: a draft that mostly agrees (top-level:
    a draft process builds it from a functools.partial)."""
    model = tiny_model(seed, vocab_size=vocab_size, scale=scale)
    g = torch.Generator().manual_seed(noise_seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" not in pname:
                p.add_(torch.randn(p.shape, generator=g) * noise)
    return model


def random_tokens(shape, vocab, seed):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed)).to(DEV)


def max_error(pairs):
    return max(float((a.float() - b.float()).abs().max()) for a, b in pairs)


def name(dtype):
    return str(dtype).split(".")[-1]


# ----------------------------------------------------------------------------------------------
# 1) flash-attn equals SDPA

def test_flash_attn_imports_when_installed(record_property):
    """Installed but not importable (built for another torch or CUDA) is a failure: kernels.py
    picks flash whenever flash_attn is installed, and would fail at import."""
    if importlib.util.find_spec("flash_attn") is None:
        pytest.skip(FLASH_WHY)
    record_property("figure", f"flash-attn {FLASH_WHY}" if FLASH_OK else "")
    assert FLASH_OK, FLASH_WHY


FLASH_CASES = ([(f, dt, 64) for dt in (torch.bfloat16, torch.float16) for f in FAMILIES]
               + [("llama", torch.bfloat16, 128), ("qwen3", torch.bfloat16, 128)]
               + [("mistral-window", torch.bfloat16, 64), ("qwen2-window", torch.bfloat16, 64)])
WINDOWS = {"mistral-window": {"sliding_window": 8},  # flash-attn's window_size against the mask
           "qwen2-window": {"use_sliding_window": True, "sliding_window": 8,
                            "max_window_layers": 1}}


@needs_flash
@pytest.mark.parametrize("family, dtype, head_dim", FLASH_CASES,
                         ids=[f"{f}-{name(d)}-hd{h}" for f, d, h in FLASH_CASES])
def test_flash_attention_equals_sdpa_for_prefill_decode_and_verify_with_ragged_rows(
        family, dtype, head_dim, record_property):
    model = scaled_model(family.split("-")[0], head_dim=head_dim, **WINDOWS.get(family, {}))
    model = model.to(DEV, dtype)
    V, K, B = model.cfg.vocab_size, 4, 3
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in (5, 17, 33)]
    steps = [random_tokens((B, T), V, seed) for seed, T in enumerate((1, K + 1, K + 1, 1))]
    runs = {}
    with torch.inference_mode():
        for backend in ("flash", "sdpa"):
            with attention(backend):
                cache = model.new_cache(B, 96)
                outs = [model.prefill(prompts, cache)]                    # (B, V) prefill
                outs.append(model(steps[0], cache))                       # decode
                outs.append(model(steps[1], cache))                       # verify, K+1 tokens
                back = torch.tensor([3, 0, 5], device=DEV)                # per-row rollback
                cache.lengths -= back.to(cache.lengths.dtype)
                outs.append(model(steps[2], cache))                       # verify after it
                outs.append(model(steps[3], cache))                       # decode
                runs[backend] = outs, cache.lengths.tolist()
    (flash, flash_len), (sdpa, sdpa_len) = runs["flash"], runs["sdpa"]
    record_property("figure", f"max |flash - sdpa| {max_error(zip(flash, sdpa)):.2g} "
                              f"({name(dtype)}, tol {TOL[dtype]['atol']})")
    assert flash_len == sdpa_len == [5 + 1 + 5 - 3 + 5 + 1, 17 + 12, 33 + 1 + 5 - 5 + 5 + 1]
    for step, a, b in zip(("prefill", "decode", "verify", "verify after rollback", "decode"),
                          flash, sdpa):
        torch.testing.assert_close(a, b, **TOL[dtype], msg=lambda m: f"{step}: {m}")


# ----------------------------------------------------------------------------------------------
# 2) CUDA graphs: replay equals eager

GRAPH_CASES = ([(f, "sdpa", torch.bfloat16) for f in FAMILIES]
               + [(f, "sdpa", torch.float32) for f in ("llama", "qwen3")]
               + [(f, "flash", torch.bfloat16) for f in FAMILIES])


def count_replays(model):
    """Wrap model.graphs.run: returns a one-item list counting the steps a graph really ran."""
    graphs, n = model.graphs, [0]
    run = graphs.run

    def counted(tokens, cache):
        out = run(tokens, cache)
        n[0] += out is not None
        return out
    graphs.run = counted
    return n


def replay_vs_eager(model, capture, tol, K=4, seed=3):
    """Decode and (K+1)-token verify steps, alternating, on a captured cache and on an eager one,
    with a per-row rollback of 0..K tokens after each verify, until the cache is full; then a
    second capture over a longer cache and another batch size. capture(model, B, max_len,
    step_lengths) -> the captured static cache: model.use_cuda_graphs, or a CPU twin that runs
    the captured forward eagerly (tests/test_gpu_check.py). Returns (max error, replays)."""
    V, g = model.cfg.vocab_size, torch.Generator().manual_seed(seed)
    pairs, replays = [], 0
    try:
        for B, max_len, lens in ((3, 96, (5, 17, 2)), (2, 160, (40, 9))):
            graphed = capture(model, B, max_len, (1, K + 1))
            counter = count_replays(model)
            eager = model.new_cache(B, max_len)
            prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in lens]
            for cache in (graphed, eager):
                model.prefill(prompts, cache)
            steps = 0
            while int(eager.lengths.max()) + K + 1 <= max_len:  # until the cache is full
                T = 1 if steps % 2 == 0 else K + 1               # decode, verify, decode, ...
                tokens = torch.randint(0, V, (B, T), generator=g).to(model.device)
                got, want = model(tokens, graphed), model(tokens, eager)
                torch.testing.assert_close(got, want, **tol,
                                           msg=lambda m: f"step {steps} (T={T}): {m}")
                pairs.append((got, want))
                if T > 1:  # roll back what a verify rejected: 0..K tokens, per row
                    back = torch.randint(0, K + 1, (B,), generator=g).to(model.device)
                    for cache in (graphed, eager):
                        cache.lengths -= back.to(cache.lengths.dtype)
                assert graphed.lengths.tolist() == eager.lengths.tolist(), steps
                steps += 1
            assert counter[0] == steps > 20  # every step ran the captured forward
            replays += steps
    finally:
        model.graphs = None
    return max_error(pairs), replays


@needs_cuda
@pytest.mark.parametrize("family, backend, dtype", GRAPH_CASES,
                         ids=[f"{f}-{b}-{name(d)}" for f, b, d in GRAPH_CASES])
def test_cuda_graph_replay_equals_eager_after_rollbacks_and_as_the_cache_fills(
        family, backend, dtype, record_property):
    if backend == "flash" and not FLASH_OK:
        pytest.skip(FLASH_WHY)
    model = scaled_model(family).to(DEV, dtype)
    with torch.inference_mode(), attention(backend):
        error, replays = replay_vs_eager(model, lambda m, *shape: m.use_cuda_graphs(*shape),
                                         TOL[dtype])
    record_property("figure", f"{replays} replays, max |graph - eager| {error:.2g}")


# ----------------------------------------------------------------------------------------------
# 3) tree-masked drafting on CUDA equals the CPU reference

@pytest.mark.parametrize("family", FAMILIES)
def test_tree_masked_drafting_on_cuda_equals_the_cpu_reference(family, record_property):
    draft = tiny_model(2, family, vocab_size=64, scale=3.0)
    prompts = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10, 11, 12, 13, 14]]
    last, spec = torch.tensor([7, 8, 9]), torch.tensor([[3, 4, 5], [6, 7, 8], [9, 10, 11]])
    fanout = [2, 1, 1, 2]                    # F_0..F_K for K = 3: 6 branches per row
    out = {}
    with torch.inference_mode():
        for dev in ("cpu", DEV):
            model = copy.deepcopy(draft).to(dev)
            cache = model.new_cache(3, 64)
            model.prefill(prompts, cache)
            glue = model(torch.cat((last[:, None], spec), 1).to(dev), cache)  # ssd's step 2b
            S = ssd.build_speculation_cache(model, cache, glue, spec.to(dev), fanout,
                                            lambda logits, j: kernels.probs_from_logits(logits),
                                            kernels.make_generator(0, dev))
            out[dev] = S.keys.cpu(), S.tokens.cpu(), S.probs.cpu(), S.logits.cpu()
    (keys, tokens, probs, logits), (keys_c, tokens_c, probs_c, logits_c) = out["cpu"], out[DEV]
    record_property("figure", f"max |cuda - cpu| tree logits {max_error([(logits_c, logits)]):.2g}")
    torch.testing.assert_close(logits_c, logits, **TOL[torch.float32])
    assert torch.equal(keys_c, keys) and torch.equal(tokens_c, tokens)
    assert torch.equal(probs_c, probs)       # one-hot at temperature 0


# ----------------------------------------------------------------------------------------------
# 4) the loops at temperature 0 on CUDA: autoregressive.py's tokens

def cuda_pair(family):  # test_speculative's pair: a draft that agrees partly
    target = tiny_model(0, family, vocab_size=64)
    draft = noisy_copy(target, 0.02)
    return target.to(DEV), draft.to(DEV)


@pytest.mark.parametrize("family", FAMILIES)
def test_autoregressive_on_cuda_equals_autoregressive_on_cpu(family):
    target = tiny_model(0, family, vocab_size=64, scale=3.0)
    want, _ = autoregressive.generate(target, RAGGED, 40)
    got, _ = autoregressive.generate(target.to(DEV), RAGGED, 40)
    assert got == want


@pytest.mark.parametrize("method", ["sd", "ssd"])
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_sd_and_ssd_on_cuda_equal_autoregressive(family, method, record_property):
    target, draft = cuda_pair(family)
    want, _ = autoregressive.generate(target, RAGGED, 40)
    if method == "sd":
        got, stats = speculative.generate(target, RAGGED, 40, draft=draft, k=3)
        record_property("figure", f"tau {stats['tau']:.2f}")
    else:
        got, stats = ssd.generate(target, RAGGED, 40, draft=draft, k=3, f=2)
        record_property("figure", f"tau {stats['tau']:.2f}, hit rate {stats['hit_rate']:.2f}")
    assert got == want
    assert 0 < stats["acceptance_rate"] < 1  # rows accepted part of a speculation: rollbacks ran


PLACEMENTS = {"one_gpu": None, "two_gpus": "cuda:1"}  # where the draft process runs
SAGUARO_CONFIGS = [dict(k=3, f=2), dict(k=2, f=1, fan_out="uniform", backup="jit"),
                   dict(k=4, f=3, backup="fast", saguaro_c=0.5)]
SAGUARO_CASES = [(p, c) for p in PLACEMENTS for c in SAGUARO_CONFIGS]


def skip_without_gpus(placement):
    if placement == "two_gpus" and GPUS < 2:
        pytest.skip(f"needs 2 GPUs (draft on the second, NCCL between them); {GPUS} here")


@pytest.fixture(scope="module")
def saguaro_workers():
    """One draft process at a time (each start costs a process and a CUDA context)."""
    running = {}

    def start(placement):
        if running.get("placement") != placement or not running["worker"].alive:
            if running:
                running.pop("worker").close()
            target = tiny_model(0, vocab_size=64, scale=3.0).to(DEV)
            draft = functools.partial(noisy_model, 0, 64, 0.15, 7, scale=3.0)
            running.update(placement=placement, target=target, worker=saguaro.DraftWorker(
                draft, target, device=PLACEMENTS[placement]))
        return running["target"], running["worker"]
    yield start
    if running:
        running["worker"].close()


@pytest.mark.parametrize("placement, config", SAGUARO_CASES,
                         ids=[p + "-" + ",".join(f"{k}={v}" for k, v in c.items())
                              for p, c in SAGUARO_CASES])
def test_greedy_saguaro_on_cuda_equals_autoregressive(saguaro_workers, placement, config,
                                                      record_property):
    skip_without_gpus(placement)
    target, worker = saguaro_workers(placement)
    want, _ = autoregressive.generate(target, RAGGED, 40)
    got, stats = saguaro.generate(target, RAGGED, 40, draft=worker, **config)
    record_property("figure", f"{worker.backend}, hit rate {stats['hit_rate'] or 0:.2f}, "
                              f"tau {stats['tau']:.2f}")
    assert got == want
    assert stats["draft_lost"] is None and worker.alive
    assert stats["cache_hits"] > 0 and stats["cache_misses"] > 0, stats  # both paths ran


# ----------------------------------------------------------------------------------------------
# 5) the law at temperature > 0 on CUDA

SAMPLES, ALPHA = 20_000, 1e-3
LAW_CASES = {  # name: (target, draft from the target, K, sampling beyond temperature=1)
    "independent_draft": (lambda: tiny8(0), lambda t: tiny8(1), 3, {}),
    "near_disjoint_negated_head": (lambda: tiny8(0), negated_head, 2, {}),
    "noisy_copy_top_k": (lambda: tiny8(0), lambda t: noisy_copy(t, 0.3), 2,
                         {"temperature": 0.8, "top_k": 3}),
}


def law_test(target, draft, k, sampling):
    sampling = {"temperature": 1.0, **sampling}
    target, draft = target.to(DEV), draft.to(DEV)
    law = exact.exact_distribution(target, PROMPT, 3, **sampling)
    counts = exact.sample_sequences(speculative.generate, target, PROMPT, 3, SAMPLES,
                                    batch_size=10_000, draft=draft, k=k, **sampling)
    passed, stat, threshold = exact.chi_square_test(counts, law, ALPHA / len(LAW_CASES))
    return passed, (f"chi2 {stat:.1f} vs {threshold:.1f}, "
                    f"TV {exact.total_variation(counts, law):.4f}")


@pytest.mark.parametrize("case", list(LAW_CASES))
def test_sd_samples_the_exact_target_law_on_cuda(case, record_property):
    make_target, make_draft, k, sampling = LAW_CASES[case]
    target = make_target()
    passed, shown = law_test(target, make_draft(target), k, sampling)
    record_property("figure", shown)
    assert passed, shown


def verify_without_residual(target_probs, draft_probs, draft_tokens, generator):
    """WRONG: the right acceptance test, the bonus after a rejection drawn from p_i instead of
    norm(max(0, p_i - q_i)). (test_speculative's copy draws on the CPU; this one on the device.)"""
    B, K = draft_tokens.shape
    p_x = target_probs[:, :K].gather(-1, draft_tokens[..., None])[..., 0]
    q_x = draft_probs.gather(-1, draft_tokens[..., None])[..., 0]
    u = torch.rand(B, K, generator=generator, device=target_probs.device)
    n = (u * q_x < p_x).long().cumprod(-1).sum(-1)
    return n, kernels.sample(target_probs[torch.arange(B, device=n.device), n], generator)


def test_negative_control_a_wrong_rule_fails_the_law_test_on_cuda(monkeypatch, record_property):
    monkeypatch.setattr(speculative, "verify", verify_without_residual)
    passed, shown = law_test(tiny8(0), tiny8(1), 2, {})
    record_property("figure", shown)
    assert not passed, f"a wrong rule went undetected: {shown}"


# ----------------------------------------------------------------------------------------------
# 6) a draft process killed mid-run on CUDA

KILL_DEADLINE_S = 150


def kill_scenario(draft_device=None) -> dict:
    """Run in a child process: SIGKILL the draft process before round 4 of a Saguaro run on
    CUDA; report what the target made of it."""
    target = tiny_model(0, vocab_size=64, scale=3.0).to(DEV)
    want, _ = autoregressive.generate(target, RAGGED, 50)
    worker = saguaro.DraftWorker(functools.partial(noisy_model, 0, 64, 0.15, 7, scale=3.0),
                                 target, device=draft_device, timeout_s=5.0)
    before_round(worker, 4, lambda: os.kill(worker.process.pid, signal.SIGKILL))
    t0 = time.time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got, stats = saguaro.generate(target, RAGGED, 50, draft=worker, k=3, f=2, backup="jit")
    return {"equal": got == want, "draft_lost": stats["draft_lost"], "backend": worker.backend,
            "fast_backup_rows": stats["backup_used"]["fast"], "seconds": time.time() - t0,
            "warned": any("draft process" in str(w.message) for w in caught),
            "alive": worker.alive}


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_killing_the_draft_process_on_cuda_loses_no_token_and_does_not_hang(placement,
                                                                            record_property):
    skip_without_gpus(placement)
    tests = os.path.dirname(os.path.abspath(__file__))
    code = (f"import json, sys; sys.path[:0] = {[ROOT, tests]!r}; import test_gpu; "
            f"print(json.dumps(test_gpu.kill_scenario({PLACEMENTS[placement]!r})))")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        output, errors = child.communicate(timeout=KILL_DEADLINE_S)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)   # the child and its draft process
        output, errors = child.communicate()
        pytest.fail(f"hung: no result within {KILL_DEADLINE_S} s; last output: "
                    f"{(output + errors)[-800:]}")
    lines = [line for line in output.splitlines() if line.startswith("{")]
    assert child.returncode == 0 and lines, (output + errors)[-2000:]
    result = json.loads(lines[-1])
    record_property("figure", f"{result['backend']}, finished {result['seconds']:.1f} s, "
                              f"{result['fast_backup_rows']} row-rounds on the fast backup")
    assert result["equal"], result                      # nothing lost or repeated
    assert result["draft_lost"] and result["warned"] and not result["alive"], result
    assert result["fast_backup_rows"] > 0 and result["seconds"] < 60, result
