"""From judgments to training data: votes per pair, agreement, statistics, and the preference dataset.

`export` writes the pairs DPO and the reward model train on (`pairs.jsonl`, and a `hf/` copy), their
audio, every vote (`votes.jsonl`, ties included) and `stats.json`; docs/annotation.md describes each.
A realtime batch's rows also carry the reply pair as the realtime readers take it (`_realtime`).
"""
from __future__ import annotations

import json
import math
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Optional

from sqlalchemy.engine import Engine

from speechrl.data.annotation import store
from speechrl.data.annotation.agreement import annotator_stats, count_matrix, fleiss_kappa, pair_agreement
from speechrl.data.annotation.db import PREFERENCES


@dataclass
class PairVotes:
    pair_id: int
    votes: Counter = field(default_factory=Counter)  # preferred -> count
    by: dict[str, str] = field(default_factory=dict)  # annotator -> preferred
    tags: Counter = field(default_factory=Counter)
    comments: list[str] = field(default_factory=list)

    @property
    def n(self) -> int:
        return sum(self.votes.values())

    @property
    def majority(self) -> Optional[str]:
        """The most common answer; None when the top two are tied."""
        top = self.votes.most_common(2)
        if not top or (len(top) == 2 and top[0][1] == top[1][1]):
            return None
        return top[0][0]

    @property
    def agreement(self) -> float:
        return pair_agreement([v for v, c in self.votes.items() for _ in range(c)])


def collect(engine: Engine, batch: Optional[str] = None, annotators: Optional[list[str]] = None,
            exclude: Optional[list[str]] = None) -> tuple[list[dict], dict[int, PairVotes]]:
    """Live judgments (filtered by annotator) and the votes they make per pair."""
    rows = [r for r in store.live_judgments(engine, batch)
            if (not annotators or r["annotator"] in annotators) and r["annotator"] not in (exclude or ())]
    votes: dict[int, PairVotes] = {}
    for r in rows:
        pv = votes.setdefault(r["pair_id"], PairVotes(r["pair_id"]))
        pv.votes[r["preferred"]] += 1
        pv.by[r["annotator"]] = r["preferred"]
        pv.tags.update(r["tags"] or [])
        if r["comment"]:
            pv.comments.append(r["comment"])
    return rows, votes


def summarize(engine: Engine, batch: Optional[str] = None, annotators: Optional[list[str]] = None,
              exclude: Optional[list[str]] = None) -> dict:
    """Throughput and agreement: what the admin page and `speechrl annotate stats` show."""
    rows, votes = collect(engine, batch, annotators, exclude)
    multi = [pv for pv in votes.values() if pv.n >= 2]
    kappa = fleiss_kappa(count_matrix([list(pv.by.values()) for pv in multi], PREFERENCES)) if multi else math.nan
    per = annotator_stats([(r["annotator"], r["pair_id"], r["preferred"]) for r in rows], PREFERENCES, min_shared=5)
    queues = {q["name"]: q for q in store.queue_counts(engine)}
    hour_ago = datetime.utcnow() - timedelta(hours=1)  # the database's CURRENT_TIMESTAMP is naive UTC
    by_name = defaultdict(list)
    for r in rows:
        by_name[r["annotator"]].append(r)

    def share(mine: list[dict], test) -> Optional[float]:
        return sum(1 for r in mine if test(r)) / len(mine) if mine else None

    people = []
    for name in sorted(set(queues) | set(per)):
        mine, s = by_name[name], per.get(name)
        times = [r["seconds"] for r in mine if r["seconds"] is not None]
        people.append({
            "annotator": name,
            "assigned": queues.get(name, {}).get("assigned", 0),
            "answered": queues.get(name, {}).get("answered", 0),
            "last_hour": sum(1 for r in mine if r["created_at"] and r["created_at"] > hour_ago),
            "median_seconds": statistics.median(times) if times else None,
            "chose_A": share(mine, lambda r: r["choice"] == "A"),  # far from 0.5: a position bias
            "played_both": share(mine, lambda r: r["played_a"] and r["played_b"]),
            "answer_rates": s.answer_rates if s else {},
            "majority_agreement": _num(s.majority_agreement) if s else None,
            "kappa_with": {k: _num(v) for k, v in s.kappa_with.items()} if s else {},
        })
    return {
        "batch": batch, "judgments": len(rows), "pairs_voted": len(votes), "pairs_with_2plus_votes": len(multi),
        "fleiss_kappa": _num(kappa),
        "mean_pair_agreement": _num(statistics.fmean(pv.agreement for pv in multi)) if multi else None,
        "answers": dict(Counter(r["preferred"] for r in rows)),
        "annotators": people,
        "batches": store.list_batches(engine),
    }


def _num(x: float) -> Optional[float]:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), 4)


def export(engine: Engine, out_dir: str | Path, *, batch: Optional[str] = None, min_votes: int = 1,
           min_agreement: float = 0.0, annotators: Optional[list[str]] = None,
           exclude: Optional[list[str]] = None) -> dict:
    """Write the export folder (see the module docstring); returns the stats written to stats.json."""
    from speechrl.data.preferences import PreferencePair, Speech, write_preferences

    out = Path(out_dir)
    (out / "audio").mkdir(parents=True, exist_ok=True)
    _, votes = collect(engine, batch, annotators, exclude)
    info = store.pairs_of(engine, votes)
    written: dict[int, str] = {}

    def clip(clip_id: int) -> str:
        if clip_id not in written:
            path = out / "audio" / f"clip-{clip_id}.wav"
            if not path.exists():
                path.write_bytes(store.clip_bytes(engine, clip_id))
            written[clip_id] = str(path.absolute())
        return written[clip_id]

    prefs, all_votes, kept_reasons = [], [], Counter()
    for pair_id in sorted(votes):
        pv, p = votes[pair_id], info[pair_id]
        record = {"pair": f"{p['batch']}/{p['key']}", "text": p["text"], "votes": {k: pv.votes.get(k, 0)
                                                                                   for k in PREFERENCES},
                  "n_votes": pv.n, "majority": pv.majority, "agreement": round(pv.agreement, 4),
                  "annotators": pv.by, "tags": dict(pv.tags), "first": p["first_meta"], "second": p["second_meta"]}
        all_votes.append(record)
        why = ("too few votes" if pv.n < min_votes else "agreement below the minimum" if pv.agreement < min_agreement
               else "no majority" if pv.majority is None else f"majority {pv.majority}"
               if pv.majority in ("tie", "both_bad") else None)
        kept_reasons[why or "kept"] += 1
        if why:
            continue
        chosen, rejected = ((p["first_clip_id"], p["second_clip_id"]) if pv.majority == "first"
                            else (p["second_clip_id"], p["first_clip_id"]))
        realtime = {"realtime": _realtime(p, pv.majority == "first")} if p["mode"] == "realtime" else {}
        prefs.append(PreferencePair(
            id=f"{p['batch']}/{p['key']}", text=p["text"], chosen=Speech(audio=clip(chosen)),
            rejected=Speech(audio=clip(rejected)),
            voice=clip(p["voice_clip_id"]) if p["voice_clip_id"] else None,
            annotator=",".join(sorted(pv.by)), reason=sorted(pv.tags) or None, mode=p["mode"],
            extra={"votes": record["votes"], "agreement": record["agreement"], "n_votes": pv.n,
                   "comments": pv.comments, "context": p["context"], **realtime}))
    write_preferences(out / "pairs.jsonl", prefs)
    (out / "votes.jsonl").write_text("".join(json.dumps(r, default=str) + "\n" for r in all_votes))
    _write_hf(out)
    stats = summarize(engine, batch, annotators, exclude)
    stats.update(exported_pairs=len(prefs), pair_outcomes=dict(kept_reasons),
                 filters={"batch": batch, "min_votes": min_votes, "min_agreement": min_agreement,
                          "annotators": annotators, "exclude": exclude})
    (out / "stats.json").write_text(json.dumps(stats, indent=2, default=str))
    return stats


def _realtime(p: dict, first_won: bool) -> dict:
    """A realtime pair as `RealtimeMode.save_pairs` writes it, which the realtime reward model and
    offline DPO read (docs/annotation.md, "Realtime batches"): the turn from the pair's context, each
    reply from its side's rollout (tasks.py `_realtime_sample`). Absent fields stay None, for the
    readers to name."""
    won, lost = (p["first_meta"], p["second_meta"]) if first_won else (p["second_meta"], p["first_meta"])
    context = p["context"] or {}

    def reply(meta: dict) -> dict:
        return {k: meta.get(source) for k, source in (("text", "reply_text"), ("codec_ids", "codec_ids"),
                                                       ("completion_ids", "completion_ids"), ("reward", "reward"))}

    return {"id": won.get("id"), "persona": context.get("persona"), "history": context.get("history"),
            "user_text": context.get("user_text", p["text"]), "user_audio": won.get("user_audio"),
            "chosen": reply(won), "rejected": reply(lost)}


def _write_hf(out: Path) -> None:
    """pairs.jsonl as a `datasets` folder (out/hf), paths relative to `out` as read_preferences expects."""
    import datasets

    rows = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines() if line.strip()]
    hf = out / "hf"
    if not rows:
        return
    # paths in pairs.jsonl are relative to `out`; a save_to_disk folder's rows resolve against its parent
    datasets.Dataset.from_list(rows).save_to_disk(str(hf))
