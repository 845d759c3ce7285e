"""Where a duplex policy's teacher-forced decisions go wrong: the tool calls token by token, and
P(speak) chunk by chunk after the user cuts in (a backchannel: keep speaking; an interruption: stop).

For an SFT (or RL) run's weights, on its recipe's training and held-out dialogues, each decision
after the reference's own chunks so far (as SFT trains it):

- tool dialogues, the chunk a call is due: how often the call opens (its first token is the argmax,
  not `<|audio_bos|>`), the tool's name and its city or number are the argmax, and how often every
  token of the call is; and the probability of the whole call, token by token, which is how often a
  sampled evaluation at temperature 1 gets it right (the played metric, without its sampling noise);
- backchannel and interrupt dialogues: the mean P(`<|audio_bos|>`) at each offset from the chunk the
  user starts in (offset 0; an interruption's offset 0 is free, so it starts at 1).

The played metrics (`<run>/duplex/step-N.json`) say *that* a rate is missed; this says which
decision, and whether the training dialogues are fit at all (docs/results.md, "More dialogues where
the words decide").

    python benchmarks/duplex_decisions.py runs/<duplex run> [--max-offset 4] [recipe overrides ...]

Prints markdown tables.
"""
from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np

from speechrl.rlhf.core.config import load_recipe
from speechrl.rlhf.model.backbone import load_backbone
from speechrl.rlhf.modes import get_mode
from speechrl.rlhf.modes.duplex_chunks import ChunkExample
from speechrl.rlhf.modes.duplex_data import window
from speechrl.rlhf.modes.duplex_eval import teacher_forced

BATCH = 16


def teacher_forced_at(task, model, processor, dataset, chunks):
    """(target ids, logits predicting them) at each (dialogue, chunk) of `chunks`."""
    items = [(ChunkExample(f"{d.id}/c{c}", d, c), window(d, c, dataset.chunk_samples, dataset.window_samples))
             for d, c in chunks]
    return [(target, logits) for _, target, logits in teacher_forced(task, model, processor, items, BATCH)]


def tool_calls(task, model, processor, dataset) -> dict:
    dialogues = [d for d in dataset.dialogues if d.kind == "tool"]
    if not dialogues:
        return {}
    tok = processor.tokenizer
    rows = teacher_forced_at(task, model, processor, dataset, [(d, d.events["action"]) for d in dialogues])
    opens = name = field = whole = 0
    # P(the whole call) at temperature 1, from the logits `teacher_forced` already gave (token_logprobs would
    # run the model again); unmasked, so a lower bound on vLLM's, whose layout mask only removes mass
    sampled = []
    for target, logits in rows:
        call = target[:-1]  # the call's tokens; the last is <|codec_end|>
        ok = [p == t for p, t in zip(logits.argmax(-1).tolist(), call)]
        sampled.append(float(logits[:len(call)].log_softmax(-1)[range(len(call)), call].sum().exp()))
        words = [tok.decode([t]) for t in call]
        opens += ok[0]
        whole += all(ok)
        # `{"tool":"weather","city":"paris"}`: the name is the token after the first `":"`, the
        # city or number the last word-like token before the closing quote or brace
        name += ok[words.index('":"') + 1] if '":"' in words else 0
        field += ok[max(i for i, w in enumerate(words) if w.strip('"{}:,'))]
    n = len(rows)
    return {"n": n, "call opens where one is due": f"{opens} of {n}", "the tool's name right": f"{name / n:.2f}",
            "the city or number right": f"{field / n:.2f}", "every token of the call right": f"{whole} of {n}",
            "P(the whole call) sampled at T = 1, mean (min)": f"{np.mean(sampled):.3f} ({min(sampled):.3f})"}


def speak_after_cut_in(task, model, processor, dataset, max_offset: int) -> dict:
    items, keys = [], []
    for d in dataset.dialogues:
        if d.kind not in ("backchannel", "interrupt"):
            continue
        onset = d.events["interrupt"] if d.kind == "interrupt" else d.events["backchannel"][0]
        for c in range(onset, min(d.num_chunks, onset + max_offset + 1)):
            if d.labels[c] in ("backchannel", "stop"):
                items.append((d, c))
                keys.append((d.kind, c - onset))
    by = defaultdict(list)
    for key, (_, logits) in zip(keys, teacher_forced_at(task, model, processor, dataset, items)):
        by[key].append(float(logits[0].softmax(-1)[task.speak_id]))
    return {f"P(speak) {kind}, offsets " + " / ".join(str(o) for o in sorted(o for k, o in by if k == kind)):
            " / ".join(f"{np.mean(by[(kind, o)]):.2f}" for o in sorted(o for k, o in by if k == kind))
            for kind in ("backchannel", "interrupt") if any(k == kind for k, _ in by)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a duplex run directory (its recipe.yaml and final/ weights)")
    ap.add_argument("--weights", type=Path, default=None, help="another checkpoint's weights (default: <run>/final)")
    ap.add_argument("--max-offset", type=int, default=4, help="chunks after the cut-in to report (default 4)")
    ap.add_argument("overrides", nargs="*", help="recipe overrides (key=value)")
    args = ap.parse_args()
    recipe = args.run / "recipe.yaml"
    if not recipe.is_file():
        raise SystemExit(f"{recipe}: no recipe.yaml; pass a run directory of `speechrl train duplex/...`")
    cfg = load_recipe(str(recipe), args.overrides)
    if cfg.mode != "duplex":
        raise SystemExit(f"{recipe}: mode is {cfg.mode!r}; this benchmark reads duplex runs")
    weights = args.weights or args.run / "final"
    backbone = load_backbone(weights)
    model = backbone.model.eval()
    mode = get_mode(cfg)
    train, held = mode.datasets(backbone.max_audio_seconds)
    task = mode.setup_task(backbone.processor)
    columns = {}
    for name, dataset in (("training dialogues", train), ("held-out dialogues", held)):
        columns[name] = {**tool_calls(task, model, backbone.processor, dataset),
                         **speak_after_cut_in(task, model, backbone.processor, dataset, args.max_offset)}
    rows = list(dict.fromkeys(k for col in columns.values() for k in col if k != "n"))
    print(f"\nteacher-forced decisions of {weights}\n")
    print("| | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for row in rows:
        print(f"| {row} | " + " | ".join(str(col.get(row, "")) for col in columns.values()) + " |")


if __name__ == "__main__":
    main()
