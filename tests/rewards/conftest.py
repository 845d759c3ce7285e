"""Fixtures for the reward tests: tiny classifiers, real speech, a local Ray cluster."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from reward_test_utils import EXAMPLES


@pytest.fixture(scope="session")
def text_classifier(tmp_path_factory) -> Path:
    """The hosted-reward example's tiny random classifier, written by the example's own script."""
    sys.path.insert(0, str(EXAMPLES / "hosted_reward"))
    try:
        from make_tiny_classifier import make_tiny_classifier
    finally:
        sys.path.pop(0)
    return make_tiny_classifier(tmp_path_factory.mktemp("fluency-classifier"))


@pytest.fixture(scope="session")
def audio_classifier(tmp_path_factory) -> Path:
    """A tiny random wav2vec2 audio classifier with one output (a reward model's score)."""
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForSequenceClassification

    out = tmp_path_factory.mktemp("quality-model")
    torch.manual_seed(0)
    config = Wav2Vec2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                            conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 8), num_feat_extract_layers=2,
                            num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, classifier_proj_size=16,
                            num_labels=1, initializer_range=0.5)
    Wav2Vec2ForSequenceClassification(config).save_pretrained(out)
    Wav2Vec2FeatureExtractor(sampling_rate=16000).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def speech():
    """Real synthesized speech at 16 kHz: {text: waveform}."""
    from speechrl.data.synth import synthesize

    texts = ["turn left", "go ten meters forward", "stop"]
    return {t: synthesize(t, sample_rate=16000) for t in texts}


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster per test module; 3 CPUs, so rewards declaring resources can be placed."""
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
