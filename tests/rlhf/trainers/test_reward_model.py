"""The learned preference reward for TTS: pairwise metrics by hand, TRL's training loss as the
Bradley–Terry formula on our scores, the held-out split, the `reward_model` recipe learning held-out
pairs from a zero head (and resuming), and the trained model as a reward, by registered name and by
path, with its codec checked. Wrong names, paths and recipes fail saying what to do.

Pairs: chosen = the real codec ids of an espeak-ng reading of the text; rejected = the same ids with
about half the frames replaced by random units, a glitchy rendering of the same length.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from speechrl.rlhf.core.config import RecipeError, load_recipe

NUM_TEXTS = 80


@pytest.fixture(scope="module")
def rm_base(tiny_overrides, tmp_path_factory):
    torch.set_num_threads(1)
    runs = tmp_path_factory.mktemp("rm-runs")
    return [*tiny_overrides, f"run.output_dir={runs}", "train.torch_threads=1"]


@pytest.fixture(scope="module")
def pairs_file(rm_base, tmp_path_factory) -> Path:
    """NUM_TEXTS pairs of distinct texts (the first two with the chosen side as an audio file, so the
    recipe's encoding runs too), and one bad row (an id outside the 64-unit codec)."""
    from speechrl.data.audio import write_wav
    from speechrl.data.synth import command_sentences, synthesize
    from speechrl.rollouts.codec import CodecSpec

    codec = CodecSpec.from_recipe(load_recipe("tts/reward_model", rm_base)).build()
    out = tmp_path_factory.mktemp("pairs")
    rng = np.random.default_rng(0)
    rows = []
    for i, text in enumerate(list(dict.fromkeys(command_sentences(400, seed=3)))[:NUM_TEXTS]):
        clip = synthesize(text, "en-us", 175, 50, 16000)
        chosen = codec.encode(clip, 16000)
        rejected = chosen.copy()
        glitch = rng.random(len(chosen)) < 0.5
        rejected[glitch] = rng.integers(0, 64, int(glitch.sum()))
        side = {"codec_ids": chosen.tolist()}
        if i < 2:
            write_wav(out / f"{i}.wav", clip, 16000)
            side = f"{i}.wav"
        rows.append({"id": f"p{i}", "text": text, "chosen": side, "rejected": {"codec_ids": rejected.tolist()}})
    rows.append({"id": "bad", "text": "stop", "chosen": {"codec_ids": [1, 2]}, "rejected": {"codec_ids": [999]}})
    (out / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out / "pairs.jsonl"


def _recipe(rm_base, pairs_file, *extra):
    return load_recipe("tts/reward_model", [
        *rm_base, f"reward_model.data={pairs_file}", "reward_model.eval_fraction=0.25", "train.batch_size=8",
        "train.lr=1e-3", "train.warmup_steps=3", "train.eval_every=20", "train.log_every=10",
        "train.checkpoint_every=20", *extra])


@pytest.fixture(scope="module")
def trained(rm_base, pairs_file):
    """One 40-step run, registered as `glitch_pref`: (summary, recipe config)."""
    from speechrl.rlhf.trainers.reward_model import run_reward_model

    cfg = _recipe(rm_base, pairs_file, "run.name=rm", "train.steps=40", "reward_model.register_as=glitch_pref")
    return run_reward_model(cfg), cfg


def held_out_batch(cfg, pairs_file):
    """The run's held-out pairs as one reward batch: the chosen sides, then the rejected ones."""
    from speechrl.data.preferences import encode_pairs, read_preferences
    from speechrl.rlhf.trainers.reward_model import split_by_text
    from speechrl.rollouts.codec import CodecSpec

    pairs = encode_pairs(read_preferences(pairs_file), CodecSpec.from_recipe(cfg).build())
    _, held = split_by_text(pairs, cfg.reward_model.eval_fraction, cfg.seed)
    ids = [p.chosen.tolist() for p in held] + [p.rejected.tolist() for p in held]
    texts = [p.pair.text for p in held] * 2
    return {"completions": [""] * len(ids), "mode": "tts", "codec_ids": ids, "text": texts}, len(held)


# --- the pieces ------------------------------------------------------------------------------------

def test_pairwise_metrics_by_hand():
    from speechrl.rlhf.trainers.reward_model import pairwise_metrics

    # margins 1, -1, 0: one right, one wrong, one tie (counts half)
    m = pairwise_metrics(torch.tensor([2.0, 0.0, 1.0]), torch.tensor([1.0, 1.0, 1.0]))
    log_sigmoid = lambda x: -math.log1p(math.exp(-x))  # noqa: E731
    assert m["accuracy"] == pytest.approx(0.5) and m["margin"] == pytest.approx(0.0)
    assert m["loss"] == pytest.approx(-(log_sigmoid(1) + log_sigmoid(-1) + log_sigmoid(0)) / 3)  # 0.7732
    assert m["loss"] == pytest.approx(0.77322, abs=1e-5)


def test_split_holds_out_whole_texts_by_seed():
    from types import SimpleNamespace

    from speechrl.rlhf.trainers.reward_model import split_by_text

    pairs = [SimpleNamespace(pair=SimpleNamespace(text=t)) for t in "aabbccddeeffgghhiijj"]  # 10 texts, 2 pairs each
    train, held = split_by_text(pairs, 0.3, seed=0)
    held_texts = {p.pair.text for p in held}
    assert len(held) == 6 and len(held_texts) == 3 and not held_texts & {p.pair.text for p in train}
    assert split_by_text(pairs, 0.3, seed=0)[1] == held  # deterministic
    assert split_by_text(pairs, 0.01, seed=0)[1] and split_by_text(pairs, 0.99, seed=0)[0]  # never an empty side
    with pytest.raises(ValueError, match="at least 2 texts"):
        split_by_text(pairs[:2], 0.5, seed=0)


def test_trl_reward_trainer_loss_is_bradley_terry_on_our_scores(rm_base, tmp_path):
    """TRL's loss on its collated batch equals -log σ(r_c - r_r) + c·mean((r_c + r_r)^2) of the scores
    `score_sequences` (the reward at inference) gives the same sequences: one model, two paths."""
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer
    from trl.trainer.reward_trainer import DataCollatorForPreference

    from speechrl.rewards.learned import score_sequences
    from speechrl.rlhf.modes import assets
    from speechrl.rlhf.trainers.reward_model import build_reward_model

    model, processor = build_reward_model(assets.backbone_path(load_recipe("tts/reward_model", rm_base)))
    assert not model.score.weight.any()  # the head starts at zero: no preference
    torch.manual_seed(0)
    torch.nn.init.normal_(model.score.weight, std=0.1)
    ids = processor.tokenizer("Say: go up", add_special_tokens=False)["input_ids"]
    rows = [{"chosen_ids": ids + [5, 6, 7], "rejected_ids": ids + [8]},
            {"chosen_ids": ids + [9], "rejected_ids": ids + [10, 11, 12, 13]}]
    args = RewardConfig(output_dir=str(tmp_path), report_to="none", bf16=False, center_rewards_coefficient=0.1)
    trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                            processing_class=processor.tokenizer)
    pad = processor.tokenizer.pad_token_id
    loss = trainer.compute_loss(trainer.model, DataCollatorForPreference(pad_token_id=pad)(rows))
    scores = score_sequences(model, [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows], pad)
    chosen, rejected = scores[:2], scores[2:]
    expected = -torch.nn.functional.logsigmoid(chosen - rejected).mean() + 0.1 * ((chosen + rejected) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5) and (chosen != rejected).all()


# --- the recipe ------------------------------------------------------------------------------------

def test_recipe_learns_held_out_pairs_from_a_zero_head_and_registers_them(trained):
    summary, cfg = trained
    run = Path(summary["run"])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [0, 20, 40]
    # a zero head: every held-out pair tied, the loss log 2
    assert evals[0]["eval/accuracy"] == 0.5 and evals[0]["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert summary["held-out accuracy at init"] == 0.5 and summary["held-out accuracy after"] >= 0.8
    assert summary["preference pairs (train/held-out/bad)"] == f"{NUM_TEXTS - 20}/20/1"
    assert any("train/loss" in r and "train/accuracy" in r and "lr" in r for r in rows)
    meta = json.loads((run / "final" / "reward_model.json").read_text())
    assert meta["heldout_accuracy"] == summary["held-out accuracy after"] and meta["mode"] == "tts"
    assert meta["codec"] == {"embedded": {"hop_length": 320, "num_codebooks": 1, "codebook_size": 64, "n_cepstra": 24}}
    pointer = json.loads((Path(cfg.run.cache_dir) / "reward_models" / "glitch_pref.json").read_text())
    assert pointer["path"] == str((run / "final").resolve())
    assert (run / "checkpoints" / "checkpoint-40" / "trainer_state.json").is_file() and (run / "curves.png").is_file()


def test_a_registered_name_is_a_reward_that_scores_as_the_recipe_measured(trained, pairs_file, monkeypatch):
    from speechrl.rewards.registry import resolve_reward

    summary, cfg = trained
    monkeypatch.setenv("SPEECHRL_CACHE_DIR", cfg.run.cache_dir)
    batch, n = held_out_batch(cfg, pairs_file)
    by_name = np.array(resolve_reward("glitch_pref", batch_size=16)(**batch)["reward"])
    by_path = resolve_reward("learned_preference", model=str(Path(summary["run"]) / "final"))(**batch)["reward"]
    assert np.allclose(by_name, by_path, atol=1e-5)
    chosen, rejected = by_name[:n], by_name[n:]
    assert chosen.mean() > rejected.mean()
    # the same sequences the recipe evaluated: the same accuracy
    assert np.mean(chosen > rejected) == pytest.approx(summary["held-out accuracy after"])


def test_reward_worker_checks_the_codec_and_marks_unscorable_samples(trained, monkeypatch):
    from dataclasses import replace

    from speechrl.rewards.api import Unscored
    from speechrl.rewards.worker import RewardWorker
    from speechrl.rollouts.codec import CodecSpec

    _, cfg = trained
    monkeypatch.setenv("SPEECHRL_CACHE_DIR", cfg.run.cache_dir)
    spec = CodecSpec.from_recipe(cfg)
    worker = RewardWorker([{"name": "glitch_pref", "normalize": False}], spec)
    reward = worker.rewards["glitch_pref"]
    out = reward(completions=["", "", ""], text=["go up", "go up", None],
                 codec_ids=[[3, 4, 5], [], [3, 4]], reference_codec_ids=[[7, 8], None, None])
    assert isinstance(out["reward"][0], float)
    assert [o.reason for o in out["reward"][1:]] == ["the completion has no audio tokens", "no text in 'text'"]
    assert isinstance(reward(completions=[""], text=["go"], codec_ids=[[1, 99]])["reward"][0], Unscored)
    with pytest.raises(KeyError, match="no column 'codec_ids'"):
        reward(completions=[""], text=["go up"])

    other = replace(spec, embedded=tuple((k, 128 if k == "codebook_size" else v) for k, v in spec.embedded))
    with pytest.raises(ValueError, match="trained on ids of the codec"):
        RewardWorker([{"name": "glitch_pref"}], other)
    RewardWorker([{"name": "glitch_pref", "kwargs": {"match_codec": False}}], other)
    decode_only = replace(spec, embedded=tuple((k, 3 if k == "griffin_lim_iters" else v) for k, v in spec.embedded))
    RewardWorker([{"name": "glitch_pref"}], decode_only)  # decoding settings do not change the ids


def test_resume_continues_the_trainers_checkpoint(trained, rm_base, pairs_file, capsys):
    from speechrl.rlhf.trainers.reward_model import run_reward_model

    summary, _ = trained
    cfg = _recipe(rm_base, pairs_file, "run.name=rm", "train.steps=50")
    run_reward_model(cfg, resume=summary["run"])
    assert "from checkpoint-40 (step 40)" in capsys.readouterr().out
    rows = [json.loads(line) for line in (Path(summary["run"]) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval/accuracy" in r] == [0, 20, 40, 50]
    assert (Path(summary["run"]) / "checkpoints" / "checkpoint-50").is_dir()


# --- what goes wrong -------------------------------------------------------------------------------

def test_bad_recipes_names_and_paths_say_what_to_do(rm_base, pairs_file, tmp_path, monkeypatch):
    from speechrl.rewards.learned import register_model
    from speechrl.rewards.registry import find_reward, resolve_reward
    from speechrl.rlhf.trainers.reward_model import run_reward_model

    with pytest.raises(RecipeError, match="needs `reward_model.data`"):
        run_reward_model(load_recipe("tts/reward_model", rm_base))
    with pytest.raises(RecipeError, match="register_as.*letters, digits"):
        _recipe(rm_base, pairs_file, "reward_model.register_as=my.pref")
    with pytest.raises(RecipeError, match="built-in reward"):
        run_reward_model(_recipe(rm_base, pairs_file, "reward_model.register_as=asr_wer"))
    with pytest.raises(RecipeError, match="no file or folder matches"):
        _recipe(rm_base, tmp_path / "rounds" / "*.jsonl")
    with pytest.raises(RecipeError, match="not implemented for mode .asr."):
        load_recipe("asr/sft", ["algorithm=reward_model"])

    monkeypatch.setenv("SPEECHRL_CACHE_DIR", str(tmp_path))
    with pytest.raises(KeyError, match="no reward model is registered as 'my_pref'"):
        find_reward("my_pref")
    with pytest.raises(FileNotFoundError, match="reward_model.register_as=my_pref"):
        resolve_reward("learned_preference", model="my_pref")
    with pytest.raises(FileNotFoundError, match="no reward_model.json in"):
        resolve_reward("learned_preference", model=str(tmp_path))
    register_model("gone", tmp_path / "deleted" / "final", tmp_path, {})
    with pytest.raises(FileNotFoundError, match="no longer a reward-model directory"):
        resolve_reward("gone")
