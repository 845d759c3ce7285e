"""SFT end to end on the small backbone and corpus: learning, run directory, exact resume, LoRA,
bad examples. The run these share is `full_run` (tests/conftest.py); DeepSpeed's is in
tests/e2e/test_sft_deepspeed_e2e.py."""
from __future__ import annotations

import itertools
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from speechrl.data.audio import BadExample
from speechrl.rlhf.model import logprobs
from speechrl.rlhf.trainers import sft
from speechrl.rlhf.model.backbone import load_backbone
from speechrl.rlhf.core.config import load_recipe
from speechrl.rlhf.modes import get_mode
from speechrl.rlhf.trainers.sft import batch_indices, run_sft


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in metrics(run_dir) if "train/loss" in r}


def weights(backbone_dir) -> dict[str, torch.Tensor]:
    return load_file(str(backbone_dir / "model.safetensors"))


def run_dir_of(cfg) -> Path:
    return Path(cfg.run.output_dir) / cfg.run.name


# --- data order ------------------------------------------------------------------------------
def test_batch_indices_cover_each_epoch_once():
    n, bs = 10, 3
    epoch0 = np.concatenate([batch_indices(n, bs, s, seed=1) for s in range(3)])  # 3 full batches per epoch
    assert len(epoch0) == 9 and len(set(epoch0.tolist())) == 9
    assert all(len(batch_indices(n, bs, s, seed=1)) == bs for s in range(20))
    assert np.array_equal(batch_indices(n, bs, 4, seed=1), batch_indices(n, bs, 4, seed=1))  # pure in (seed, step)
    assert not np.array_equal(batch_indices(n, bs, 0, seed=1), batch_indices(n, bs, 3, seed=1))  # new epoch, new order


def test_batch_indices_smaller_dataset_than_batch():
    assert sorted(batch_indices(2, 4, 0, seed=0).tolist()) == [0, 1]


# --- an uninterrupted run ----------------------------------------------------------------------
def test_sft_loss_decreases(full_run):
    cfg, run_dir, table = full_run
    loss = losses(run_dir)
    assert sorted(loss) == list(range(1, cfg.train.steps + 1)), "log_every=1 logs every step"
    first, last = np.mean([loss[s] for s in (1, 2, 3)]), np.mean([loss[s] for s in (13, 14, 15)])
    assert all(math.isfinite(v) for v in loss.values())
    assert last < 0.9 * first, f"loss did not fall: first 3 {first:.3f}, last 3 {last:.3f}"
    assert table["final loss"] == pytest.approx(loss[15])


def test_logged_lr_is_the_rate_each_step_used(full_run):
    cfg, run_dir, _ = full_run
    lr = {r["step"]: r["lr"] for r in metrics(run_dir) if "lr" in r}
    # warm-up over 2 steps: step 1 runs at lr/2, steps 2-3 at the peak, then cosine decay to lr_min_ratio
    assert lr[1] == pytest.approx(cfg.train.lr / 2)
    assert lr[2] == pytest.approx(cfg.train.lr)
    assert all(lr[s + 1] < lr[s] for s in range(3, cfg.train.steps))
    assert lr[cfg.train.steps] >= cfg.train.lr * cfg.train.lr_min_ratio


def test_run_directory_layout(full_run, small_backbone_dir):
    cfg, run_dir, table = full_run
    assert load_recipe(str(run_dir / "recipe.yaml")) == cfg, "recipe.yaml is the resolved, loadable config"

    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(cfg.train.steps + 1))
    evals = [r["step"] for r in rows if "eval/wer" in r]
    assert evals == [0, cfg.train.steps], "eval before training and at the end (eval_every > steps)"
    assert all(0.0 <= r["eval/wer"] for r in rows if "eval/wer" in r)
    scores = {step: [json.loads(line) for line in path.read_text().splitlines()]
              for step, path in get_mode(cfg).example_scores(run_dir).items()}
    assert sorted(scores) == evals, "each evaluation keeps every clip's scores"
    for step, clips in scores.items():
        assert len(clips) == cfg.data.max_eval_examples and len({c["id"] for c in clips}) == len(clips)
        logged = next(r for r in rows if r["step"] == step)
        assert sum(c["eval/wer"] for c in clips) / len(clips) == pytest.approx(logged["eval/wer"])
        assert {"text", "transcript", "eval/cer"} <= set(clips[0])

    events = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, cfg.train.steps + 1))

    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == cfg.train.steps and summary["train examples (kept/bad)"] == "72/0"
    assert summary["final weights"] == str(run_dir / "final") == table["final weights"]

    # checkpoint_every=5, keep_checkpoints=2: step-5 was pruned
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == ["step-10", "step-15"]
    for name in ckpts:
        ckpt = run_dir / "checkpoints" / name
        assert {"model", "trainer_state.pt", "optimizer.pt"} <= {p.name for p in ckpt.iterdir()}
        assert torch.load(ckpt / "trainer_state.pt", weights_only=False)["step"] == int(name.split("-")[1])
        assert (ckpt / "model" / "config.json").is_file()

    final = load_backbone(run_dir / "final")
    assert final.audio_token_ids() == load_backbone(small_backbone_dir).audio_token_ids()
    trained, last_ckpt, start = (weights(run_dir / "final"), weights(run_dir / "checkpoints/step-15/model"),
                                 weights(small_backbone_dir))
    assert all(torch.equal(trained[k], last_ckpt[k]) for k in trained)
    assert any(not torch.equal(trained[k], start[k]) for k in trained), "training changed the weights"


def test_cli_eval_scores_a_run(full_run, sft_overrides, capsys):
    from speechrl.rlhf.cli.main import main

    _, run_dir, _ = full_run
    assert main(["eval", str(run_dir / "final"), *sft_overrides("unused")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"eval/wer=\d+\.\d{4} eval/cer=\d+\.\d{4}", out), out
    assert out.count("ref: ") == 3  # a few examples to eyeball

    # two checkpoints: the table of changes, then each change's interval over the held-out clips
    assert main(["eval", str(run_dir / "checkpoints" / "step-10" / "model"), str(run_dir / "final"),
                 *sft_overrides("unused")]) == 0
    out = capsys.readouterr().out
    assert "95% bootstrap interval over the held-out clips" in out
    clips = len((run_dir / "final" / "eval" / "scores" / "step-0.jsonl").read_text().splitlines())
    assert re.search(rf"^held-out WER, {run_dir.name}/final: [-+]\d\.\d{{3}}  95% interval \[[-+]\d\.\d{{3}}, "
                     rf"[-+]\d\.\d{{3}}\] over {clips} clips", out, re.M), out


def test_new_run_refuses_a_directory_with_checkpoints(full_run):
    cfg, run_dir, _ = full_run
    with pytest.raises(FileExistsError, match="--resume"):
        run_sft(cfg)


# --- resume ----------------------------------------------------------------------------------
class Crash(Exception):
    """Stands in for a killed job."""


def test_resume_continues_the_exact_run(full_run, sft_config, monkeypatch):
    cfg_full, full_dir, _ = full_run
    cfg = sft_config("interrupted")
    run_dir = run_dir_of(cfg)

    calls, real_loss = itertools.count(), logprobs.completion_nll

    def crash_at_step_8(logp, mask):  # the token loss of every SFT step, with MTP heads or without
        if next(calls) == 7:  # steps 6 and 7 are logged, the step-5 checkpoint is the latest
            raise Crash
        return real_loss(logp, mask)

    monkeypatch.setattr(logprobs, "completion_nll", crash_at_step_8)
    with pytest.raises(Crash):
        run_sft(cfg)
    monkeypatch.setattr(logprobs, "completion_nll", real_loss)
    assert max(r["step"] for r in metrics(run_dir)) == 7
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-5"]
    assert not (run_dir / "final").exists()

    run_sft(cfg, resume=str(run_dir))

    steps = [r["step"] for r in metrics(run_dir)]
    assert steps == list(range(cfg.train.steps + 1)), "rows after the checkpoint are rewritten, not duplicated"
    resumed, uninterrupted = losses(run_dir), losses(full_dir)
    for step in range(1, cfg.train.steps + 1):
        assert abs(resumed[step] - uninterrupted[step]) < 1e-5, (step, resumed[step], uninterrupted[step])
    a, b = weights(run_dir / "final"), weights(full_dir / "final")
    assert set(a) == set(b)
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6, rtol=0), name


def test_resume_without_checkpoint_is_refused(sft_config):
    cfg = sft_config("never-started")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run_sft(cfg, resume=str(run_dir_of(cfg)))


# --- a full disk, a read-only run directory ------------------------------------------------------
@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_a_full_disk_or_read_only_run_dir_stops_clearly_and_the_run_resumes_exactly(
        fault, small_disk, sft_overrides, full_run, monkeypatch, capsys):
    """The disk fills up (or the run directory turns read-only) after the step-5 checkpoint: the
    step-10 one cannot be written, the CLI says so and where to resume, without a traceback; with
    room again --resume continues from step 5 to the uninterrupted run's final weights."""
    from speechrl.rlhf.cli.main import main

    _, full_dir, _ = full_run
    # metrics are logged only at the end, so the step-10 checkpoint is the first write to fail
    args = ["train", "asr/sft", *sft_overrides(f"disk-{fault}", f"run.output_dir={small_disk.path}", "train.log_every=100")]
    run_dir, original = small_disk.path / f"disk-{fault}", sft.SFTRecipe.save_checkpoint

    def fault_after_step_5(self, step):
        path = original(self, step)
        if step == 5 and fault == "full":
            small_disk.fill()
        elif step == 5:
            small_disk.read_only()
        return path

    monkeypatch.setattr(sft.SFTRecipe, "save_checkpoint", fault_after_step_5)
    assert main(args) == 1
    err = capsys.readouterr().err
    why = "No space left on device" if fault == "full" else "Read-only file system"
    assert "Traceback" not in err and "speechrl: error: could not write the step-10 checkpoint" in err, err
    assert why in err and f"last complete checkpoint is {run_dir / 'checkpoints' / 'step-5'}" in err, err
    assert f"--resume {run_dir}" in err
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-5"], "the half-written one is gone"

    monkeypatch.setattr(sft.SFTRecipe, "save_checkpoint", original)
    if fault == "full":
        small_disk.free()
    else:
        small_disk.writable()
    assert main([*args, "--resume", str(run_dir)]) == 0
    a, b = weights(run_dir / "final"), weights(full_dir / "final")
    assert set(a) == set(b) and all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)


# --- LoRA ------------------------------------------------------------------------------------
def test_lora_changes_only_adapted_decoder_weights(sft_config, small_backbone_dir):
    cfg = sft_config("lora", "model.lora.enabled=true", "model.lora.r=4", "train.steps=2",
                     "train.checkpoint_every=1")
    run_sft(cfg)
    run_dir = run_dir_of(cfg)
    assert all(math.isfinite(v) for v in losses(run_dir).values())
    assert (run_dir / "checkpoints/step-2/adapter/adapter_model.safetensors").is_file()

    load_backbone(run_dir / "final")  # merged weights: a plain backbone directory
    start, final = weights(small_backbone_dir), weights(run_dir / "final")
    assert set(start) == set(final), "LoRA is merged away: no adapter keys in final/"
    targets = tuple(f".{m}.weight" for m in cfg.model.lora.target_modules)
    adapted = [k for k in start if k.startswith("language_model.model.layers.") and k.endswith(targets)]
    assert len(adapted) == cfg.model.tiny.num_layers * len(cfg.model.lora.target_modules)
    for name in start:
        if name in adapted:
            assert not torch.equal(start[name], final[name]), f"{name} should carry the merged adapter"
        else:  # audio tower (even its q/k/v/o projections), projector, embeddings, norms, biases, lm_head
            assert torch.equal(start[name], final[name]), f"{name} changed without an adapter"


# --- bad examples ----------------------------------------------------------------------------
@pytest.fixture
def dirty_manifest(sft_assets, tmp_path):
    """One good clip from the synthetic corpus, one missing file, one empty transcript."""
    _, train_manifest, _ = sft_assets
    good = json.loads(train_manifest.read_text().splitlines()[0])
    good["audio"] = str((train_manifest.parent / good["audio"]).resolve())
    rows = [good,
            {"id": "missing", "text": "go left", "audio": str(tmp_path / "missing.wav")},
            {"id": "empty", "text": "  ", "audio": good["audio"]}]
    path = tmp_path / "dirty.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_bad_examples_are_skipped_and_counted(sft_config, dirty_manifest):
    cfg = sft_config("dirty", f"data.train={dirty_manifest}", f"data.eval={dirty_manifest}", "train.steps=1")
    table = run_sft(cfg)
    assert table["train examples (kept/bad)"] == "1/2"
    assert table["eval examples"] == 1
    summary = json.loads((run_dir_of(cfg) / "summary.json").read_text())
    assert summary["train examples (kept/bad)"] == "1/2"
    assert math.isfinite(losses(run_dir_of(cfg))[1])


def test_bad_example_fails_the_run_when_asked(sft_config, dirty_manifest, tmp_path):
    cfg = sft_config("dirty-fail", f"data.train={dirty_manifest}", f"data.eval={dirty_manifest}",
                     "data.on_bad_example=fail")
    with pytest.raises(BadExample, match="missing.wav.*file not found"):
        run_sft(cfg)
    assert not (run_dir_of(cfg) / "checkpoints").exists()


def test_cli_reports_a_bad_example_without_a_traceback(sft_overrides, dirty_manifest, capsys):
    from speechrl.rlhf.cli.main import main

    rc = main(["train", "asr/sft", *sft_overrides("dirty-cli", f"data.train={dirty_manifest}",
                                                   f"data.eval={dirty_manifest}", "data.on_bad_example=fail")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "missing.wav" in err and "file not found" in err and "Traceback" not in err
