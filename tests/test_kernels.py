"""kernels.py: our forward equals transformers', the cache and masks behave, inputs are checked."""
import collections
import os
import re
import shutil
import copy
import warnings

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import harness
import kernels
import kernels_cpu
from conftest import noisy_copy, tiny_config, tiny_model

FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]


def hf_and_ours(model_type, biases=0.0, **over):
    """A random tiny transformers model of one family and our Model loaded from its weights
    (`biases`: the spread of random biases; transformers starts them at zero)."""
    c = tiny_config(model_type, **over)
    c.pop("model_type")
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **c),
                                          dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, biases)
    ours = kernels.model_from_hf_state(kernels.ModelConfig.from_hf(hf.config), hf.state_dict())
    return hf, ours.eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_transformers_on_tiny_models(family):
    hf, ours = hf_and_ours(family)
    ids = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids, ours.new_cache(2, 32))
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_llama3_rope_scaling_equals_transformers():
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
               "rope_theta": 500000.0}
    hf, ours = hf_and_ours("llama", rope_parameters=scaling)
    ids = torch.randint(0, 64, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, ours.new_cache(1, 64)), hf(ids).logits,
                                   atol=1e-4, rtol=1e-4)


# every config field ModelConfig.from_hf reads, each set away from its default; sequences of 40
# tokens cross the windows of 8; initializer_range 0.3 makes a dropped term show in the logits
FIELDS = {
    "gqa": ("llama", {}),                                     # 4 query heads on 2 KV heads
    "mha": ("llama", {"num_key_value_heads": 4}),
    "head_dim": ("llama", {"head_dim": 16}),                  # not hidden_size / heads
    "rms_norm_eps": ("llama", {"rms_norm_eps": 0.5}),
    "rope_theta": ("qwen2", {"rope_theta": 50.0}),
    "rope_linear": ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 4.0,
                                                  "rope_theta": 10000.0}}),
    "tied": ("qwen3", {"tie_word_embeddings": True}),
    "llama_attention_bias": ("llama", {"attention_bias": True}),      # q, k, v and o
    "llama_mlp_bias": ("llama", {"mlp_bias": True}),                  # gate, up, down
    "llama_both_biases": ("llama", {"attention_bias": True, "mlp_bias": True}),
    "qwen2_qkv_bias": ("qwen2", {}),
    "qwen3_attention_bias": ("qwen3", {"attention_bias": True}),
    "mistral_window": ("mistral", {"sliding_window": 8}),
    "mistral_no_window": ("mistral", {"sliding_window": None}),
    "qwen2_window_all": ("qwen2", {"use_sliding_window": True, "sliding_window": 8,
                                   "max_window_layers": 0}),
    "qwen2_window_layer_1": ("qwen2", {"use_sliding_window": True, "sliding_window": 8,
                                       "max_window_layers": 1}),
    "qwen2_window_off": ("qwen2", {"use_sliding_window": False, "sliding_window": 8,
                                   "max_window_layers": 0}),
    "qwen3_layer_types": ("qwen3", {"use_sliding_window": True, "sliding_window": 8,
                                    "layer_types": ["sliding_attention", "full_attention"]}),
}


@pytest.mark.parametrize("case", FIELDS)
def test_logits_equal_transformers_for_every_config_field(case):
    """Prefill, then decode steps over the cache: transformers' logits, for each field."""
    family, over = FIELDS[case]
    hf, ours = hf_and_ours(family, biases=0.3, initializer_range=0.3, **over)
    ids = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(5))
    cache = ours.new_cache(2, 48)
    with torch.no_grad():
        ref = hf(ids).logits
        got = [ours(ids[:, :30], cache)] + [ours(ids[:, i:i + 1], cache) for i in range(30, 40)]
    torch.testing.assert_close(torch.cat(got, dim=1), ref, atol=2e-4, rtol=1e-4)


def test_sliding_window_holds_in_tree_drafting():
    """A branch forked inside the trunk, in scratch slots far from its positions, deeper than
    the window: the window counts positions, not slots (the branch decoded alone agrees)."""
    model = tiny_model(seed=6, model_type="mistral", sliding_window=2)
    prefix, fork, branch = [1, 2, 3, 4, 5, 6, 7, 8], 5, [20, 21, 22]
    cache = model.new_cache(1, 16)
    model.prefill([prefix], cache)
    mask = torch.zeros(1, 3, 16, dtype=torch.bool)
    mask[..., :fork] = True
    for q in range(3):
        mask[0, q, 8:9 + q] = True       # its own tokens, in slots 8, 9, 10
    tree = model(torch.tensor([branch]), cache, positions=torch.tensor([[5, 6, 7]]),
                 slots=torch.tensor([[8, 9, 10]]), mask=mask)
    alone = model.new_cache(1, 16)
    model.prefill([prefix[:fork]], alone)
    torch.testing.assert_close(tree, model(torch.tensor([branch]), alone), atol=1e-5, rtol=1e-5)


def test_config_fields_that_change_the_math_are_read_or_refused():
    """Fields we do not model are refused by name; absent fields take the family's defaults."""
    bad = {"hidden_act": "gelu", "rope_parameters": {"rope_type": "yarn", "factor": 2.0},
           "layer_types": ["chunked_attention"] * 2}
    for field, value in bad.items():
        extra = {"use_sliding_window": True} if field == "layer_types" else {}
        with pytest.raises(ValueError, match=field if field != "rope_parameters" else "yarn"):
            kernels.ModelConfig.from_hf(tiny_config("qwen3", **{field: value}, **extra))
    c = tiny_config("qwen3")
    del c["head_dim"]
    assert kernels.ModelConfig.from_hf(c).head_dim == 128                # Qwen3's default
    c = tiny_config("mistral", max_position_embeddings=10000)
    assert kernels.ModelConfig.from_hf(c).windows == (4096, 4096)        # Mistral's default


def test_every_checkpoint_tensor_is_used_or_named():
    """A tensor the config does not declare (a spare o_proj bias) or a half-fused set is an
    error naming it; old checkpoints' rotary_emb.inv_freq buffers are skipped, as in
    transformers."""
    hf, _ = hf_and_ours("llama")
    cfg = kernels.ModelConfig.from_hf(hf.config)
    for spare in ("model.layers.0.self_attn.o_proj.bias", "model.layers.1.mlp.up_proj.bias",
                  "lm_head.bias", "model.vision_tower.weight"):
        state = dict(hf.state_dict(), **{spare: torch.zeros(3)})
        with pytest.raises(ValueError, match=spare):
            kernels.model_from_hf_state(cfg, state)
    state = dict(hf.state_dict(), **{"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)})
    kernels.model_from_hf_state(cfg, state)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("stored", [True, False])
def test_tied_and_stored_heads_load_as_transformers_loads_them(tmp_path, tied, stored):
    """tie_word_embeddings x lm_head.weight in the checkpoint or not: transformers keeps a
    stored head that differs from the embedding (with a warning) and ties otherwise; an untied
    config without a head is refused (transformers would start a random head)."""
    import json
    from safetensors.torch import load_file, save_file
    hf, _ = hf_and_ours("llama", initializer_range=0.3)
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, tie_word_embeddings=tied)))
    state = load_file(tmp_path / "model.safetensors")
    if not stored:
        del state["lm_head.weight"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    cfg = kernels.ModelConfig.from_hf(json.loads((tmp_path / "config.json").read_text()))
    if not tied and not stored:
        with pytest.raises(ValueError, match="head"):
            kernels.model_from_hf_state(cfg, state)
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = kernels.model_from_hf_state(cfg, state).eval()
    assert any("lm_head" in str(w.message) for w in caught) == (tied and stored)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, ours.new_cache(1, 12)), ref(ids).logits,
                                   atol=2e-4, rtol=1e-4)


def test_a_sliding_window_checkpoint_loads_and_decodes_as_transformers(tmp_path, default_model):
    """The issue's case end to end: a Mistral folder with sliding_window 8 (saved with the
    default tokenizer) through load_model: logits past the window, and greedy SD (a noisy
    draft) emitting transformers' greedy tokens."""
    import speculative
    from transformers import AutoTokenizer, MistralConfig
    config = MistralConfig(vocab_size=49152, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=16, sliding_window=8, initializer_range=0.3)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    hf.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(default_model.path).save_pretrained(tmp_path)
    ours = kernels.load_model(str(tmp_path), device="cpu")
    assert ours.cfg.windows == (8, 8)
    ids = torch.randint(0, 49152, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, ours.new_cache(1, 40)), hf(ids).logits,
                                   atol=2e-4, rtol=1e-4)
        want = hf.generate(ids[:, :12], max_new_tokens=20, do_sample=False)[0, 12:].tolist()
    got, _ = speculative.generate(ours, ids[0, :12].tolist(), 20, eos=False, k=3,
                                  draft=noisy_copy(ours, 0.05))
    assert got[0] == want


def test_logits_equal_transformers_on_default_model(default_model, default_prompts):
    hf = AutoModelForCausalLM.from_pretrained(default_model.path, dtype=torch.float32).eval()
    ids = torch.tensor([default_prompts[0]])
    with torch.no_grad():
        ref = hf(ids).logits
        got = default_model(ids, default_model.new_cache(1, ids.shape[1]))
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-4)


def test_incremental_decode_equals_full_forward():
    model = tiny_model(seed=3)
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(3))
    full = model(ids, model.new_cache(1, 16))
    cache = model.new_cache(1, 16)
    parts = [model(ids[:, :5], cache), model(ids[:, 5:9], cache)]
    parts += [model(ids[:, i:i + 1], cache) for i in range(9, 12)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.lengths.tolist() == [12]


def test_ragged_prefill_rows_equal_each_prompt_alone():
    model = tiny_model(seed=4)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]]
    cache = model.new_cache(3, 16)
    batched = model.prefill(prompts, cache)
    assert cache.lengths.tolist() == [3, 7, 1]
    step = model(torch.tensor([[5], [6], [7]]), cache)[:, 0]
    for b, p in enumerate(prompts):
        alone = model.new_cache(1, 16)
        torch.testing.assert_close(model.prefill([p], alone)[0], batched[b], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(torch.tensor([[5 + b]]), alone)[0, 0], step[b],
                                   atol=1e-5, rtol=1e-5)


def test_rollback_then_redecode_equals_fresh_decode():
    model = tiny_model(seed=5)
    cache = model.new_cache(1, 32)
    model.prefill([[1, 2, 3, 4]], cache)
    model(torch.tensor([[9, 9, 9]]), cache)      # three tokens that get rejected
    cache.lengths -= 3                            # roll back: only a length moves
    after = model(torch.tensor([[5, 6]]), cache)
    fresh = model.new_cache(1, 32)
    model.prefill([[1, 2, 3, 4]], fresh)
    torch.testing.assert_close(after, model(torch.tensor([[5, 6]]), fresh), atol=1e-5, rtol=1e-5)


def test_tree_masked_forward_equals_each_branch_alone():
    """Two branches forked after a shared prefix, laid out in scratch slots, decoded in one
    forward with a tree mask, give the logits of each branch decoded alone."""
    model = tiny_model(seed=6)
    prefix, branches = [1, 2, 3, 4, 5], [[7, 8], [9, 10]]
    cache = model.new_cache(1, 16)
    model.prefill([prefix], cache)
    P = len(prefix)
    # slots: branch 0 -> 5, 6; branch 1 -> 7, 8; positions: both P, P+1
    tokens = torch.tensor([[7, 9, 8, 10]])
    positions = torch.tensor([[P, P, P + 1, P + 1]])
    slots = torch.tensor([[5, 7, 6, 8]])
    mask = torch.zeros(1, 4, 16, dtype=torch.bool)
    mask[..., :P] = True
    for q, own in enumerate([[5], [7], [5, 6], [7, 8]]):
        mask[0, q, own] = True
    tree = model(tokens, cache, positions=positions, slots=slots, mask=mask)[0]
    assert cache.lengths.tolist() == [P]           # explicit calls leave lengths alone
    for i, br in enumerate(branches):
        alone = model.new_cache(1, 16)
        model.prefill([prefix], alone)
        ref = model(torch.tensor([br]), alone)[0]
        torch.testing.assert_close(tree[[i, i + 2]], ref, atol=1e-5, rtol=1e-5)


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    probs = torch.softmax(torch.randn(4, 50), -1)
    draw = lambda seed: kernels.sample(probs.expand(64, 4, 50), kernels.make_generator(seed, "cpu"))
    assert torch.equal(draw(7), draw(7))
    assert not torch.equal(draw(7), draw(8))


def test_sample_follows_the_law_never_draws_a_zero_and_one_hot_gives_its_token():
    from exact import chi_square_test
    probs = torch.tensor([0.5, 0.0, 0.25, 0.125, 0.0, 0.125])
    draws = kernels.sample(probs.expand(20000, 6), kernels.make_generator(3, "cpu"))
    counts = collections.Counter(draws.tolist())
    assert counts[1] == 0 and counts[4] == 0                 # probability 0: never drawn
    passed, stat, threshold = chi_square_test(counts, dict(enumerate(probs.tolist())), 1e-3)
    assert passed, (stat, threshold)                         # false-failure rate 1e-3
    one_hot = torch.zeros(1000, 49152)
    one_hot[torch.arange(1000), torch.arange(1000) * 49] = 1.0
    assert torch.equal(kernels.sample(one_hot, kernels.make_generator(0, "cpu")),
                       torch.arange(1000) * 49)
    logits = torch.randn(3, 49152)
    assert torch.equal(kernels.next_token(logits, 0.0), logits.argmax(-1))
    for bad in (torch.zeros(2, 6), torch.full((2, 6), float("nan"))):
        with pytest.raises(ValueError, match="no probability mass"):
            kernels.sample(bad)


def test_probs_from_logits_greedy_topk_topp():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    assert kernels.probs_from_logits(logits, 0.0).tolist() == [[1.0, 0.0, 0.0, 0.0]]
    p = kernels.probs_from_logits(logits, 1.0, top_k=2)
    assert (p[0, 2:] == 0).all() and abs(p.sum().item() - 1) < 1e-6
    full = torch.softmax(logits, -1)[0]
    p = kernels.probs_from_logits(logits, 1.0, top_p=float(full[0]) + 1e-3)  # needs 2 tokens
    assert (p[0, :2] > 0).all() and (p[0, 2:] == 0).all()
    p = kernels.probs_from_logits(logits, 1.0, top_p=float(full[0]) - 1e-3)  # 1 token suffices
    assert p[0].tolist() == [1.0, 0.0, 0.0, 0.0]


# -- bad input gets a clear error ---------------------------------------------------------------

def test_unknown_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        kernels.load_model(str(tmp_path / "nope"), device="cpu")


def test_unsupported_architecture_is_a_clear_error():
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'.*llama"):
        kernels.ModelConfig.from_hf({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})


def test_unknown_device_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        kernels.resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            kernels.resolve_device("cuda")


def test_bad_requests_are_clear_errors():
    model = tiny_model(seed=0)  # context of 256 tokens
    with pytest.raises(ValueError, match="empty prompt"):
        harness.check_request(model, [[]], 4)
    with pytest.raises(ValueError, match="exceeds the model's context of 256"):
        harness.check_request(model, [[1] * 250], 10)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1"):
        harness.check_request(model, [[1]], 0)
    with pytest.raises(ValueError, match=r"token id 64, outside \[0, 64\): the model's vocabulary"):
        harness.check_request(model, [[64]], 1)
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
        kernels.probs_from_logits(torch.zeros(1, 4), -0.5)
    with pytest.raises(ValueError, match="KV cache overflow"):
        model(torch.tensor([[1, 2, 3]]), model.new_cache(1, 2))


# -- GPU only: the flash-attn and CUDA-graph paths against the eager SDPA path --------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_cuda_graph_decode_equals_eager():
    model = tiny_model(seed=8).to("cuda", torch.bfloat16)
    eager = model.new_cache(2, 64)
    model.prefill([[1, 2, 3], [4, 5]], eager)
    ref = model(torch.tensor([[6], [7]], device="cuda"), eager)
    graphed = model.use_cuda_graphs(2, 64, step_lengths=(1, 5))
    model.prefill([[1, 2, 3], [4, 5]], graphed)
    got = model(torch.tensor([[6], [7]], device="cuda"), graphed)
    model.graphs = None
    torch.testing.assert_close(got, ref, atol=2e-2, rtol=2e-2)


@cuda
@pytest.mark.skipif(kernels.ATTENTION != "flash", reason="flash-attn not installed")
def test_flash_attention_equals_sdpa():
    model = tiny_model(seed=9).to("cuda", torch.bfloat16)
    ids = torch.randint(0, 64, (2, 9), device="cuda")
    flash = model(ids, model.new_cache(2, 16))
    kernels.ATTENTION = "sdpa"
    try:
        sdpa = model(ids, model.new_cache(2, 16))
    finally:
        kernels.ATTENTION = "flash"
    torch.testing.assert_close(flash, sdpa, atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(not kernels_cpu.PACKED[torch.float32], reason="needs oneDNN")
def test_packed_linear_equals_plain_linear_for_every_row_count():
    lin = torch.nn.Linear(48, 80)
    packed = kernels_cpu.PackedLinear(lin)
    for M in [*range(1, 11), 64, 700]:  # decode, verify and tree steps, prefills
        x = torch.randn(1, M, 48)
        torch.testing.assert_close(packed(x), lin(x), atol=1e-5, rtol=1e-5)
        assert packed.plans[(torch.float32, M)] != packed._plain  # all on the packed kernel
    assert list(packed.packed) == [torch.float32]  # one packed copy serves every M


def packed_bytes(model) -> tuple:
    """(bytes of the packed weights the model's PackedLinears hold, bytes of their weights)."""
    lins = [m for m in model.modules() if isinstance(m, kernels_cpu.PackedLinear)]
    size = lambda t: t.numel() * t.element_size()  # noqa: E731
    return (sum(size(t) for m in lins for t in m.packed.values()),
            sum(size(m.weight) for m in lins))


@pytest.mark.skipif(not kernels_cpu.PACKED[torch.float32], reason="needs oneDNN")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_verify_widths_one_to_eight_share_one_packed_copy_of_the_weights(dtype):
    """SD at K = 1..8 (verify steps of 2..9 rows) on one target: each linear keeps at most one
    packed copy of its weight, whatever the widths a run (or bench.py --sweep) goes through."""
    import speculative
    from conftest import noisy_copy
    if not kernels_cpu.PACKED[dtype]:
        pytest.skip(f"no packed {dtype} kernel on this CPU")
    target = kernels_cpu.speed_up(tiny_model(seed=4, scale=3.0).to(dtype))
    draft = noisy_copy(target, 0.05)
    for k in range(1, 9):
        speculative.generate(target, [3, 1, 4, 1, 5], 10, draft=draft, k=k, eos=False)
    packed, weights = packed_bytes(target)
    assert 0 < packed <= weights  # one packed copy of each weight, not one per verify width
    for m in target.modules():
        if isinstance(m, kernels_cpu.PackedLinear):
            assert list(m.packed) == [dtype]


def resident_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads /proc/self/statm")
def test_default_model_resident_memory_stays_bounded_over_verify_widths(default_model):
    """The default model stepped at every width 1..9: the process grows by at most about one
    more copy of the weights (the shared packed copy), not by one per width. RSS is noisy on a
    busy machine, hence a generous bound: twice the weights' bytes."""
    weights_mb = sum(p.numel() * p.element_size() for p in default_model.parameters()) / 2**20
    cache = default_model.new_cache(1, 64)
    before = resident_mb()
    with torch.inference_mode():
        for T in range(1, 10):
            positions = torch.arange(T)[None]
            mask = torch.arange(T) <= positions[:, :, None]
            default_model(torch.arange(T)[None], cache, positions, positions, mask)
    grown = resident_mb() - before
    assert grown < 2 * weights_mb, f"resident memory grew {grown:.0f} MB over the widths"


def test_packed_linear_in_bfloat16_matches_plain_linear_and_survives_copies():
    lin = torch.nn.Linear(48, 80).to(torch.bfloat16)
    packed = kernels_cpu.PackedLinear(lin)
    for M in (1, 3, 8, 12, 300):  # oneDNN's packed bf16 path where the CPU has one
        x = torch.randn(1, M, 48, dtype=torch.bfloat16)
        torch.testing.assert_close(packed(x), lin(x), atol=3e-2, rtol=2e-2)
    twin = copy.deepcopy(packed)            # oneDNN's packed weights are opaque: re-packed
    x = torch.randn(2, 48, dtype=torch.bfloat16)
    torch.testing.assert_close(twin(x), lin(x), atol=3e-2, rtol=2e-2)
    as_float = copy.deepcopy(packed).float()  # .to() drops packed weights of the old dtype
    torch.testing.assert_close(as_float(x.float()), lin.float()(x.float()), atol=1e-5, rtol=1e-5)


def test_default_model_is_packed_on_cpu_float32(default_model):
    assert isinstance(default_model.layers[0].wqkv, kernels_cpu.PackedLinear)
    assert default_model.head.weight is default_model.embed.weight  # still tied


def fused_and_eager(model, run):
    """run(model) three ways: all layers in one C++ call (kernels_cpu.Stack), layer by layer
    with the small steps in C++ (Block.forward_fused), and in PyTorch ops (Block.forward)."""
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler: the fused CPU kernels cannot be built here")
    assert kernels_cpu.cpu_ops() is not None, "kernels_cpu.cpp did not build (see the warning)"
    stacked = run(model)
    stacks = kernels_cpu._STACKS.get(model)
    assert stacks and all(s is not None for s, _, _ in stacks.values())
    real = kernels_cpu.cpu_stack
    kernels_cpu.cpu_stack = lambda model, dtype: None  # as for a linear it cannot run
    try:
        layered = run(model)
        saved = kernels_cpu._cpu_ops
        kernels_cpu._cpu_ops, kernels_cpu.CPU_KERNELS = None, "eager"
        try:
            eager = run(model)
        finally:
            kernels_cpu._cpu_ops, kernels_cpu.CPU_KERNELS = saved, "fused"
    finally:
        kernels_cpu.cpu_stack = real
    return stacked, layered, eager


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", FAMILIES + ["llama_biases", "mistral_window"])
def test_fused_cpu_layer_equals_eager_layer(family, dtype):
    """The C++ twins of Block.forward give the eager layer's logits (and KV cache) for every
    kind of call: a ragged prefill, a decode step, a 5-token verify, a tree-masked call; also
    with o/MLP biases and with a sliding window (in the mask the Stack gets)."""
    over = {"llama_biases": {"attention_bias": True, "mlp_bias": True},
            "mistral_window": {"sliding_window": 4}}.get(family, {})
    model = tiny_model(seed=3, model_type=family.split("_")[0], **over)
    if family == "llama_biases":  # the packed kernels add the biases too
        kernels_cpu.pack_linears(model)
    for name, p in model.named_parameters():  # norm weights away from 1: their product counts
        if "norm" in name:
            p.data.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(len(name)))

    def run(m):
        cache = m.new_cache(2, 32)
        out = [m.prefill([[1, 2, 3, 4, 5, 6, 7], [8, 9, 10]], cache)]
        out.append(m(torch.tensor([[11], [12]]), cache))
        out.append(m(torch.tensor([[13, 14, 15, 16, 17], [18, 19, 20, 21, 22]]), cache))
        L = cache.lengths.clone()  # two branches of 2 tokens per row in scratch slots 20..23
        positions = L[:, None] + torch.tensor([0, 0, 1, 1])
        slots = torch.tensor([[20, 22, 21, 23]] * 2)
        mask = torch.arange(32) < L[:, None, None]
        mask = mask.expand(2, 4, 32).clone()
        for q, own in enumerate([[20], [22], [20, 21], [22, 23]]):
            mask[:, q, own] = True
        out.append(m(torch.tensor([[30, 31, 32, 33]] * 2), cache, positions=positions,
                     slots=slots, mask=mask))
        return out + [cache.k[:, :, :24].float(), cache.v[:, :, :24].float()]

    stacked, layered, eager = fused_and_eager(model.to(dtype), run)
    # bfloat16: logits reach ~10 here, where bf16 numbers are 0.0625 apart; a sum taken in
    # another order may land one step away (a wrong index would be off by ~10)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.07, rtol=0)
    for s, f, e in zip(stacked, layered, eager):
        torch.testing.assert_close(s, e, **tol)
        torch.testing.assert_close(f, e, **tol)


def test_fused_cpu_kernels_equal_torch_ops_on_long_inputs():
    """Each C++ kernel against the PyTorch ops it replaces, on a prefill-sized input (where the
    kernels split rows across threads) and in both CPU dtypes."""
    if kernels_cpu.cpu_ops() is None:
        pytest.skip("the fused CPU kernels are not built here")
    ops = kernels_cpu.cpu_ops()
    for dtype in (torch.float32, torch.bfloat16):
        x, w = torch.randn(3, 700, 96, dtype=dtype), torch.rand(96, dtype=dtype) + 0.5
        tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(ops.rms_norm(x, w, 1e-6), kernels.rms_norm(x, w, 1e-6), **tol)
        gate, up = x.chunk(2, dim=-1)
        torch.testing.assert_close(ops.silu_mul(x), torch.nn.functional.silu(gate) * up, **tol)


@pytest.mark.parametrize("D", [64, 48, 128, 40, 144])
def test_small_query_attention_equals_sdpa(D):
    """kernels_cpu.cpp's attend (the Stack's attention for steps of at most 32 query rows per KV
    head) against torch's SDPA: two rows of different masks (a row that sees a single slot,
    scratch slots hidden as in a tree step), lengths that are not multiples of 16, a ragged
    exp tail, D = 48, 64 and 128 (the vectorized loop, where the CPU has AVX-512) and 40, 144
    (not a multiple of 16, or past 128: the plain loops); 33 rows go to SDPA."""
    if kernels_cpu.cpu_ops() is None:
        pytest.skip("the fused CPU kernels are not built here")
    ops, g = kernels_cpu.cpu_ops(), torch.Generator().manual_seed(D)
    for R, S in [(1, 1), (3, 7), (3, 17), (15, 140), (32, 45), (33, 45)]:
        q = torch.randn(2, 3, R, D, generator=g)
        k, v = torch.randn(2, 160, 3, D, generator=g) * 3, torch.randn(2, 160, 3, D, generator=g)
        bias = torch.zeros(2, 1, R, S)
        bias[0, ..., S // 2:] = float("-inf")
        bias[0, ..., S - 1] = 0.0                        # row 0 sees its first half and the last
        bias[1, ..., : S - 1] = torch.where(torch.rand(R, S - 1, generator=g) < 0.5, 0.0,
                                            float("-inf"))
        want = torch.nn.functional.scaled_dot_product_attention(
            q, k[:, :S].transpose(1, 2), v[:, :S].transpose(1, 2), attn_mask=bias)
        torch.testing.assert_close(ops.attend(q, k, v, bias, S), want, atol=2e-6, rtol=1e-5)


def test_stack_is_rebuilt_when_a_layer_changes():
    """kernels_cpu.Stack holds the layers' tensors: swapping a module must not leave it stale."""
    if kernels_cpu.cpu_ops() is None:
        pytest.skip("the fused CPU kernels are not built here")
    model, ids = tiny_model(seed=4), torch.tensor([[1, 2, 3]])
    model(ids, model.new_cache(1, 8))
    new = torch.nn.Linear(64, 32, bias=False)
    new.weight.data.copy_(model.layers[1].w2.weight * 2)
    model.layers[1].w2 = new
    got = model(ids, model.new_cache(1, 8))
    saved = kernels_cpu._cpu_ops
    kernels_cpu._cpu_ops, kernels_cpu.CPU_KERNELS = None, "eager"
    try:
        want = model(ids, model.new_cache(1, 8))
    finally:
        kernels_cpu._cpu_ops, kernels_cpu.CPU_KERNELS = saved, "fused"
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_a_damaged_checkpoint_is_refused_with_the_checkpoint_s_own_names():
    """A wrong-shaped tensor, one of a declared q/k/v bias set missing, a missing embedding:
    each named as the checkpoint names it (not our fused names), not a state_dict traceback
    (found by a newcomer run)."""
    hf, _ = hf_and_ours("llama", attention_bias=True)
    cfg = kernels.ModelConfig.from_hf(hf.config)
    state = dict(hf.state_dict())
    up = "model.layers.1.mlp.up_proj.weight"
    for damaged, named in (
            ({up: state[up][:-4]}, up),
            ({"model.layers.0.self_attn.q_proj.bias": None}, "q_proj.bias"),
            ({"model.embed_tokens.weight": None}, "model.embed_tokens.weight"),
            ({"model.layers.1.post_attention_layernorm.weight": None},
             "model.layers.1.post_attention_layernorm.weight"),
            ({f"model.layers.0.mlp.{p}_proj.weight": None for p in ("gate", "up")},
             "model.layers.0.mlp.{gate,up}_proj.weight")):
        broken = {n: t for n, t in {**state, **damaged}.items() if t is not None}
        with pytest.raises(ValueError, match=re.escape(named)):
            kernels.model_from_hf_state(cfg, broken)
