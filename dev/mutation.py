"""Mutation testing of the losslessness core: a developer tool, not part of CI.

The tests are the project's proof that every loop is lossless. This script asks whether they can
fail: mutmut (https://github.com/boxed/mutmut, 3.x) plants one small bug at a time in the
functions the proof rests on, runs the tests that reach that function, and counts the bugs no
test noticed (survivors). Each survivor must then be killed by a new test or argued equivalent.

    python -m venv --system-site-packages /tmp/mutvenv && /tmp/mutvenv/bin/pip install mutmut==3.4.0
    nice /tmp/mutvenv/bin/python dev/mutation.py --label after               # the working tree
    nice /tmp/mutvenv/bin/python dev/mutation.py --label before --rev 2d88c86 --stages verify

Each stage mutates some functions of one file and runs one test file (mutmut runs, per mutant,
only the tests that called the mutated function, fastest first, stopping at the first failure).
Work happens in a copy under --workdir; results go to <workdir>/<label>/<stage>/result.json and
a summary is printed. `mutmut` cannot mutate decorated functions or classes (the loops'
`generate` under @torch.inference_mode, the @dataclass SpeculationCache): those lie outside.

Two details of this project need help: the draft process of saguaro.py is spawned, so mutmut's
call tracing (which links a function to the tests that reach it) does not see what runs there.
The draft-side functions get the tests that talked to a draft process (DraftWorker.round), and a
sitecustomize gives the spawned process the minimal mutmut config its trampolines need. Tiny
models only: the fused C++ layer is switched off (SSD_CPU_KERNELS=eager), which saves a build.
"""
import argparse
import fnmatch
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# tests no mutant here can change the verdict of (the real model, faults, bad input), left out
SLOW = ("not default_model and not shipped_int4 and not killing and not stops_answering and "
        "not dies_while_starting and not ctrl_c and not bad_arguments and not own_cores")
STAGES = {
    # stage: (file, functions (mutmut's mangled names), test file(s) and -k)
    "sampling": ("kernels.py", ["x_probs_from_logits", "x_sample"],
                 ["tests/test_kernels.py", "tests/test_sampling.py", "-k",
                  "sampl or probs or top or temperature or reference"]),
    "verify": ("speculative.py", ["x_verify"],
               ["tests/test_speculative.py", "-k", "verify or law or negative or decay"]),
    "ssd": ("ssd.py", ["x_predict_outcomes", "x_build_speculation_cache"],
            ["tests/test_ssd.py", "-k", SLOW]),
    "saguaro": ("saguaro.py", ["x_saguaro_probs", "x_saguaro_q", "x_geometric_fan_out",
                               "x_uniform_fan_out", "x_largest_remainder", "xǁEstimatesǁfan_outs",
                               "xǁEstimatesǁchoose_backup", "xǁDraftSideǁanswer",
                               "xǁDraftSideǁjit_draft", "xǁDraftSideǁwork"],
                ["tests/test_saguaro.py", "tests/test_timeline.py", "-k",
                 SLOW + " and not bench"]),  # bench's default-model runs need assets/
}
DRAFT_SIDE = ("xǁDraftSideǁ", "x_reuse_branch", "x_saguaro_probs", "x_saguaro_q")  # run in the
# draft process: linked to the tests that ran a generation (they all ask Estimates for a backup)
SITECUSTOMIZE = '''import os
if os.environ.get("MUTANT_UNDER_TEST") in ("stats", "fail"):  # a spawned draft process
    try:  # mutmut.__main__ sets the start method on import: here, before spawn's bootstrap does
        import types, mutmut, mutmut.__main__
        if mutmut.config is None:
            mutmut.config = types.SimpleNamespace(max_stack_depth=-1)
    except ImportError:
        pass
'''


def export(rev, dest):
    """The repository at `rev` (None: the working tree, untracked files included) into dest."""
    os.makedirs(dest)
    if rev:
        archive = subprocess.run(["git", "-C", ROOT, "archive", rev], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True)
        return
    files = subprocess.run(["git", "-C", ROOT, "ls-files", "--cached", "--others",
                            "--exclude-standard"], check=True, capture_output=True,
                           text=True).stdout.split()
    for f in files:
        if os.path.exists(os.path.join(ROOT, f)):
            os.makedirs(os.path.dirname(os.path.join(dest, f)) or dest, exist_ok=True)
            shutil.copy2(os.path.join(ROOT, f), os.path.join(dest, f))


def mutant_names(path, functions, every):
    """The mutants of `functions` in the file at `path`, every N-th where --every says so, less
    those that only change the text of an error message (no test reads most of them)."""
    import ast
    import libcst
    import mutmut.__main__ as mm
    from mutmut.file_mutation import mutate_file_contents
    code, names = mutate_file_contents(path, open(path).read())
    module, stem = libcst.parse_module(code), os.path.splitext(os.path.basename(path))[0]
    chosen, messages = [], []
    for fn in functions:
        mine = [n for n in names if n.rpartition("__mutmut_")[0] == fn]
        mine.sort(key=lambda n: int(n.rpartition("_")[-1]))
        for n in mine[::every.get(fn, 1)]:
            a, b = (libcst.Module([f(module, n)]).code for f in
                    (mm.read_original_function, mm.read_mutant_function))
            raises = {line for node in ast.walk(ast.parse(a)) if isinstance(node, ast.Raise)
                      for line in range(node.lineno, node.end_lineno + 1)}
            changed = {i + 1 for i, (x, y) in enumerate(zip(a.split("\n"), b.split("\n")))
                       if x != y}
            (messages if changed and changed <= raises else chosen).append(f"{stem}.{n}")
    return chosen, messages


def prepare(stage, rev, workdir):
    file, functions, tests = STAGES[stage]
    if os.path.exists(workdir):
        shutil.rmtree(workdir)
    export(rev, workdir)
    tests = [t for t in tests if not t.endswith(".py") or os.path.exists(os.path.join(workdir, t))]
    others = [f for f in os.listdir(workdir) if f != file and f.endswith((".py", ".cpp"))]
    with open(os.path.join(workdir, "setup.cfg"), "w") as f:
        f.write("[mutmut]\npaths_to_mutate=" + file + "\n")
        f.write("also_copy=\n" + "".join(f"  {o}\n" for o in sorted(others)))
        f.write("pytest_add_cli_args_test_selection=\n" + "".join(f"  {t}\n" for t in tests))
        f.write("pytest_add_cli_args=\n  -p\n  no:cacheprovider\n")
    os.makedirs(os.path.join(workdir, "site"))
    with open(os.path.join(workdir, "site", "sitecustomize.py"), "w") as f:
        f.write(SITECUSTOMIZE)


def inner(names):
    """Runs inside the work folder: mutmut's `run`, with the draft side linked to its tests.
    mutmut forks a child per mutant from the process that ran the tests once: an OpenMP thread
    pool made before the fork hangs the child's first parallel op, so torch keeps one thread."""
    import torch
    torch.set_num_threads(1)
    torch.set_num_threads = lambda n: None
    import mutmut.__main__ as mm
    collect, execute = mm.collect_or_load_stats, mm.PytestRunner.execute_pytest

    def execute_fresh(self, params, **kwargs):
        """Each in-process pytest run imports conftest anew: drop the test modules of the last
        run, or they keep the old conftest's functions (which then do not pickle by name)."""
        tests = os.path.join(os.getcwd(), "tests", "")   # mutmut runs pytest in mutants/
        for name, module in list(sys.modules.items()):
            if (getattr(module, "__file__", None) or "").startswith(tests):
                del sys.modules[name]
        return execute(self, params, **kwargs)
    mm.PytestRunner.execute_pytest = execute_fresh

    def collect_and_link(runner):
        collect(runner)
        by_name = mm.mutmut.tests_by_mangled_function_name
        talked = set().union(*(v for k, v in by_name.items()
                               if k.endswith("Estimatesǁchoose_backup")))
        for name in {n.partition("__mutmut_")[0] for n in names}:
            if any(s in name for s in DRAFT_SIDE):
                by_name[name] |= talked
        mm.save_stats()
    mm.collect_or_load_stats = collect_and_link
    sys.argv = ["mutmut", "run", "--max-children", "1", *names]
    try:
        mm.cli()
    except SystemExit:
        pass


def collect(stage, workdir, names, seconds, done):
    """mutmut's verdicts from the .meta file (and `done`, those of an earlier, interrupted run:
    mutmut forgets them when it runs again), with each survivor's diff."""
    import difflib
    import libcst
    import mutmut.__main__ as mm
    file = STAGES[stage][0]
    meta = os.path.join(workdir, "mutants", file + ".meta")
    codes = json.load(open(meta))["exit_code_by_key"] if os.path.exists(meta) else {}
    codes.update(done)
    with open(os.path.join(workdir, "verdicts.json"), "w") as f:   # what --resume reads
        json.dump({n: codes.get(n) for n in names}, f)
    module = libcst.parse_module(open(os.path.join(workdir, "mutants", file)).read())

    def diff(name):
        a, b = (libcst.Module([f(module, name)]).code.strip().split("\n")
                for f in (mm.read_original_function, mm.read_mutant_function))
        return "\n".join(difflib.unified_diff(a, b, file, file, lineterm="", n=1))
    result = {"stage": stage, "seconds": round(seconds), "by_function": {}, "survivors": {}}
    for name in names:
        status = mm.status_by_exit_code[codes.get(name)]
        fn = name.partition(".")[2].partition("__mutmut_")[0]
        result["by_function"].setdefault(fn, {}).setdefault(status, 0)
        result["by_function"][fn][status] += 1
        if status not in ("killed", "timeout", "segfault"):
            result["survivors"][name] = {"status": status, "diff": diff(name)}
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--label", required=True, help="a name for this run (before, after, ...)")
    ap.add_argument("--rev", default=None, help="a git revision (default: the working tree)")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--only", default="*", help="globs over mutant names, comma-separated, "
                    "e.g. '*x_sample*'")
    ap.add_argument("--every", default="", help="fn=N,...: test every N-th mutant of fn only")
    ap.add_argument("--workdir", default="/tmp/ssd-mutation")
    ap.add_argument("--resume", action="store_true",
                    help="keep the work folders and run only the mutants without a verdict")
    ap.add_argument("--inner", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.inner is not None:
        return inner(args.inner)
    every = {k: int(v) for k, v in (x.split("=") for x in args.every.split(",") if x)}
    summary = {}
    for stage in args.stages.split(","):
        workdir = os.path.join(args.workdir, args.label, stage)
        meta = os.path.join(workdir, "mutants", STAGES[stage][0] + ".meta")
        done = {}
        if args.resume and os.path.exists(meta):
            for f in (os.path.join(workdir, "verdicts.json"), meta):
                if os.path.exists(f):
                    codes = json.load(open(f))
                    done.update({k: v for k, v in codes.get("exit_code_by_key", codes).items()
                                 if v is not None})
        else:
            prepare(stage, args.rev, workdir)
        file, functions, _ = STAGES[stage]
        names, messages = mutant_names(os.path.join(workdir, file), functions, every)
        globs = args.only.split(",")
        names = [n for n in names if any(fnmatch.fnmatch(n, g) for g in globs)]
        todo = [n for n in names if n not in done]
        print(f"[{args.label}] {stage}: {len(names)} mutants of {file} ({len(messages)} more "
              f"only change an error message: not run); {len(todo)} to run", flush=True)
        env = dict(os.environ, SSD_CPU_KERNELS="eager", OMP_NUM_THREADS="1",
                   PYTHONPATH=os.path.join(workdir, "site"))
        t0 = time.time()
        with open(os.path.join(workdir, "mutmut.log"), "a") as log:
            if todo:
                subprocess.run([sys.executable, os.path.abspath(__file__), "--label", args.label,
                                "--inner", *todo], cwd=workdir, env=env, stdout=log,
                               stderr=subprocess.STDOUT)
        result = collect(stage, workdir, names, time.time() - t0, done)
        result["message_only"] = messages
        json.dump(result, open(os.path.join(workdir, "result.json"), "w"), indent=1,
                  ensure_ascii=False)
        summary[stage] = result
        for fn, counts in result["by_function"].items():
            print(f"    {fn}: {counts}", flush=True)
        print(f"    {len(result['survivors'])} not killed, {result['seconds']} s", flush=True)
    total = sum(sum(c.values()) for r in summary.values() for c in r["by_function"].values())
    killed = sum(c.get(s, 0) for r in summary.values() for c in r["by_function"].values()
                 for s in ("killed", "timeout", "segfault"))
    print(f"[{args.label}] killed {killed} of {total} mutants "
          f"({100 * killed / max(total, 1):.1f}%)")


if __name__ == "__main__":
    main()
