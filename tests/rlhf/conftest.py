"""Fixtures for the trainer tests: one small backbone and one small synthetic corpus per session.

Both are built into a session cache directory through the recipe's own asset path, so every
SFT run (and the backbone tests) reuses them instead of rebuilding.
"""
from __future__ import annotations

from pathlib import Path

import pytest

# head_dim 64 (vLLM's CPU kernels need >= 32); about 1M parameters, a training step well under a second
SMALL_TINY = {"hidden_size": 128, "num_heads": 2, "num_kv_heads": 1, "encoder_dim": 128, "num_layers": 2,
              "encoder_layers": 1, "num_codec_tokens": 64}


@pytest.fixture(scope="session")
def small_tiny():
    from speechrl.rlhf.core.config import TinyBackboneConfig

    return TinyBackboneConfig(**SMALL_TINY)


@pytest.fixture(scope="session")
def sft_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("speechrl-cache")


@pytest.fixture(scope="session")
def sft_overrides(sft_cache, tmp_path_factory):
    """sft_overrides(name, *extra) -> asr/sft overrides for a fast run writing <runs>/<name>."""
    runs = tmp_path_factory.mktemp("runs")
    base = [f"run.cache_dir={sft_cache}", f"run.output_dir={runs}",
            *(f"model.tiny.{k}={v}" for k, v in SMALL_TINY.items()),
            "data.synthetic.num_utterances=80", "data.max_eval_examples=4", "eval_max_new_tokens=8",
            "train.batch_size=4", "train.steps=15", "train.warmup_steps=2", "train.eval_every=100",
            "train.log_every=1", "train.checkpoint_every=5"]
    return lambda name, *extra: [*base, f"run.name={name}", *extra]


@pytest.fixture(scope="session")
def sft_config(sft_overrides):
    """sft_config(name, *extra) -> the fast asr/sft RecipeConfig."""
    from speechrl.rlhf.core.config import load_recipe

    return lambda name, *extra: load_recipe("asr/sft", sft_overrides(name, *extra))


@pytest.fixture(scope="session")
def sft_assets(sft_config):
    """(backbone dir, train manifest, eval manifest) of the fast recipe, built once."""
    from speechrl.rlhf.modes import assets

    cfg = sft_config("assets")
    return (assets.backbone_path(cfg), *assets.manifests(cfg))


@pytest.fixture(scope="session")
def small_backbone_dir(sft_assets) -> Path:
    return sft_assets[0]
