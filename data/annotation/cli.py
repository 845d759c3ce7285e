"""`speechrl annotate ...`: the annotation service's commands (admin, tasks, app, export).

The app's packages are the `annotate` extra: building this parser imports none of them, and each
command checks for them first, so a core install gets an install hint instead of a traceback.
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import random
import sys
import uuid
from pathlib import Path

from speechrl.data.annotation import DEFAULT_URL_ENV, STRATEGIES

EXTRA_MODULES = ("fastapi", "uvicorn", "sqlalchemy", "alembic")  # psycopg too, but only PostgreSQL needs it

EPILOG = f"""the loop (database: --db URL, default ${DEFAULT_URL_ENV} or ./annotations.db):
  speechrl annotate add-annotator alice            prints alice's sign-in token (--admin: sees stats)
  speechrl annotate tasks runs/<grpo run> --name round1 --annotators alice,bob --votes 2
  speechrl annotate serve                          the app on http://127.0.0.1:8700/
  speechrl annotate stats                          throughput and agreement
  speechrl annotate export prefs/round1            pairs.jsonl (DPO format), hf/, stats.json
  speechrl train tts/dpo dpo.data=prefs/round1/pairs.jsonl run.init_from=...
"""


def missing_extra() -> list[str]:
    return [m for m in EXTRA_MODULES if importlib.util.find_spec(m) is None]


def _needs_extra(cmd):
    @functools.wraps(cmd)
    def run(args) -> int:
        if missing := missing_extra():
            print(f"speechrl: error: `speechrl annotate` needs the annotation extra ({', '.join(missing)} "
                  "not installed): pip install 'speechrl[annotate]' (from a checkout: pip install -e '.[annotate]')",
                  file=sys.stderr)
            return 2
        return cmd(args)
    return run


def _engine(args):
    from speechrl.data.annotation.db import open_db

    return open_db(args.db)


def _names(value: str | None) -> list[str] | None:
    return [n.strip() for n in value.split(",") if n.strip()] if value else None


def cmd_migrate(args) -> int:
    from speechrl.data.annotation.db import make_engine, migrate, normalize_url

    print(f"{normalize_url(args.db) if args.db else 'database'} at schema revision {migrate(make_engine(args.db))}")
    return 0


def cmd_add_annotator(args) -> int:
    from speechrl.data.annotation.store import add_annotator

    token = add_annotator(_engine(args), args.name, admin=args.admin)
    print(f"annotator {args.name!r}{' (admin)' if args.admin else ''} added. Their sign-in token (shown once):")
    print(token)
    return 0


def cmd_token(args) -> int:
    from speechrl.data.annotation.store import new_token

    print(new_token(_engine(args), args.name))
    return 0


def cmd_annotators(args) -> int:
    from speechrl.data.annotation.store import list_annotators

    for a in list_annotators(_engine(args)):
        print(f"{a['name']}\t{'admin' if a['is_admin'] else 'annotator'}\t{'active' if a['active'] else 'inactive'}")
    return 0


def cmd_tasks(args) -> int:
    from speechrl.data.annotation import tasks
    from speechrl.data.annotation.batches import Batch, create_batch

    engine = _engine(args)
    steps = [int(s) for s in args.steps.split(",")] if args.steps else None
    samples, mode = tasks.read_samples(args.source, steps=steps)
    mode = args.mode or mode
    sources = tuple(_names(args.sources)) if args.sources else None
    if sources is not None and len(sources) != 2:
        raise ValueError(f"--sources takes two names (e.g. step-0,step-30), got {args.sources!r}")
    chosen = tasks.choose_pairs(samples, args.strategy, min_gap=args.min_gap, pairs_per_group=args.pairs_per_group,
                                sources=sources, max_pairs=args.max_pairs, seed=args.seed)
    if not chosen:
        raise ValueError(f"{args.source}: {len(samples)} samples, but the {args.strategy!r} strategy found no pairs "
                         "(samples of one prompt are needed in twos; try --min-gap 0 or another --strategy)")
    run_dir = Path(args.source) if Path(args.source).is_dir() else None
    specs, dropped = tasks.load_pair_audio(chosen, run_dir)
    batch = Batch(name=args.name, mode=mode, strategy=args.strategy, source=str(Path(args.source).absolute()),
                  tags=tasks.TAGS.get(mode, tasks.TAGS["tts"]), instructions=tasks.INSTRUCTIONS.get(mode, ""),
                  votes_per_pair=args.votes)
    made = create_batch(engine, batch, specs, _names(args.annotators) or [], seed=args.seed)
    print(f"batch {args.name!r}: {made['pairs']} pairs from {len(samples)} samples ({args.strategy}), "
          f"{made['assignments']} assignments: " + ", ".join(f"{n} {c}" for n, c in made["per_annotator"].items())
          + (f"; {len(dropped)} pairs left out (unreadable audio, see the log)" if dropped else "")
          + (f"; {made['identical']} pairs left out (the same audio twice)" if made["identical"] else ""))
    return 0


def cmd_serve(args) -> int:
    from speechrl.data.annotation.app import serve

    serve(args.db, host=args.host, port=args.port)
    return 0


def cmd_stats(args) -> int:
    from speechrl.data.annotation.export import summarize

    s = summarize(_engine(args), batch=args.batch)
    if args.json:
        print(json.dumps(s, indent=2, default=str))
        return 0
    print(f"{s['judgments']} judgments on {s['pairs_voted']} pairs ({s['pairs_with_2plus_votes']} with 2+ votes); "
          f"Fleiss' kappa {_fmt(s['fleiss_kappa'])}, mean pair agreement {_fmt(s['mean_pair_agreement'])}")
    print(f"{'annotator':<16}{'answered':>10}{'assigned':>10}{'last hour':>11}{'median s':>10}{'chose A':>9}"
          f"{'agrees':>8}")
    for p in s["annotators"]:
        print(f"{p['annotator']:<16}{p['answered']:>10}{p['assigned']:>10}{p['last_hour']:>11}"
              f"{_fmt(p['median_seconds']):>10}{_fmt(p['chose_A']):>9}{_fmt(p['majority_agreement']):>8}")
    return 0


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def cmd_export(args) -> int:
    from speechrl.data.annotation.export import export

    s = export(_engine(args), args.out_dir, batch=args.batch, min_votes=args.min_votes,
               min_agreement=args.min_agreement, annotators=_names(args.annotators), exclude=_names(args.exclude))
    print(f"{s['exported_pairs']} preference pairs -> {Path(args.out_dir) / 'pairs.jsonl'} (and hf/); "
          f"pair outcomes {s['pair_outcomes']}; Fleiss' kappa {_fmt(s['fleiss_kappa'])}; "
          f"stats in {Path(args.out_dir) / 'stats.json'}")
    return 0


def cmd_simulate(args) -> int:
    """Answer an annotator's queue by a rule, for dry runs of the loop (no human needed)."""
    from speechrl.data.annotation.store import Submission, annotator_for_token, next_task, sides, submit

    engine = _engine(args)
    who = annotator_for_token(engine, args.token)
    if who is None:
        raise ValueError("--token: no active annotator holds that token")
    rng, answered = random.Random(args.seed), 0
    while (task := next_task(engine, who["id"])["task"]) is not None:
        a_is_first, first, second = sides(engine, task["id"])
        first_better = (first.get("reward") or 0) >= (second.get("reward") or 0)
        if args.prefer == "random" or rng.random() < args.noise:
            first_better = rng.random() < 0.5
        choice = "A" if first_better == a_is_first else "B"
        submit(engine, who["id"], Submission(task["id"], uuid.uuid4().hex, choice, played_a=True, played_b=True))
        answered += 1
    print(f"{who['name']}: answered {answered} tasks ({args.prefer}, noise {args.noise})")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("annotate", help="pairwise annotation: annotators, tasks from runs, the web app, export",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", default=None, help=f"database URL (sqlite:///file.db, postgresql://user@host/db) or a "
                   f"file path; default ${DEFAULT_URL_ENV}, else ./annotations.db")
    asub = p.add_subparsers(dest="annotate_command", required=True, metavar="ACTION")

    q = asub.add_parser("migrate", help="create or upgrade the database schema (every command does it too)")
    q.set_defaults(fn=_needs_extra(cmd_migrate))

    q = asub.add_parser("add-annotator", help="add an annotator and print their sign-in token")
    q.add_argument("name")
    q.add_argument("--admin", action="store_true", help="may see the stats page")
    q.set_defaults(fn=_needs_extra(cmd_add_annotator))

    q = asub.add_parser("token", help="give an annotator a new token (the old one stops working)")
    q.add_argument("name")
    q.set_defaults(fn=_needs_extra(cmd_token))

    q = asub.add_parser("annotators", help="list annotators")
    q.set_defaults(fn=_needs_extra(cmd_annotators))

    q = asub.add_parser("tasks", help="turn a run's samples (or a samples .jsonl) into pairwise tasks")
    q.add_argument("source", help="a run directory (rollouts/, samples/) or a samples .jsonl file")
    q.add_argument("--name", required=True, help="the batch's name (unique)")
    q.add_argument("--annotators", required=True, help="comma-separated annotator names to assign to")
    q.add_argument("--votes", type=int, default=3, help="annotators per pair, for agreement (default 3)")
    q.add_argument("--strategy", choices=STRATEGIES, default="reward_gap",
                   help="reward_gap: the most different rewards; random; checkpoints: same text, two checkpoints")
    q.add_argument("--min-gap", type=float, default=0.0, help="reward_gap: least reward difference to pair")
    q.add_argument("--pairs-per-group", type=int, default=1, help="pairs per prompt")
    q.add_argument("--max-pairs", type=int, default=None, help="at most this many pairs (a random subset)")
    q.add_argument("--steps", help="only these steps' samples, e.g. 10,30")
    q.add_argument("--sources", help="checkpoints: the two sources to compare, e.g. step-0,step-30")
    q.add_argument("--mode", help="override the mode (tts, realtime) the run's recipe says")
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(fn=_needs_extra(cmd_tasks))

    q = asub.add_parser("serve", help="run the annotation web app")
    q.add_argument("--host", default="127.0.0.1", help="address (default loopback; anything else: put HTTPS in front)")
    q.add_argument("--port", type=int, default=8700)
    q.set_defaults(fn=_needs_extra(cmd_serve))

    q = asub.add_parser("stats", help="throughput and agreement per annotator")
    q.add_argument("--batch")
    q.add_argument("--json", action="store_true")
    q.set_defaults(fn=_needs_extra(cmd_stats))

    q = asub.add_parser("export", help="write the judgments as a preference dataset (DPO format, HF datasets)")
    q.add_argument("out_dir")
    q.add_argument("--batch", help="only this batch")
    q.add_argument("--min-votes", type=int, default=1, help="pairs with fewer votes are left out")
    q.add_argument("--min-agreement", type=float, default=0.0, help="least share of votes for the majority answer")
    q.add_argument("--annotators", help="count only these annotators' votes (comma-separated)")
    q.add_argument("--exclude", help="ignore these annotators' votes (comma-separated)")
    q.set_defaults(fn=_needs_extra(cmd_export))

    q = asub.add_parser("simulate", help="answer one annotator's queue by rule (dry runs of the loop)")
    q.add_argument("--token", required=True, help="the annotator's token")
    q.add_argument("--prefer", choices=("reward", "random"), default="reward",
                   help="reward: the side whose recorded reward is higher")
    q.add_argument("--noise", type=float, default=0.0, help="chance of a random answer instead")
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(fn=_needs_extra(cmd_simulate))

