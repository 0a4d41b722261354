"""Shared fixtures: the default model (loaded once per session) and tiny random models."""
import copy
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import kernels  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (tests/test_gpu.py), skipped without "
                            "one; `python gpu_check.py` runs them all with the speed probe")


def tiny_config(model_type="llama", vocab_size=64, **over):
    """A transformers-style config dict for a tiny model of one supported family."""
    c = {"model_type": model_type, "vocab_size": vocab_size, "hidden_size": 32,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "head_dim": 8, "intermediate_size": 64, "rms_norm_eps": 1e-6,
         "rope_theta": 10000.0, "tie_word_embeddings": False,
         "max_position_embeddings": 256, "eos_token_id": None}
    c.update(over)
    return c


def tiny_model(seed=0, model_type="llama", vocab_size=64, scale=1.0, **over) -> kernels.Model:
    """Our Model with random weights (no tokenizer). `scale` sharpens the output distribution."""
    cfg = kernels.ModelConfig.from_hf(tiny_config(model_type, vocab_size, **over))
    g = torch.Generator().manual_seed(seed)
    model = kernels.Model(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        model.head.weight.mul_(scale)
    return model.eval().requires_grad_(False)


def noisy_copy(model, noise, seed=1):
    """The target with Gaussian noise on every weight: a draft that agrees with it partly."""
    draft = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=g) * noise)
    return draft


class FakeTokenizer:
    """n token ids, no text: what check_draft compares (its vocabulary and its length); `salt`
    makes a tokenizer of the same size with other token strings."""

    def __init__(self, n, salt=""):
        self.vocab = {f"tok{i}{salt}": i for i in range(n)}

    def get_vocab(self):
        return dict(self.vocab)

    def __len__(self):
        return len(self.vocab)


def before_round(worker, n, action):
    """Run action() on a saguaro DraftWorker just before it sends Round n + 1 (n rounds already
    answered, counted over all its calls): how the tests kill, stop or wait for the real
    draft process at a chosen moment (once), with no test hook inside the library."""
    import draft_process
    real, fired = worker.exchange, []

    def exchange(msg):
        if isinstance(msg, draft_process.Round) and worker.rounds == n and not fired:
            fired.append(action())
        return real(msg)
    worker.exchange = exchange


def draft_processes() -> list:
    """The saguaro draft processes of this process still running (none once every worker is
    closed: a failed start or a lost draft must leave nothing behind)."""
    import multiprocessing
    return [p for p in multiprocessing.active_children() if p.name == "saguaro-draft"]


@pytest.fixture(scope="session")
def default_model():
    return kernels.load_model("default", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def default_prompts(default_model):
    texts = ["Write a Python function that checks whether a number is prime.",
             "Write a short story about a robot who learns to paint.",
             "Give me three tips for learning to play the guitar.",
             "What is the capital of France, and what is it famous for?"]
    return [kernels.encode_prompt(default_model, t) for t in texts]


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        item.saw_failure = True
    return report


@pytest.fixture(autouse=True)
def no_draft_process_outlives_a_failed_test(request):
    """A test that fails while a saguaro DraftWorker runs closes it, so one failure never
    cascades into every later test that starts a worker (one per process)."""
    yield
    saguaro = sys.modules.get("saguaro")
    if saguaro is not None and getattr(request.node, "saw_failure", False):
        for worker in list(saguaro.draft_process._LIVE):
            worker.close()
