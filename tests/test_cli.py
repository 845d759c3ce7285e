"""The installed `speechrl` console script: help, show, recipes, build-backbone, error exits."""
from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import yaml

from speechrl.rlhf.core.config import RECIPES_DIR

SPEECHRL = shutil.which("speechrl")
pytestmark = pytest.mark.skipif(SPEECHRL is None, reason="speechrl console script not installed (pip install -e .)")


def speechrl(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([SPEECHRL, *args], capture_output=True, text=True, timeout=timeout)


def test_help_lists_every_subcommand():
    proc = speechrl("--help")
    assert proc.returncode == 0, proc.stderr
    for command in ("train", "demo", "show", "recipes", "build-backbone", "build-corpus", "eval"):
        assert re.search(rf"^ {{4}}{command}\s", proc.stdout, re.M), f"{command} missing from --help"


def test_no_subcommand_is_a_usage_error():
    proc = speechrl()
    assert proc.returncode == 2 and "usage:" in proc.stderr


def test_show_applies_overrides():
    proc = speechrl("show", "asr/grpo", "rollout.sampling.n=4")
    assert proc.returncode == 0, proc.stderr
    # printed `'n': 4`: the key is quoted because a bare `n` reads as false in YAML 1.1 (PyYAML)
    assert re.search(r"^    '?n'?: 4$", proc.stdout, re.M)
    shown = yaml.safe_load(proc.stdout)
    assert shown["algorithm"] == "grpo" and shown["rollout"]["sampling"]["n"] == 4
    shipped = yaml.safe_load((RECIPES_DIR / "asr" / "grpo.yaml").read_text())
    assert shown["train"]["steps"] == shipped["train"]["steps"]  # the recipe's own values survive


@pytest.mark.parametrize("args, named", [
    (["show", "asr/sft", "train.stepz=1"], "train.stepz"),
    (["show", "asr/sft", "train.steps=abc"], "train.steps"),
    (["show", "asr/sft", "data.train=/nope.jsonl"], "data.train"),
    (["show", "asr/nope"], "asr/nope"),
    (["train", "asr/sft", "algorithm=foo"], "algorithm"),
    # overrides after an option are still the recipe's (argparse alone left them unrecognized)
    (["eval", "ckpt", "--recipe", "realtime/ppo", "train.stepz=1"], "train.stepz"),
    (["eval", "/nope", "--recipe", "realtime/ppo"], "/nope"),
])
def test_bad_recipe_exits_2_naming_the_problem(args, named):
    proc = speechrl(*args)
    assert proc.returncode == 2
    assert named in proc.stderr and proc.stderr.startswith("speechrl: error:")
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_recipes_lists_shipped_recipes():
    proc = speechrl("recipes")
    assert proc.returncode == 0, proc.stderr
    names = [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]
    assert {"asr/sft", "asr/grpo"} <= set(names)
    sft_line = next(line for line in proc.stdout.splitlines() if line.startswith("asr/sft "))
    assert "Supervised fine-tuning" in sft_line  # the recipe's first comment line describes it
    assert {"asr/real_sft", "asr/real_grpo"} <= set(names)
    listed = proc.stdout.split("pretrained backbones")[1]
    assert "whisper-tiny.en+smollm2-135m" in listed and "speechrl build-pretrained" in listed


def test_build_backbone(tmp_path):
    out = tmp_path / "tiny"
    proc = speechrl("build-backbone", str(out), "model.tiny.hidden_size=128", "model.tiny.num_heads=2",
                    "model.tiny.encoder_dim=128", "model.tiny.num_layers=2", "model.tiny.num_codec_tokens=32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (out / name).is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["text_config"]["hidden_size"] == 128 and config["text_config"]["num_attention_heads"] == 2
    assert config["audio_config"]["d_model"] == 128
    assert "'codec_tokens': 32" in proc.stdout  # the printed summary

    from speechrl.rlhf.model.backbone import load_backbone

    assert len(load_backbone(out).audio_token_ids()) == 32


def test_build_backbone_rejects_a_bad_shape(tmp_path):
    proc = speechrl("build-backbone", str(tmp_path / "x"), "model.tiny.hidden_size=64")  # 4 heads -> 16
    assert proc.returncode == 2 and "model.tiny.hidden_size" in proc.stderr
    assert not (tmp_path / "x").exists()
