"""How many threads the main job trains on right after a `pip install`, and what it costs.

    python benchmarks/threads.py [--rounds 1] [--out benchmarks/results/threads.txt]

The README's first command is ``pip install ... && bnfold train-fold``. pip keeps a core busy
for a while, so the one-minute load average is ~1 when training starts. The previous rule
(``OLD_RULE``: the busier of a short /proc/stat window and the load average) then saw one
core free on an idle two-core machine and trained on one thread; the current rule
(:func:`bnfold.mlp.train.free_cores`: the /proc/stat window alone) sees what is busy now.

Three scenarios, each rule's main job run in turn (side by side, same conditions):

1. right after ``pip install`` of the bnfold wheel into a fresh venv: old rule, then new;
2. while another process keeps one core busy: old rule, new rule (both must pick 1);
3. the thread choice alone on the machine as it is (no job running).

Each job is ``bnfold train-fold --out TMP --json`` in a subprocess with the rule patched in;
the figures are its own ``train.threads``, ``train.seconds`` and ``wall_seconds`` (process
start to exit), with the load average and the idle cores (/proc/stat, 1 s) just before.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

OLD_RULE = '''
def old_free_cores(limit=2, window=0.1):
    """The rule before: the busier of /proc/stat over `window` and the load average."""
    import math, os
    from contextlib import suppress
    from bnfold.mlp.train import _idle_cores
    cores = len(os.sched_getaffinity(0))
    estimates = []
    with suppress(OSError, ValueError, IndexError):
        estimates.append(_idle_cores(window))
    estimates.append(cores - os.getloadavg()[0])
    return max(1, min(limit, cores, math.floor(min(estimates) + 0.25)))
'''

JOB = """
import sys
{old}
import bnfold.mlp.train as train
if {use_old!r}:
    train.free_cores = old_free_cores
from bnfold.cli import main
sys.argv = ["bnfold", "train-fold", "--out", {out!r}, "--json"]
main()
"""


def idle_cores(window: float = 1.0) -> float:
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return v[3] + v[4], sum(v[:8])

    i0, t0 = sample()
    time.sleep(window)
    i1, t1 = sample()
    return (i1 - i0) / max(1, t1 - t0) * (os.cpu_count() or 1)


def state() -> str:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"load average {load}; idle cores over 1 s {idle_cores():.2f}"


def pip_install(wheel: Path, scratch: Path) -> float:
    """``pip install`` of the wheel (with its dependencies, from pip's cache when it has
    them) into a fresh venv: the README's first step. Returns its seconds."""
    venv = scratch / f"venv-{time.monotonic_ns()}"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", str(wheel)],
        check=True,
        stderr=subprocess.DEVNULL,  # this machine's pip config warns about missing indexes
    )
    return time.perf_counter() - t0


def main_job(rule: str, scratch: Path) -> dict:
    out = scratch / f"models-{rule}-{time.monotonic_ns()}"
    code = JOB.format(old=OLD_RULE, use_old=rule == "old", out=str(out))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    before = state()
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"train-fold failed ({rule} rule):\n{r.stderr[-2000:]}")
    d = json.loads(r.stdout)
    return {
        "rule": rule,
        "before": before,
        "threads": d["train"]["threads"],
        "train_s": d["train"]["seconds"],
        "wall_s": d["wall_seconds"],
        "outside_s": round(wall, 2),
    }


def choice(rule: str) -> int:
    code = (
        OLD_RULE
        + "\nfrom bnfold.mlp.train import free_cores\n"
        + f"print(({'old_free_cores' if rule == 'old' else 'free_cores'})())"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    return int(r.stdout.strip())


def row(r: dict) -> str:
    return (
        f"  {r['rule']:3s} rule: {r['threads']} thread(s), training {r['train_s']:5.1f} s,"
        f" main job wall {r['wall_s']:5.1f} s   [before: {r['before']}]"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=1, help="old/new pairs per scenario")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "threads.txt")
    args = ap.parse_args()

    lines = [
        "# benchmarks/threads.py: training threads right after `pip install`",
        f"command: python benchmarks/threads.py {shlex.join(sys.argv[1:])}".rstrip(),
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores,"
        f" Python {platform.python_version()}",
        f"at start: {state()}",
        "",
    ]
    print("\n".join(lines), flush=True)

    def emit(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    with tempfile.TemporaryDirectory(prefix="bnfold-threads-") as tmp:
        scratch = Path(tmp)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "-q",
                "--no-deps",
                "--no-build-isolation",
                "-w",
                str(scratch),
                str(ROOT),
            ],
            check=True,
            stderr=subprocess.DEVNULL,
        )
        wheel = next(scratch.glob("bnfold-*.whl"))

        emit("1. right after `pip install` (the wheel and its dependencies into a fresh venv)")
        pairs = []
        for _ in range(args.rounds):
            pair = {}
            for rule in ("old", "new"):
                seconds = pip_install(wheel, scratch)
                emit(f"  pip install: {seconds:.1f} s")
                pair[rule] = main_job(rule, scratch)
                emit(row(pair[rule]))
            pairs.append(pair)
        for rule in ("old", "new"):
            walls = [p[rule]["wall_s"] for p in pairs]
            emit(f"  {rule} rule: main job wall {min(walls):.1f}-{max(walls):.1f} s")
        ratio = [p["new"]["wall_s"] / p["old"]["wall_s"] for p in pairs]
        emit(f"  new/old wall time: {', '.join(f'{x:.2f}' for x in ratio)}")

        emit("")
        emit("2. while another process keeps one core busy")
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            time.sleep(1.0)  # let the busy loop show up in /proc/stat
            for _ in range(args.rounds):
                for rule in ("old", "new"):
                    emit(row(main_job(rule, scratch)))
        finally:
            busy.kill()
            busy.wait()

    emit("")
    emit("3. the choice alone, on the machine as it is now (no job running)")
    emit(f"  {state()}: old rule {choice('old')}, new rule {choice('new')} thread(s)")
    emit("")
    emit(f"at end: {state()}")
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
