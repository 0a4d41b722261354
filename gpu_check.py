"""gpu_check.py: the GPU self-check. On any machine with a CUDA GPU, one command answers "does
every GPU path of this repository work, and how fast is it?":

    python gpu_check.py               # a few minutes on one H200; exit 0 only if all passed
    python gpu_check.py -k graph      # extra arguments go to pytest (here: the graph tests only)

1. tests/test_gpu.py (pytest -m gpu): flash-attn vs SDPA, CUDA-graph replay vs eager, tree
   drafting on CUDA vs the CPU, AR/SD/SSD/Saguaro token-exact at temperature 0, SD's exact law
   at temperature > 0, a draft process killed mid-run. Each row of the table is the outcome
   pytest reported for one test (this file is also the pytest plugin that records them), with
   the figure the test measured.
2. gpu_probe.py: decode and verify step times, eager vs CUDA graphs vs flash-attn, and the
   fraction of the GPU's memory bandwidth each reaches (a random 1B-Llama-shaped model).
Nothing is installed or downloaded: torch, transformers, rich and pytest are enough (flash-attn
is optional: its rows then say skipped, and why). Exit codes: 0 every check passed (skips
allowed); 1 a check failed or did not finish; 2 no CUDA here, so nothing was checked.
"""
import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.abspath(__file__))
TESTS_TIMEOUT_S, PROBE_TIMEOUT_S = 200, 70   # with the checks before them: under 5 minutes
BAD = ("FAILED", "ERROR", "did not finish")


# ----------------------------------------------------------------------------------------------
# the pytest half: loaded in the pytest child (-p gpu_check), one JSON line per event, so the
# outcomes of a run that hangs and is stopped are still there

def _log(record):
    path = os.environ.get("GPU_CHECK_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def pytest_collection_finish(session):
    _log({"collected": [item.nodeid for item in session.items]})


def pytest_runtest_logreport(report):
    message = ""
    if report.skipped and isinstance(report.longrepr, tuple):
        message = report.longrepr[2].removeprefix("Skipped: ")
    elif report.failed:
        crash = getattr(report.longrepr, "reprcrash", None)
        message = crash.message if crash else (str(report.longrepr).strip() or "?").splitlines()[-1]
    _log({"id": report.nodeid, "when": report.when, "outcome": report.outcome,
          "seconds": report.duration, "message": (message.splitlines() or [""])[0][:240],
          "figure": dict(report.user_properties).get("figure", "")})


# ----------------------------------------------------------------------------------------------
# the runner half

def rows_from_log(lines) -> list:
    """(check, result, figure) per collected test from the plugin's records. A test that was
    collected but never reported (the run hung or crashed) 'did not finish'."""
    collected, phases = None, {}
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:  # a line cut short by a killed run
            continue
        if "collected" in record:
            collected = record["collected"]
        else:
            phases.setdefault(record["id"], []).append(record)
    rows = []
    for nodeid in collected if collected is not None else list(phases):
        records = phases.get(nodeid, [])
        failed = [r for r in records if r["outcome"] == "failed"]
        skipped = [r for r in records if r["outcome"] == "skipped"]
        call = [r for r in records if r["when"] == "call" and r["outcome"] == "passed"]
        figure = next((r["figure"] for r in records if r["figure"]), "")
        if failed:
            kind = "FAILED" if failed[0]["when"] == "call" else "ERROR"
            result = f"{kind}: {failed[0]['message']}"
        elif skipped:
            result = f"skipped: {skipped[0]['message']}"
        elif call and any(r["when"] == "teardown" for r in records):
            result = "passed"
            figure = ", ".join(x for x in (figure, f"{call[0]['seconds']:.1f} s") if x)
        else:
            result = "did not finish"
        rows.append((nodeid.split("::", 1)[-1].removeprefix("test_"), result, figure))
    return rows


def run_tests(pytest_args, timeout_s, env):
    """pytest in a child process (its own session: a hang is stopped with its draft processes).
    Returns (rows, the child's output)."""
    fd, log = tempfile.mkstemp(suffix=".jsonl")
    os.close(fd)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "gpu_check", "-p", "no:cacheprovider",
           *pytest_args]
    child = subprocess.Popen(cmd, cwd=ROOT, env={**env, "GPU_CHECK_LOG": log}, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             start_new_session=True)
    try:
        output, _ = child.communicate(timeout=timeout_s)
        code = child.returncode
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        output, code = child.communicate()[0], None
    with open(log) as f:
        rows = rows_from_log(f)
    os.unlink(log)
    tail = (output.strip().splitlines() or ["no output"])[-1]
    if code is None:
        rows.append(("pytest", f"did not finish: stopped after {timeout_s} s", ""))
    elif code not in (0, 1) or not rows:  # 1: some test failed, already in its row
        rows.append(("pytest", f"ERROR: exit code {code}: {tail}", ""))
    return rows, output


def run_probe(timeout_s, env):
    """gpu_probe.py in a child process; its last stdout line is JSON. Returns (rows, output)."""
    try:
        done = subprocess.run([sys.executable, "gpu_probe.py"], cwd=ROOT, env=env, text=True,
                              capture_output=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        return [("probe", f"did not finish: stopped after {timeout_s} s", "")], str(e.stdout)
    output = done.stdout + done.stderr
    if done.returncode != 0:
        last = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
        return [("probe", f"FAILED: exit code {done.returncode}: {last}", "")], output
    probe = json.loads(done.stdout.strip().splitlines()[-1])
    rows = [("probe: device-to-device copy", "measured",
             f"{probe['copy_GBps']:.0f} GB/s (read + write): the 100% below")]
    for r in probe["rows"]:
        rows.append((f"probe: {r['step']}, {r['mode']}", "measured",
                     f"{r['ms']:.3f} ms/step, {r['GBps']:.0f} GB/s = {r['fraction']:.0%} of it"))
    return rows, output


def exit_code(rows) -> int:
    """0 when every check passed or was skipped and at least one passed; else 1."""
    bad = any(result.startswith(BAD) for _, result, _ in rows)
    return 1 if bad or not any(result == "passed" for _, result, _ in rows) else 0


def print_table(rows, title, console=None):
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text
    console = console or Console(width=None if sys.stdout.isatty() else 200)
    table = Table(title=title, title_justify="left")
    for name in ("check", "result", "figure"):
        table.add_column(name, overflow="fold")  # long test ids fold, never lose their end
    for check, result, figure in rows:
        style = ("red" if result.startswith(BAD) else "yellow" if result.startswith("skipped")
                 else "green")
        table.add_row(Text(check), Text(result, style=style), Text(figure))  # Text: no markup
    console.print(table)


def flash_import_error():
    """None when flash-attn is absent or imports; else the error of `from flash_attn import
    flash_attn_with_kvcache` (checked in a child: a broken extension must not take us down)."""
    if importlib.util.find_spec("flash_attn") is None:
        return None
    done = subprocess.run([sys.executable, "-c", "from flash_attn import flash_attn_with_kvcache"],
                          capture_output=True, text=True, timeout=60)
    return None if done.returncode == 0 else (done.stderr.strip() or "?").splitlines()[-1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--no-probe", action="store_true", help="the tests only")
    args, pytest_args = ap.parse_known_args(argv)
    import torch
    if not torch.cuda.is_available():
        print(f"gpu_check: no CUDA: nothing to check (torch {torch.__version__}, CUDA build "
              f"{torch.version.cuda}). Run it on a machine with a CUDA GPU.")
        return 2
    t0 = time.time()
    env = {**os.environ, "SSD_CPU_KERNELS": "eager", "PYTHONUNBUFFERED": "1"}  # no C++ build
    env.pop("SSD_GPU_TEST_DEVICE", None)
    if flash_import_error():  # kernels.py would fail at import: run the rest on SDPA, and the
        env["SSD_ATTENTION"] = "sdpa"  # test that imports flash-attn reports the error
    rows, output = run_tests(["-m", "gpu", "tests/test_gpu.py", *pytest_args], TESTS_TIMEOUT_S,
                             env)
    if not args.no_probe:
        probe_rows, probe_output = run_probe(PROBE_TIMEOUT_S, env)
        rows, output = rows + probe_rows, output + "\n" + probe_output
    os.makedirs(os.path.join(ROOT, "results"), exist_ok=True)
    with open(os.path.join(ROOT, "results", "gpu_check.log"), "w") as f:
        f.write(output)
    code = exit_code(rows)
    if code:
        print(output)  # the failures' tracebacks, above the table
    flash = importlib.util.find_spec("flash_attn") is not None
    gpus = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    print_table(rows, f"GPU self-check on {gpus}; torch {torch.__version__}, CUDA "
                      f"{torch.version.cuda}, flash-attn {'installed' if flash else 'absent'}")
    counts = {kind: sum(r[1].startswith(kind) for r in rows) for kind in ("passed", "skipped")}
    print(f"gpu_check: {counts['passed']} passed, {counts['skipped']} skipped, "
          f"{sum(r[1].startswith(BAD) for r in rows)} failed or unfinished, "
          f"{time.time() - t0:.0f} s; full output in results/gpu_check.log; exit {code}")
    return code


if __name__ == "__main__":
    sys.exit(main())
