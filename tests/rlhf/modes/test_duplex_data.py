"""The duplex mode's data and task without Ray or vLLM engines: the synthetic dialogues on the clock
(real espeak-ng speech where the labels say), the task's references and prompts, SFT's examples,
the timeline metrics, teacher-forced decisions and the decisions benchmark. The chunk layout, the
reward and the recipe checks are tests/rlhf/modes/test_duplex.py; SFT and GRPO end to end through
Ray + vLLM are tests/e2e/test_duplex_e2e.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from speechrl.rewards.duplex import ACT, BACKCHANNEL, EITHER, LISTEN, PAUSE, SPEAK, STOP, same_action
from speechrl.rlhf.core.config import load_recipe

torch.set_num_threads(1)

# --- dialogues on the clock -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cfg(duplex_overrides, tmp_path_factory):
    return load_recipe("duplex/sft", [*duplex_overrides, f"run.output_dir={tmp_path_factory.mktemp('duplex-runs')}"])


@pytest.fixture(scope="module")
def dialogues(cfg):
    from speechrl.rlhf.modes.duplex_data import load_dialogues

    return load_dialogues(cfg)


def _energy(d, c, chunk=2560):
    return float(np.abs(d.audio[c * chunk:(c + 1) * chunk]).max()) if c * chunk < len(d.audio) else 0.0


def test_plans_are_seeded_and_held_out_ones_differ(cfg):
    from speechrl.rlhf.modes.duplex_data import plan_dialogues

    assert plan_dialogues(cfg, "train") == plan_dialogues(cfg, "train")
    assert {p.kind for p in plan_dialogues(cfg, "train")} == set(cfg.duplex.kinds)
    assert plan_dialogues(cfg, "train") != plan_dialogues(cfg, "heldout")
    other = load_recipe("duplex/sft", ["duplex.seed=1", "duplex.dialogues_per_kind=2"])
    assert plan_dialogues(other, "train") != plan_dialogues(cfg, "train")


def test_tool_requests_hear_each_city_and_each_number_about_as_often():
    import json
    from collections import Counter

    from speechrl.rlhf.modes.duplex_data import plan_dialogues

    cfg = load_recipe("duplex/sft", ["duplex.kinds=[tool]", "duplex.dialogues_by_kind={tool: 900}"])
    calls = [json.loads(p.action) for p in plan_dialogues(cfg, "train")]
    timers = [c["minutes"] for c in calls if c["tool"] == "timer"]
    cities = [c["city"] for c in calls if "city" in c]
    assert len(timers) + len(cities) == 900 and 0.45 < len(timers) / 900 < 0.55, "half ask for minutes"
    per_number, per_city = Counter(timers), Counter(cities)
    assert len(per_number) == 9 and len(per_city) == 10
    # each value about 900 / 2 / 9 = 50 or 900 / 2 / 10 = 45 times; one of four sentences gave a number ~25
    assert min(per_number.values()) > 35 and min(per_city.values()) > 30, (per_number, per_city)


def test_the_demo_prints_the_dialogues_fingerprint_not_a_corpus(cfg, dialogues, duplex_overrides):
    from speechrl.rlhf.modes import get_mode

    prints = get_mode(cfg).data_fingerprints()
    assert set(prints) == {"dialogues"} and len(prints["dialogues"]) == 12
    assert get_mode(cfg).data_fingerprints() == prints, "the cached speech gives the same fingerprint again"
    other = load_recipe("duplex/sft", [*duplex_overrides, "duplex.seed=1"])
    assert get_mode(other).data_fingerprints() != prints, "other dialogues, another fingerprint"


def test_labels_follow_the_speech_on_the_clock(dialogues):
    train, held = dialogues
    assert len(train) == 10 and len(held) == 5
    for d in train + held:
        labels = d.labels
        assert len(d.audio) == d.num_chunks * 2560
        first_end = d.events["ends"][0]
        assert _energy(d, first_end) > 0.01 and all(l in (LISTEN, PAUSE) for l in labels[:first_end + 1])
        due = labels[first_end + 1]
        assert due == (ACT if d.kind == "tool" else SPEAK), (d.kind, labels)
        if d.kind == "pause":
            start, stop = d.events["pause"]
            assert labels[start:stop] == [PAUSE] * (stop - start) and stop - start >= 4
            assert max(_energy(d, c) for c in range(start, stop)) < 0.01, "the pause is silent"
            assert _energy(d, stop) > 0.01, "the user goes on"
        if d.kind == "backchannel":
            start, stop = d.events["backchannel"]
            assert BACKCHANNEL in labels and _energy(d, start) > 0.01
            assert all(l in (SPEAK, BACKCHANNEL) for l in labels[first_end + 1:])
        if d.kind == "interrupt":
            onset = d.events["interrupt"]
            assert labels[onset] == EITHER and labels[onset + 1] == STOP and _energy(d, onset) > 0.01
            second_end = d.events["ends"][1]
            assert labels[second_end + 1] == SPEAK and all(l == STOP for l in labels[onset + 1:second_end + 1])
        if d.kind == "tool":
            assert same_action(d.action, d.action) and labels.count(ACT) == 1
        else:
            assert d.action is None


@pytest.fixture(scope="module")
def task(cfg):
    from speechrl.rlhf.model.backbone import load_processor
    from speechrl.rlhf.modes import get_mode

    mode = get_mode(cfg)
    return mode.make_task(load_processor(mode.backbone_path()))


def test_references_fit_the_layout_and_say_what_the_labels_ask(task, dialogues):
    for d in dialogues[0]:
        reference = task.reference(d)
        assert len(reference) == d.num_chunks
        for c, ids in enumerate(reference):
            assert task.layout.admits(ids), (d.id, c, ids)
            out = task.parse(ids)
            assert out.speaks == (d.labels[c] in (SPEAK, BACKCHANNEL, EITHER)), (d.id, c, d.labels[c])
            assert len(out.codec_ids) <= task.per_chunk
            assert (out.action is not None) == (d.labels[c] == ACT)
            if out.action:
                assert same_action(out.action, d.action)


def test_sft_example_reads_the_window_and_the_assistants_chunks_so_far(task, cfg):
    from speechrl.rlhf.modes import get_mode

    from speechrl.rlhf.modes.duplex_data import is_event

    from speechrl.rlhf.modes.duplex_chunks import ChunkDataset, recovery_examples

    train, _ = get_mode(cfg).datasets(4.0)
    calls = sum(d.labels[c] == ACT for d in train.dialogues for c in range(d.num_chunks))
    events = sum(is_event(d, c) for d in train.dialogues for c in range(d.num_chunks)) - calls
    recovery = sum(len(recovery_examples(d)) for d in train.dialogues)
    assert calls == sum(d.kind == "tool" for d in train.dialogues)
    assert len(train) == (sum(d.num_chunks for d in train.dialogues) + (cfg.duplex.event_repeats - 1) * events
                          + (cfg.duplex.call_repeats - 1) * calls + cfg.duplex.recovery_repeats * recovery)
    more = ChunkDataset(train.dialogues, train.chunk_samples, train.window_samples, cfg.duplex.event_repeats,
                        cfg.duplex.recovery_repeats, call_repeats=cfg.duplex.call_repeats + 3)
    assert len(more) == len(train) + 3 * calls
    due = next((d, c, "") for d in train.dialogues for c in range(d.num_chunks) if d.labels[c] == ACT)
    assert more.index.count(due) == cfg.duplex.call_repeats + 3
    onsets = [(d, c, "") for d in train.dialogues for c in range(1, d.num_chunks)
              if d.labels[c] == SPEAK and d.labels[c - 1] == LISTEN]
    assert onsets and all(train.index.count(o) == cfg.duplex.event_repeats for o in onsets)
    assert train.index.count((train.dialogues[0], 0, "")) == 1, "a chunk where nothing changes is listed once"
    ex, audio = next(train[i] for i in range(len(train) - 1, -1, -1) if not train.index[i][2])
    heard = min(4 * 16000, (ex.chunk + 1) * 2560)
    assert len(audio) == 4 * 16000, "always the whole window: now is its end"
    assert np.array_equal(audio[4 * 16000 - heard:], ex.dialogue.audio[(ex.chunk + 1) * 2560 - heard:(ex.chunk + 1) * 2560])
    assert not audio[:4 * 16000 - heard].any(), "silence before the dialogue's start"
    prompt, completion, clip = task.sft_example(ex, audio)
    assert clip is audio and completion == task.reference(ex.dialogue)[ex.chunk]
    stream = [t for chunk in task.reference(ex.dialogue)[:ex.chunk][-task.history_chunks:] for t in chunk]
    assert prompt[-len(stream):] == stream, "the assistant's own chunks, token for token, end the prompt"
    request = task.request(ex.dialogue, ex.chunk, task.reference(ex.dialogue)[:ex.chunk])
    assert request.metadata["duplex_label"] == ex.dialogue.labels[ex.chunk] and np.array_equal(request.audio, audio)


# --- metrics on the clock -------------------------------------------------------------------------------

def _played(task, d, moves):
    from speechrl.rlhf.modes.duplex import ChunkOut

    return [ChunkOut(d.action if m == "A" else None, [1] if m == "S" else [], m == "S") for m in moves]


def test_playing_the_reference_meets_every_target_and_silence_or_chatter_do_not(task, dialogues):
    from speechrl.rlhf.modes.duplex_eval import summarize, timeline_metrics

    train, _ = dialogues
    reference = [timeline_metrics(d, [task.parse(ids) for ids in task.reference(d)]) for d in train]
    m = summarize(reference)
    assert m["duplex/pause_takeover"] == 0 and m["duplex/backchannel_takeover"] == 0 and m["duplex/barge_in"] == 0
    assert m["duplex/interrupt_stop_2"] == 1 and m["duplex/response_latency"] == 1 and m["duplex/tool_exact"] == 1
    assert m["duplex/interrupt_stop_latency"] == 1 and m["duplex/response_within_2"] == 1
    silent = summarize([timeline_metrics(d, _played(task, d, "." * d.num_chunks)) for d in train])
    assert silent["duplex/backchannel_takeover"] == 1 and silent["duplex/tool_exact"] == 0
    assert silent["duplex/response_latency"] >= 3, "never answering is censored at the dialogue's end"
    assert silent["duplex/interrupted_speaking"] == 0 and np.isnan(silent["duplex/interrupt_stop_2"]), \
        "nothing to stop: a silent policy gets no stop rate"
    chatty = summarize([timeline_metrics(d, _played(task, d, "S" * d.num_chunks)) for d in train])
    assert chatty["duplex/pause_takeover"] == 1 and chatty["duplex/barge_in"] == 1
    assert chatty["duplex/interrupted_speaking"] == 1 and chatty["duplex/interrupt_stop_2"] == 0


def test_the_prompt_keeps_the_assistants_last_chunks_as_the_audio_window_keeps_the_users(task):
    assert task.history_chunks == task.window_samples // task.chunk_samples
    call = task.tokenizer('{"tool":"timer","minutes":3}', add_special_tokens=False)["input_ids"]
    busy = [[*call, task.speak_id, *task.layout.codec_ids[:4], task.tokens.end_id]] * 100  # the longest chunks
    short = task.tokenizer(task.prompt(busy[:task.history_chunks]), add_special_tokens=False)["input_ids"]
    assert task.prompt(busy) == task.prompt(busy[:task.history_chunks])
    silent = [[task.tokens.end_id]]
    assert task.prompt([]) == task.prompt(silent * 3) == task.prompt(silent * 80), \
        "before the start the assistant listened: the prompt does not count chunks since the start"
    assert task.prompt(busy[:2]) == task.prompt(silent * 30 + busy[:2])
    assert len(short) + 100 + 32 <= 1024, "instruction, the chunks, 4 s of audio and one chunk fit max_model_len"
    # sampled garbage on the action channel re-tokenizes longer than it was sampled: older chunks go
    garbage = [[*task.layout.text_ids[:24], task.tokens.end_id]] * 100
    ids = task.tokenizer(task.prompt(garbage), add_special_tokens=False)["input_ids"]
    assert len(ids) <= task.prompt_budget < 1024


def test_recovery_examples_put_the_assistants_own_mistake_in_the_prompt(task, dialogues):
    from speechrl.rlhf.modes.duplex_chunks import FALSE_START, LATE_START, ChunkExample, recovery_examples

    silent = [task.tokens.end_id]
    seen = set()
    for d in dialogues[0]:
        reference = task.reference(d)
        for c, variant in recovery_examples(d):
            seen.add((d.kind, variant))
            history, target = task.history_and_target(ChunkExample(f"{d.id}/c{c}/{variant}", d, c, variant))
            assert len(history) == c and task.layout.admits(target)
            if variant == FALSE_START:  # it spoke where the user had the floor: be silent now
                assert d.labels[c] in (LISTEN, PAUSE) and reference[c - 1] == silent and reference[c] == silent
                assert task.parse(history[-1]).speaks and history[:-1] == reference[:c - 1] and target == silent
            else:  # it stayed silent where the answer was due: start the answer now, from its beginning
                k = d.reply[c][1]
                assert variant == LATE_START and d.labels[c] == SPEAK and k in (1, 2)
                assert history[c - k:] == [silent] * k and history[:c - k] == reference[:c - k]
                assert target == reference[c - k] and task.parse(target).speaks and target != reference[c]
    assert {("pause", FALSE_START), ("turn", FALSE_START), ("turn", LATE_START), ("interrupt", LATE_START)} <= seen
    pause = next(d for d in dialogues[0] if d.kind == "pause")
    start, stop = pause.events["pause"]
    assert {c for c, v in recovery_examples(pause) if v == FALSE_START} >= set(range(start, stop)), "every pause chunk"
    with pytest.raises(ValueError, match="variant"):
        task.history_and_target(ChunkExample("x", pause, 3, "early"))


def test_decision_scores_read_the_first_token_of_each_held_out_chunk(task, cfg):
    from speechrl.rlhf.model.backbone import load_backbone
    from speechrl.rlhf.modes import get_mode
    from speechrl.rlhf.modes.duplex_eval import decision_scores

    mode = get_mode(cfg)
    backbone = load_backbone(mode.backbone_path())
    _, held = mode.datasets(4.0)
    scores = decision_scores(task, backbone.model, backbone.processor, held, 16)
    assert 0.0 <= scores["eval/decision_accuracy"] <= 1.0 and 0.0 < scores["eval/onset_speak"] < 1.0
    # a model that always opens its speech is right exactly where the labels say speak
    bias = torch.zeros(backbone.model.config.text_config.vocab_size if hasattr(backbone.model.config, "text_config")
                       else backbone.model.config.vocab_size)
    bias[task.speak_id] = 100.0
    head = backbone.model.get_output_embeddings()
    head.bias = torch.nn.Parameter(bias)
    forced = decision_scores(task, backbone.model, backbone.processor, held, 16)
    labels = [d.labels[c] for d, c, _ in held.index]
    speak = [l in (SPEAK, BACKCHANNEL) for l in labels if l != EITHER]
    assert forced["eval/onset_speak"] == pytest.approx(1.0)
    assert forced["eval/decision_accuracy"] == pytest.approx(np.mean(speak))
    assert forced["eval/decision_accuracy/speak"] == 1.0 and forced["eval/decision_accuracy/listen"] == 0.0
    assert set(k.split("/")[-1] for k in forced if k.startswith("eval/decision_accuracy/")) == set(labels) - {EITHER}


def test_the_decisions_benchmark_reads_calls_token_by_token_and_speech_after_a_cut_in(task, cfg):
    import importlib.util
    from pathlib import Path

    from speechrl.rlhf.model.backbone import load_backbone
    from speechrl.rlhf.modes import get_mode

    path = Path(__file__).resolve().parents[3] / "benchmarks" / "duplex_decisions.py"
    spec = importlib.util.spec_from_file_location("duplex_decisions", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    mode = get_mode(cfg)
    backbone = load_backbone(mode.backbone_path())
    train, _ = mode.datasets(4.0)
    head = backbone.model.get_output_embeddings()
    bias = torch.zeros(head.weight.shape[0])
    bias[task.speak_id] = 100.0  # always opens its speech: never a call, speaks through every cut-in
    head.bias = torch.nn.Parameter(bias)
    calls = bench.tool_calls(task, backbone.model, backbone.processor, train)
    tools = sum(d.kind == "tool" for d in train.dialogues)
    assert calls["n"] == tools and calls["call opens where one is due"] == f"0 of {tools}"
    assert calls["every token of the call right"] == f"0 of {tools}"
    assert calls["P(the whole call) sampled at T = 1, mean (min)"] == "0.000 (0.000)"
    after = bench.speak_after_cut_in(task, backbone.model, backbone.processor, train, max_offset=2)
    assert len(after) == 2 and all(k.startswith(("P(speak) backchannel", "P(speak) interrupt")) for k in after)
    assert all(set(v.split(" / ")) == {"1.00"} for v in after.values())
    bias[task.speak_id] = -100.0  # never speaks
    head.bias = torch.nn.Parameter(bias)
    after = bench.speak_after_cut_in(task, backbone.model, backbone.processor, train, max_offset=2)
    assert all(set(v.split(" / ")) == {"0.00"} for v in after.values())


def test_grpo_credits_the_decision_and_the_call_not_the_speech_after_them(task):
    from speechrl.rlhf.algos.updates import TOKEN_CREDIT, credited
    from speechrl.rollouts.types import Sample

    bos, end, codec = task.speak_id, task.tokens.end_id, task.layout.codec_ids[:4]
    call = task.tokenizer('{"tool":"timer","minutes":3}', add_special_tokens=False)["input_ids"]
    chunks = [[end], [bos, *codec, end], [*call, end], [*call, bos, *codec, end]]
    credits = [task.credit(ids) for ids in chunks]
    assert credits[0] == [1.0] and credits[1] == [1.0] + [0.0] * 5 and credits[2] == [1.0] * (len(call) + 1)
    assert credits[3] == [1.0] * (len(call) + 1) + [0.0] * 5
    samples = [Sample(0, k, [1], ids, [0.0] * len(ids), "", "stop", {TOKEN_CREDIT: c})
               for k, (ids, c) in enumerate(zip(chunks, credits))]
    adv = credited(np.array([2.0, -1.0, 0.5, 1.0]), samples, [1, 3])
    assert adv == [[-1.0] + [0.0] * 5, [1.0] * (len(call) + 1) + [0.0] * 5]
    plain = [Sample(0, 0, [1], [end], [0.0], "", "stop", {})]
    assert credited(np.array([0.3]), plain, [0]) == [pytest.approx(0.3)], "without credit: a float per sample"
    samples[1].metadata[TOKEN_CREDIT] = [1.0]
    with pytest.raises(ValueError, match="token_credit"):
        credited(np.array([2.0, -1.0, 0.5, 1.0]), samples, [1])
