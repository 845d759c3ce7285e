"""TTS batches arrive as codec ids; the reward worker decodes them to waveforms before scoring."""
from __future__ import annotations

import numpy as np
import pytest

from speechrl.rewards.api import Unscored
from speechrl.rewards.worker import AudioDecoder, RewardWorker
from speechrl.rollouts.codec import CodecSpec


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    spec = CodecSpec(cache_dir=str(tmp_path_factory.mktemp("cache")),
                     embedded=(("codebook_size", 32), ("num_codebooks", 2)))
    spec.build()  # fit once; workers then load it from the cache
    return spec


def test_decoder_turns_codec_ids_into_audio_and_marks_what_it_cannot_decode(spec):
    codec = spec.build()
    good = codec.encode(np.sin(np.arange(8000) / 7).astype(np.float32) * 0.3, 16000).tolist()
    batch = {"codec_ids": [good, [], [40, 3]],  # [] has no audio; 40 sits where codebook 0's ids (< 32) belong
             "reference_codec_ids": [good[:10], good[:10], None]}
    out = AudioDecoder(spec)(batch)
    assert out["sample_rate"] == codec.sample_rate
    audio = out["audio"]
    assert isinstance(audio[0], np.ndarray) and len(audio[0]) > 0
    assert isinstance(audio[1], Unscored) and "no audio tokens" in audio[1].reason
    assert isinstance(audio[2], Unscored) and "codebook 0" in audio[2].reason
    refs = out["reference_audio"]
    assert refs[0] is refs[1] and refs[2] is None  # a shared voice prompt is decoded once
    assert AudioDecoder(None)(batch) is batch and AudioDecoder(spec)({"audio": [1]}) == {"audio": [1]}


def test_reward_worker_scores_decoded_audio_and_leaves_undecodable_samples_unscored(spec):
    codec = spec.build()
    speech = codec.encode(np.sin(np.arange(16000) / 5).astype(np.float32) * 0.3, 16000).tolist()
    worker = RewardWorker([{"name": "speech_sanity"}], codec=spec)
    result = worker.score({"completions": ["", ""], "codec_ids": [speech, []], "text": ["go up", "go up"]})
    assert list(result.valid) == [True, False]
    assert "no audio tokens" in result.errors[1]
