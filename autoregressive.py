"""autoregressive.py: plain autoregressive decoding, the baseline and the oracle.

One target forward per generated token: feed the last token, read the distribution p over the
next one, sample (or take the argmax at temperature 0), repeat. Every token costs a full pass
over the model's weights, and on small batches that pass is bound by memory bandwidth, not
arithmetic: verifying 5 tokens costs about what 1 does. That slack is what speculative.py uses.

Every richer loop (speculative.py, ssd.py, saguaro.py) must reproduce this file's distribution
exactly at temperature > 0, in every dtype. At temperature 0 it must reproduce its tokens one for
one in float32: a (K+1)-token verify and a 1-token step compute the same logits up to float32
rounding (~1e-6 relative), so only a near-exact tie of the two best logits could split them. In
bfloat16/float16 rounding is ~1e-2 relative and the two forwards round differently: near-ties
are common over a large vocabulary and outputs may part (token equality is not claimed there).

    python autoregressive.py --prompt "Write a haiku about cacti."
"""
import argparse
import time

import torch

import harness
import kernels
import timeline


@torch.inference_mode()
def generate(target, prompt_ids, max_new_tokens, *, draft=None, temperature=0.0, top_k=None,
             top_p=None, seed=0, eos=True):
    """prompt_ids: a list of token ids, or a batch of them (ragged is fine).
    Returns (tokens, stats): tokens[b] = the new tokens of row b (ending at EOS if one came,
    EOS included); stats as in harness.new_stats. `draft` is ignored: AR needs none."""
    prompts = harness.as_batch(prompt_ids)
    kernels.check_sampling(temperature, top_k, top_p)
    max_len = harness.check_request(target, prompts, max_new_tokens)
    B, dev = len(prompts), target.device
    gen = kernels.make_generator(seed, dev)
    eos_ids = torch.tensor(target.cfg.eos_token_ids if eos else (), device=dev)
    stats = harness.new_stats()
    out = torch.zeros(B, max_new_tokens, dtype=torch.long, device=dev)   # (B, N)
    n_out = torch.zeros(B, dtype=torch.long, device=dev)                  # tokens so far per row
    done = torch.zeros(B, dtype=torch.bool, device=dev)

    # 1) prefill: the whole prompt in one forward; its last position gives the first token
    t0 = time.perf_counter()
    cache = target.new_cache(B, max_len)
    token = kernels.next_token(target.prefill(prompts, cache), temperature, top_k, top_p, gen,
                              "the target's prefill")
    kernels.sync(dev)
    stats["prefill_s"] = timeline.span("prefill", t0)

    # 2) decode: one target forward per token, every row in one batch
    t0 = time.perf_counter()
    for i in range(max_new_tokens):
        out[:, i] = torch.where(done, out[:, i], token)
        n_out += ~done
        done |= torch.isin(token, eos_ids)
        if i == max_new_tokens - 1 or bool(done.all()):
            break
        tick = time.perf_counter()
        stats["target_calls"] += 1
        stats["rows_verified"] += int((~done).sum())
        logits = target(token[:, None], cache)                            # (B, 1, V)
        token = kernels.next_token(logits[:, -1], temperature, top_k, top_p, gen,  # (B,)
                                  f"the target at decode step {i + 1}")
        timeline.span("step", tick)
    kernels.sync(dev)
    stats["decode_s"] = time.perf_counter() - t0

    # 3) hand back each row's tokens
    tokens = [out[b, : n_out[b]].tolist() for b in range(B)]
    return tokens, harness.finish_stats(stats, tokens)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_common_args(ap, tp=True)
    ap.add_argument("--prompt", required=True, type=harness.prompt_text)
    args = ap.parse_args()
    target, _ = harness.load_models(args)
    ids = kernels.encode_prompt(target, args.prompt)
    tokens, stats = harness.after_warm_up(lambda n: generate(
        target, ids, n, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        seed=args.seed), args.max_new_tokens, trace=args.trace)
    harness.report(target, tokens, stats)


if __name__ == "__main__":
    harness.cli(main)
