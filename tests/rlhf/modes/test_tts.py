"""The TTS mode on a tiny backbone: prompts and targets, text-only batches, SFT with samples written,
offline DPO (loss at the start, learning a pair, the recipe), and the online-DPO pair rule.

GRPO and online DPO through Ray + vLLM are in tests/e2e/test_tts_e2e.py.
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from speechrl.rlhf.core.config import load_recipe
from speechrl.rlhf.modes import get_mode

@pytest.fixture(scope="module")
def tts_base(tts_overrides, tmp_path_factory):
    return [*tts_overrides, f"run.output_dir={tmp_path_factory.mktemp('tts-runs')}"]


@pytest.fixture(scope="module")
def task(tts_base):
    from speechrl.rlhf.modes import assets
    from speechrl.rlhf.model.backbone import load_processor
    from speechrl.rlhf.modes.tts import TtsTask

    cfg = load_recipe("tts/sft", tts_base)
    return TtsTask(cfg, load_processor(assets.backbone_path(cfg)))


@pytest.fixture(scope="module")
def clip():
    from speechrl.data.synth import synthesize

    return synthesize("move left three steps", "en-us", 175, 50, 16000)


def test_tts_task_prompts_targets_and_constraint(task, clip):
    tok, end = task.tokenizer, task.tokens.end_id
    codec_block = set(task.tokens.token_ids.tolist())
    assert set(task.allowed_ids) == codec_block | {end} and len(codec_block) == 64

    prompt = task.prompt_ids("go up two steps")
    assert not codec_block & set(prompt) and "Say: go up two steps" in tok.decode(prompt)

    ex = type("Ex", (), {"id": "x", "text": "move left three steps"})()
    target = task.target(ex, clip)
    assert target[-1] == end and end not in target[:-1] and set(target[:-1]) <= codec_block
    assert task.codec_ids(target) == task.codec.encode(clip, 16000).tolist()

    voice = task.encode(clip, 16000, max_seconds=0.5)
    assert len(voice) == pytest.approx(0.5 * task.codec.frame_rate, abs=2)
    with_voice = task.prompt_ids("go up", voice)
    start = with_voice.index(voice[0])
    assert with_voice[start:start + len(voice) + 1] == voice + [end]  # the voice prompt, closed by the end token
    assert "Say: go up" in tok.decode(with_voice[start + len(voice):])


def test_text_only_batch_shares_prompts_with_the_same_logprobs_and_gradients(task, tts_base):
    """Through the KV cache, in full, and packed (gradient checkpointing): the same numbers."""
    from speechrl.rlhf.modes import assets
    from speechrl.rlhf.model.backbone import load_backbone
    from speechrl.rlhf.model.logprobs import build_token_batch, token_logprobs, vocab_mask

    model = load_backbone(assets.backbone_path(load_recipe("tts/sft", tts_base))).model.train()
    prompts = [task.prompt_ids("go up"), task.prompt_ids("go up"), task.prompt_ids("turn left two degrees")]
    rng = np.random.default_rng(0)
    completions = [task.tokens.token_ids[rng.integers(0, 64, k)].tolist() + [task.tokens.end_id] for k in (5, 9, 3)]
    grouped = build_token_batch(task.processor, prompts, completions, [None] * 3, task.tokenizer.pad_token_id)
    assert grouped.input_features is None and grouped.audio_index.tolist() == [0, 0, 1]
    plain = copy.copy(grouped)
    plain.audio_index = None
    allowed = vocab_mask(task.allowed_ids, model.get_output_embeddings().weight.shape[0])

    logps, grads = [], []
    for batch, checkpointing in ((grouped, False), (plain, False), (grouped, True)):  # last: packed (packing.py)
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.zero_grad()
        logp = token_logprobs(model, batch, 1.0, allowed)
        (logp * batch.completion_mask).sum().backward()
        logps.append(logp.detach())
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    mask = grouped.completion_mask
    for other in (1, 2):
        assert torch.allclose(logps[0][mask], logps[other][mask], atol=1e-5)
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads[0], grads[other]))
    assert bool((logps[0][mask] < 0).all())


def test_tts_sft_lowers_the_loss_and_writes_samples_at_every_evaluation(tts_base):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from speechrl.rlhf.trainers.sft import run_sft

    cfg = load_recipe("tts/sft", [*tts_base, "run.name=sft", "train.steps=30", "train.eval_every=15",
                                  "train.checkpoint_every=30", "train.lr=3e-3"])
    summary = run_sft(cfg)
    run = Path(summary["run"])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5
    for step in (0, 15, 30):
        wavs = sorted((run / "samples" / f"step-{step}").glob("*.wav"))
        assert len(wavs) == 2 and all(w.stat().st_size > 44 for w in wavs)
    assert len(list((run / "samples" / "reference").glob("*.codec.wav"))) == 2
    evals = [r for r in rows if "eval/speech_sanity/reward" in r]
    assert [r["step"] for r in evals] == [0, 15, 30] and all(0 <= r["eval/ended"] <= 1 for r in evals)
    assert sorted(get_mode(cfg).example_scores(run)) == [0, 15, 30]  # each evaluation's per-completion scores
    # the held-out recordings themselves are scored once: clean, and through the codec
    references = [r for r in rows if any(k.startswith("eval_reference/") for k in r)]
    assert [r["step"] for r in references] == [0]
    for name in ("clean", "codec"):
        assert math.isfinite(references[0][f"eval_reference/{name}/speech_sanity/reward"])
    # the recordings are sane speech; the untrained policy's 24 codec tokens are not
    assert references[0]["eval_reference/clean/speech_sanity/reward"] > evals[0]["eval/speech_sanity/reward"]
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"audio": 0}).Reload()
    audio_tags = events.Tags()["audio"]
    assert len(audio_tags) == 2 and len(events.Audio(audio_tags[0])) == 3  # steps 0, 15, 30
    assert "held-out sanity penalty after" in summary


# --- DPO -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dpo_setup(task, tts_base):
    from speechrl.rlhf.modes import assets
    from speechrl.rlhf.model.backbone import load_backbone
    from speechrl.rlhf.core.config import DPOConfig
    from speechrl.rlhf.model.logprobs import vocab_mask

    model = load_backbone(assets.backbone_path(load_recipe("tts/sft", tts_base))).model
    allowed = vocab_mask(task.allowed_ids, model.get_output_embeddings().weight.shape[0])
    ids = task.tokens.token_ids
    prompts = [task.prompt_ids("go up"), task.prompt_ids("stop and turn left")]
    chosen = [ids[[1, 2, 3, 4]].tolist() + [task.tokens.end_id], ids[[5, 6]].tolist() + [task.tokens.end_id]]
    rejected = [ids[[9, 9, 9]].tolist() + [task.tokens.end_id], ids[[7, 8, 7, 8, 7]].tolist() + [task.tokens.end_id]]
    return model, allowed, prompts, chosen, rejected, DPOConfig


@pytest.mark.parametrize("loss, at_start", [("sigmoid", math.log(2)), ("ipo", (1 / (2 * 0.1)) ** 2)])
def test_dpo_loss_starts_where_the_formulas_say_and_learns_the_pairs(dpo_setup, task, loss, at_start):
    from speechrl.rlhf.trainers.dpo import preference_batch, preference_loss

    model, allowed, prompts, chosen, rejected, DPOConfig = dpo_setup
    policy, reference = copy.deepcopy(model).train(), copy.deepcopy(model).eval()
    cfg = DPOConfig(loss=loss, beta=0.1)
    batch = preference_batch(task.processor, prompts, chosen, rejected, task.tokenizer.pad_token_id)
    first, metrics = preference_loss(policy, reference, batch, 2, cfg, allowed)
    # policy == reference: zero margin, so sigmoid gives log 2 and IPO (0 - 1/(2 beta))^2
    assert first.item() == pytest.approx(at_start, rel=1e-5) and metrics["reward_margin"] == pytest.approx(0, abs=1e-5)
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-3)
    for _ in range(15):
        optimizer.zero_grad()
        loss_value, metrics = preference_loss(policy, reference, batch, 2, cfg, allowed)
        loss_value.backward()
        optimizer.step()
    assert loss_value.item() < first.item() and metrics["reward_accuracy"] == 1.0 and metrics["reward_margin"] > 0


def test_sft_weight_adds_the_chosen_nll(dpo_setup, task):
    from speechrl.rlhf.trainers.dpo import preference_batch, preference_loss

    model, allowed, prompts, chosen, rejected, DPOConfig = dpo_setup
    batch = preference_batch(task.processor, prompts, chosen, rejected, task.tokenizer.pad_token_id)
    plain, _ = preference_loss(model, model, batch, 2, DPOConfig(beta=0.1), allowed)
    mixed, metrics = preference_loss(model, model, batch, 2, DPOConfig(beta=0.1, sft_weight=0.5), allowed)
    assert metrics["chosen_nll"] > 0 and mixed.item() == pytest.approx(plain.item() + 0.5 * metrics["chosen_nll"], rel=1e-5)


def test_offline_dpo_recipe_trains_on_a_preference_file_and_skips_bad_rows(task, tts_base, tmp_path, clip):
    from speechrl.data.audio import write_wav
    from speechrl.rlhf.trainers.dpo import run_dpo

    write_wav(tmp_path / "good.wav", clip, 16000)
    write_wav(tmp_path / "worse.wav", np.zeros(8000, np.float32) + 0.01 * np.sin(np.arange(8000)), 16000)
    rows = [{"text": "move left three steps", "chosen": "good.wav", "rejected": {"audio": "worse.wav"},
             "annotator": "ann1", "reason": ["intelligibility"]},
            {"text": "go up", "chosen": {"codec_ids": [1, 2, 3, 4]}, "rejected": {"codec_ids": [9, 9, 9]}},
            {"text": "", "chosen": {"codec_ids": [1]}, "rejected": {"codec_ids": [2]}},  # bad: empty text
            {"text": "stop", "chosen": {"codec_ids": [1, 2]}, "rejected": {"codec_ids": [999]}}]  # bad: id > 63
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_recipe("tts/dpo", [*tts_base, "run.name=dpo", f"dpo.data={tmp_path / 'pairs.jsonl'}",
                                  "train.steps=4", "train.batch_size=2", "train.eval_every=4",
                                  "train.checkpoint_every=2", "train.lr=1e-3"])
    summary = run_dpo(cfg)
    assert summary["preference pairs"] == 2
    run = Path(summary["run"])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in rows if "train/loss" in r)
    assert first["train/loss"] == pytest.approx(math.log(2), abs=0.05)  # starts at its reference
    assert rows[-1]["train/reward_accuracy"] == 1.0 and (run / "samples" / "step-4").is_dir()
    assert (run / "checkpoints" / "step-4" / "trainer_state.pt").is_file()


def test_online_dpo_pairs_each_groups_best_with_its_worst():
    from speechrl.rlhf.algos.updates import best_worst_pairs

    total = np.array([0.1, 0.9, 0.5, 0.3, 0.3, np.nan, 0.2, 0.8, 0.0])
    valid = np.array([True, True, True, True, True, False, True, False, True])
    groups = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
    # group 0: best 1 (0.9), worst 0 (0.1); group 1: tie among the valid -> none;
    # group 2: 7 is unscored -> best 6 (0.2), worst 8 (0.0)
    assert best_worst_pairs(total, valid, groups) == [(1, 0), (6, 8)]
    assert best_worst_pairs(total, valid, groups, min_gap=0.5) == [(1, 0)]


def test_tts_recipes_validate():
    from speechrl.rlhf.core.config import RecipeError
    from speechrl.rlhf.trainers.dpo import run_dpo

    for name in ("tts/sft", "tts/grpo", "tts/dpo", "tts/online_dpo", "tts/composed_sft", "tts/composed_grpo"):
        assert load_recipe(name).mode == "tts"
    with pytest.raises(RecipeError, match="dpo.data"):
        run_dpo(load_recipe("tts/dpo"))  # fails before building anything
    with pytest.raises(RecipeError, match="not implemented for mode 'asr'"):
        load_recipe("asr/sft", ["algorithm=reward_model"])


def test_rl_prompts_from_the_corpus_source_leave_the_held_out_texts_out():
    """tts.prompt_texts=corpus: every sentence of data.synthetic.texts' source (here the composed commands,
    most of them never in the SFT corpus), less the evaluation's texts; with the grammar, the grammar's."""
    from types import SimpleNamespace

    from speechrl.data.manifest import Example
    from speechrl.data.synth import command_sentences, composed_commands
    from speechrl.rlhf.core.config import RecipeError
    from speechrl.rlhf.modes.tts import rl_prompt_pool

    composed = composed_commands(500, seed=4)
    held = SimpleNamespace(items=[(Example(id=f"h{i}", text=t), None) for i, t in enumerate(composed[:20])])
    cfg = load_recipe("tts/grpo", ["data.synthetic.texts=composed-commands", "data.synthetic.num_texts=500",
                                   "data.synthetic.seed=4", "tts.prompt_texts=corpus"])
    assert [ex.text for ex in rl_prompt_pool(cfg, held)] == composed[20:]
    grammar = rl_prompt_pool(load_recipe("tts/grpo", ["tts.prompt_texts=corpus"]), held)
    held_texts = set(composed[:20])
    assert [ex.text for ex in grammar] == [t for t in dict.fromkeys(command_sentences(5000, seed=1)) if t not in held_texts]
    with pytest.raises(RecipeError, match='neither "grammar", "corpus" nor a text file'):
        load_recipe("tts/grpo", ["tts.prompt_texts=everything"])


@pytest.mark.parametrize("recipe, overrides, message", [
    ("tts/grpo", ["tts.embedded_codec.codebook_size=2048"], "needs .* = 2048 codec tokens, but `model.tiny.num_codec_tokens` is 1024"),
    ("realtime/sft", ["tts.embedded_codec.num_codebooks=2"], "= 2048 codec tokens"),
    ("tts/dpo", ["dpo.loss=ipo", "dpo.label_smoothing=0.1"], "`dpo.label_smoothing`=0.1 has no meaning for `dpo.loss: ipo`"),
])
def test_a_recipe_that_would_stop_mid_run_stops_at_load(recipe, overrides, message):
    from speechrl.rlhf.core.config import RecipeError

    with pytest.raises(RecipeError, match=message):
        load_recipe(recipe, overrides)
    load_recipe(recipe, overrides[:-1])  # without the last override it loads


def test_voice_prompt_is_another_clip_of_the_same_speaker_and_reaches_the_reward_side(tts_base):
    from speechrl.rlhf.modes import assets
    from speechrl.rlhf.model.backbone import load_processor
    from speechrl.rlhf.modes.tts import TtsTask

    cfg = load_recipe("tts/sft", [*tts_base, "tts.voice_prompt=true", "tts.max_voice_seconds=1.0"])
    train, _ = assets.load_datasets(cfg, 4.0)
    task = TtsTask(cfg, load_processor(assets.backbone_path(cfg)))
    ex, audio = train[0]
    request = task.request(ex, audio, train)
    voice = request.metadata["reference_codec_ids"]
    assert 0 < len(voice) <= task.codec.frame_rate * 1.0 + 1
    other = next(a for e, a in train.items if e.speaker == ex.speaker and e.id != ex.id)
    assert voice == task.codec.encode(other[:16000], 16000).tolist()  # not the target clip itself
    prompt_ids, target, no_audio = task.sft_example(ex, audio, train)
    assert no_audio is None and task.tokens.to_backbone(voice) + [task.tokens.end_id] == \
        prompt_ids[prompt_ids.index(task.tokens.to_backbone(voice)[0]):][:len(voice) + 1]


def test_eval_command_scores_a_tts_checkpoint_and_writes_its_samples(tts_base, capsys):
    from speechrl.rlhf.modes import assets
    from speechrl.rlhf.cli.main import main

    backbone = assets.backbone_path(load_recipe("tts/sft", tts_base))
    assert main(["eval", str(backbone), *tts_base, "--recipe", "tts/sft"]) == 0
    printed = capsys.readouterr().out
    assert "eval/speech_sanity/reward=" in printed and "eval/ended=" in printed
    assert len(list((backbone / "eval" / "samples" / "step-0").glob("*.wav"))) == 2


def test_sampled_evaluation_repeats_each_text_with_the_same_draws_every_time(tts_base, capsys):
    """Held-out synthesis samples `tts.eval_repeats` per text, seeded, so two evaluations of one
    checkpoint agree exactly; greedy (temperature 0) makes one per text."""
    from speechrl.rlhf.modes import assets
    from speechrl.rlhf.cli.main import main

    backbone = assets.backbone_path(load_recipe("tts/sft", tts_base))

    def printed(*overrides):
        assert main(["eval", str(backbone), *tts_base, *overrides, "--recipe", "tts/sft"]) == 0
        return sorted(line for line in capsys.readouterr().out.splitlines() if line.startswith("eval/"))

    sampled = printed("tts.eval_repeats=3")
    assert sampled and sampled == printed("tts.eval_repeats=3")
    assert printed("tts.eval_temperature=0") != sampled


def test_eval_of_several_checkpoints_uses_the_same_draws_and_ends_with_a_paired_table(tts_base, capsys, tmp_path):
    import shutil

    from speechrl.rlhf.modes import assets
    from speechrl.rlhf.cli.main import main

    backbone = assets.backbone_path(load_recipe("tts/sft", tts_base))
    copy = tmp_path / "copy"
    shutil.copytree(backbone, copy, ignore=shutil.ignore_patterns("eval"))
    # a checkpoint that is not one stops the command before anything is evaluated
    assert main(["eval", str(copy), str(tmp_path / "nope"), *tts_base, "--recipe", "tts/sft"]) == 2
    assert str(tmp_path / "nope") in capsys.readouterr().err and not (copy / "eval").exists()

    assert main(["eval", str(backbone), str(copy), *tts_base, "tts.eval_repeats=2", "--recipe", "tts/sft"]) == 0
    printed = capsys.readouterr().out
    table = printed[printed.index("the same draws for every checkpoint (seed=0)"):].splitlines()
    assert "held-out sanity penalty" in table[1] and "held-out intelligibility CER" not in table[1]  # not scored
    first, second = table[2].split(), table[3].split()
    assert first[0] == "/".join(backbone.parts[-2:]) and second[0] == f"{tmp_path.name}/copy"
    assert first[1] == second[1] and second[2] == "+0.000"
    # the same weights and the same draws: every metric of the two evaluations agrees, lengths and all
    blocks = printed.split("\n== ")[1:]
    reports = [sorted(line for line in block.splitlines() if line.startswith("eval/")) for block in blocks]
    assert len(reports) == 2 and reports[0] and reports[0] == reports[1]
    assert any(line.startswith("eval/audio_seconds=") for line in reports[0])
    assert (copy / "eval" / "samples" / "step-0").is_dir()
    # every completion's scores are kept (2 repeats of each held-out text), and the paired interval of
    # identical weights is a point at zero
    rows = [json.loads(line) for line in (copy / "eval" / "samples" / "step-0" / "scores.jsonl").read_text().splitlines()]
    assert rows and [r["repeat"] for r in rows[:2]] == [0, 1] and rows[0]["id"] == rows[1]["id"]
    penalties = [r["eval/speech_sanity/reward"] for r in rows if r["eval/speech_sanity/reward"] is not None]
    printed_mean = next(float(line.split("=")[1]) for line in reports[0] if line.startswith("eval/speech_sanity/reward="))
    assert np.mean(penalties) == pytest.approx(printed_mean, abs=1e-4)  # the file holds what the mean was taken of
    intervals = printed[printed.index("95% bootstrap interval"):]
    assert f"held-out sanity penalty, {tmp_path.name}/copy: +0.000  95% interval [+0.000, +0.000] over {len(rows) // 2} texts" in intervals


def test_the_demo_prints_the_fingerprints_each_build_recorded(tts_base):
    from speechrl.rlhf.cli.demo import asset_fingerprints
    from speechrl.rlhf.model.backbone import backbone_fingerprint
    from speechrl.rlhf.modes import assets

    sft, rl = load_recipe("tts/sft", tts_base), load_recipe("tts/grpo", tts_base)
    assets.manifests(sft)  # the corpus, built here if no test before did
    prints = asset_fingerprints(sft, rl)
    recorded = json.loads((assets.corpus_dir(sft) / "corpus.json").read_text())["fingerprint"]
    assert prints == {"backbone": backbone_fingerprint(assets.backbone_path(sft)), "corpus": recorded}
    assert all(len(v) == 12 for v in prints.values())
