"""The GPU self-check's CPU twins: what of gpu_check.py, gpu_probe.py and tests/test_gpu.py can run
without a GPU runs here, in the normal suite: the runner's rows come from real pytest outcomes and
its exit code follows them, the probe's byte counts and timing loop are right, both refuse cleanly
without CUDA, and the forward a CUDA graph captures (one static cache, no host sync) equals eager.
"""
import io
import json
import os

import pytest
import torch

import gpu_check
import gpu_probe
import kernels
from conftest import tiny_model
from test_gpu import TOL, replay_vs_eager, scaled_model

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


@no_cuda
def test_self_check_without_cuda_says_nothing_was_checked_and_exits_2(capsys):
    assert gpu_check.main([]) == 2
    assert "no CUDA: nothing to check" in capsys.readouterr().out


@no_cuda
def test_probe_without_cuda_refuses_cleanly(capsys):
    assert gpu_probe.main([]) == 2
    assert "no CUDA GPU here" in capsys.readouterr().err


FAKE_TESTS = '''
import pytest

@pytest.fixture
def broken():
    raise RuntimeError("setup went wrong")

def test_passes(record_property):
    record_property("figure", "max error 0.01")

def test_fails():
    assert 1 == 2, "one is not two"

def test_skips():
    pytest.skip("flash-attn is not installed")

def test_errors(broken):
    pass

@pytest.mark.parametrize("x", ["a[1]"])
def test_brackets(x):
    pass
'''


def test_rows_are_the_outcomes_pytest_reported(tmp_path):
    """A real pytest child with the plugin, on a file that passes, fails, skips and errors."""
    path = tmp_path / "test_fake.py"
    path.write_text(FAKE_TESTS)
    rows, output = gpu_check.run_tests([str(path)], 120, dict(os.environ))
    got = {check: (result, figure) for check, result, figure in rows}
    assert set(got) == {"passes", "fails", "skips", "errors", "brackets[a[1]]"}, output
    assert got["passes"][0] == "passed" and got["passes"][1].startswith("max error 0.01, ")
    assert got["fails"][0].startswith("FAILED: AssertionError: one is not two")
    assert got["skips"][0] == "skipped: flash-attn is not installed"
    assert got["errors"][0] == "ERROR: RuntimeError: setup went wrong"
    assert gpu_check.exit_code(rows) == 1
    assert gpu_check.exit_code([r for r in rows if r[0] in ("passes", "skips")]) == 0
    assert gpu_check.exit_code([r for r in rows if r[0] == "skips"]) == 1  # proved nothing


def test_a_test_that_never_reported_did_not_finish():
    """A run stopped at its deadline: what was collected but not reported is a failure."""
    log = [{"collected": ["t.py::test_a", "t.py::test_b"]}]
    log += [{"id": "t.py::test_a", "when": w, "outcome": "passed", "seconds": 0.5, "message": "",
             "figure": ""} for w in ("setup", "call", "teardown")]
    log += [{"id": "t.py::test_b", "when": "setup", "outcome": "passed", "seconds": 0.1,
             "message": "", "figure": ""}]
    cut_short = '{"id": "t.py::test_b", "when": "ca'  # the run was killed while writing
    rows = gpu_check.rows_from_log([json.dumps(r) for r in log] + [cut_short])
    assert rows == [("a", "passed", "0.5 s"), ("b", "did not finish", "")]
    assert gpu_check.exit_code(rows) == 1


def test_table_shows_every_row_as_written():
    from rich.console import Console
    out = io.StringIO()
    rows = [("flash[llama-bfloat16]", "passed", "max |flash - sdpa| 0.01"),
            ("probe: decode, eager, SDPA", "measured", "1.234 ms/step")]
    gpu_check.print_table(rows, "title", Console(file=out, width=200))
    text = out.getvalue()
    assert all(cell in text for row in rows for cell in row)  # brackets are not rich markup


def test_probe_counts_the_bytes_a_step_reads():
    for tied in (False, True):
        model = tiny_model(tie_word_embeddings=tied)
        c = model.cfg
        table = c.vocab_size * c.hidden_size * 4                   # float32
        everything = sum(p.numel() * 4 for p in model.parameters())
        # untied: the embedding is not streamed (one row per token); tied: it is the head
        assert gpu_probe.weight_bytes(model) == (everything if tied else everything - table)
    assert gpu_probe.kv_bytes(model, context=10, batch=3) == 2 * c.num_layers * 3 * 10 * \
        c.num_kv_heads * c.head_dim * 4


def test_probe_measures_steps_on_the_cpu_twin():
    """The probe's loop on a tiny CPU model: decode and verify rows, fraction = bytes/s / copy."""
    model = tiny_model()
    rows = gpu_probe.measure(model, [("sdpa", False)], context=16, K=3, batch=2,
                             copy_bps=1e9, reps=1, n=2)
    assert [r["step"] for r in rows] == ["decode", "verify K+1=4"]
    read = gpu_probe.weight_bytes(model) + gpu_probe.kv_bytes(model, 16, 2)
    for r in rows:
        assert r["ms"] > 0 and r["mode"] == "eager, SDPA"
        assert r["fraction"] == pytest.approx(read / (r["ms"] / 1e3) / 1e9)
    assert kernels.ATTENTION == "sdpa" and model.graphs is None  # left as found


def test_probe_model_has_the_1b_llama_shape():
    with torch.device("meta"):
        model = kernels.Model(kernels.ModelConfig.from_hf(gpu_probe.LLAMA_1B))
    assert 1.23e9 < sum(p.numel() for p in model.parameters()) < 1.24e9  # Llama-3.2-1B: 1.236e9


class StaticTwin:
    """What kernels.CUDAGraphs captures, run eagerly on the CPU: Model._forward over one static
    cache (keys up to max_len, masked; no host sync), for the captured step lengths only."""

    def __init__(self, model, batch_size, max_len, step_lengths):
        self.model, self.steps = model, set(step_lengths)
        self.cache = model.new_cache(batch_size, max_len)
        self.cache.static = True

    def run(self, tokens, cache):
        if cache is not self.cache or tokens.shape[1] not in self.steps:
            return None
        return self.model._forward(tokens, cache, None, None, None, True)


def capture_twin(model, *shape):
    model.graphs = StaticTwin(model, *shape)
    return model.graphs.cache


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_the_forward_a_cuda_graph_captures_equals_eager_on_the_cpu(family):
    """tests/test_gpu.py's graph test with the capture replaced by its CPU twin: rollbacks, the
    cache filled to its end, a second capture. On a GPU the same test adds capture and replay."""
    with torch.inference_mode():
        error, replays = replay_vs_eager(scaled_model(family), capture_twin, TOL[torch.float32])
    assert replays > 60 and error < 1e-4
