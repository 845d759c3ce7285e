"""`dnsmos`: a no-reference MOS prediction of the generated audio's quality.

DNSMOS (Microsoft's Deep Noise Suppression MOS, P.835 and P.808 heads) as ONNX models shipped in
the `speechmos` wheel, run with onnxruntime on the CPU. reward = the overall (OVRL) MOS, 1..5;
the speech-signal (SIG), background (BAK) and P.808 MOS are returned as components. Clips shorter
than DNSMOS's 9 s window are looped to fill it (speechmos does this).
"""
from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np

from speechrl.rewards.api import Unscored
from speechrl.rewards.speech import JUDGE_RATE, waveforms

COMPONENTS = {"reward": "ovrl_mos", "sig": "sig_mos", "bak": "bak_mos", "p808": "p808_mos"}


def _load_dnsmos(personalized: bool, num_threads: int):
    """speechmos's DNSMOS with onnxruntime sessions capped at `num_threads` (its own use every core,
    which starves the rollouts sharing the machine)."""
    import os

    import onnxruntime as ort
    from speechmos import dnsmos

    models = os.path.dirname(os.path.abspath(dnsmos.__file__))
    primary = os.path.join(models, "pdnsmos_models" if personalized else "dnsmos_models", "sig_bak_ovr.onnx")
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = num_threads
    model = dnsmos.DNSMOS.__new__(dnsmos.DNSMOS)  # its __init__ would build sessions with every core
    model.primary_model_path = primary
    model.onnx_sess = ort.InferenceSession(primary, options, providers=["CPUExecutionProvider"])
    model.p808_onnx_sess = ort.InferenceSession(os.path.join(models, "dnsmos_models", "model_v8.onnx"), options,
                                                providers=["CPUExecutionProvider"])
    return model


class DnsmosReward:
    """reward = DNSMOS OVRL; components "sig", "bak", "p808". No audio: unscored."""

    def __init__(
        self,
        personalized: bool = False,  # the personalized DNSMOS also penalizes interfering talkers
        num_threads: int = 1,  # onnxruntime threads
        audio_column: str = "audio",
    ):
        if num_threads < 1:
            raise ValueError(f"dnsmos: num_threads must be >= 1, got {num_threads}")
        self.personalized, self.num_threads, self.audio_column = personalized, num_threads, audio_column
        self._model = None

    def __call__(self, completions: list[str], **columns: Any) -> dict[str, list[Optional[float]]]:
        if self._model is None:
            self._model = _load_dnsmos(self.personalized, self.num_threads)
        out: dict[str, list] = {k: [] for k in COMPONENTS}
        for audio in waveforms(columns, self.audio_column, "dnsmos"):
            if audio is None or isinstance(audio, Unscored):
                scores = dict.fromkeys(COMPONENTS.values(), math.nan if audio is None else audio)
            else:
                scores = self._model(np.clip(audio, -1.0, 1.0), JUDGE_RATE, self.personalized)
            for key, name in COMPONENTS.items():
                out[key].append(float(scores[name]) if not isinstance(scores[name], Unscored) else scores[name])
        return out
