"""timeline.py: where each round's time goes, as spans on one clock, for every loop.

The loops mark what they already time: `verify_s = timeline.span("verify", tick)` records the span
from `tick` (a time.perf_counter() reading) to now and returns its length in seconds, so a stat,
saguaro's speed model and the picture read one measurement. Recording is off unless start() was
called (the CLIs' and bench.py's --trace): span() then only subtracts two clock readings.

One clock for both processes: time.perf_counter reads CLOCK_MONOTONIC on Linux (check:
time.get_clock_info("perf_counter")), one clock for every process of a machine, so the draft
process's spans line up with the target's. (Across machines, measure an offset at the handshake.)
On a GPU a span first synchronizes, while recording only, so it ends when the work does.

The file format is Chrome's trace-event format (what torch.profiler exports; Perfetto and
chrome://tracing open it): "X" complete events with ts/dur in microseconds, "i" instant events
(a cache lookup's hits and misses), "M" metadata naming each process and lane (tid).

    python timeline.py t.json [--rounds 6] [--svg t.svg]   # a trace file's first rounds, again
"""
import argparse
import json
import os
import time

import torch

LANES = {"target": 1, "draft": 2}                 # tid of each role
_events = None                                   # None: off; else the events recorded here


def start():
    global _events
    _events = []


def stop() -> list:
    """Stop recording; return what was recorded (with what came from the draft process)."""
    global _events
    events, _events = _events or [], None
    return events


def recording() -> bool:
    return _events is not None


def take() -> list:
    """The events recorded so far, forgotten here (the draft process ships them with an Answer)."""
    events = list(_events or [])
    if _events is not None:
        _events.clear()
    return events


def extend(events):
    if _events is not None and events:
        _events.extend(events)


def span(name, start_s, lane="target", **args) -> float:
    """Seconds from start_s (a time.perf_counter() reading) to now; recorded when on."""
    if _events is None:
        return time.perf_counter() - start_s
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    end = time.perf_counter()
    _events.append({"name": name, "ph": "X", "ts": start_s * 1e6, "dur": (end - start_s) * 1e6,
                    "pid": os.getpid(), "tid": LANES[lane], "args": args})
    return end - start_s


def lookup(hits: int, rows: int):
    """An instant on the draft's lane: the speculation cache was looked up for `rows` rows."""
    if _events is not None:
        _events.append({"name": "lookup", "ph": "i", "s": "t", "ts": time.perf_counter() * 1e6,
                        "pid": os.getpid(), "tid": LANES["draft"],
                        "args": {"hits": hits, "misses": rows - hits}})


def write(path, events, **about):
    """The Chrome trace file: the events, one named track per process and lane."""
    names = [{"name": "process_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": (
        "target process" if pid == os.getpid() else "draft process") + f" (pid {pid})"}}
        for pid in sorted({e["pid"] for e in events})]
    names += [{"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": lane}}
              for pid, tid in sorted({(e["pid"], e["tid"]) for e in events})
              for lane in LANES if LANES[lane] == tid]
    with open(path, "w") as f:
        json.dump({"traceEvents": names + events, "displayTimeUnit": "ms",
                   "otherData": {"clock": "time.perf_counter (CLOCK_MONOTONIC on Linux)", **about}},
                  f)


# ----------------------------------------------------------------------------------------------
# The terminal picture: the first rounds, one lane per role, one letter per span

STYLE = {"prefill": ("P", "white"), "step": ("S", "green"), "verify": ("V", "green"),
         "accept": ("a", "blue"), "wait for draft": ("w", "bold red"),
         "fast backup": ("f", "yellow"), "draft": ("D", "cyan"), "jit": ("J", "bold yellow"),
         "glue": ("g", "magenta"), "build": ("B", "cyan"), "answer": ("A", "white"),
         "send": ("s", "white"), "wait for target": (".", "dim")}


def show(events, rounds=6, width=100, console=None):
    """Print the first `rounds` rounds (from the end of prefill) as two lanes of letters; a cache
    lookup is H (all rows hit) or M (a miss). Returns the rich Console (record=True: save_svg)."""
    from rich.console import Console
    from rich.text import Text
    console = console or Console(record=True, width=width + 12)
    spans = [e for e in events if e["ph"] == "X"]
    rounds_ = sorted(e["ts"] for e in spans if e["name"] in ("verify", "step"))
    if not rounds_:
        return console
    prefills = [e["ts"] + e["dur"] for e in spans if e["name"] == "prefill" and e["tid"] == 1]
    t0 = min(prefills) if prefills else rounds_[0]
    stop_at = rounds_[rounds] if len(rounds_) > rounds else max(
        e["ts"] + e.get("dur", 0) for e in events)
    scale = max(stop_at - t0, 1.0) / width                      # microseconds per column
    run = max(e["ts"] + e.get("dur", 0) for e in events) - t0   # the whole decode, for shares
    share = lambda tid, name: sum(e["dur"] for e in spans if e["tid"] == tid and e["ts"] >= t0
                                  and e["name"] == name) / max(run, 1.0)
    legend = []
    for lane, tid in LANES.items():
        cells, names = [(" ", "")] * width, {}
        for e in sorted((e for e in events if e["tid"] == tid and e["ph"] in "Xi"),
                        key=lambda e: -e.get("dur", 0)):        # long spans first: nested on top
            a = int((e["ts"] - t0) / scale)
            b = max(a + 1, round((e["ts"] + e.get("dur", 0) - t0) / scale))
            if b <= 0 or a >= width:
                continue
            if e["ph"] == "i":                                  # a lookup: all hit, or a miss
                miss = e["args"].get("misses", 0) > 0
                char, style = ("M", "bold white on red") if miss else ("H", "bold white on green")
                names["H/M"] = "lookup hit/miss"
            else:
                char, style = STYLE.get(e["name"], (e["name"][0], "white"))
                names[char] = e["name"]
            for c in range(max(a, 0), min(b, width)):
                cells[c] = (char, style)
        if names:
            console.print(Text(f"{lane:>7} |").append_text(Text.assemble(*cells)).append("|"))
            shown = {ch for ch, _ in cells}
            legend.append(f"{lane:>7}: " + ", ".join(
                f"{c} {n}" + ("" if c == "H/M" else f" {share(tid, n):.0%}")
                for c, n in names.items() if shown & set(c.split("/"))))
    console.print("\n".join(legend) + f"\n{'':>7}  one column = {scale / 1e3:.2f} ms; % = share "
                  f"of the whole decode ({run / 1e3:.0f} ms; glue is part of build)",
                  highlight=False)
    return console


def main():
    ap = argparse.ArgumentParser(description="print a trace file's first rounds")
    ap.add_argument("trace")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--width", type=int, default=100)
    ap.add_argument("--svg", default=None, help="also save the picture as SVG")
    args = ap.parse_args()
    if args.rounds < 1 or args.width < 20:
        ap.error("--rounds must be >= 1 and --width >= 20")
    try:
        with open(args.trace) as f:
            events = [e for e in json.load(f)["traceEvents"] if e["ph"] != "M"]
    except (OSError, ValueError, KeyError, TypeError) as e:  # no file, not JSON, not a trace
        ap.error(f"cannot read {args.trace!r} as a Chrome trace ({type(e).__name__}: {e})")
    console = show(events, args.rounds, args.width)
    if args.svg:
        try:
            console.save_svg(args.svg, title=os.path.basename(args.trace))
        except OSError as e:
            ap.error(f"cannot write {args.svg!r}: {e.strerror}")


if __name__ == "__main__":
    main()
