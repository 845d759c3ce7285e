"""The learned preference reward for realtime replies: the `realtime/reward_model` recipe trained on
pair files the realtime mode's own `save_pairs` wrote, personas held out whole, its meta, and the
registered model scoring replies in their dialogue through the online loop's reward batch. A bad
row is skipped, named by file and line; ASR refuses `algorithm: reward_model`, saying why.

Pairs: for each turn of the small builtin setup (4 personas), chosen = the reference reply (its text
and the codec ids of its espeak-ng reading), rejected = an out-of-character text over the same
audio with about half the frames replaced by random units.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from speechrl.rlhf.core.config import RecipeError, load_recipe
from speechrl.rollouts.types import Sample

OUT_OF_CHARACTER = ("As an AI language model, I have no name.", "I cannot say, I am only a computer program.")


@pytest.fixture(scope="module")
def rm_base(realtime_overrides, tmp_path_factory):
    torch.set_num_threads(1)  # the machine's cores are shared
    return [*realtime_overrides, f"run.output_dir={tmp_path_factory.mktemp('rt-rm-runs')}"]


@pytest.fixture(scope="module")
def turns(rm_base, tmp_path_factory):
    """(mode with its task, the reply pairs as (chosen, rejected) samples of every turn, pairs folder):
    the training turns' pairs as round 1, the drift turns' as round 2, then a row without `user_text`
    appended to round 2 (a bad line)."""
    from speechrl.rlhf.model.backbone import load_processor
    from speechrl.rlhf.modes import get_mode
    from speechrl.rlhf.modes.realtime_data import realtime_datasets

    cfg = load_recipe("realtime/reward_model", rm_base)
    mode = get_mode(cfg)
    task = mode.setup_task(load_processor(mode.backbone_path()))
    rng = np.random.default_rng(0)
    out = tmp_path_factory.mktemp("rt-pairs")
    samples = []
    for round_, dataset in enumerate(realtime_datasets(cfg, max_audio_seconds=4.0), 1):
        pairs = []
        for k in range(len(dataset)):
            ex, clip = dataset[k]
            _, reference, _ = task.sft_example(ex, clip)
            codec_ids = np.array(task.parse(reference).codec_ids)
            glitch = rng.random(len(codec_ids)) < 0.5
            codec_ids[glitch] = rng.integers(0, task.codec.codebook_size, int(glitch.sum()))
            worse = task.reply_ids(OUT_OF_CHARACTER[k % 2], codec_ids.tolist())
            meta = {"id": ex.id, "persona": ex.persona, "history": list(ex.history), "user_text": ex.user_text}
            pairs.append(tuple(Sample(k, j, [], ids, [], task.parse(ids).text, "stop", dict(meta))
                               for j, ids in enumerate((reference, worse))))
        flat = [s for pair in pairs for s in pair]
        mode.save_pairs(out / f"round-{round_:05d}.jsonl", round_, flat, np.tile([0.9, 0.1], len(pairs)),
                        [(2 * i, 2 * i + 1) for i in range(len(pairs))])
        samples += pairs
    last = out / "round-00002.jsonl"
    row = json.loads(last.read_text().splitlines()[0])
    del row["user_text"]  # as a hand-made row without the user's words would be
    last.write_text(last.read_text() + json.dumps(row) + "\n")
    return mode, samples, out


@pytest.fixture(scope="module")
def trained(rm_base, turns, caplog_module):
    """One 20-step run on the pairs folder, registered as `rt_pref`: (summary, recipe config, warnings)."""
    from speechrl.rlhf.trainers.reward_model import run_reward_model

    cfg = load_recipe("realtime/reward_model", [
        *rm_base, f"reward_model.data={turns[2]}", "reward_model.eval_fraction=0.25", "reward_model.register_as=rt_pref",
        "run.name=rt-rm", "train.steps=20", "train.batch_size=8", "train.lr=1e-3", "train.warmup_steps=3",
        "train.eval_every=10", "train.log_every=5", "train.checkpoint_every=20"])
    return run_reward_model(cfg), cfg, caplog_module


@pytest.fixture(scope="module")
def caplog_module():
    """The module's warnings (pytest's caplog is per test; the run is per module)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logging.getLogger().addHandler(handler)
    yield records
    logging.getLogger().removeHandler(handler)


def test_personas_are_held_out_whole_and_the_bad_row_is_named(trained, turns):
    from speechrl.rlhf.trainers.reward_model import split_by_group

    summary, cfg, warnings = trained
    mode, samples, pairs_dir = turns
    data = mode.reward_model_pairs(str(pairs_dir), mode.task.processor, mode.task.codec)
    assert data.split_by == "persona" and data.read == len(samples) + 1 and len(data.pairs) == len(samples)
    train, held = split_by_group(data.pairs, cfg.reward_model.eval_fraction, cfg.seed)
    personas = {s[0].metadata["persona"].strip() for s in samples}
    assert len(personas) == 4 and {p.group for p in held} < personas  # 0.25 of 4 cards: one, all its pairs
    assert len({p.group for p in held}) == 1 and not {p.group for p in held} & {p.group for p in train}
    assert summary["preference pairs (train/held-out/bad)"] == f"{len(train)}/{len(held)}/1"
    assert summary["held-out personas"] == 1
    bad_line = f"round-00002.jsonl:{len(pairs_dir.joinpath('round-00002.jsonl').read_text().splitlines())}"
    named = [r.getMessage() for r in warnings if bad_line in r.getMessage()]
    assert named and "user_text" in named[0], [r.getMessage() for r in warnings]


def test_recipe_learns_held_out_personas_from_a_zero_head_and_records_its_mode(trained):
    import math

    summary, cfg, _ = trained
    run = Path(summary["run"])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [0, 10, 20]
    assert evals[0]["eval/accuracy"] == 0.5 and evals[0]["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert summary["held-out accuracy after"] >= 0.8
    meta = json.loads((run / "final" / "reward_model.json").read_text())
    assert (meta["mode"], meta["split_by"], meta["heldout_groups"]) == ("realtime", "persona", 1)
    assert "<persona card>" in meta["prompt"] and meta["prompt"].endswith("<reply text><codec tokens><|codec_end|>")
    assert meta["heldout_accuracy"] == summary["held-out accuracy after"]
    pointer = json.loads((Path(cfg.run.cache_dir) / "reward_models" / "rt_pref.json").read_text())
    assert pointer["path"] == str((run / "final").resolve())


def test_a_realtime_recipe_scores_replies_in_their_dialogue_with_the_registered_name(trained, turns, rm_base,
                                                                                    monkeypatch):
    """The reward batch the online loop makes of realtime samples (the mode's columns and the turns'
    metadata), scored by `rewards: [{name: rt_pref}]`: the held-out persona's pairs rank as the
    recipe measured, so the reward reads the sequences the model was trained on."""
    from speechrl.rewards.worker import RewardWorker
    from speechrl.rlhf.trainers.online import OnlineRecipe
    from speechrl.rlhf.trainers.reward_model import split_by_group
    from speechrl.rollouts.codec import CodecSpec

    summary, cfg, _ = trained
    mode, samples, _ = turns
    monkeypatch.setenv("SPEECHRL_CACHE_DIR", cfg.run.cache_dir)
    grpo = load_recipe("realtime/grpo", [*rm_base, "rewards=[{name: rt_pref, weight: 1.0}]",
                                         "realtime.drift_judge=rt_pref", "realtime.drift_check=null"])
    persona = lambda pair: pair[0].metadata["persona"].strip()  # noqa: E731
    _, held = split_by_group(samples, cfg.reward_model.eval_fraction, cfg.seed, persona)
    recipe = OnlineRecipe(grpo)
    recipe.task = recipe.mode.task = mode.task
    recipe.score_batch = RewardWorker(grpo.rewards, CodecSpec.from_recipe(grpo)).score  # the codec checked too
    result = recipe.score([c for c, _ in held] + [r for _, r in held], None)
    scores = result.rewards["rt_pref"]
    assert result.valid.all()
    chosen, rejected = scores[:len(held)], scores[len(held):]
    assert np.mean(chosen > rejected) == pytest.approx(summary["held-out accuracy after"])


def test_the_reward_says_what_it_cannot_score(trained, turns, monkeypatch):
    from speechrl.rewards.api import Unscored
    from speechrl.rewards.registry import resolve_reward

    summary, cfg, _ = trained
    _, samples, _ = turns
    monkeypatch.setenv("SPEECHRL_CACHE_DIR", cfg.run.cache_dir)
    reward = resolve_reward("rt_pref")
    meta = samples[0][0].metadata
    batch = {"persona": [meta["persona"]] * 3, "history": [meta["history"]] * 3,
             "user_text": [meta["user_text"], None, meta["user_text"]], "reply_text": ["Hi.", "Hi.", None],
             "codec_ids": [[1, 2, 3], [1, 2], []], "mode": "realtime"}
    out = reward(completions=[""] * 3, **batch)["reward"]
    assert isinstance(out[0], float) and isinstance(out[2], float)  # a silent, textless reply is still a reply
    assert isinstance(out[1], Unscored) and out[1].reason == "no user turn in 'user_text'"
    assert isinstance(reward(completions=[""], **{**batch, "codec_ids": [[999]] * 3})["reward"][0], Unscored)
    with pytest.raises(ValueError, match="realtime reward model; it cannot score tts replies"):
        reward(completions=[""], **{**batch, "mode": "tts"})
    with pytest.raises(KeyError, match="no column 'persona'"):
        reward(completions=[""], codec_ids=[[1]], reply_text=["Hi."], user_text=["hello"])
    by_path = resolve_reward("learned_preference", model=str(Path(summary["run"]) / "final"))
    assert by_path(completions=[""], **batch)["reward"][0] == pytest.approx(out[0], abs=1e-5)


def test_asr_refuses_a_reward_model_saying_why():
    with pytest.raises(RecipeError, match="ASR's reward is verifiable") as e:
        load_recipe("asr/sft", ["algorithm=reward_model"])
    assert "asr/online_dpo" in str(e.value) and "asr/dpo" in str(e.value)
