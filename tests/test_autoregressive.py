"""autoregressive.py: the oracle equals transformers' greedy generate, batches equal singles."""
import pytest
import torch
from transformers import AutoModelForCausalLM

import autoregressive
from conftest import tiny_model


@pytest.fixture(scope="module")
def hf_default(default_model):
    return AutoModelForCausalLM.from_pretrained(default_model.path, dtype=torch.float32).eval()


def test_greedy_equals_transformers_generate_on_default_model(default_model, default_prompts,
                                                              hf_default):
    """4 prompts x 64 tokens, token for token (the prompts are chosen to run past 64 tokens)."""
    for prompt in default_prompts:
        ours, _ = autoregressive.generate(default_model, prompt, 64)
        ref = hf_default.generate(torch.tensor([prompt]), max_new_tokens=64, do_sample=False,
                                  pad_token_id=2)[0, len(prompt):].tolist()
        assert ours[0] == ref and len(ref) == 64


def test_ragged_batch_equals_each_prompt_alone(default_model, default_prompts):
    batch, stats = autoregressive.generate(default_model, default_prompts, 24, eos=False)
    for prompt, row in zip(default_prompts, batch):
        alone, _ = autoregressive.generate(default_model, prompt, 24, eos=False)
        assert row == alone[0]
    assert stats["new_tokens"] == 4 * 24 and stats["tau"] == 1.0


def test_each_row_stops_at_eos():
    model = tiny_model(seed=1, vocab_size=16)
    free, _ = autoregressive.generate(model, [[1, 2], [3, 4, 5]], 40, eos=False)
    stop = free[0][5]                       # pretend this token is EOS
    model.cfg.eos_token_ids = (stop,)
    try:
        tokens, _ = autoregressive.generate(model, [[1, 2], [3, 4, 5]], 40)
    finally:
        model.cfg.eos_token_ids = ()
    for row, ref in zip(tokens, free):
        cut = ref.index(stop) + 1 if stop in ref else len(ref)
        assert row == ref[:cut]
    assert len(tokens[0]) == free[0].index(stop) + 1 <= 6


def test_seeded_sampling_is_reproducible():
    model = tiny_model(seed=2)
    a, _ = autoregressive.generate(model, [1, 2, 3], 30, temperature=1.0, seed=11)
    b, _ = autoregressive.generate(model, [1, 2, 3], 30, temperature=1.0, seed=11)
    c, _ = autoregressive.generate(model, [1, 2, 3], 30, temperature=1.0, seed=12)
    assert a == b and a != c


def test_negative_temperature_is_a_clear_error():
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
        autoregressive.generate(tiny_model(), [1, 2], 4, temperature=-1.0)
