"""harness.py: what every decoding loop shares around its body, so that the loop files hold
the algorithm and nothing else: the checks of a request, the stats every loop returns (same keys
everywhere, so bench.py loops over methods), the warm-up a CLI times after, and the command-line
flags every script spells the same way (each checked as it is parsed)."""
from __future__ import annotations

import argparse
import contextlib
import operator
import os
import sys
import tempfile
import traceback
import warnings

import torch

import kernels
import timeline


def check_request(model: kernels.Model, prompts: list, max_new_tokens: int, room: int = 0,
                  draft=None) -> int:
    """Validate a batch of prompts (lists of token ids); return the KV cache length it needs
    (longest prompt + max_new_tokens + `room` scratch slots for speculation). `draft`: a
    kernels.Model, or saguaro's DraftWorker (its max_positions), whose context must hold the
    request too (a draft with a shorter context than the target's would otherwise run past
    its positions silently); a model-free proposer has no limit."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt: every row needs at least one token.")
    if isinstance(max_new_tokens, bool) or not hasattr(max_new_tokens, "__index__") or \
            max_new_tokens < 1:  # 2.0 reached torch.zeros as a float size
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}.")
    max_new_tokens = operator.index(max_new_tokens)
    # ids past the tokenizer are embedding padding (151936 rows for 151669 tokens): no text
    # encodes them, and a draft padded to another size may lack them, so every loop refuses them
    tok, V = model.tokenizer, model.cfg.vocab_size
    n_ids = min(V, len(tok)) if tok is not None else V
    for b, p in enumerate(prompts):
        bad = [t for t in p if not 0 <= t < n_ids]
        if bad:
            raise ValueError(f"prompt row {b} holds token id {bad[0]!r}, outside [0, {n_ids}): "
                             + (f"the tokenizer has {len(tok)} tokens (ids past it are padding "
                                f"of the {V}-row embedding)" if tok is not None else
                                "the model's vocabulary") + ". Encode prompts with the "
                             "target's tokenizer (kernels.encode_prompt).")
    if 1 < max_new_tokens <= room:  # legal, exact, and wasteful: say so rather than run it
        warnings.warn(f"K = {room} draft tokens a round for max_new_tokens = {max_new_tokens}: "
                      f"a round can use at most {max_new_tokens - 1} (the prefill emits the "
                      f"first token), yet drafts all K; K = {max_new_tokens - 1} is faster.")
    need = max(len(p) for p in prompts) + max_new_tokens
    if need > model.cfg.max_positions:
        raise ValueError(f"prompt ({max(len(p) for p in prompts)} tokens) + max_new_tokens "
                         f"({max_new_tokens}) = {need} exceeds the model's context of "
                         f"{model.cfg.max_positions} tokens: shorten one of them.")
    limit = draft.cfg.max_positions if hasattr(draft, "cfg") else getattr(draft, "max_positions",
                                                                           None)
    if limit is not None and need > limit:
        raise ValueError(f"prompt ({max(len(p) for p in prompts)} tokens) + max_new_tokens "
                         f"({max_new_tokens}) = {need} exceeds the draft's context of {limit} "
                         f"tokens (max_position_embeddings; the target's is "
                         f"{model.cfg.max_positions}): shorten the request or use a draft with "
                         "a longer context.")
    return need + room


def saguaro_budget(budget, k, f):
    """saguaro's budget B as its caller gave it: a number or "auto"; None: (K+1) f when f is
    given, else "auto" (the CLIs' default: a caller who sets nothing gets the rules)."""
    return budget or ((k + 1) * f if f else "auto")


def check_saguaro(target, prompt_ids, max_new_tokens, *, k=4, f=None, temperature=0.0,
                  top_k=None, top_p=None, fan_out="geometric", saguaro_c="auto", backup="auto",
                  budget=None, seed=0, **_):
    """What saguaro.generate refuses (ValueError), checked before its draft process starts."""
    kernels.check_sampling(temperature, top_k, top_p)
    kernels.check_seed(seed)
    if not isinstance(k, int) or k < 1 or (f is not None and (not isinstance(f, int) or f < 1)):
        raise ValueError(f"k and f must be integers >= 1, got k={k!r}, f={f!r}.")
    if fan_out not in ("geometric", "uniform") or backup not in ("auto", "jit", "fast"):
        raise ValueError(f"fan_out is geometric|uniform and backup auto|jit|fast; got "
                         f"{fan_out!r}, {backup!r}.")
    if saguaro_c != "auto":
        check_saguaro_c(saguaro_c)
    if budget not in (None, "auto") and (not isinstance(budget, int) or budget < 1):
        raise ValueError(f"budget (B) must be an integer >= 1 or 'auto', got {budget!r}.")
    budget = saguaro_budget(budget, k, f)
    B = 1 if budget == "auto" else budget   # auto weighs only B < vocabulary
    if fan_out == "uniform" and budget != "auto" and B < k + 1:
        # the paper's uniform fan-out is F guesses per outcome, B = (K + 1) F: below K + 1 the
        # even split must leave outcomes without a guess, and it leaves out the highest k,
        # k = K first, where most rounds land with a good draft (a hit rate near 0)
        warnings.warn(f"saguaro: uniform fan-out with budget B = {B} < K + 1 = {k + 1} places "
                      f"no guess on k = {B}..{k} (k = K included), so those outcomes always "
                      f"miss; use B >= K + 1 (a multiple of K + 1 is the paper's uniform) or "
                      f"--fan-out geometric", stacklevel=2)
    if B >= target.cfg.vocab_size:
        raise ValueError(f"the cache budget B = {B} must stay below the vocabulary "
                         f"({target.cfg.vocab_size} tokens): lower f or --budget.")
    check_request(target, as_batch(prompt_ids), max_new_tokens, room=k)
    if budget != "auto":  # auto's budgets are at most 24
        check_tree_memory(len(as_batch(prompt_ids)), B, k, target.cfg.vocab_size, target.device,
                          "f or --budget")


def free_memory(device) -> int | None:
    """Bytes free for new tensors on `device`: the GPU's free memory, or the OS's MemAvailable
    (Linux); None where neither is known."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f
                        if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def check_tree_memory(batch: int, branches: int, K: int, vocab: int, device, lower: str) -> None:
    """A speculation tree (ssd.py; saguaro's draft) keeps, for each of `batch` rows x `branches`
    branches x K steps, the q drawn from and the logits behind it: 8 bytes per token of the
    vocabulary. ValueError naming the flags to `lower` when that exceeds the free memory (such a
    run died after loading, or was killed by the OS without a word)."""
    need, free = 8 * batch * branches * K * vocab, free_memory(device)
    if free is not None and need > free:
        raise ValueError(f"a speculation tree of {branches} branches a row x {batch} row(s) x "
                         f"K = {K} steps keeps q and its logits over {vocab} tokens: "
                         f"{need / 2**30:.1f} GiB, more than the {free / 2**30:.1f} GiB free on "
                         f"{device}: lower {lower}.")


def check_saguaro_c(c) -> None:
    """C, Saguaro's sampling factor (Def. 14), lies in [0, 1]; ValueError otherwise."""
    if not isinstance(c, (int, float)) or not 0 <= c <= 1:
        raise ValueError(f"saguaro_c (C) must lie in [0, 1], got {c}.")


def as_batch(prompt_ids) -> list:
    """A single prompt (list of ints) or a batch (list of lists) -> a batch. ValueError for
    text (the loops take token ids) and for anything that is not ids."""
    def ids(p):
        if isinstance(p, (str, bytes)):
            raise ValueError(f"a prompt is token ids, not text ({str(p)[:40]!r}): encode it "
                             "first, e.g. kernels.encode_prompt(target, text).")
        if isinstance(p, torch.Tensor):
            p = p.tolist()
        try:
            return [operator.index(t) for t in p]
        except TypeError:
            raise ValueError(f"a prompt is a list of token ids (ints), got {type(p).__name__} "
                             f"{str(p)[:60]}.") from None
    if isinstance(prompt_ids, torch.Tensor):
        prompt_ids = prompt_ids.tolist()
    if isinstance(prompt_ids, (str, bytes)) or (len(prompt_ids) and not isinstance(
            prompt_ids[0], (list, tuple, torch.Tensor, str, bytes))):
        return [ids(prompt_ids)]
    return [ids(p) for p in prompt_ids]


def new_stats(k: int = 0) -> dict:
    """The stats every loop returns, with the same keys, so bench.py can loop over methods."""
    return {"new_tokens": 0, "prefill_s": 0.0, "decode_s": 0.0, "decode_tokens_per_s": 0.0,
            "target_calls": 0, "rows_verified": 0, "draft_calls": 0, "tau": 0.0, "acceptance_rate": None,
            "accept_counts": [0] * (k + 1) if k else [], "cache_hits": 0, "cache_misses": 0,
            "hit_rate": None}


def finish_stats(stats: dict, tokens: list) -> dict:
    stats["new_tokens"] = sum(len(t) for t in tokens)
    decoded = stats["new_tokens"] - len(tokens)  # the first token of each row came from prefill
    stats["decode_tokens_per_s"] = decoded / stats["decode_s"] if stats["decode_s"] > 0 else 0.0
    if "lookups_by_k" in stats:  # ssd, saguaro: speculation-cache lookups per accepted count k
        stats["cache_hits"] = sum(stats["hits_by_k"])
        stats["cache_misses"] = sum(stats["lookups_by_k"]) - stats["cache_hits"]
        if sum(stats["lookups_by_k"]):
            stats["hit_rate"] = stats["cache_hits"] / sum(stats["lookups_by_k"])
    if stats["rows_verified"]:  # target forwards x live rows: tau counts per sequence
        stats["tau"] = decoded / stats["rows_verified"]
    return stats


@contextlib.contextmanager
def warming_up():
    """Around a warm-up call shorter than the real one: check_request's warning that K exceeds
    max_new_tokens is then the warm-up's doing, not the user's, so it is not shown."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"K = \d+ draft tokens a round")
        yield


def after_warm_up(run, max_new_tokens: int, warm_up: int = 8, trace=None):
    """What a CLI times: run(n) -> (tokens, stats), called first for a few tokens, whose first
    calls pack the weights and build the fused layer for each step length, then for real.
    trace: a file for the timed run's timeline (timeline.py), whose first rounds are printed."""
    with warming_up():
        run(min(warm_up, max_new_tokens))
    if trace:
        timeline.start()
    try:
        return run(max_new_tokens)
    finally:
        if trace:
            events = timeline.stop()
            timeline.write(trace, events, command=" ".join(sys.argv))
            timeline.show(events)
            print(f"[timeline: {trace}, open it in https://ui.perfetto.dev or chrome://tracing]\n")


class RunFailed(RuntimeError):
    """A process the run needs (saguaro's draft) failed: the message says how; its own
    traceback, if it printed one, is above. cli ends the run on one line, exit code 1."""


class StartFailed(RunFailed):
    """... while starting: it died or timed out."""


def cli(main) -> None:
    """Run a script's main(): bad input found after parsing (a ValueError: an impossible length,
    a prompt past the context, a draft over another tokenizer; a FileNotFoundError: no such
    model or draft) ends it as argparse ends a bad flag, one line on stderr and exit code 2, not
    a traceback. A helper process that failed (RunFailed: StartFailed, or lost while bench.py
    measures) ends it on one line with code 1, Ctrl-C with code 130. A tensor-parallel rank that left its
    group after a failure (tp.abandoned) ends with os._exit and the same code (1 for any other
    error, after its traceback): its group's threads could abort the interpreter's teardown."""
    try:
        main()
    except (ValueError, FileNotFoundError) as e:  # FileNotFoundError: no such model or draft
        print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)
        _exit(2)
    except RunFailed as e:  # not the caller's input (code 1), but nothing to trace here
        print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)
        _exit(1)
    except KeyboardInterrupt:  # Ctrl-C: stopped as asked (a draft process is closed at exit)
        print(f"{os.path.basename(sys.argv[0])}: interrupted", file=sys.stderr)
        _exit(130)
    except Exception:
        if not _left_group():
            raise
        traceback.print_exc()
        _exit(1)


def _left_group() -> bool:
    tp = sys.modules.get("tp")  # imported only by runs with --tp
    return tp is not None and tp.abandoned()


def _exit(code: int) -> None:
    if not _left_group():
        sys.exit(code)
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(code)


def report(target, tokens, stats, *names) -> None:
    """What a loop's CLI prints after its timed run: row 0's text, then the tokens, prefill time
    and decode speed, then the named stats keys with their values (floats to two places; n/a
    when no decode step ran)."""
    print(target.tokenizer.decode(tokens[0], skip_special_tokens=True))
    decoded = stats["new_tokens"] > len(tokens)  # else every row ended at its prefill token
    shown = [f"{stats['new_tokens']} tokens", f"prefill {stats['prefill_s'] * 1e3:.0f} ms",
             f"decode {stats['decode_tokens_per_s']:.1f} tokens/s" if decoded else
             "decode n/a (every row ended at prefill)"]
    values = [stats[n] for n in names]  # every name must exist, decoded or not
    shown += [f"{n} n/a" if not decoded else f"{n} {v:.2f}" if isinstance(v, float)
              else f"{n} {v}" for n, v in zip(names, values)]
    print(f"\n[{', '.join(shown)}]")


def output_path(kind: str = "file"):
    """argparse type for what a run writes at its end: a file (kind "file", its folder must
    exist) or a folder ("folder", made if missing). Refused at parse time when it cannot be
    written (a file where a folder is wanted, no such folder, no permission), not found out
    after minutes of measuring."""
    def check(text: str) -> str:
        path = os.path.abspath(os.path.expanduser(text))
        if os.path.exists(path) and os.path.isdir(path) != (kind == "folder"):
            other = "folder" if kind == "file" else "file"
            raise argparse.ArgumentTypeError(f"{text!r} is a {other}; give a {kind} to write")
        parent = path if kind == "folder" else os.path.dirname(path)
        while kind == "folder" and not os.path.exists(parent):
            parent = os.path.dirname(parent)   # the folders still to make go under this one
        if not os.path.isdir(parent):
            raise argparse.ArgumentTypeError(f"cannot write {text!r}: no folder {parent}")
        try:
            with tempfile.TemporaryFile(dir=parent):
                pass
        except OSError as e:
            raise argparse.ArgumentTypeError(f"cannot write {text!r} in {parent}: {e.strerror}")
        return text
    return check


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (k, f, budget, threads, token counts)."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return n


def thread_count(text: str) -> int:
    """argparse type for --threads: positive_int, with a warning past the cores this process
    may use (the threads would share cores, and every step waits for its slowest thread)."""
    n, cores = positive_int(text), len(os.sched_getaffinity(0))
    if n > cores:
        warnings.warn(f"--threads {n} is more than the {cores} cores this process may use: "
                      f"threads then share cores and each step waits for the slowest; "
                      f"use --threads {cores} or fewer", stacklevel=2)
    return n


def draft_name(text: str) -> str:
    """argparse type for --draft: a name that is not blank (an empty --draft reached the Python
    API's 'needs a draft' message)."""
    if not text.strip():
        from drafts import DRAFT_HELP   # only here: the loops themselves need no drafts.py
        raise argparse.ArgumentTypeError(f"must name a draft, got {text!r}: {DRAFT_HELP}")
    return text


def checked(kind, check):
    """argparse type: `kind(text)` that `check(value)` accepts (its ValueError becomes the
    flag's error: argparse then says which flag was wrong before any model loads)."""
    def convert(text):
        try:
            value = kind(text)
            check(value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return value
    return convert


def _nonempty(text):
    if not text.strip():
        raise ValueError("empty prompt: give at least one character of text.")


prompt_text = checked(str, _nonempty)  # argparse type of --prompt


def fanout(text):
    """argparse type of ssd's --f: 3 (F at every k) or 4,3,2,2,1 (F_0..F_K; their count is
    checked against K when the loop starts)."""
    if "," not in text:
        return positive_int(text)
    try:
        fs = [int(x) for x in text.split(",")]
    except ValueError:
        fs = []
    if not fs or min(fs) < 0 or sum(fs) == 0:
        raise argparse.ArgumentTypeError(f"must be F >= 1 or F_0,...,F_K >= 0 (not all 0), "
                                         f"got {text!r}")
    return fs


def check_seconds(name, value, low=1e-3, high=86400.0):
    """A wait bound in seconds, in [1 ms, 1 day]: torch.distributed counts whole milliseconds
    and reads 0 as "its default" (a sub-ms timeout would silently become ~60 s)."""
    if not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"{name} must be a number of seconds in [{low:g}, {high:g}] (1 ms to 1 "
                         f"day), got {value!r}.")
    return float(value)


def or_auto(kind):
    """argparse type: the word auto, or what `kind` reads (its error then says auto too)."""
    def read(text):
        if text == "auto":
            return "auto"
        try:
            return kind(text)
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentTypeError(f"{str(e).rstrip('.')} (or auto)") from None
    return read


def add_saguaro_args(parser, budget=None, backup="auto", saguaro_c=1.0) -> None:
    """saguaro's own flags, spelled once for saguaro.py and bench.py's saguaro row."""
    parser.add_argument("--budget", type=or_auto(positive_int), default=budget,
                        help="B, saguaro's guesses per row per round; None: (K+1) f (in "
                             "saguaro.py: auto unless --f is given); auto: "
                             "the budget rule (the speed model's best B, per round; like "
                             "--backup auto it follows measured latencies)")
    parser.add_argument("--fan-out", default="geometric", choices=["geometric", "uniform"],
                        help="how B is spread over the outcomes k (geometric: Thm. 12)")
    parser.add_argument("--saguaro-c", type=or_auto(checked(float, check_saguaro_c)),
                        default=saguaro_c, help="Saguaro sampling factor C, in [0, 1]; auto: "
                        "the speed model's best C, per round (1 at temperature 0; like "
                        "--backup auto it follows measured latencies)")
    parser.add_argument("--backup", default=backup, choices=["auto", "jit", "fast"],
                        help="saguaro's backup on a miss. auto: the batch-aware rule, which "
                             "follows measured latencies, so at temperature > 0 one seed can "
                             "give other text run to run (jit and fast repeat it)")
    parser.add_argument("--couple-bonus", default=True, action=argparse.BooleanOptionalAction,
                        help="at temperature > 0, draw the bonus by a race whose clocks the "
                             "draft process shares, so its guess predicts the draw (saguaro.py, "
                             "idea 7: ours, not the paper's; the same law either way)")
    parser.add_argument("--timeout", default=10.0, help="seconds to wait for saguaro's draft "
                        "process (1 ms to 1 day)", type=checked(float, lambda s: check_seconds(
                            "--timeout", s)))
    parser.add_argument("--draft-device", default=None,
                        type=checked(str, kernels.resolve_device),
                        help="saguaro's draft process; None: the target's device (with --tp N "
                             "on GPUs: cuda:N, after the target's)")


def add_common_args(parser, tp: bool = False) -> None:
    """The flags every script spells the same way, each checked as it is parsed. `tp`: the
    script runs a tensor-parallel target (tp.py); elsewhere --tp N > 1 is refused. --help then
    shows every flag's default."""
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    parser.add_argument("--model", default="default", help="hub id, local folder, or 'default'")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N",
                        type=checked(str, kernels.resolve_device))
    parser.add_argument("--dtype", default="float32", choices=list(kernels.DTYPES),
                        help="the target's weights and compute")
    parser.add_argument("--threads", type=thread_count, default=None,
                        help="CPU threads; None: every core this process may use")
    parser.add_argument("--temperature", type=checked(float, kernels.check_sampling), default=0.0,
                        help="0 = greedy")
    parser.add_argument("--top-k", type=checked(int, lambda k: kernels.check_sampling(0, top_k=k)),
                        help="sample from the k likeliest tokens only; None: all")
    parser.add_argument("--top-p", type=checked(float, lambda p: kernels.check_sampling(0, top_p=p)),
                        help="sample from the smallest set of mass >= p only; None: all")
    parser.add_argument("--max-new-tokens", type=positive_int, default=64,
                        help="tokens to generate per prompt")
    parser.add_argument("--seed", type=checked(int, kernels.check_seed), default=0,
                        help="the sampling generator's seed, in [0, 2^63 - 1)")
    parser.add_argument("--trace", default=None, metavar="FILE.json", type=output_path(),
                        help="write the timed run's timeline (Chrome trace format) and print it")
    parser.add_argument("--tp", type=_tp_flag if tp else _not_yet(parser.prog), default="1",
                        help="tensor-parallel ranks for the target (launch with torchrun "
                             "--nproc-per-node N)")


def _tp_flag(text):
    """argparse type of --tp: N >= 1, and a launch that can run it (torchrun, N processes)."""
    import os

    import tp
    n = positive_int(text)
    try:
        tp.check_world(n, os.environ)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return n


def _not_yet(prog):
    def check(text):  # draft_lab.py: its drafts are trained on one device
        if text.strip() != "1":
            raise argparse.ArgumentTypeError(f"tensor parallelism is not yet supported by {prog} "
                                             "(autoregressive.py, speculative.py, ssd.py, "
                                             "saguaro.py and bench.py run it)")
        return 1
    return check


def load_models(args, draft_name=None):
    """(target, draft) for a CLI: the target split over --tp ranks (tp.py; ranks > 0 then print
    nothing), the draft named `draft_name` (drafts.load_draft; None: no draft) whole on every
    rank. drafts.py's own drafts (default, ngram, its candidates, self) are made from the whole
    target: it is loaded whole, then cut; otherwise each rank reads only its shard of it."""
    import drafts
    import tp
    device = tp.init(args.tp, args.device)
    whole = args.tp == 1 or draft_name in drafts.DRAFT_NAMES + tuple(drafts.CANDIDATES)
    load = kernels.load_model if whole else tp.load_model
    target = load(args.model, str(device), args.dtype, args.threads)
    draft = drafts.load_draft(draft_name, target) if draft_name else None
    if args.tp > 1 and whole:
        tp.shard(target)
    return target, draft
