"""The duplex mode's evaluation: Full-Duplex-Bench-style metrics of dialogues played on the clock
(`timeline_metrics`, `summarize`), the issue's targets, and SFT's teacher-forced decisions
(`decision_scores`). docs/duplex.md defines each metric."""
from __future__ import annotations

import numpy as np

from speechrl.rewards.duplex import ACT, BACKCHANNEL, PAUSE, same_action
from speechrl.rlhf.modes.duplex_data import is_event

# Full-Duplex-Bench-style targets on held-out dialogues after RL (docs/duplex.md): (metric key, label,
# target as text, whether it is met)
TARGETS = (
    ("duplex/pause_takeover", "pause take-over rate", "<= 0.2", lambda v: v <= 0.2),
    ("duplex/backchannel_takeover", "backchannel take-over rate", "<= 0.2", lambda v: v <= 0.2),
    ("duplex/interrupt_stop_2", "interruptions stopped within 2 chunks", ">= 0.9", lambda v: v >= 0.9),
    ("duplex/response_latency", "response latency, median chunks", "<= 2", lambda v: v <= 2),
    ("duplex/tool_exact", "tool-call exact match", ">= 0.9", lambda v: v >= 0.9),
)


def timeline_metrics(dialogue, played) -> dict:
    """One dialogue's turn-taking on the clock (docs/duplex.md): take-overs, latencies, the tool call.
    `played`: its chunks as played (duplex.ChunkOut: action, codec ids, speaks)."""
    speaks = [c.speaks for c in played]
    acts = [bool(c.action) for c in played]
    out: dict = {"kind": dialogue.kind}
    latencies = []
    for end in dialogue.events.get("ends", []):
        after = [c for c in range(end + 1, dialogue.num_chunks) if speaks[c] or acts[c]]
        latencies.append(after[0] - end if after else dialogue.num_chunks - end)  # never: censored at the end
    out["latencies"] = latencies
    if PAUSE in dialogue.labels:
        out["pause_takeover"] = any(speaks[c] or acts[c] for c, l in enumerate(dialogue.labels) if l == PAUSE)
    if BACKCHANNEL in dialogue.labels:
        out["backchannel_takeover"] = any(not speaks[c] for c, l in enumerate(dialogue.labels) if l == BACKCHANNEL)
    if "interrupt" in dialogue.events:
        onset = dialogue.events["interrupt"]
        # a stop is only measured where there was something to stop: speaking as the user cut in
        out["interrupted_speaking"] = speaks[onset - 1] or speaks[onset]
        if out["interrupted_speaking"]:
            silent = [c for c in range(onset, dialogue.num_chunks) if not speaks[c]]
            out["stop_latency"] = silent[0] - onset if silent else dialogue.num_chunks - onset
    if dialogue.action:
        said = next((c.action for c in played if c.action), None)
        out["tool_exact"] = same_action(said, dialogue.action)
        out["tool_said"] = said
    else:
        out["false_call"] = any(acts)
    out["barge_in"] = any(speaks[c] for c, l in enumerate(dialogue.labels) if l == "listen")
    out["labels"] = "".join(_LABEL_CHARS[l] for l in dialogue.labels)
    out["played"] = "".join("A" if a else ("S" if s else ".") for s, a in zip(speaks, acts))
    return out


_LABEL_CHARS = {"listen": ".", "pause": "p", "speak": "S", "backchannel": "b", "stop": "x", "either": "?", "act": "A"}


def summarize(rows: list[dict]) -> dict[str, float]:
    """The held-out metrics over dialogues' `timeline_metrics` (NaN where no dialogue has the event)."""
    def rate(key: str) -> float:
        values = [float(r[key]) for r in rows if key in r]
        return float(np.mean(values)) if values else float("nan")

    stops = [r["stop_latency"] for r in rows if "stop_latency" in r]
    latencies = [x for r in rows for x in r["latencies"]]
    return {"duplex/pause_takeover": rate("pause_takeover"), "duplex/backchannel_takeover": rate("backchannel_takeover"),
            "duplex/interrupt_stop_2": float(np.mean([s <= 2 for s in stops])) if stops else float("nan"),
            "duplex/interrupt_stop_latency": float(np.median(stops)) if stops else float("nan"),
            "duplex/interrupted_speaking": rate("interrupted_speaking"),
            "duplex/response_latency": float(np.median(latencies)) if latencies else float("nan"),
            "duplex/response_within_2": float(np.mean([x <= 2 for x in latencies])) if latencies else float("nan"),
            "duplex/tool_exact": rate("tool_exact"), "duplex/false_call": rate("false_call"),
            "duplex/barge_in": rate("barge_in")}


def teacher_forced(task, model, processor, items, batch_size: int):
    """Each of `items` ((ChunkExample, the window it hears)) teacher-forced, as SFT trains it: yields
    (example, its target ids, the logits [len(target), vocab] that predict them, float32 on the CPU).
    In eval mode without gradients; the model's mode is restored after the last item."""
    import torch

    from speechrl.rlhf.model.logprobs import build_token_batch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(items), batch_size):
                part = items[start:start + batch_size]
                rows = [task.sft_example(ex, audio) for ex, audio in part]
                batch = build_token_batch(processor, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows],
                                          processor.tokenizer.pad_token_id).to(model.device)
                logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                               input_features=batch.input_features,
                               feature_attention_mask=batch.feature_attention_mask).logits
                for k, ((ex, _), (prompt, target, _)) in enumerate(zip(part, rows)):
                    yield ex, list(target), logits[k, len(prompt) - 1: len(prompt) - 1 + len(target)].float().cpu()
    finally:
        model.train(was_training)


def decision_scores(task, model, processor, chunks, batch_size: int) -> dict[str, float]:
    """Teacher-forced decisions of an in-process model on `chunks` (a duplex.ChunkDataset; see
    `DuplexMode.evaluate_offline`):
    `eval/decision_accuracy` (the likeliest of listen, speak and call, summed over the tokens that
    start each, against the label; "either" chunks left out), the same per label
    (`eval/decision_accuracy/<label>`: where the overall figure hides a kind of chunk) and
    `eval/onset_speak` (the mean probability of speaking in the chunk an answer is due)."""
    import torch

    layout, right, onsets, by_label = task.layout, [], [], {}
    text = torch.tensor(layout.text_ids)
    expected = {PAUSE: 0, BACKCHANNEL: 1, ACT: 2, "listen": 0, "stop": 0, "speak": 1}
    for ex, _, logits in teacher_forced(task, model, processor, [chunks[i] for i in range(len(chunks))], batch_size):
        p = logits[0].softmax(-1)
        mass = [float(p[layout.end_id]), float(p[task.speak_id]), float(p[text].sum())]
        label = ex.dialogue.labels[ex.chunk]
        if label in expected:
            right.append(int(np.argmax(mass)) == expected[label])
            by_label.setdefault(label, []).append(right[-1])
        if label in ("speak", ACT) and is_event(ex.dialogue, ex.chunk):
            onsets.append(mass[1] + (mass[2] if label == ACT else 0.0))
    return {"eval/decision_accuracy": float(np.mean(right)) if right else float("nan"),
            **{f"eval/decision_accuracy/{label}": float(np.mean(v)) for label, v in sorted(by_label.items())},
            "eval/onset_speak": float(np.mean(onsets)) if onsets else float("nan")}
