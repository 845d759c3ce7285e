"""The trained persona judge: what it is built from, where it lives, and the card it ships with.

`persona_judge model=trained` reads SmolLM2-135M-Instruct fine-tuned on rule-built judgments
(data/persona_judgments.py) into `<cache_dir>/judges/persona-smollm2-<key>`; the trainer builds it once
before its reward workers start (rlhf/trainers/persona_judge_build.py, `speechrl build-judges`). Beside
the weights, `persona_judge.json` holds the rubric it was trained with (the reward asks with that one),
its rating scale, and its held-out accuracy per corruption kind.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from speechrl.data.personagym import personagym_present

JUDGE_CARD = "persona_judge.json"  # written last into the judge's directory: its presence means "built"
TRAINED_JUDGE_VERSION = 3  # bump when the build or its data change, so cached judges are rebuilt

TRAINED_RUBRIC = (
    "Judge whether the assistant's reply stays in character as the persona below. Out of character: it "
    "contradicts a persona fact, claims facts of somebody else, says something from the never-say list, "
    "breaks an emotional boundary, or speaks as an AI or a program instead of as the persona.")


@dataclass(frozen=True)
class PersonaJudgeBuild:
    """How the trained judge is built; every field is part of its directory's key."""

    made_personas: int = 600  # made-up cards (data/persona_factory.py), split train/held-out like the others
    personagym: bool = True  # also PersonaGym's 200 cards from the shared data folder, where present
    heldout: float = 0.25  # fraction of the cards (by id hash) kept out of training; the builtin four always are
    per_card: int = 2  # judgments of each corruption kind per training card
    steps: int = 240  # optimizer steps (about 11 s each on 2 CPU cores)
    batch_size: int = 8  # judgments per step (3 prompts each: both replies rated, and the pair)
    lr: float = 2e-4  # AdamW, linear warm-up over the first 5 % of steps, then linear decay
    train_layers: int = 8  # SmolLM2's top decoder layers trained (of 30); the rest and the embeddings frozen
    eval_per_kind: int = 24  # held-out judgments per (card source, corruption kind) measured after training
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size", "per_card", "eval_per_kind"):
            if getattr(self, name) < 1:
                raise ValueError(f"persona_judge: build.{name}={getattr(self, name)}; give an integer >= 1")
        if self.made_personas < 0:
            raise ValueError(f"persona_judge: build.made_personas={self.made_personas}; give an integer >= 0")
        if not 0.0 < self.heldout < 1.0:
            raise ValueError(f"persona_judge: build.heldout={self.heldout}; give the held-out fraction, in (0, 1)")
        if not 1 <= self.train_layers <= 30:
            raise ValueError(f"persona_judge: build.train_layers={self.train_layers}; SmolLM2-135M has 30 layers: "
                             "give 1 to 30")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"persona_judge: build.lr={self.lr}; give a positive learning rate")

    @classmethod
    def from_kwargs(cls, values: Any) -> "PersonaJudgeBuild":
        """From a recipe's `build:` mapping; an unknown key names the known ones."""
        if values is None:
            return cls()
        if not isinstance(values, dict):
            raise ValueError(f"persona_judge: build must be a mapping of build settings, got {values!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"persona_judge: build has unknown key(s) {unknown}; known: {sorted(known)}")
        return cls(**values)


def trained_judge_dir(cache_dir: str | Path, build: PersonaJudgeBuild = PersonaJudgeBuild()) -> Path:
    """Where the trained judge of `build` lives (built or not)."""
    keyed: list[Any] = [TRAINED_JUDGE_VERSION, asdict(build)]
    if build.personagym and not personagym_present():  # built without PersonaGym's cards: another judge
        keyed.append("no personagym data")
    key = hashlib.sha1(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:10]
    return Path(cache_dir).expanduser() / "judges" / f"persona-smollm2-{key}"


def read_judge_card(path: str | Path) -> dict | None:
    """The judge card of a model directory, or None where it has none (any other model)."""
    card = Path(path).expanduser() / JUDGE_CARD
    if not card.is_file():
        return None
    try:
        return json.loads(card.read_text())
    except ValueError as e:
        raise ValueError(f"{card}: not valid JSON ({e}); delete the judge directory to rebuild it") from e


def heldout_table(scores: dict) -> str:
    """A judge card's held-out accuracy as a table: a row per card source, pairwise accuracy per
    corruption kind (pointwise ordering accuracy in brackets), then the judgments counted."""
    kinds = sorted({k for v in scores.values() for k in v["pairwise"] if k != "all"}) + ["all"]
    lines = ["| held-out cards | " + " | ".join(kinds) + " | judgments |", "|---" * (len(kinds) + 2) + "|"]
    for source, v in scores.items():
        cells = [f"{v['pairwise'][k]:.2f} ({v['pointwise'][k]:.2f})" if k in v["pairwise"] else "-" for k in kinds]
        lines.append(f"| {source} | " + " | ".join(cells) + f" | {v['judgments']['all']} |")
    return "\n".join(lines)
