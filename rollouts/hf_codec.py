"""Neural codecs from transformers (Mimi, DAC, EnCodec), loaded from a local directory.

Each keeps its first `num_codebooks` residual codebooks; the ids they emit are flattened as
codec.py describes. A real checkpoint's vocabulary (Mimi: 8 x 2048) is larger than the tiny
backbone's 1024 codec tokens: build the backbone with enough (`CodecTokens` says how many).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from speechrl.rollouts.codec import flatten_codes, prepare_waveform, unflatten_ids

SUPPORTED = ("mimi", "dac", "encodec")


class HfCodec:
    """A transformers codec as an `AudioCodec`; runs on the CPU unless given a device."""

    def __init__(self, path: str | Path, num_codebooks: Optional[int] = None, device: str = "cpu"):
        import torch
        from transformers import AutoConfig, AutoModel

        path = Path(path).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"HfCodec: {path} holds no config.json; save_pretrained a Mimi, DAC or "
                                    "EnCodec model there (nothing is downloaded)")
        config = AutoConfig.from_pretrained(path)
        if config.model_type not in SUPPORTED:
            raise ValueError(f"HfCodec: {path} is a {config.model_type!r} model; supported: {', '.join(SUPPORTED)}")
        if config.model_type == "encodec" and (config.chunk_length_s or config.normalize):
            # the 48 kHz EnCodec rescales each chunk by a float that no token carries
            raise ValueError(f"HfCodec: {path} is a chunked/normalized EnCodec (the 48 kHz kind), whose per-chunk "
                             "scales cannot travel as tokens; use the 24 kHz EnCodec, DAC or Mimi")
        self.kind, self.device = config.model_type, torch.device(device)
        self.model = AutoModel.from_pretrained(path).to(self.device).eval()
        self.sample_rate, self.codebook_size = int(config.sampling_rate), int(config.codebook_size)
        self.frame_rate = float(config.frame_rate)
        available = self._available_codebooks()
        self.num_codebooks = available[0] if num_codebooks is None else num_codebooks
        if self.num_codebooks not in available:
            raise ValueError(f"HfCodec: num_codebooks={num_codebooks} for {path} ({self.kind}); choose one of {available}")
        self._bandwidth = None
        if self.kind == "encodec":  # EnCodec picks its number of codebooks by bandwidth
            self._bandwidth = dict(zip(available, config.target_bandwidths))[self.num_codebooks]

    def _available_codebooks(self) -> list[int]:
        """Codebook counts this model can emit; the first is the default (EnCodec's lowest bandwidth)."""
        config = self.model.config
        if self.kind == "encodec":
            return [self.model.quantizer.get_num_quantizers_for_bandwidth(bw) for bw in config.target_bandwidths]
        total = config.n_codebooks if self.kind == "dac" else config.num_quantizers
        return list(range(total, 0, -1))

    def encode(self, waveform: np.ndarray, sample_rate: int) -> np.ndarray:
        import torch

        audio = prepare_waveform(waveform, sample_rate, self.sample_rate, f"HfCodec({self.kind}).encode")
        x = torch.from_numpy(audio).to(self.device)[None, None, :]
        with torch.inference_mode():
            if self.kind == "encodec":
                codes = self.model.encode(x, bandwidth=self._bandwidth, return_dict=True).audio_codes[0]
            elif self.kind == "dac":
                codes = self.model.encode(x, n_quantizers=self.num_codebooks, return_dict=True).audio_codes
            else:
                codes = self.model.encode(x, num_quantizers=self.num_codebooks, return_dict=True).audio_codes
        # DAC returns every codebook even when asked for fewer (the rest are unused): keep ours
        return flatten_codes(codes[0, :self.num_codebooks].cpu().numpy(), self.codebook_size)

    def decode(self, ids: Sequence[int]) -> np.ndarray:
        import torch

        units = unflatten_ids(ids, self.num_codebooks, self.codebook_size, f"HfCodec({self.kind}).decode")
        codes = torch.from_numpy(units).to(self.device)[None]
        with torch.inference_mode():
            if self.kind == "encodec":
                audio = self.model.decode(codes[None], [None], return_dict=True).audio_values
            else:
                audio = self.model.decode(audio_codes=codes, return_dict=True).audio_values
        return audio.reshape(-1).float().cpu().numpy()
