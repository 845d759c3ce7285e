"""A soak run: an RL recipe trains for hours while its Ray workers are killed at random.

    python benchmarks/soak.py --hours 2 --kill-every 10 --name soak -- asr/grpo run.init_from=runs/<sft>/final
    python benchmarks/soak.py --report runs/soak --reference runs/calm     # the table again, beside an undisturbed run

Every ~`--kill-every` minutes (uniformly within +-50%) one worker of the run gets SIGKILL, picked at
random among its rollout engines, reward workers and the policy worker, as a crash or an OOM kill
would. A rollout or reward worker is replaced and its step retried inside the run
(rollout.max_retries); the policy worker holds the only copy of the weights since the last
checkpoint, so the run stops saying where to resume from, and the soak continues it with `--resume`,
as a cluster's job scheduler would. At the deadline the run is interrupted (it can be resumed).

The report: steps completed, kills by worker and what followed, retries and resumes, and the metrics
by step beside an undisturbed run's (`--reference`): the engines are reseeded per call from (seed,
step, call) and resumes are exact, so a disturbed run should log the undisturbed run's numbers.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

KINDS = {"ray::RolloutEngine": "rollout", "ray::RewardWorker": "reward", "ray::RewardRouter": "reward",
         "ray::PolicyWorker": "policy"}


def workers(root: int) -> list[tuple[str, int]]:
    """(kind, pid) of the run's Ray workers: processes under the driver whose title Ray set to
    `ray::<actor class>` (or `ray::<class>.<method>` while a call runs)."""
    try:
        procs = psutil.Process(root).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    out = []
    for p in procs:
        try:
            title = " ".join(p.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        kind = next((k for prefix, k in KINDS.items() if title.startswith(prefix)), None)
        if kind:
            out.append((kind, p.pid))
    return out


def rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a row being written
            pass
    return out


def last_step(run_dir: Path) -> int:
    return max((r["step"] for r in rows(run_dir)), default=0)


def soak(args, train: list[str]) -> dict:
    run_dir = Path(args.output_dir) / args.name
    log_path = Path(args.output_dir) / f"{args.name}.log"
    speechrl = shutil.which("speechrl") or sys.exit("speechrl is not on PATH: activate the venv (bash .ci/install)")
    base = [speechrl, "train", *train, f"run.output_dir={args.output_dir}", f"run.name={args.name}",
            f"rollout.max_retries={args.max_retries}"]
    rng = random.Random(args.seed)
    began = time.time()
    deadline = began + args.hours * 3600
    kills, exits, proc, finished = [], [], None, False
    next_kill = began + args.kill_every * 60 * rng.uniform(0.5, 1.5)
    with open(log_path, "a") as log:
        while time.time() < deadline:
            if proc is None:
                resume = ["--resume", str(run_dir)] if (run_dir / "checkpoints").is_dir() else []
                log.write(f"\n=== soak: {' '.join(base[1:] + resume)} ===\n")
                log.flush()
                # SIGINT at its default: a soak started in the background (`&`) inherits it ignored, and the
                # run would not take the deadline's Ctrl-C
                proc = subprocess.Popen(base + resume, stdout=log, stderr=subprocess.STDOUT,
                                        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
            rc = proc.poll()
            if rc is not None:
                exits.append({"at_min": round((time.time() - began) / 60, 1), "rc": rc, "step": last_step(run_dir)})
                proc = None
                if rc == 0:
                    finished = True
                    break
                if len(exits) >= 3 and all(e["rc"] != 0 for e in exits[-3:]) and not any(
                        k["at_min"] >= exits[-3]["at_min"] for k in kills):
                    print("soak: the run failed three times in a row with no kill in between; see", log_path)
                    break
                continue
            if time.time() >= next_kill:
                found = workers(proc.pid)
                if found:
                    kind, pid = rng.choice(found)
                    try:
                        os.kill(pid, signal.SIGKILL)
                        kills.append({"at_min": round((time.time() - began) / 60, 1), "worker": kind, "pid": pid,
                                      "step": last_step(run_dir)})
                        print(f"soak: killed the {kind} worker (pid {pid}) at step {kills[-1]['step']}", flush=True)
                    except ProcessLookupError:
                        pass
                next_kill = time.time() + args.kill_every * 60 * rng.uniform(0.5, 1.5)
            time.sleep(1.0)
        if proc is not None:  # the deadline: interrupt it as Ctrl-C would; it resumes from its last checkpoint
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
    record = {"run": str(run_dir), "hours": round((time.time() - began) / 3600, 2), "finished": finished,
              "kills": kills, "exits": exits, "log": str(log_path)}
    (Path(args.output_dir) / f"{args.name}.soak.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def numbers(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("time/") and not k.endswith("/cache_hit")}


def report(run_dir: Path, reference: Path | None) -> None:
    record_path = run_dir.parent / f"{run_dir.name}.soak.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {"kills": [], "exits": []}
    log = Path(record.get("log", run_dir.parent / f"{run_dir.name}.log"))
    text = log.read_text(errors="replace") if log.exists() else ""
    done = rows(run_dir)
    print(f"run {run_dir}: {last_step(run_dir)} steps in {record.get('hours', '?')} h"
          f"{' (finished)' if record.get('finished') else ''}")
    print(f"{'kills':<38}{len(record['kills'])}")
    for kind in ("rollout", "reward", "policy"):
        print(f"  {kind + ' worker':<36}{sum(k['worker'] == kind for k in record['kills'])}")
    print(f"{'rollout steps retried (run log)':<38}{text.count('restarting it and retrying the step')}")
    print(f"{'runs stopped, then resumed (--resume)':<38}{sum(e['rc'] != 0 for e in record['exits'])}")
    stopped = [line for line in text.splitlines() if line.startswith("speechrl: error:")]
    for line in stopped[:5]:
        print(f"  {line[:160]}")
    if reference is None:
        return
    ref = {r["step"]: r for r in rows(reference)}
    common = [r for r in done if r["step"] in ref]
    same = [r["step"] for r in common if numbers(r) == numbers(ref[r["step"]])]
    print(f"steps logged by both runs: {len(common)}; with every number equal: {len(same)}")
    keys = [k for k in ("eval/wer", "eval/cer", "rewards/total") if any(k in r for r in common)]
    print(f"{'step':>6}" + "".join(f"{k + ' soak':>22}{k + ' calm':>22}" for k in keys))
    for r in common:
        if any(k in r for k in keys[:1]) or r["step"] % 10 == 0:
            cells = "".join(f"{r.get(k, math.nan):>22.4f}{ref[r['step']].get(k, math.nan):>22.4f}" for k in keys)
            print(f"{r['step']:>6}{cells}")


def main() -> None:
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hours", type=float, default=2.0)
    parser.add_argument("--kill-every", type=float, default=10.0, help="minutes between kills, on average")
    parser.add_argument("--max-retries", type=int, default=3, help="rollout.max_retries for the run")
    parser.add_argument("--output-dir", default="runs")
    parser.add_argument("--name", default="soak")
    parser.add_argument("--seed", type=int, default=0, help="of the kill schedule")
    parser.add_argument("--report", type=Path, help="print the report of this soak run's directory and stop")
    parser.add_argument("--reference", type=Path, help="an undisturbed run of the same recipe, to compare with")
    args = parser.parse_args(argv[:split])
    if args.report:
        report(args.report, args.reference)
        return
    if split == len(argv):
        parser.error("give the recipe and its overrides after --, e.g. -- asr/grpo run.init_from=...")
    soak(args, argv[split + 1:])
    report(Path(args.output_dir) / args.name, args.reference)


if __name__ == "__main__":
    main()
