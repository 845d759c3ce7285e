"""From samples to tasks (pair selection) and from judgments to preference data (votes, agreement,
filters), read back by the DPO reader."""
from __future__ import annotations

import json

import pytest

from annotation_test_utils import annotator_id, make_batch, tone
from speechrl.data.annotation import store, tasks
from speechrl.data.annotation.db import open_db
from speechrl.data.annotation.export import export, summarize
from speechrl.data.annotation.store import Submission
from speechrl.data.audio import write_wav
from speechrl.data.preferences import read_preferences


def samples_file(tmp_path, rows):
    for r in rows:
        if "audio" in r and not (tmp_path / r["audio"]).exists():
            write_wav(tmp_path / r["audio"], tone(150 + 7 * len(r["audio"]) + hash(r["audio"]) % 200), 16000)
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_pair_selection_strategies(tmp_path):
    rows = [{"text": "go left", "audio": f"l{i}.wav", "reward": r, "source": f"step-{s}"}
            for i, (r, s) in enumerate([(0.9, 0), (0.1, 0), (0.5, 30), (0.4, 30)])]
    rows += [{"text": "stop", "audio": "s0.wav", "reward": 0.3, "source": "step-0"},
             {"text": "stop", "audio": "s1.wav", "reward": 0.31, "source": "step-30"}]
    samples, mode = tasks.read_samples(samples_file(tmp_path, rows))
    assert mode == "tts" and len(samples) == 6

    gap = tasks.choose_pairs(samples, "reward_gap", min_gap=0.05)
    assert [(a.reward, b.reward) for a, b in gap] == [(0.9, 0.1)]  # "stop" differs by 0.01 < min_gap
    two = tasks.choose_pairs(samples, "reward_gap", pairs_per_group=2)
    assert sorted((a.reward, b.reward) for a, b in two) == [(0.31, 0.3), (0.5, 0.4), (0.9, 0.1)]

    ckpt = tasks.choose_pairs(samples, "checkpoints")
    assert sorted((a.source, b.source, a.text) for a, b in ckpt) == [("step-0", "step-30", "go left"),
                                                                      ("step-0", "step-30", "stop")]
    rand = tasks.choose_pairs(samples, "random", pairs_per_group=10, seed=3)
    assert len(rand) == 6 + 1 and all(a.group == b.group for a, b in rand)
    assert len(tasks.choose_pairs(samples, "random", pairs_per_group=10, max_pairs=2)) == 2

    specs, dropped = tasks.load_pair_audio(gap)
    assert not dropped and specs[0].first.meta["reward"] == 0.9 and specs[0].first.sample_rate == 16000


@pytest.mark.parametrize("row, message", [
    ({"audio": "a.wav"}, "field 'text'"),
    ({"text": "hi"}, "field 'audio'"),
    ({"text": "hi", "audio": "a.wav", "reward": "high"}, "field 'reward'"),
])
def test_bad_sample_rows_name_file_line_and_field(tmp_path, row, message):
    path = samples_file(tmp_path, [{"text": "ok", "audio": "a.wav"}, row])
    with pytest.raises(tasks.TaskSourceError, match=rf"samples.jsonl:2: {message}"):
        tasks.read_samples(path)


def test_unreadable_audio_costs_only_its_pair(tmp_path):
    path = samples_file(tmp_path, [{"text": "a", "audio": "a0.wav"}, {"text": "a", "audio": "a1.wav"},
                                   {"text": "b", "audio": "b0.wav"}, {"text": "b", "audio": "b1.wav"}])
    (tmp_path / "b1.wav").write_bytes(b"RIFF not really a wav")
    samples, _ = tasks.read_samples(path)
    specs, dropped = tasks.load_pair_audio(tasks.choose_pairs(samples, "random"))
    assert [s.text for s in specs] == ["a"] and len(dropped) == 1 and "b1.wav" in dropped[0]


def answer_all(engine, name, choose):
    """Answer `name`'s queue; choose(pair_key) -> "first" | "second" | "tie" | "both_bad"."""
    import sqlalchemy as sa

    from speechrl.data.annotation.db import assignments, pairs

    me = annotator_id(engine, name)
    while (task := store.next_task(engine, me)["task"]) is not None:
        with engine.connect() as conn:
            key, a_first = conn.execute(sa.select(pairs.c.key, assignments.c.a_is_first)
                                        .select_from(assignments.join(pairs))
                                        .where(assignments.c.id == task["id"])).one()
        want = choose(key)
        choice = want if want in ("tie", "both_bad") else ("A" if (want == "first") == a_first else "B")
        store.submit(engine, me, Submission(task["id"], f"{name}-{task['id']:06d}", choice, tags=["naturalness"]))


def test_export_votes_agreement_filters_and_formats(tmp_path):
    engine = open_db(tmp_path / "a.db")
    make_batch(engine, ["ann", "ben", "cat"], n_pairs=6, votes=3)
    # ann and ben always prefer the first clip; cat prefers it on p0-p2 and says "tie" on p3-p5
    answer_all(engine, "ann", lambda key: "first")
    answer_all(engine, "ben", lambda key: "second" if key == "p5" else "first")
    answer_all(engine, "cat", lambda key: "first" if key in ("p0", "p1", "p2") else "tie")

    out = tmp_path / "export"
    stats = export(engine, out)
    assert stats["judgments"] == 18 and stats["exported_pairs"] == 5  # p5: first/second/tie, no majority
    pairs = read_preferences(out / "pairs.jsonl", on_bad="fail")
    assert len(pairs) == 5 and not pairs.bad
    assert not any("realtime" in p.extra for p in pairs)  # only a realtime batch's rows carry the reply pair
    p3 = next(p for p in pairs if p.id.endswith("/p3"))
    assert p3.extra["votes"] == {"first": 2, "second": 0, "tie": 1, "both_bad": 0}
    assert p3.extra["agreement"] == pytest.approx(2 / 3, abs=1e-4) and p3.annotator == "ann,ben,cat"
    # chosen is the majority's clip: the pair's stored first clip
    import sqlalchemy as sa
    from pathlib import Path
    from speechrl.data.annotation.db import pairs as pairs_table
    with engine.connect() as conn:
        first_clip = conn.execute(sa.select(pairs_table.c.first_clip_id).where(pairs_table.c.key == "p3")).scalar()
    assert Path(p3.chosen.audio).read_bytes() == store.clip_bytes(engine, first_clip)
    hf = read_preferences(out / "hf", on_bad="fail")
    assert sorted(p.id for p in hf) == sorted(p.id for p in pairs)
    votes = [json.loads(line) for line in (out / "votes.jsonl").read_text().splitlines()]
    assert len(votes) == 6 and next(v for v in votes if v["pair"].endswith("/p5"))["majority"] is None

    # Fleiss' kappa over the 6 pairs × 3 raters, by hand: categories first/second/tie
    # counts: p0-p2 (3,0,0); p3,p4 (2,0,1); p5 (1,1,1)
    # P_i: 1, 1, 1, 1/3, 1/3, 0 -> P̄ = 11/18; p = (14, 1, 3)/18 -> P_e = (196 + 1 + 9)/324
    p_e = 206 / 324
    assert stats["fleiss_kappa"] == pytest.approx((11 / 18 - p_e) / (1 - p_e), abs=1e-4)

    strict = export(engine, tmp_path / "strict", min_agreement=1.0)
    assert strict["exported_pairs"] == 3  # only the unanimous p0-p2
    without_cat = export(engine, tmp_path / "no_cat", exclude=["cat"], min_votes=2)
    assert without_cat["exported_pairs"] == 5 and without_cat["judgments"] == 12  # p5: 1-1, no majority
    only_ann = export(engine, tmp_path / "ann", annotators=["ann"])
    assert only_ann["exported_pairs"] == 6 and only_ann["fleiss_kappa"] is None

    people = {p["annotator"]: p for p in summarize(engine)["annotators"]}
    # leave-one-out majority, pairs where the other two disagree skipped: ann 5/5, cat 3/5 (tie on p3, p4)
    assert people["ann"]["answered"] == 6 and people["ann"]["majority_agreement"] == 1.0
    assert people["cat"]["majority_agreement"] == pytest.approx(0.6)
    assert people["cat"]["answer_rates"]["tie"] == pytest.approx(0.5)
