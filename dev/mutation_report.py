"""Write dev/mutation-report.md from two runs of dev/mutation.py (a developer tool, not CI).

    python dev/mutation_report.py --before /tmp/ssd-mutation/before \
        --after /tmp/ssd-mutation/final --rerun /tmp/ssd-mutation/rerun /tmp/ssd-mutation2/rerun

Each survivor of the "after" run gets a verdict: the rules below name the edits that cannot
change what any caller observes (equivalent mutants), each with its reason; any survivor no rule
explains is listed as "NOT EXPLAINED", to be killed by a test or argued here. --rerun: a run of
some survivors again, with a stage's wider test set (dev/mutation.py --only): those it kills
count as killed, and are listed apart.
"""
import argparse
import json
import os
import re

STAGES = ("sampling", "verify", "ssd", "saguaro")
RULES = [  # (regex over the mutant's +line, reason it is equivalent)
    (r"topk\(.*, \)", "equivalent: `torch.topk`'s `dim` defaults to -1, the dimension named"),
    (r'"-INF"|"XX', "equivalent: `float()` reads 'inf' in any case / the string is never compared"),
    (r"device=None|generator=generator, \)|dtype=torch.float64, generator|fanout\], \)|"
     r"\.to\(None\)|\(\(B,\), -1, \)|self\.V, \)",
     "equivalent on the CPU, the default device (on CUDA, tests/test_gpu.py runs the same code: "
     "a CPU tensor beside a CUDA generator or tensor raises there)"),
    (r"shape\[\+1\]|cumprod\(\+1\)|sum\(\+1|softmax\(\+1\)|scatter\(\+1|dim=\+1",
     "equivalent: the tensor is 2-D there, so dimension +1 is its last (-1)"),
    (r"default=1\)", "equivalent: K >= 1, so fanout[:K] is never empty and max's default unused"),
    (r"if k <= K:", "equivalent: at k = K the slice spec_tokens[:, K:K+1] is empty: the scatter "
     "changes nothing"),
    (r"if a < 0 or a >= 1:", "equivalent: at a = 0 the general formula's weights are "
     "[1, 0, ..., 0] (0^0 = 1), so it returns the limit's schedule [B, 0, ..., 0]"),
    (r"largest_remainder\(\[2\.0\]", "equivalent: shares proportional to weights do not change "
     "when every weight is doubled"),
    (r"F\.pad\(draft_probs, \(0, 0, 0, 2\)\)",
     "equivalent: one more zero row of q after position K+1 is never read"),
    (r"residual \* mass|clamp_min\(1\.0\)",
     "equivalent: `kernels.sample` draws from unnormalized rows (u is scaled by the row's total), "
     "so rescaling the residual by its mass leaves the law unchanged"),
]


def verdict(diff):
    plus = "\n".join(line for line in diff.split("\n") if line.startswith("+") and
                     not line.startswith("+++"))
    for pattern, reason in RULES:
        if re.search(pattern, plus):
            return reason
    return "NOT EXPLAINED"


def load(folder):
    out = {}
    for stage in STAGES:
        path = os.path.join(folder, stage, "result.json")
        if os.path.exists(path):
            out[stage] = json.load(open(path))
    return out


def rate(result):
    counts = {}
    for by in result["by_function"].values():
        for status, n in by.items():
            counts[status] = counts.get(status, 0) + n
    total = sum(counts.values())
    killed = sum(counts.get(s, 0) for s in ("killed", "timeout", "segfault"))
    return killed, total


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", required=True)
    ap.add_argument("--after", required=True)
    ap.add_argument("--rerun", nargs="*", default=[],
                    help="runs of --after's survivors again (wider or newer tests)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "mutation-report.md"))
    args = ap.parse_args()
    before, after = load(args.before), load(args.after)
    rerun_killed = {}   # stage -> survivors of after that the rerun killed
    for folder in args.rerun:
        for stage, r in load(folder).items():
            ran = json.load(open(os.path.join(folder, stage, "verdicts.json")))
            rerun_killed.setdefault(stage, set()).update(n for n in ran if n not in r["survivors"])
    lines = ["# Mutation testing of the losslessness core (issue 18)", "",
             "Made by `dev/mutation.py` (mutmut 3.4) and `dev/mutation_report.py`. \"Before\": the",
             "tests at `2d88c86`, on that commit's code; \"after\": the tests and code of the",
             "issue-18 work (saguaro.py and ssd.py's cache build were redesigned in between, issue",
             "14, so those two stages compare different mutants of the same functions). Per stage,",
             "the functions and test files are dev/mutation.py's STAGES; mutants that only change",
             "an error message's text are left out.", "",
             "| stage | before: killed / run | after: killed / run | after: survivors argued "
             "equivalent |", "|---|---:|---:|---:|"]
    survivors, late = [], []
    for stage in STAGES:
        b = "%d / %d" % rate(before[stage]) if stage in before else "-"
        if stage in after:
            k, n = rate(after[stage])
            again = rerun_killed.get(stage, set())
            alive = {name: v for name, v in after[stage]["survivors"].items() if name not in again}
            k += len(after[stage]["survivors"]) - len(alive)
            argued = sum(verdict(v["diff"]) != "NOT EXPLAINED" for v in alive.values())
            a = f"{k} / {n} ({100 * k / n:.1f}%)"
            survivors += [(stage, name, v) for name, v in alive.items()]
            late += [(stage, name, v) for name, v in after[stage]["survivors"].items()
                     if name in again]
        else:
            a, argued = "not run", "-"
        lines.append(f"| {stage} | {b} | {a} | {argued} |")

    def show(stage, name, v, why):
        plus = [line[1:].strip() for line in v["diff"].split("\n")
                if line.startswith("+") and not line.startswith("+++")]
        minus = [line[1:].strip() for line in v["diff"].split("\n")
                 if line.startswith("-") and not line.startswith("---")]
        return (f"- `{name}` ({stage}): `{' '.join(minus)[:100]}` -> `{' '.join(plus)[:100]}`: "
                f"{why}")
    lines += ["", "## Survivors after, with their verdicts", ""]
    lines += [show(stage, name, v, verdict(v["diff"])) for stage, name, v in survivors]
    if late:
        lines += ["", "## Killed when run again with the stage's wider test set", "",
                  "The stage's first run gave these functions only their own file's tests; "
                  "run again with every test file the stage now lists (and the tests added "
                  "after it), each was killed:", ""]
        lines += [show(stage, name, v, "killed") for stage, name, v in late]
    open(args.out, "w").write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
