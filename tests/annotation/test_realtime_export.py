"""Realtime annotation, from a run to the realtime readers: a one-step realtime GRPO run saves its
rollouts (the turn's context, the reply's text part, codec and sampled ids, the user's audio file);
`speechrl annotate tasks` makes pairs of its replies (the user's turn shown, with the card and the
dialogue so far); two annotators vote through the store; the export's rows carry the voted reply
pairs under `realtime`, which the realtime reward model and offline DPO read back as the replies
the run sampled. A row lacking a field is skipped, named by file, line and field, or stops the read.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import sqlalchemy as sa

from annotation_test_utils import annotator_id
from speechrl.data.annotation import store, tasks
from speechrl.data.annotation.db import assignments, open_db, pairs
from speechrl.data.annotation.export import export
from speechrl.data.annotation.store import Submission
from speechrl.rlhf.core.config import load_recipe

pytestmark = [pytest.mark.vllm, pytest.mark.ray]

# 2 episodes of 2 turns, 2 replies each: 4 groups, a pair from each. At most 8 text tokens and 40 in
# all, so every reply has audio to listen to. Cheap rule rewards: this tests the data path, not taste.
RL = ["rl.prompts_per_step=2", "rollout.sampling.n=2", "rollout.kv_cache_gib=0.25", "rollout.num_workers=1",
      "ray.num_cpus=2", "train.steps=1", "run.save_rollouts_every=1", "realtime.decode_replies=false",
      "rewards=[{name: reply_length, kwargs: {unit: words, min: 1, max: 25}}, "
      "{name: latency, kwargs: {column: ttfa_tokens, budget: 8}}]",
      "realtime.drift_judge=reply_length", "realtime.drift_check=null"]


@pytest.fixture(scope="module")
def base(realtime_overrides, tmp_path_factory) -> list[str]:
    return [*realtime_overrides, "realtime.max_text_tokens=8", f"run.output_dir={tmp_path_factory.mktemp('rt-annot')}"]


@pytest.fixture(scope="module")
def run(base) -> Path:
    from speechrl.rlhf.trainers.online import run_online

    return Path(run_online(load_recipe("realtime/grpo", [*base, *RL, "run.name=grpo"]))["run"])


@pytest.fixture(scope="module")
def rollouts(run) -> list[dict]:
    return [json.loads(line) for line in (run / "rollouts" / "step-00001.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def task(base):
    """The realtime task of the run's backbone (the reward model's mode holds it)."""
    from speechrl.rlhf.model.backbone import load_processor
    from speechrl.rlhf.modes import get_mode

    mode = get_mode(load_recipe("realtime/reward_model", base))
    return mode.setup_task(load_processor(mode.backbone_path()))


def preference(meta: dict) -> tuple:
    """The annotators' rule, which they can hear: the longer audio, then the larger codec ids."""
    return len(meta["codec_ids"]), meta["codec_ids"]


def vote(engine, name: str) -> int:
    """Answer `name`'s queue by `preference` through the store, as the app does; returns the answers."""
    me, answered = annotator_id(engine, name), 0
    while (task := store.next_task(engine, me)["task"]) is not None:
        with engine.connect() as conn:
            first, second, a_first = conn.execute(
                sa.select(pairs.c.first_meta, pairs.c.second_meta, assignments.c.a_is_first)
                .select_from(assignments.join(pairs)).where(assignments.c.id == task["id"])).one()
        choice = "A" if (preference(first) > preference(second)) == a_first else "B"
        store.submit(engine, me, Submission(task["id"], f"{name}-{task['id']:06d}", choice, tags=["in character"],
                                            played_a=True, played_b=True))
        answered += 1
    return answered


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory) -> tuple[Path, dict]:
    """Tasks from the run by the command a user types, two annotators' votes, the export: (its folder, stats)."""
    from speechrl.rlhf.cli.main import main

    folder = tmp_path_factory.mktemp("rt-export")
    db = f"sqlite:///{folder / 'annotations.db'}"
    engine = open_db(db)
    for name in ("ann", "ben"):
        store.add_annotator(engine, name)
    assert main(["annotate", "--db", db, "tasks", str(run), "--name", "rt1", "--annotators", "ann,ben", "--votes", "2",
                 "--strategy", "random"]) == 0
    assert vote(engine, "ann") == vote(engine, "ben") == 4  # a pair of each turn's two replies
    return folder / "prefs", export(engine, folder / "prefs", min_votes=2)


def export_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]


def test_rollout_rows_carry_the_turn_the_reply_and_the_user_audio(rollouts, task):
    assert len(rollouts) == 8
    for row in rollouts:
        reply = task.parse(row["completion_ids"])
        assert (row["reply_text"], row["codec_ids"]) == (reply.text, reply.codec_ids) and row["codec_ids"]
        assert row["persona"].startswith("Name: ") and isinstance(row["history"], list) and row["user_text"]
        assert Path(row["user_audio"]).is_file()  # the dialogue's spoken user turn, in run.cache_dir
    second = [r for r in rollouts if r["turn"] == 1]
    assert second and all(len(r["history"]) == 2 for r in second)  # the first turn and the reply the episode kept


def test_tasks_show_the_user_turn_with_the_card_and_the_dialogue_so_far(run, rollouts, tmp_path):
    samples, mode = tasks.read_samples(run)
    assert mode == "realtime" and len(samples) == len(rollouts)
    for s, row in zip(samples, rollouts):
        assert s.text == row["user_text"] and s.codec_ids == row["codec_ids"]
        assert s.context == {"persona": row["persona"], "history": row["history"], "user_text": row["user_text"]}
        assert {k: s.meta[k] for k in ("id", "reply_text", "completion_ids", "user_audio")} == \
            {k: row[k] for k in ("id", "reply_text", "completion_ids", "user_audio")}

    # rollouts saved before rollout rows held `reply_text`, `completion_ids` and `user_audio`: the
    # reply's text is the engine's decoding (codec tokens are special tokens, so it is the text part);
    # the rest stays missing, for the export's readers to name
    old = tmp_path / "old-run"
    (old / "rollouts").mkdir(parents=True)
    (old / "recipe.yaml").write_text((run / "recipe.yaml").read_text())
    new_fields = ("reply_text", "completion_ids", "user_audio")
    stripped = [{k: v for k, v in r.items() if k not in new_fields} for r in rollouts]
    (old / "rollouts" / "step-00001.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stripped))
    samples, _ = tasks.read_samples(old)
    assert [s.meta["reply_text"] for s in samples] == [r["reply_text"] for r in rollouts]
    assert all(s.meta["user_audio"] is None and s.meta["completion_ids"] is None for s in samples)

    # across checkpoints a turn is its id: the same user words come in several personas' dialogues
    (old / "rollouts" / "step-00002.jsonl").write_text((old / "rollouts" / "step-00001.jsonl").read_text())
    samples, _ = tasks.read_samples(old)
    across = tasks.choose_pairs(samples, "checkpoints")
    assert sorted(a.meta["id"] for a, _ in across) == sorted({r["id"] for r in rollouts})
    assert all((a.source, b.source, a.meta["id"], a.context) == ("step-1", "step-2", b.meta["id"], b.context)
               for a, b in across)
    (old / "rollouts" / "step-00002.jsonl").unlink()

    del stripped[2]["persona"]
    (old / "rollouts" / "step-00001.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stripped))
    with pytest.raises(tasks.TaskSourceError, match=r"step-00001.jsonl:3: field 'persona' is missing"):
        tasks.read_samples(old)


def test_export_rows_hold_the_voted_reply_pairs_as_the_realtime_readers_take_them(exported, rollouts):
    out, stats = exported
    assert stats["exported_pairs"] == 4 and stats["pair_outcomes"] == {"kept": 4}  # the two agreed on each
    sampled = {(r["id"], tuple(r["completion_ids"])): r for r in rollouts}
    for row in export_rows(out):
        assert row["mode"] == "realtime" and Path(out, row["chosen"]["audio"]).is_file()  # the TTS format's clips
        pair = row["realtime"]
        chosen, rejected = (sampled[pair["id"], tuple(pair[k]["completion_ids"])] for k in ("chosen", "rejected"))
        assert preference(chosen) > preference(rejected)  # the side both annotators voted for
        assert row["text"] == pair["user_text"] == chosen["user_text"]
        assert {k: pair[k] for k in ("persona", "history", "user_audio")} == \
            {k: chosen[k] for k in ("persona", "history", "user_audio")}
        for side, rollout in ((pair["chosen"], chosen), (pair["rejected"], rejected)):
            assert (side["text"], side["codec_ids"], side["reward"]) == \
                (rollout["reply_text"], rollout["codec_ids"], rollout["reward"])


def with_bad_row(out: Path, tmp_path: Path, missing: str) -> Path:
    """A copy of the export's pairs.jsonl, and after its rows a copy of the first whose `realtime`
    lacks `missing` (as in an export of rollouts saved without it)."""
    rows = export_rows(out)
    bad = {**rows[0], "realtime": {**rows[0]["realtime"], missing: None}}
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [*rows, bad]))
    return path


def test_the_reward_model_reads_the_export_and_names_a_row_without_the_users_words(exported, task, base, tmp_path,
                                                                                   caplog):
    from speechrl.data.preferences import PreferenceError
    from speechrl.rewards.learned import dialogue_sequence
    from speechrl.rlhf.modes import get_mode
    from speechrl.rollouts.codec import CodecTokens

    out, _ = exported
    mode = get_mode(load_recipe("realtime/reward_model", base))
    path = with_bad_row(out, tmp_path, "user_text")
    with caplog.at_level(logging.WARNING):
        data = mode.reward_model_pairs(str(path), task.processor, task.codec)
    rows = export_rows(out)
    assert data.read == len(rows) + 1 and len(data.pairs) == len(rows) and data.split_by == "persona"
    assert f"pairs.jsonl:{len(rows) + 1}" in data.bad[0] and "user_text" in data.bad[0]
    assert any(f"pairs.jsonl:{len(rows) + 1}" in r.getMessage() for r in caplog.records)
    tokens, pair = CodecTokens(task.processor.tokenizer, task.codec), rows[0]["realtime"]
    side = lambda s: dialogue_sequence(task.processor, tokens, pair["persona"], pair["history"],  # noqa: E731
                                       pair["user_text"], s["text"], s["codec_ids"])
    assert data.pairs[0] == (pair["persona"].strip(), side(pair["chosen"]), side(pair["rejected"]))

    strict = get_mode(load_recipe("realtime/reward_model", [*base, "data.on_bad_example=fail"]))
    with pytest.raises(PreferenceError, match=rf"pairs.jsonl:{len(rows) + 1}.*user_text"):
        strict.reward_model_pairs(str(path), task.processor, task.codec)
    older = tmp_path / "older.jsonl"  # a realtime export's row without the pair: what exports wrote before
    older.write_text(json.dumps({k: v for k, v in rows[0].items() if k != "realtime"}) + "\n")
    with pytest.raises(PreferenceError, match=r"older.jsonl:1: .*export the batch again"):
        strict.reward_model_pairs(str(older), task.processor, task.codec)


def test_offline_dpo_trains_on_the_sampled_replies_and_names_a_row_without_user_audio(exported, task, base, tmp_path):
    from speechrl.rlhf.modes import get_mode

    out, _ = exported
    offline = get_mode(load_recipe("realtime/dpo", base))
    offline.task = task
    read, summary = offline.preference_rows(str(with_bad_row(out, tmp_path, "user_audio")))
    rows = export_rows(out)
    assert len(read) == len(rows) and summary["read"] == len(rows) + 1
    for got, row in zip(read, rows):
        assert got.chosen_ids == row["realtime"]["chosen"]["completion_ids"]
        assert got.rejected_ids == row["realtime"]["rejected"]["completion_ids"]
        assert got.audio is not None and len(got.prompt_ids) > 0
    # rollouts saved before rows held the user's audio file: DPO's prompt cannot be rebuilt, and says so
    assert f"pairs.jsonl:{len(rows) + 1}" in summary["bad"][0] and "user_audio" in summary["bad"][0]
