"""`tts_intelligibility`: does a judge ASR hear the input text in the generated audio?

reward = -min(error rate of the judge's transcript against `text`, error_cap), with asr.py's rates
and normalization. The judge is pluggable (`asr=`: pocketsphinx, the default; embedded; whisper-tiny.en
or whisper-base; a local model directory; see docs/rewards.md) because pocketsphinx, offline and weak,
cannot hear the embedded espeak-ng corpus (WER 0.93).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import numpy as np

from speechrl.rewards.api import Unscored
from speechrl.rewards.asr import char_error_rate, word_error_rate
from speechrl.rewards.asr_judge import BackboneAsrJudge, embedded_judge, is_backbone_dir, judge_build
from speechrl.rewards.speech import JUDGE_RATE, waveforms


class PocketsphinxJudge:
    """pocketsphinx's bundled en-us acoustic model, dictionary and language model."""

    def __init__(self):
        from pocketsphinx import Decoder

        self.decoder = Decoder(samprate=JUDGE_RATE, loglevel="FATAL")

    def transcribe(self, audio: np.ndarray) -> str:
        pcm = (np.clip(audio, -1.0, 1.0) * 32767).astype(np.int16).tobytes()
        self.decoder.start_utt()
        self.decoder.process_raw(pcm, full_utt=True)  # one whole utterance: no state from the previous clip
        self.decoder.end_utt()
        hyp = self.decoder.hyp()
        return hyp.hypstr if hyp is not None else ""


class HfAsrJudge:
    """A transformers ASR model from a local directory (model, feature extractor and tokenizer)."""

    def __init__(self, path: str, device: str = "auto"):
        import torch
        from transformers import pipeline

        device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        self.pipe = pipeline("automatic-speech-recognition", model=str(Path(path).expanduser()), device=device)
        self.rate = self.pipe.feature_extractor.sampling_rate

    def transcribe(self, audio: np.ndarray) -> str:
        import soxr

        if self.rate != JUDGE_RATE:
            audio = soxr.resample(audio, JUDGE_RATE, self.rate).astype(np.float32)
        return self.pipe({"raw": audio, "sampling_rate": self.rate})["text"]


class WhisperJudge:
    """A Whisper from its wheel (`ensure_whisper`), greedy, the batch transcribed in passes of `batch_size`."""

    def __init__(self, name: str, cache_dir: str, device: str = "auto", batch_size: int = 32, window_s: int = 30):
        import torch

        from speechrl.rlhf.model.pretrained.whisper import ensure_whisper, load_whisper

        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        self.path, self.batch_size, self.window_s = ensure_whisper(cache_dir, name), batch_size, window_s
        load_whisper(str(self.path), self.device, window_s)  # load now, once per worker, not inside the first batch's timing

    def transcribe(self, audio: np.ndarray) -> str:
        return self.transcribe_batch([audio])[0]

    def transcribe_batch(self, audios: list[np.ndarray]) -> list[str]:
        """`audios` at 16 kHz; a clip over the window (`window_s`) is cut there."""
        from speechrl.rlhf.model.pretrained.whisper import transcribe

        return transcribe(self.path, audios, JUDGE_RATE, batch_size=self.batch_size, device=self.device,
                          window_s=self.window_s)


def whisper_names() -> list[str]:
    """The Whisper judges `asr=` can name (their wheels, in rlhf/model/pretrained/whisper.py)."""
    from speechrl.rlhf.model.pretrained.whisper import WHEELS

    return list(WHEELS)


class TtsIntelligibilityReward:
    """reward = -min(CER or WER, error_cap); components "reward", "cer", "wer".

    A sample without audio or text is unscored. The judge loads at the first batch, once; with
    asr="embedded" it must have been built into `cache_dir` (trainers build it before their
    reward workers start: rlhf/trainers/judges.py); a Whisper judge is converted on first use.
    """

    def __init__(
        self,
        asr: str = "pocketsphinx",  # "pocketsphinx", "embedded", "whisper-tiny.en", "whisper-base", or a directory
        metric: str = "cer",  # "cer" or "wer": which one the reward uses (both are logged)
        error_cap: float = 1.0,  # a babbling output can push the error rate past 1; keep the score bounded
        text_column: str = "text",
        audio_column: str = "audio",
        device: str = "auto",  # for a model judge: "auto" takes the GPU if there is one
        cache_dir: str = "~/.cache/speechrl",  # where the embedded or Whisper judge lives (run.cache_dir)
        window_s: int = 30,  # a Whisper judge's window in seconds: 15 hears clips of a few seconds 2.2x faster
        corpus: Any = None,  # asr="embedded": the data.synthetic block the judge is trained on; None: the TTS demo's
    ):
        if metric not in ("cer", "wer"):
            raise ValueError(f"tts_intelligibility: metric={metric!r}; use 'cer' or 'wer'")
        if error_cap <= 0:
            raise ValueError(f"tts_intelligibility: error_cap must be > 0, got {error_cap}")
        if not isinstance(asr, str):
            raise TypeError(f"tts_intelligibility: asr={asr!r}; use 'pocketsphinx', 'embedded', a Whisper name "
                            "or a directory path")
        named = asr in ("pocketsphinx", "embedded") or (asr.startswith("whisper-") and asr in whisper_names())
        is_dir = (Path(asr).expanduser() / "config.json").is_file()
        if asr.startswith("whisper-") and not named and not is_dir:
            raise ValueError(f"tts_intelligibility: unknown Whisper judge asr={asr!r}; known: "
                             f"{', '.join(whisper_names())}")
        if not named and not is_dir:
            raise FileNotFoundError(f"tts_intelligibility: asr={asr!r} is neither 'pocketsphinx', 'embedded', "
                                    f"{', '.join(map(repr, whisper_names()))} nor a directory with config.json (a "
                                    "speechrl backbone, or a transformers ASR model saved with save_pretrained)")
        self.asr, self.metric, self.error_cap, self.device = asr, metric, error_cap, device
        self.build = judge_build(corpus)  # checked here, so a malformed block fails before any rollout
        from speechrl.rlhf.model.pretrained.whisper import check_window

        self.cache_dir, self.window_s = cache_dir, check_window(window_s, "tts_intelligibility")
        self.text_column, self.audio_column = text_column, audio_column
        self._judge = None

    @property
    def judge(self):
        if self._judge is None:
            if self.asr == "pocketsphinx":
                self._judge = PocketsphinxJudge()
            elif self.asr == "embedded":
                self._judge = BackboneAsrJudge(embedded_judge(self.cache_dir, self.build), self.device)
            elif self.asr.startswith("whisper-") and self.asr in whisper_names():  # a name wins over a folder
                self._judge = WhisperJudge(self.asr, self.cache_dir, self.device, window_s=self.window_s)
            elif is_backbone_dir(self.asr):
                self._judge = BackboneAsrJudge(self.asr, self.device)
            else:
                self._judge = HfAsrJudge(self.asr, self.device)
        return self._judge

    def transcribe(self, audios: list[np.ndarray]) -> list[str]:
        """Batched where the judge can: a model judge decodes the whole batch at once."""
        if hasattr(self.judge, "transcribe_batch"):
            return self.judge.transcribe_batch(audios)
        return [self.judge.transcribe(a) for a in audios]

    def __call__(self, completions: list[str], **columns: Any) -> dict[str, list[Optional[float]]]:
        if self.text_column not in columns:
            raise KeyError(f"tts_intelligibility: no text column {self.text_column!r} in the batch "
                           f"(columns: {', '.join(sorted(columns))}); set kwargs.text_column")
        audios = waveforms(columns, self.audio_column, "tts_intelligibility")
        texts = columns[self.text_column]
        if len(texts) != len(audios):
            raise ValueError(f"tts_intelligibility: {len(audios)} waveforms in {self.audio_column!r} but "
                             f"{len(texts)} texts in {self.text_column!r}; send one of each per sample")
        scored = [a is not None and not isinstance(a, Unscored) and t is not None for a, t in zip(audios, texts)]
        heard = {id(a): a for a, ok in zip(audios, scored) if ok}  # one waveform sent for several texts is heard once
        transcripts = dict(zip(heard, self.transcribe(list(heard.values()))))
        out: dict[str, list] = {"reward": [], "cer": [], "wer": []}
        for audio, text, ok in zip(audios, texts, scored):
            if not ok:
                for k in out:
                    out[k].append(audio if isinstance(audio, Unscored) else math.nan)
                continue
            hyp = transcripts[id(audio)]
            cer, wer = char_error_rate(hyp, text), word_error_rate(hyp, text)
            out["cer"].append(cer)
            out["wer"].append(wer)
            out["reward"].append(-min(cer if self.metric == "cer" else wer, self.error_cap))
        return out
