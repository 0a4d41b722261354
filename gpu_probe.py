"""gpu_probe.py: how long do a decode step and a (K+1)-token verify step take on this GPU, and what
fraction of its memory bandwidth do they reach? Eager vs CUDA graphs vs flash-attn.

At batch 1 a step is memory-bound: it streams every weight and the KV cache once, so its floor
is bytes / bandwidth. The probe builds a model of a real shape with random weights (Llama-3.2-1B's
config; nothing is downloaded) in bf16 on the GPU, fills a KV cache with `--context` tokens and
times, in each mode (eager SDPA, CUDA graphs + SDPA, and the same two with flash-attn when it
imports):
  decode   1 token per row        (what AR runs per token)
  verify   K+1 tokens per row     (what SD / SSD / Saguaro run per round; K = 7 as in the paper)
Each step is followed by a rollback of the lengths, so every step sees the same context. The
fraction of bandwidth is (weight bytes + KV bytes read) / step time over the bandwidth of a
large device-to-device copy measured in the same run ((read + write bytes) / time). The figures
belong to the GPU that ran it; nothing here is a claim about another one.

    python gpu_probe.py                       # ~20-40 s; its last stdout line is JSON
    python gpu_probe.py --context 4096 --batch 4 --k 3
"""
import argparse
import json
import statistics
import sys
import time

import torch

import kernels

LLAMA_1B = {  # meta-llama/Llama-3.2-1B's shape (config.json); the weights here are random
    "model_type": "llama", "vocab_size": 128256, "hidden_size": 2048, "num_hidden_layers": 16,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
    "intermediate_size": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "tie_word_embeddings": True, "max_position_embeddings": 131072, "eos_token_id": 128001}
MODES = [("sdpa", False), ("sdpa", True), ("flash", False), ("flash", True)]  # (attention, graphs)


def mode_name(attention, graphs):
    return ("CUDA graphs" if graphs else "eager") + (", flash-attn" if attention == "flash"
                                                     else ", SDPA")


def random_model(config: dict, device, dtype) -> kernels.Model:
    """Our Model with the layers' own random init, built on the device (seconds, not minutes)."""
    with torch.device(device):
        model = kernels.Model(kernels.ModelConfig.from_hf(config))
    inv_freq = model.inv_freq.clone()
    model = model.to(dtype).eval().requires_grad_(False)
    model.inv_freq = inv_freq  # RoPE frequencies stay float32
    return model


def weight_bytes(model) -> int:
    """Bytes of weights one step streams: every parameter once (tied ones once). An untied
    embedding table is not streamed (a step reads one row per token); tied, it is the head."""
    tied = model.head.weight is model.embed.weight
    return sum(p.numel() * p.element_size() for name, p in model.named_parameters()
               if tied or name != "embed.weight")


def kv_bytes(model, context: int, batch: int) -> int:
    """Bytes of K and V a step reads: `context` cached tokens per row, every layer."""
    c, size = model.cfg, model.embed.weight.element_size()
    return 2 * c.num_layers * batch * context * c.num_kv_heads * c.head_dim * size


def copy_bandwidth(device, nbytes=1 << 31, reps=5) -> float:
    """Bytes/s of a large device-to-device copy, read + write counted (median of reps)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    kernels.sync(device)
    rates = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(4):
            dst.copy_(src)
        kernels.sync(device)
        rates.append(2 * 4 * nbytes / (time.perf_counter() - t0))
    return statistics.median(rates)


def step_seconds(model, cache, tokens, reps: int, n: int) -> float:
    """Median over reps of the mean time of n steps (each step, then a rollback of lengths)."""
    start = cache.lengths.clone()

    def step():
        model(tokens, cache)
        cache.lengths.copy_(start)
    for _ in range(3):  # warm-up: kernel selection, lazy init
        step()
    kernels.sync(model.device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        kernels.sync(model.device)
        times.append((time.perf_counter() - t0) / n)
    return statistics.median(times)


def measure(model, modes, context: int, K: int, batch: int, copy_bps: float, reps=5, n=20):
    """One row per (mode, step): ms per step, bytes/s read, fraction of the copy bandwidth."""
    rows, before = [], kernels.ATTENTION
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.cfg.vocab_size, (context,), generator=g).tolist()
    read = weight_bytes(model) + kv_bytes(model, context, batch)
    try:
        for attention, graphs in modes:
            kernels.ATTENTION = attention  # before the cache: flash wants int32 lengths
            if attention == "flash":
                from flash_attn import flash_attn_with_kvcache
                kernels.flash_attn_with_kvcache = flash_attn_with_kvcache
            max_len = context + K + 1
            cache = (model.use_cuda_graphs(batch, max_len, step_lengths=(1, K + 1)) if graphs
                     else model.new_cache(batch, max_len))
            model.prefill([prompt] * batch, cache)
            for step, T in (("decode", 1), (f"verify K+1={K + 1}", K + 1)):
                tokens = torch.randint(0, model.cfg.vocab_size, (batch, T), generator=g)
                s = step_seconds(model, cache, tokens.to(model.device), reps, n)
                rows.append({"step": step, "mode": mode_name(attention, graphs), "ms": s * 1e3,
                             "GBps": read / s / 1e9, "fraction": read / s / copy_bps})
            model.graphs = None
            del cache
    finally:
        kernels.ATTENTION, model.graphs = before, None
    return rows


def flash_imports() -> bool:
    try:
        from flash_attn import flash_attn_with_kvcache  # noqa: F401
        return True
    except Exception:
        return False


def print_table(rows, title):
    from rich.console import Console
    from rich.table import Table
    table = Table(title=title)
    for col in ("step", "mode", "ms/step", "GB/s read", "of copy bandwidth", "vs eager SDPA"):
        table.add_column(col, justify="left" if col in ("step", "mode") else "right")
    base = {r["step"]: r["ms"] for r in rows if r["mode"] == mode_name("sdpa", False)}
    for r in rows:
        vs = f"{base[r['step']] / r['ms']:.2f}x" if r["step"] in base else "-"
        table.add_row(r["step"], r["mode"], f"{r['ms']:.3f}", f"{r['GBps']:.0f}",
                      f"{r['fraction']:.0%}", vs)
    Console().print(table)


@torch.inference_mode()
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--context", type=int, default=1024, help="cached tokens per row")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--k", type=int, default=7, help="draft tokens per round: verify K+1")
    ap.add_argument("--dtype", default="bfloat16", choices=list(kernels.DTYPES))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"gpu_probe: no CUDA GPU here (torch {torch.__version__}, CUDA build "
              f"{torch.version.cuda}): nothing to measure.", file=sys.stderr)
        return 2
    dev, dtype = torch.device("cuda"), kernels.resolve_dtype(args.dtype)
    t0 = time.perf_counter()
    copy_bps = copy_bandwidth(dev)
    model = random_model(LLAMA_1B, dev, dtype)
    flash = flash_imports() and dtype != torch.float32  # flash-attn: fp16 / bf16 only
    modes = [m for m in MODES if flash or m[0] != "flash"]
    rows = measure(model, modes, args.context, args.k, args.batch, copy_bps)
    gpu, kv = torch.cuda.get_device_name(dev), kv_bytes(model, args.context, args.batch)
    print(f"{gpu}, torch {torch.__version__}, CUDA {torch.version.cuda}, flash-attn "
          f"{'timed' if flash else 'not timed (absent, or float32)'}; Llama-3.2-1B shape, "
          f"random weights, {args.dtype}, batch {args.batch}, {args.context} cached tokens; "
          f"weights {weight_bytes(model) / 1e9:.2f} GB + KV {kv / 1e9:.3f} GB per step; device "
          f"copy bandwidth {copy_bps / 1e9:.0f} GB/s; {time.perf_counter() - t0:.0f} s")
    print_table(rows, f"step times on {gpu} (median of 5 x 20 steps)")
    print(json.dumps({"gpu": gpu, "copy_GBps": copy_bps / 1e9, "flash": flash,
                      "context": args.context, "batch": args.batch, "k": args.k, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
