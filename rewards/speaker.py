"""`speaker_similarity`: does the generated voice sound like the reference voice?

Cosine of speaker embeddings of `audio` and `reference_audio`: resemblyzer's d-vector (weights in its
wheel) by default, or a local transformers x-vector model. resemblyzer is installed `--no-deps`: its
metadata asks for `webrtcvad` and `typing`, source-only on PyPI; `webrtcvad-wheels` gives the module.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import numpy as np

from speechrl.rewards.api import Unscored
from speechrl.rewards.speech import JUDGE_RATE, waveforms


class ResemblyzerEncoder:
    def __init__(self, device: str):
        try:
            from resemblyzer import VoiceEncoder, preprocess_wav
        except ImportError as e:
            raise ImportError(f"speaker_similarity: resemblyzer is missing ({e}); install it with "
                              "`pip install --no-deps resemblyzer==0.1.4` (see rewards/speaker.py)") from e
        self.encoder = VoiceEncoder(device="cpu" if device == "auto" else device, verbose=False)
        self.preprocess = preprocess_wav

    def embed(self, audio: np.ndarray) -> np.ndarray:
        # preprocess_wav levels the volume and drops long silences (webrtcvad), as at training time
        return self.encoder.embed_utterance(self.preprocess(audio))


class HfSpeakerEncoder:
    def __init__(self, path: str, device: str):
        import torch
        from transformers import AutoFeatureExtractor, AutoModelForAudioXVector

        device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        self.device = torch.device(device)
        self.features = AutoFeatureExtractor.from_pretrained(path)
        self.model = AutoModelForAudioXVector.from_pretrained(path).to(self.device).eval()

    def embed(self, audio: np.ndarray) -> np.ndarray:
        import soxr
        import torch

        rate = self.features.sampling_rate
        if rate != JUDGE_RATE:
            audio = soxr.resample(audio, JUDGE_RATE, rate).astype(np.float32)
        inputs = self.features(audio, sampling_rate=rate, return_tensors="pt").to(self.device)
        with torch.inference_mode():
            return self.model(**inputs).embeddings[0].float().cpu().numpy()


class SpeakerSimilarityReward:
    """reward = cos(embed(audio), embed(reference_audio)); a sample without either is unscored.

    A waveform sent several times in a batch (the reference shared by the n samples of a prompt)
    is embedded once.
    """

    def __init__(
        self,
        model: str = "resemblyzer",  # "resemblyzer", or a local directory with an AutoModelForAudioXVector
        reference_column: str = "reference_audio",
        audio_column: str = "audio",
        device: str = "auto",  # "auto": a transformers model takes the GPU if there is one; resemblyzer the CPU
    ):
        if model != "resemblyzer" and not (Path(model).expanduser() / "config.json").is_file():
            raise FileNotFoundError(f"speaker_similarity: model={model!r} is neither 'resemblyzer' nor a directory "
                                    "with config.json (a speaker-verification model saved with save_pretrained)")
        self.model, self.device = model, device
        self.reference_column, self.audio_column = reference_column, audio_column
        self._encoder = None

    @property
    def encoder(self):
        if self._encoder is None:
            self._encoder = (ResemblyzerEncoder(self.device) if self.model == "resemblyzer"
                             else HfSpeakerEncoder(str(Path(self.model).expanduser()), self.device))
        return self._encoder

    def __call__(self, completions: list[str], **columns: Any) -> list[Optional[float]]:
        audios = waveforms(columns, self.audio_column, "speaker_similarity")
        refs = waveforms(columns, self.reference_column, "speaker_similarity")
        embeddings: dict[int, np.ndarray] = {}
        scores: list[Optional[float]] = []
        for audio, ref in zip(audios, refs, strict=True):
            missing = next((x for x in (audio, ref) if x is None or isinstance(x, Unscored)), False)
            if missing is not False:
                scores.append(math.nan if missing is None else missing)
                continue
            for x in (audio, ref):
                if id(x) not in embeddings:
                    embeddings[id(x)] = self.encoder.embed(x)
            a, b = embeddings[id(audio)], embeddings[id(ref)]
            scores.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12)))
        return scores
