"""The duplex mode without Ray or vLLM engines: the chunk layout (vLLM's processor and the trainer
agree), the turn-taking reward's table and the recipe checks. The dialogues, the task and the
evaluation are tests/rlhf/modes/test_duplex_data.py; SFT and GRPO end to end through Ray + vLLM are
tests/e2e/test_duplex_e2e.py."""
from __future__ import annotations

import pytest
import torch

from speechrl.rewards.duplex import (ACT, BACKCHANNEL, EITHER, LISTEN, PAUSE, SPEAK, STOP, DuplexTurnTakingReward,
                                     chunk_penalties, same_action)
from speechrl.rlhf.core.config import RecipeError, load_recipe
from speechrl.rlhf.model.layout import AUDIO, FULL, SWITCH, TEXT, LayoutMask, ReplyLayout, layout_phases

torch.set_num_threads(1)

# text 0-3, codec 4-6, end 7; two action tokens, then two codec tokens a chunk; SPEAK_FIRST: token 8 opens
# the audio, as `<|audio_bos|>` does in the duplex task
CHUNK = ReplyLayout(text_ids=(0, 1, 2, 3), codec_ids=(4, 5, 6), end_id=7, max_text_tokens=2, silent_end=True,
                    max_audio_tokens=2)
SPEAK_FIRST = ReplyLayout(text_ids=(0, 1, 2, 3), codec_ids=(4, 5, 6), end_id=7, max_text_tokens=2, silent_end=True,
                          max_audio_tokens=2, audio_start=8)


# --- the chunk layout -----------------------------------------------------------------------------------

def test_chunk_layout_listens_speaks_one_chunk_or_acts_first():
    assert CHUNK.admits([7]), "<|codec_end|> alone: a silent chunk"
    assert CHUNK.admits([4, 5, 7]) and CHUNK.admits([4, 7]), "a chunk of audio, or less"
    assert not CHUNK.admits([4, 5, 6]), "no more than max_audio_tokens codec tokens"
    assert CHUNK.admits([0, 1, 7]) and CHUNK.admits([0, 1, 4, 5, 7]), "a call, then nothing or audio"
    assert not CHUNK.admits([0, 1, 2]), "the action channel's rate limit"
    assert not CHUNK.admits([4, 0]), "no text after audio"
    assert [CHUNK.phase(p) for p in ([], [0], [0, 1], [4], [4, 5])] == [TEXT, TEXT, SWITCH, AUDIO, FULL]
    masks = CHUNK.masks(8)
    assert masks[FULL].nonzero().flatten().tolist() == [7]
    assert masks[TEXT].nonzero().flatten().tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    realtime = ReplyLayout((0, 1), (4, 5), 7, 2)
    assert not realtime.admits([7]) and realtime.admits([4, 5, 4, 7]), "realtime's layout is unchanged"


def test_speaking_opens_with_its_own_token_where_the_layout_names_one():
    assert SPEAK_FIRST.admits([7]) and SPEAK_FIRST.admits([8, 4, 5, 7]) and SPEAK_FIRST.admits([0, 8, 4, 7])
    assert not SPEAK_FIRST.admits([4, 5, 7]), "codec tokens only after the opening token"
    assert not SPEAK_FIRST.admits([8, 4, 5, 6]) and not SPEAK_FIRST.admits([8, 8])
    assert [SPEAK_FIRST.phase(p) for p in ([], [0, 1], [8], [8, 4], [8, 4, 5])] == [TEXT, SWITCH, AUDIO, AUDIO, FULL]
    assert SPEAK_FIRST.masks(9)[TEXT].nonzero().flatten().tolist() == [0, 1, 2, 3, 7, 8]
    assert SPEAK_FIRST.masks(9)[SWITCH].nonzero().flatten().tolist() == [7, 8]
    with pytest.raises(ValueError, match="audio_start"):
        ReplyLayout((0, 1), (4, 5), 7, 2, audio_start=4)


@pytest.mark.parametrize("layout", [CHUNK, SPEAK_FIRST], ids=["codec-opens", "token-opens"])
def test_trainer_phases_match_the_python_rule_with_the_audio_cap(layout):
    gen = torch.Generator().manual_seed(0)
    codec = torch.zeros(9, dtype=torch.bool)
    codec[[4, 5, 6]] = True
    mask = LayoutMask(layout, 9)
    for _ in range(120):
        prompt, n = int(torch.randint(1, 4, (1,), generator=gen)), int(torch.randint(1, 7, (1,), generator=gen))
        completion = torch.randint(0, 9, (n,), generator=gen).tolist()
        targets = torch.tensor([[3] * prompt + completion + [0]])
        valid = torch.zeros_like(targets, dtype=torch.bool)
        valid[0, prompt:prompt + n] = True
        phases = layout_phases(targets, valid, codec, 2, 2, mask.opens)[0, prompt:prompt + n].tolist()
        assert phases == [layout.phase(completion[:t]) for t in range(n)], completion
        allowed = mask.for_targets(targets, valid)[0, prompt:prompt + n]
        assert allowed.tolist() == [layout.masks(9)[layout.phase(completion[:t])].tolist() for t in range(n)]


@pytest.mark.parametrize("layout", [CHUNK, SPEAK_FIRST], ids=["codec-opens", "token-opens"])
def test_vllm_processor_caps_the_audio_of_a_chunk(layout):
    from vllm import SamplingParams
    from vllm.v1.sample.logits_processor import BatchUpdate

    from speechrl.rlhf.model.layout import reply_layout_processor

    processor = reply_layout_processor()(None, torch.device("cpu"), False)
    params = SamplingParams(extra_args=layout.as_extra_args())
    opens = [4] if layout.audio_start < 0 else [8, 4]
    rows = [[], [0], list(opens), opens + [5]]
    processor.update_state(BatchUpdate(batch_size=4, removed=[], moved=[],
                                       added=[(i, params, None, out) for i, out in enumerate(rows)]))
    logits = processor.apply(torch.zeros(4, 9))
    for i, out in enumerate(rows):
        assert torch.isfinite(logits[i]).tolist() == layout.masks(9)[layout.phase(out)].tolist()
    rows[2].append(6)  # its second codec token: the chunk is full, only <|codec_end|> is left
    assert torch.isfinite(processor.apply(torch.zeros(4, 9))[2]).nonzero().flatten().tolist() == [7]


# --- the reward -----------------------------------------------------------------------------------------

CALL = '{"tool":"weather","city":"oslo"}'


@pytest.mark.parametrize("label,speaks,action,component", [
    (LISTEN, True, None, "response"),  # barge-in
    (SPEAK, False, None, "response"),  # a late or dropped answer
    (PAUSE, True, None, "pause"),  # a take-over in a pause
    (PAUSE, False, CALL, "pause"),
    (BACKCHANNEL, False, None, "backchannel"),  # stopped for a backchannel
    (STOP, True, None, "interrupt"),  # still talking over the user
    (ACT, False, None, "tool"),  # the call is missing
    (ACT, False, '{"tool":"weather","city":"rome"}', "tool"),  # the wrong call
    (ACT, True, "not json", "tool"),
    (LISTEN, False, CALL, "tool"),  # a call nobody asked for
])
def test_each_mistake_costs_its_own_component(label, speaks, action, component):
    scores = chunk_penalties(label, speaks, action, CALL)
    assert scores[component] == -1.0
    assert sum(scores.values()) == -1.0 or label == PAUSE and action, scores


@pytest.mark.parametrize("label,speaks,action", [
    (LISTEN, False, None), (PAUSE, False, None), (SPEAK, True, None), (BACKCHANNEL, True, None), (STOP, False, None),
    (EITHER, True, None), (EITHER, False, None), (ACT, False, CALL), (ACT, True, '{"city": "oslo", "tool": "weather"}')])
def test_the_right_move_costs_nothing(label, speaks, action):
    assert set(chunk_penalties(label, speaks, action, CALL).values()) == {0.0}


def test_reward_weights_components_and_names_bad_input():
    reward = DuplexTurnTakingReward(pause=2.0, tool=0.5)
    out = reward(["", "", ""], duplex_label=[PAUSE, ACT, SPEAK], speaks=[True, False, True],
                 action_text=[None, None, None], duplex_action=[None, CALL, None])
    assert out["reward"] == [-2.0, -0.5, 0.0] and out["pause"] == [-1.0, 0.0, 0.0] and out["tool"] == [0.0, -1.0, 0.0]
    with pytest.raises(KeyError, match="duplex_label"):
        reward(["x"])
    with pytest.raises(ValueError, match="'talk'"):
        reward(["x"], duplex_label=["talk"], speaks=[True])
    with pytest.raises(ValueError, match="pause"):
        DuplexTurnTakingReward(pause=-1.0)
    assert same_action('{"a": 1, "b": 2}', '{"b":2,"a":1}') and not same_action("{", CALL) and not same_action(None, CALL)


def test_dialogues_by_kind_adds_dialogues_of_that_kind_and_keeps_the_first_ones():
    from speechrl.rlhf.modes.duplex_data import plan_dialogues

    # the recipe's dict is merged with an override's: each kind it names is set again
    same = "duplex.dialogues_by_kind={backchannel: 2, interrupt: 2, tool: %d}"
    base = load_recipe("duplex/sft", ["duplex.dialogues_per_kind=2", same % 2])
    more = load_recipe("duplex/sft", ["duplex.dialogues_per_kind=2", same % 5])
    counts = {k: sum(p.kind == k for p in plan_dialogues(more, "train")) for k in more.duplex.kinds}
    assert counts == {"turn": 2, "pause": 2, "backchannel": 2, "interrupt": 2, "tool": 5}
    tools = [p for p in plan_dialogues(more, "train") if p.kind == "tool"]
    assert tools[:2] == [p for p in plan_dialogues(base, "train") if p.kind == "tool"]  # the first ones kept
    assert plan_dialogues(more, "heldout") == plan_dialogues(base, "heldout")  # held-out: heldout_per_kind
    for bad, named in (("{chat: 5}", "dialogues_by_kind.chat"), ("{tool: 0}", "dialogues_by_kind.tool"),
                       ("{tool: 1000000}", "dialogues_by_kind.tool")):
        with pytest.raises(RecipeError, match=named):
            load_recipe("duplex/sft", [f"duplex.dialogues_by_kind={bad}"])
    fewer = load_recipe("duplex/sft", ["duplex.kinds=[turn,tool]", "duplex.dialogues_per_kind=2"])
    assert {p.kind for p in plan_dialogues(fewer, "train")} == {"turn", "tool"}  # counts of kinds not built: unused


def test_duplex_recipes_are_checked():
    load_recipe("duplex/grpo")
    with pytest.raises(RecipeError, match="duplex.kinds"):
        load_recipe("duplex/sft", ["duplex.kinds=[turn,chat]"])
    with pytest.raises(RecipeError, match="max_action_tokens"):
        load_recipe("duplex/sft", ["duplex.max_action_tokens=0"])
    with pytest.raises(RecipeError, match="chunk_seconds"):
        load_recipe("duplex/sft", ["duplex.chunk_seconds=0.1"])
    with pytest.raises(RecipeError, match="max_new_tokens"):
        load_recipe("duplex/grpo", ["rollout.sampling.max_new_tokens=8"])
    with pytest.raises(RecipeError, match="not implemented for mode 'duplex'"):
        load_recipe("duplex/sft", ["algorithm=ppo"])
    load_recipe("duplex/sft", ["duplex.kinds=[turn,pause]", "duplex.max_action_tokens=0"])
