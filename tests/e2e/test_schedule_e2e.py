"""A schedule end to end (recipes/multi): one backbone for every mode, SFT on a mixture of ASR, TTS and
realtime turns, then ASR GRPO through Ray and vLLM, the interference matrix after every stage, and a
schedule stopped mid-stage that resumes to the numbers of an uninterrupted run."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from speechrl.rlhf.core.config import load_recipe
from speechrl.rlhf.core.schedule import load_schedule
from speechrl.rlhf.modes import get_mode
from speechrl.rlhf.trainers import sft_mix
from speechrl.rlhf.trainers.schedule import ScheduleRun, read_matrix, run_schedule, units
from speechrl.rlhf.trainers.sft_mix import MixedSFTRecipe, run_sft_mix

pytestmark = [pytest.mark.vllm, pytest.mark.ray]

SMALL = ["model.tiny.texts=all_modes", "model.tiny.text_vocab_size=1200", "data.synthetic.num_utterances=60", "data.max_eval_examples=4",
         "eval_max_new_tokens=24", "train.batch_size=4", "train.warmup_steps=1", "train.log_every=1",
         "realtime.personas=builtin", "realtime.dialogues_per_persona=2", "realtime.max_turns=2",
         "realtime.drift_dialogues_per_persona=1", "realtime.drift_turns=3", "tts.embedded_codec.hop_length=320"]


class Crash(Exception):
    """Stands in for a killed job."""


def metric_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def schedule_file(tiny_overrides, tmp_path_factory):
    out = tmp_path_factory.mktemp("schedules")
    tree = {"schedule": {
        "name": "test", "output_dir": str(out), "shared": [*tiny_overrides, *SMALL],
        "stages": [
            {"name": "mix", "mix": {"asr/sft": 1, "tts/sft": 1, "realtime/sft": 1}, "steps": 6,
             "overrides": ["train.checkpoint_every=3"]},
            {"name": "asr_grpo", "recipe": "asr/grpo", "steps": 2,
             "overrides": ["rl.prompts_per_step=2", "rollout.sampling.n=2", "rollout.sampling.max_new_tokens=8",
                           "rollout.num_workers=1", "rollout.kv_cache_gib=0.25", "train.eval_every=0",
                           "ray.num_cpus=2"]}],
        "evaluate": [{"recipe": "asr/sft"},
                     {"recipe": "tts/sft", "overrides": ["rewards=[{name: speech_sanity}]", "tts.eval_repeats=1",
                                                         "tts.eval_samples=1"]},
                     {"recipe": "realtime/sft"}]}}
    path = out / "schedule.yaml"
    path.write_text(yaml.safe_dump(tree))
    return str(path)


def test_every_mode_starts_from_one_backbone(tiny_overrides):
    paths = {str(get_mode(load_recipe(f"{mode}/sft", [*tiny_overrides, *SMALL])).backbone_path())
             for mode in ("asr", "tts", "realtime")}
    assert len(paths) == 1 and "shared-" in paths.pop()
    own = {str(get_mode(load_recipe(f"{mode}/sft", tiny_overrides)).backbone_path()) for mode in ("asr", "realtime")}
    assert len(own) == 2, "without all_modes, realtime keeps a tokenizer of its own"


def test_a_schedule_runs_stops_resumes_and_measures_interference(schedule_file, monkeypatch):
    schedule = load_schedule(schedule_file)
    run = ScheduleRun(schedule, run_name="stopped")
    real = MixedSFTRecipe.step_loss

    def crash_at_step_4(self, step):
        if step == 4:  # steps 0-3 done, the step-3 checkpoint written
            raise Crash
        return real(self, step)

    monkeypatch.setattr(MixedSFTRecipe, "step_loss", crash_at_step_4)
    with pytest.raises(Crash):
        run.run()
    monkeypatch.setattr(MixedSFTRecipe, "step_loss", real)
    root = run.root
    assert json.loads((root / "state.json").read_text())["finals"] == {}
    assert [r["row"] for r in read_matrix(root)["rows"]] == ["start"], "the start was measured before stage 1"

    result = run_schedule(schedule, resume=str(root))

    # every stage chained from the last one's weights, one run directory each
    finals = json.loads((root / "state.json").read_text())["finals"]
    assert list(finals) == ["01-mix", "02-asr_grpo"]
    grpo_recipe = yaml.safe_load((root / "stages" / "02-asr_grpo" / "recipe.yaml").read_text())
    assert grpo_recipe["run"]["init_from"] == finals["01-mix"]
    assert result["final weights"] == finals["02-asr_grpo"]

    # the mixture trained every mode: each drawn mode's own loss is logged
    mix_dir = root / "stages" / "01-mix"
    rows = metric_rows(mix_dir)
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4, 5, 6], "resumed rows are not duplicated"
    drawn = {["asr", "tts", "realtime"][k] for k in sft_mix.mixture_draws([1, 1, 1], 6, 0)}
    modes_logged = {k for r in rows for k in r if k.endswith("_loss") and k[len("train/"):-len("_loss")] in
                    ("asr", "tts", "realtime")}
    assert modes_logged == {f"train/{m}_loss" for m in drawn}

    # the resumed mixture made the uninterrupted one's steps
    first = units(schedule)[0]
    start_weights = read_matrix(root)["rows"][0]["checkpoint"]
    parts = ScheduleRun(schedule, run_name="uninterrupted").configs(first, start_weights)
    for cfg, _ in parts:
        cfg.run.name = "mix-uninterrupted"
    run_sft_mix(parts)
    again = {r["step"]: r["train/loss"] for r in metric_rows(Path(parts[0][0].run.output_dir) / "mix-uninterrupted")
             if "train/loss" in r}
    for r in rows:
        if "train/loss" in r:
            assert abs(r["train/loss"] - again[r["step"]]) < 1e-5, (r["step"], r["train/loss"], again[r["step"]])

    # the matrix: every mode's held-out metric at the start and after each stage, all finite
    matrix = read_matrix(root)
    assert [r["row"] for r in matrix["rows"]] == ["start", "mix", "asr_grpo"]
    for r in matrix["rows"]:
        assert {"asr/eval/wer", "tts/eval/speech_sanity/reward", "realtime/eval/loss"} <= set(r["metrics"]), r
        assert all(math.isfinite(v) for v in r["metrics"].values()), r
    start, mixed = (matrix["rows"][i]["metrics"] for i in (0, 1))
    assert mixed["realtime/eval/loss"] < start["realtime/eval/loss"], "SFT on the mixture fits realtime replies"
    assert (root / "interference.png").stat().st_size > 0

    # resuming a finished schedule trains and measures nothing more
    before = (root / "interference.json").read_text()
    run_schedule(schedule, resume=str(root))
    assert (root / "interference.json").read_text() == before
    assert json.loads((root / "state.json").read_text())["finals"] == finals
