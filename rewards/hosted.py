"""A transformers classifier as a reward: a team's reward model, loaded from a local directory.

`hf_classifier` scores either the completions' text (a sequence-classification model: a
preference reward model, a fluency or toxicity classifier) or an audio column (an
audio-classification model: a quality or speaker-match classifier), in batches, on the reward
worker's device. Give it `resources.num_gpus` in the recipe to put it on a GPU worker of its own.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

MODALITIES = ("text", "audio")


class HfClassifierReward:
    """reward = P(`label`) under the classifier, or its single logit when the model has one output
    (the usual shape of a reward model trained on preference pairs)."""

    def __init__(
        self,
        path: str,  # local directory from save_pretrained (model + tokenizer or feature extractor)
        modality: str = "text",  # "text" scores the completions, "audio" scores `audio_column`
        label: Union[str, int, None] = None,  # class whose probability is the reward; null: the 2nd of 2 classes
        text_pair_column: Optional[str] = None,  # batch column paired with each completion (e.g. the prompt text)
        audio_column: str = "audio",  # batch column of float32 waveforms at the batch's `sample_rate`
        batch_size: int = 16,  # samples per forward pass
        max_length: int = 512,  # text is truncated to this many tokens
        device: str = "auto",  # "auto" takes the GPU Ray gave this worker, else the CPU
    ):
        import torch
        from transformers import (AutoFeatureExtractor, AutoModelForAudioClassification,
                                  AutoModelForSequenceClassification, AutoTokenizer)

        if modality not in MODALITIES:
            raise ValueError(f"hf_classifier: modality={modality!r}; use one of {', '.join(MODALITIES)}")
        if not (Path(path).expanduser() / "config.json").is_file():
            raise FileNotFoundError(f"hf_classifier: {path!r} holds no config.json; point kwargs.path at a "
                                    "directory written by save_pretrained (no hub downloads here)")
        if batch_size < 1:
            raise ValueError(f"hf_classifier: batch_size must be >= 1, got {batch_size}")
        path = str(Path(path).expanduser())
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                   "cpu" if device == "auto" else device)
        if modality == "text":
            self.preprocess = AutoTokenizer.from_pretrained(path)
            model = AutoModelForSequenceClassification.from_pretrained(path)
        else:
            self.preprocess = AutoFeatureExtractor.from_pretrained(path)
            model = AutoModelForAudioClassification.from_pretrained(path)
        self.model = model.to(self.device).eval()
        self.index = _label_index(model.config, label, path)
        self.modality, self.text_pair_column, self.audio_column = modality, text_pair_column, audio_column
        self.batch_size, self.max_length = batch_size, max_length

    def __call__(self, completions: list[str], **columns: Any) -> list[Optional[float]]:
        inputs = self._inputs(completions, columns)
        scores: list[Optional[float]] = [None] * len(inputs)  # a sample without audio stays unscored
        for batch in self._batches(inputs):
            for i, score in zip(batch, self._forward([inputs[i] for i in batch])):
                scores[i] = score
        return scores

    def _batches(self, inputs: list) -> list[list[int]]:
        """Sample indices, at most batch_size at a time. An audio model whose feature extractor
        gives no attention mask (wav2vec2-base and kin) hears zero padding as signal, and batching
        would change a clip's score: its batches hold clips of one length only (the n samples of
        one prompt still batch together)."""
        unmasked_audio = self.modality == "audio" and not self.preprocess.return_attention_mask
        groups: dict[Any, list[int]] = {}
        for i, item in enumerate(inputs):
            if item is None:
                continue
            groups.setdefault(len(item) if unmasked_audio else None, []).append(i)
        return [g[s:s + self.batch_size] for g in groups.values() for s in range(0, len(g), self.batch_size)]

    def _inputs(self, completions: list[str], columns: dict[str, Any]) -> list:
        if self.modality == "text":
            if self.text_pair_column is None:
                return list(completions)
            return list(zip(_column(columns, self.text_pair_column), completions))
        import soxr

        rate, target = columns.get("sample_rate"), self.preprocess.sampling_rate
        if rate is None:
            raise KeyError("hf_classifier: the batch has audio but no 'sample_rate'; send the waveforms' rate with them")
        return [None if a is None else np.asarray(a, dtype=np.float32) if rate == target else
                soxr.resample(np.asarray(a, dtype=np.float32), rate, target) for a in _column(columns, self.audio_column)]

    def _forward(self, chunk: list) -> list[float]:
        import torch

        if self.modality == "text":
            pairs = isinstance(chunk[0], tuple)
            features = self.preprocess([c[0] for c in chunk] if pairs else chunk,
                                       [c[1] for c in chunk] if pairs else None,
                                       padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        else:
            features = self.preprocess(chunk, sampling_rate=self.preprocess.sampling_rate, padding=True,
                                       return_tensors="pt")
        with torch.inference_mode():
            logits = self.model(**features.to(self.device)).logits.float()
        if self.index is None:
            return logits[:, 0].tolist()
        return logits.softmax(dim=-1)[:, self.index].tolist()


def _label_index(config, label: Union[str, int, None], path: str) -> Optional[int]:
    """Which output is the reward; None means the model's one logit is."""
    labels = {int(i): name for i, name in config.id2label.items()}
    if config.num_labels == 1:
        if label is not None:
            raise ValueError(f"hf_classifier: {path} has one output (a reward model's score); drop kwargs.label")
        return None
    if label is None:
        if config.num_labels == 2:
            return 1
        raise ValueError(f"hf_classifier: {path} has {config.num_labels} classes; set kwargs.label to one of {labels}")
    if isinstance(label, int) and label in labels:
        return label
    by_name = {name: i for i, name in labels.items()}
    if label in by_name:
        return by_name[label]
    raise ValueError(f"hf_classifier: label {label!r} is not a class of {path}; its classes are {labels}")


def _column(columns: dict[str, Any], name: str) -> list:
    if name not in columns:
        raise KeyError(f"hf_classifier: no column {name!r} in the batch (columns: {', '.join(sorted(columns))})")
    return columns[name]
