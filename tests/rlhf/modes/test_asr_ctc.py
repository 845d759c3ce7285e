"""asr.ctc_weight: SFT's CTC loss on the projector's output (rlhf/modes/asr.py, projector_ctc_loss)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from speechrl.rlhf.core.config import RecipeError
from speechrl.rlhf.model.backbone import IM_END
from speechrl.rlhf.model.logprobs import build_token_batch
from speechrl.rlhf.model.policy import build_policy
from speechrl.rlhf.modes import get_mode
from speechrl.rlhf.modes.asr import projector_ctc_loss


@pytest.fixture()
def ctc_setup(sft_config, sft_assets):
    cfg = sft_config("ctc", "model.freeze_audio_encoder=true", "asr.ctc_weight=0.5")
    policy = build_policy(cfg, sft_assets[0])
    mode = get_mode(cfg)
    task = mode.setup_task(policy.backbone.processor)
    train, _ = mode.datasets(policy.backbone.max_audio_seconds)
    rows = [task.sft_example(*train[i], train) for i in range(4)]
    batch = build_token_batch(policy.backbone.processor, [r[0] for r in rows], [r[1] for r in rows],
                              [r[2] for r in rows], policy.backbone.tokenizer.pad_token_id)
    end_id = policy.backbone.tokenizer.convert_tokens_to_ids(IM_END)
    return mode, policy, batch, end_id


def test_ctc_is_added_to_the_token_loss_and_logged(ctc_setup):
    mode, policy, batch, end_id = ctc_setup
    total, metrics = mode.sft_loss(policy.model, batch)
    assert set(metrics) == {"token_loss", "ctc_loss"} and metrics["ctc_loss"] > 0
    assert total.item() == pytest.approx(metrics["token_loss"] + 0.5 * metrics["ctc_loss"], rel=1e-5)


def test_ctc_trains_only_the_projector_and_falls_when_it_does(ctc_setup):
    mode, policy, batch, end_id = ctc_setup
    model = policy.model
    model.zero_grad()
    projector_ctc_loss(model, batch, end_id).backward()
    with_grad = {k for k, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad and all("multi_modal_projector" in k for k in with_grad), with_grad
    projector = [p for k, p in model.named_parameters() if "multi_modal_projector" in k]
    opt = torch.optim.Adam(projector, lr=3e-3)
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = projector_ctc_loss(model, batch, end_id)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_an_sft_run_logs_both_losses_and_the_ctc_reading(sft_config, sft_assets):
    from speechrl.rlhf.trainers.sft import run_sft

    cfg = sft_config("ctc-run", "train.steps=2", "train.log_every=1", "train.eval_every=2",
                     "model.freeze_audio_encoder=true", "asr.ctc_weight=0.5")
    run_sft(cfg)
    rows = [json.loads(x) for x in (Path(cfg.run.output_dir) / cfg.run.name / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "train/ctc_loss" in r]
    assert [r["step"] for r in logged] == [1, 2]
    assert all(r["train/loss"] > r["train/token_loss"] for r in logged)
    assert [r["step"] for r in rows if "eval/ctc_wer" in r] == [0, 2] and all(r["eval/ctc_wer"] >= 0 for r in rows
                                                                             if "eval/ctc_wer" in r)


def test_a_negative_ctc_weight_is_refused(sft_config):
    with pytest.raises(RecipeError, match="asr.ctc_weight"):
        sft_config("bad", "asr.ctc_weight=-1")


def test_greedy_ctc_reads_back_what_the_projector_learnt(ctc_setup):
    """After the projector overfits a batch with CTC alone, the greedy CTC reading of its clips is
    their transcripts (eval/ctc_wer's decoder: repeats merged, blanks dropped)."""
    from speechrl.rewards.asr import word_error_rate
    from speechrl.rlhf.modes.asr import ctc_transcribe

    mode, policy, batch, end_id = ctc_setup
    model, processor = policy.model, policy.backbone.processor
    train, _ = mode.datasets(policy.backbone.max_audio_seconds)
    items = [train[i] for i in range(4)]
    before = [word_error_rate(h, ex.text) for h, (ex, _) in zip(ctc_transcribe(model, processor, [a for _, a in items]), items)]
    opt = torch.optim.Adam([p for k, p in model.named_parameters() if "multi_modal_projector" in k], lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        projector_ctc_loss(model, batch, end_id).backward()
        opt.step()
    after = [word_error_rate(h, ex.text) for h, (ex, _) in zip(ctc_transcribe(model, processor, [a for _, a in items]), items)]
    assert min(before) > 0.5 and sum(after) < 0.5 * sum(before), (before, after)
