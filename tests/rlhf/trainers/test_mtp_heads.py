"""`algorithm: mtp_heads`: a checkpoint's MTP heads trained alone on the policy's own greedy continuations
(rlhf/trainers/mtp_heads.py), on the tiny backbone, a real vLLM engine decoding."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from speechrl.rlhf.core.config import RecipeError, load_recipe
from speechrl.rlhf.model.mtp import MTP_DIR


@pytest.fixture(scope="module")
def heads_overrides(small_backbone_dir, sft_overrides):
    """mtp_heads overrides from the fast recipe's untrained backbone, which has no heads yet (five new
    ones start from its LM head) and whose greedy continuations run to the cap: every head has targets.
    (The fast SFT run's model says only its end token after 15 steps.)"""
    start = small_backbone_dir
    return lambda name, *extra: [*sft_overrides(name), f"run.init_from={start}", "train.steps=30",
                                 "train.batch_size=8", "train.warmup_steps=3", "train.eval_every=10",
                                 "train.checkpoint_every=10", "train.log_every=10", "train.keep_checkpoints=0",
                                 "mtp_heads.max_examples=40",
                                 *extra]


@pytest.fixture(scope="module")
def distilled(heads_overrides):
    from speechrl.rlhf.trainers.mtp_heads import run_mtp_heads

    cfg = load_recipe("asr/mtp_heads", heads_overrides("mtp-heads"))
    table = run_mtp_heads(cfg)
    return cfg, Path(cfg.run.output_dir) / cfg.run.name, table


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_each_head_learns_the_token_its_draft_is_checked_against():
    """A continuation's hidden state j predicts its token j (the LM head's next token), so head i read
    at j drafts token j + 1 + i: the loss over Continuations' grid is the cross-entropy of exactly those
    pairs (a grid one position off would pass a "loss falls" check, not this one)."""
    from speechrl.rlhf.model.mtp import MtpHeads
    from speechrl.rlhf.trainers.mtp_heads import Continuations

    torch.manual_seed(0)
    completions = [torch.tensor([5, 6, 7, 8, 9]), torch.tensor([3, 4, 2]), torch.tensor([1, 11])]
    rows = [(torch.randn(len(c), 8), c) for c in completions]
    heads = MtpHeads(3, 8, 12)
    loss, metrics = heads.loss(*Continuations(rows).batch([0, 1, 2]))
    expected = []
    for i in range(3):
        pairs = [(h[j], c[j + 1 + i]) for h, c in rows for j in range(len(c) - 1 - i)]
        states, targets = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
        with torch.no_grad():
            expected.append(torch.nn.functional.cross_entropy(heads.lm_heads[i](heads.blocks[i](states)), targets))
    assert torch.allclose(loss, torch.stack(expected).mean())
    assert sorted(metrics) == ["mtp_acc_1", "mtp_acc_2", "mtp_acc_3", "mtp_loss"]


def test_heads_learn_the_policys_greedy_output_and_the_policy_is_untouched(distilled, small_backbone_dir):
    from speechrl.rlhf.model.backbone import load_backbone
    from speechrl.rlhf.modes import get_mode
    from speechrl.rollouts.local import greedy_transcribe

    cfg, run_dir, table = distilled
    start, final = small_backbone_dir, run_dir / "final"
    before, after = load_file(str(start / "model.safetensors")), load_file(str(final / "model.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    config = json.loads((final / MTP_DIR / "config.json").read_text())
    assert config["model_type"] == "medusa" and config["num_heads"] == 5

    # the targets are what the policy itself says greedily (transformers, in process), not the references
    rows = _rows(run_dir / "train" / "continuations.jsonl")
    train_set, _ = get_mode(cfg).datasets(cfg.model.tiny.max_audio_seconds)
    items = [train_set[i] for i in range(len(rows))]
    assert [r["id"] for r in rows] == [ex.id for ex, _ in items]
    backbone = load_backbone(start)
    said = greedy_transcribe(backbone.model, backbone.processor, [a for _, a in items],
                             max_new_tokens=cfg.eval_max_new_tokens)
    decoded = [t.strip() for t in backbone.tokenizer.batch_decode([r["completion_ids"] for r in rows],
                                                                  skip_special_tokens=True)]
    assert sum(a == b for a, b in zip(said, decoded)) >= 0.9 * len(rows)
    assert decoded != [ex.text for ex, _ in items]

    metrics = _rows(run_dir / "metrics.jsonl")
    train_loss = [r["train/mtp_loss"] for r in metrics if "train/mtp_loss" in r]
    assert len(train_loss) == 3 and train_loss[-1] < train_loss[0]
    assert [r["step"] for r in metrics if "eval/mtp_acc_1" in r] == [0, 10, 20, 30]
    learnt = [r["train/mtp_acc_1"] for r in metrics if "train/mtp_acc_1" in r]
    assert learnt[-1] > learnt[0], "the first head learns to draft the policy's next greedy token"
    # measured on a vLLM engine drafting with the heads (the start had none to measure before)
    emitted = [r for r in metrics if "eval/mtp_emitted_after" in r][0]
    assert 1.0 <= emitted["eval/mtp_emitted_after"] <= 6.0 and "eval/mtp_emitted_before" not in emitted
    assert "held-out tokens per decoding step, k=5 (vLLM, greedy)" in table


def test_a_resumed_run_ends_with_the_uninterrupted_runs_heads(distilled, heads_overrides, tmp_path, monkeypatch):
    """Stopped after its step-20 checkpoint, the run resumes there, reuses its decoded continuations
    (no engine decodes them again) and ends with the very heads of the run that was not stopped."""
    from speechrl.rlhf.trainers import mtp_heads

    cfg, run_dir, _ = distilled
    copy = tmp_path / "resumed"
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "checkpoints" / "step-30")
    shutil.rmtree(copy / "final")
    resumed = load_recipe("asr/mtp_heads", heads_overrides("resumed", f"run.output_dir={tmp_path}",
                                                           "mtp_heads.measure=false"))
    started, original = [], mtp_heads.MtpHeadsRecipe.engine  # a spy: engines still start where asked
    monkeypatch.setattr(mtp_heads.MtpHeadsRecipe, "engine", lambda self, *a: started.append(a) or original(self, *a))
    mtp_heads.run_mtp_heads(resumed, resume=str(copy))
    assert started == []
    a = load_file(str(run_dir / "final" / MTP_DIR / "model.safetensors"))
    b = load_file(str(copy / "final" / MTP_DIR / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_reference_targets_train_on_the_datasets_completions(heads_overrides):
    """`mtp_heads.targets: reference` decodes only the held-out prompts (what a kept draft is measured
    against), and learns from the training set's transcripts."""
    from speechrl.rlhf.trainers.mtp_heads import MtpHeadsRecipe

    cfg = load_recipe("asr/mtp_heads", heads_overrides("mtp-reference", "mtp_heads.targets=reference",
                                                       "train.steps=5", "mtp_heads.measure=false"))
    recipe = MtpHeadsRecipe(cfg)
    recipe.setup()
    task, train_set = recipe.task, recipe.train_set
    references = [task.sft_example(train_set[i][0], train_set[i][1], train_set)[1] for i in range(40)]
    assert [c.tolist() for _, c in recipe.data.rows] == [r for r in references if len(r) >= 2]
    recipe.train()
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    assert (run_dir / "eval" / "continuations.jsonl").is_file()
    assert not (run_dir / "train").exists()
    assert (run_dir / "final" / MTP_DIR / "model.safetensors").is_file()


def test_recipe_checks_name_what_to_set(heads_overrides, realtime_overrides):
    with pytest.raises(RecipeError, match="model.mtp.num_heads"):
        load_recipe("asr/mtp_heads", heads_overrides("x", "model.mtp.num_heads=0"))
    with pytest.raises(RecipeError, match="mtp_heads.targets"):
        load_recipe("asr/mtp_heads", heads_overrides("x", "mtp_heads.targets=truth"))
    with pytest.raises(RecipeError, match="mtp_heads.max_examples"):
        load_recipe("asr/mtp_heads", heads_overrides("x", "mtp_heads.max_examples=-1"))
    with pytest.raises(RecipeError, match="mtp_heads.*not implemented for mode 'realtime'"):
        load_recipe("realtime/sft", [*realtime_overrides, "algorithm=mtp_heads", "model.mtp.num_heads=2"])


def test_tts_heads_learn_the_policys_codec_tokens(tts_overrides, tmp_path):
    """The same stage in TTS: the continuations are the policy's greedy codec tokens under the mode's
    constraint (codec tokens and `<|codec_end|>` only), and the heads learn them."""
    from speechrl.rlhf.model.backbone import load_backbone
    from speechrl.rlhf.modes import get_mode
    from speechrl.rlhf.trainers.mtp_heads import run_mtp_heads

    cfg = load_recipe("tts/sft", [*tts_overrides, "algorithm=mtp_heads", "model.mtp.num_heads=2",
                                  f"run.output_dir={tmp_path}", "run.name=tts-heads", "train.steps=10",
                                  "train.eval_every=10", "train.log_every=5", "mtp_heads.max_examples=16"])
    run_mtp_heads(cfg)
    run_dir = tmp_path / "tts-heads"
    allowed = set(get_mode(cfg).setup_task(load_backbone(run_dir / "final").processor).allowed_ids)
    rows = _rows(run_dir / "train" / "continuations.jsonl")
    assert len(rows) == 16 and all(r["completion_ids"] and set(r["completion_ids"]) <= allowed for r in rows)
    metrics = _rows(run_dir / "metrics.jsonl")
    losses = [r["train/mtp_loss"] for r in metrics if "train/mtp_loss" in r]
    assert len(losses) == 2 and losses[-1] < losses[0]
    assert json.loads((run_dir / "final" / MTP_DIR / "config.json").read_text())["num_heads"] == 2
    assert 1.0 <= [r for r in metrics if "eval/mtp_emitted_after" in r][0]["eval/mtp_emitted_after"] <= 3.0
