"""Recipes: every shipped one loads; inheritance, overrides and validation errors name the key."""
from __future__ import annotations

import textwrap

import pytest
from omegaconf import OmegaConf

from speechrl.rlhf.core.config import RECIPES_DIR, RecipeConfig, RecipeError, load_recipe, to_yaml

SHIPPED = sorted(p for p in RECIPES_DIR.rglob("*.yaml") if "schedule:" not in p.read_text())  # schedules: test_schedule.py


def write(path, text: str):
    path.write_text(textwrap.dedent(text))
    return path


def test_recipes_are_shipped():
    names = {str(p.relative_to(RECIPES_DIR)) for p in SHIPPED}
    assert {"asr/base.yaml", "asr/sft.yaml", "asr/grpo.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(RECIPES_DIR)))
def test_every_shipped_recipe_loads(path):
    by_path = load_recipe(str(path))
    by_name = load_recipe(str(path.relative_to(RECIPES_DIR))[: -len(".yaml")])
    assert isinstance(by_path, RecipeConfig)
    assert by_path == by_name


@pytest.mark.parametrize("name", ["asr/sft", "asr/grpo"])
def test_resolved_recipe_round_trips(tmp_path, name):
    """A run directory's recipe.yaml (to_yaml) loads back to the same config."""
    cfg = load_recipe(name, ["train.steps=7", "rewards.0.weight=0.5"])
    again = load_recipe(str(write(tmp_path / "resolved.yaml", to_yaml(cfg))))
    assert again == cfg


def test_shipped_recipes_inherit_base():
    sft, grpo = load_recipe("asr/sft"), load_recipe("asr/grpo")
    assert (sft.algorithm, grpo.algorithm) == ("sft", "grpo")
    # from base.yaml, not repeated in the children
    for cfg in (sft, grpo):
        assert [r.name for r in cfg.rewards] == ["asr_wer"] and cfg.rewards[0].normalize is False
    shipped = OmegaConf.load(RECIPES_DIR / "asr" / "grpo.yaml")  # the child's own values win
    assert grpo.rollout.sampling.n == shipped.rollout.sampling.n and grpo.train.lr == pytest.approx(shipped.train.lr)


def test_defaults_child_overrides_parent_keeps_the_rest(tmp_path):
    write(tmp_path / "parent.yaml", """
        seed: 7
        train:
          steps: 11
          lr: 0.5
        data:
          max_eval_examples: 3
    """)
    write(tmp_path / "mid.yaml", """
        defaults: [parent.yaml]
        train:
          lr: 0.25
    """)
    child = write(tmp_path / "child.yaml", """
        defaults: mid.yaml
        train:
          steps: 22
    """)
    cfg = load_recipe(str(child))
    assert cfg.train.steps == 22  # child wins
    assert cfg.train.lr == 0.25  # middle layer wins over its parent
    assert cfg.seed == 7 and cfg.data.max_eval_examples == 3  # parent values kept
    assert cfg.train.batch_size == RecipeConfig().train.batch_size  # schema default where nobody sets it


def test_later_defaults_override_earlier(tmp_path):
    write(tmp_path / "a.yaml", "seed: 1\ntrain: {steps: 5}\n")
    write(tmp_path / "b.yaml", "seed: 2\n")
    cfg = load_recipe(str(write(tmp_path / "c.yaml", "defaults: [a.yaml, b.yaml]\n")))
    assert (cfg.seed, cfg.train.steps) == (2, 5)


def test_command_line_overrides_apply_last():
    cfg = load_recipe("asr/grpo", ["rollout.sampling.n=4", "train.lr=1e-3", "data.synthetic.voices=[en]",
                                   "rl.clip_eps_high=0.3", "rewards.0.weight=2"])
    assert cfg.rollout.sampling.n == 4
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.data.synthetic.voices == ["en"]
    assert cfg.rl.clip_eps_high == pytest.approx(0.3)
    assert cfg.rewards[0].weight == 2.0 and cfg.rewards[0].name == "asr_wer"  # list item edited in place
    assert cfg.train.steps == OmegaConf.load(RECIPES_DIR / "asr" / "grpo.yaml").train.steps  # untouched keys keep the recipe's value


@pytest.mark.parametrize("override, key", [
    ("train.stepz=1", "train.stepz"),
    ("foo=1", "foo"),
    ("train.steps=abc", "train.steps"),
    ("train.lr=fast", "train.lr"),
    ("train=3", "train"),
])
def test_bad_override_names_the_key(override, key):
    with pytest.raises(RecipeError, match=f"`{key}`") as err:
        load_recipe("asr/sft", [override])
    assert override in str(err.value)


def test_override_without_equals_sign():
    with pytest.raises(RecipeError, match="key.path=value"):
        load_recipe("asr/sft", ["train.steps"])


def test_unknown_key_in_a_file_names_file_and_key(tmp_path):
    path = write(tmp_path / "typo.yaml", "defaults: [%s]\ntrain:\n  stepz: 3\n" % (RECIPES_DIR / "asr/sft.yaml"))
    with pytest.raises(RecipeError, match="`train.stepz`") as err:
        load_recipe(str(path))
    assert str(path) in str(err.value)


def test_missing_file_names_the_field():
    with pytest.raises(RecipeError, match="`data.train`.*/nope.jsonl"):
        load_recipe("asr/sft", ["data.train=/nope.jsonl"])
    with pytest.raises(RecipeError, match="`model.path`"):
        load_recipe("asr/sft", ["model.path=/no/such/backbone"])


def test_existing_file_is_accepted(tmp_path):
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("")
    assert load_recipe("asr/sft", [f"data.train={manifest}"]).data.train == str(manifest)


@pytest.mark.parametrize("override, key", [
    ("algorithm=foo", "algorithm"),
    ("mode=video", "mode"),
    ("data.on_bad_example=ignore", "data.on_bad_example"),
    ("rl.loss_agg=sum", "rl.loss_agg"),
    ("model.tiny.audio_encoder=whisper-large", "model.tiny.audio_encoder"),
])
def test_bad_choice_lists_the_choices(override, key):
    with pytest.raises(RecipeError, match=f"`{key}`.*choose one of"):
        load_recipe("asr/sft", [override])


@pytest.mark.parametrize("overrides, key", [
    (["model.tiny.hidden_size=48"], "model.tiny.hidden_size"),  # 48 / 4 heads = 12
    (["model.tiny.hidden_size=128", "model.tiny.num_heads=8"], "model.tiny.hidden_size"),  # 16
    (["model.tiny.encoder_dim=96"], "model.tiny.encoder_dim"),  # 24
    (["model.tiny.hidden_size=250"], "model.tiny.hidden_size"),  # not divisible by 4
])
def test_small_head_dim_rejected(overrides, key):
    with pytest.raises(RecipeError, match=f"`{key}`.*head_dim"):
        load_recipe("asr/sft", overrides)


def test_a_whisper_encoder_needs_16_khz_and_frees_the_encoder_shape():
    with pytest.raises(RecipeError, match="audio_encoder.*16 kHz.*data.sample_rate"):
        load_recipe("asr/sft", ["model.tiny.audio_encoder=whisper-tiny.en", "data.sample_rate=24000"])
    cfg = load_recipe("asr/sft", ["model.tiny.audio_encoder=whisper-tiny.en", "model.tiny.encoder_dim=96"])
    assert cfg.model.tiny.audio_encoder == "whisper-tiny.en", "Whisper's width, not encoder_dim, is the tower's"


def test_head_dim_32_accepted():
    cfg = load_recipe("asr/sft", ["model.tiny.hidden_size=64", "model.tiny.num_heads=2",
                                  "model.tiny.encoder_dim=64"])
    assert cfg.model.tiny.hidden_size // cfg.model.tiny.num_heads == 32


@pytest.mark.parametrize("override, key", [
    ("train.steps=0", "train.steps"),
    ("train.batch_size=-1", "train.batch_size"),
    ("rollout.sampling.n=0", "rollout.sampling.n"),
    ("data.synthetic.heldout_fraction=1.0", "data.synthetic.heldout_fraction"),
])
def test_ranges_rejected(override, key):
    with pytest.raises(RecipeError, match=f"`{key}`"):
        load_recipe("asr/sft", [override])


def test_several_trainer_ranks_are_for_online_runs_without_deepspeed():
    assert load_recipe("asr/grpo", ["train.num_ranks=2"]).train.num_ranks == 2
    with pytest.raises(RecipeError, match=r"`train.num_ranks`.*>= 1"):
        load_recipe("asr/grpo", ["train.num_ranks=0"])
    with pytest.raises(RecipeError, match=r"`train.num_ranks`=2 .* algorithm=sft trains in one process"):
        load_recipe("asr/sft", ["train.num_ranks=2"])
    with pytest.raises(RecipeError, match=r"set train.deepspeed.enabled=false"):
        load_recipe("asr/grpo", ["train.num_ranks=2", "train.deepspeed.enabled=true"])


def test_grpo_needs_groups():
    with pytest.raises(RecipeError, match="rollout.sampling.n"):
        load_recipe("asr/grpo", ["rollout.sampling.n=1"])
    assert load_recipe("asr/sft", ["rollout.sampling.n=1"]).rollout.sampling.n == 1  # SFT does not sample


def test_defaults_cycle_rejected(tmp_path):
    write(tmp_path / "a.yaml", "defaults: [b.yaml]\nseed: 1\n")
    write(tmp_path / "b.yaml", "defaults: [a.yaml]\nseed: 2\n")
    with pytest.raises(RecipeError, match="cycle"):
        load_recipe(str(tmp_path / "a.yaml"))
    write(tmp_path / "self.yaml", "defaults: [self.yaml]\n")
    with pytest.raises(RecipeError, match="cycle"):
        load_recipe(str(tmp_path / "self.yaml"))


def test_diamond_defaults_are_not_a_cycle(tmp_path):
    write(tmp_path / "root.yaml", "seed: 3\n")
    write(tmp_path / "left.yaml", "defaults: [root.yaml]\n")
    write(tmp_path / "right.yaml", "defaults: [root.yaml]\n")
    cfg = load_recipe(str(write(tmp_path / "top.yaml", "defaults: [left.yaml, right.yaml]\n")))
    assert cfg.seed == 3


def test_missing_defaults_entry_named(tmp_path):
    path = write(tmp_path / "child.yaml", "defaults: [gone.yaml]\n")
    with pytest.raises(RecipeError, match="gone.yaml"):
        load_recipe(str(path))


def test_malformed_yaml_names_the_file(tmp_path):
    path = write(tmp_path / "broken.yaml", "train:\n  steps: [1, 2\n  lr: 0.1\n")
    with pytest.raises(RecipeError, match="not valid YAML") as err:
        load_recipe(str(path))
    assert str(path) in str(err.value)


def test_malformed_parent_names_the_parent(tmp_path):
    parent = write(tmp_path / "parent.yaml", "seed: : :\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(str(write(tmp_path / "child.yaml", "defaults: [parent.yaml]\n")))
    assert str(parent) in str(err.value)


def test_recipe_must_be_a_mapping(tmp_path):
    with pytest.raises(RecipeError, match="mapping"):
        load_recipe(str(write(tmp_path / "list.yaml", "- a\n- b\n")))


def test_unknown_recipe_lists_shipped_ones():
    with pytest.raises(RecipeError, match="asr/sft") as err:
        load_recipe("asr/nope")
    assert "asr/grpo" in str(err.value)


def test_old_grpo_keys_name_their_new_place(tmp_path):
    """The online loop's shared settings moved from `grpo:` to `rl:`; a recipe or override using
    the old key is told the new one."""
    with pytest.raises(RecipeError, match=r"`grpo.kl_coef` is now `rl.kl_coef`"):
        load_recipe("asr/grpo", ["grpo.kl_coef=0.1"])
    old = tmp_path / "old.yaml"
    old.write_text(f"defaults: [{RECIPES_DIR / 'asr' / 'grpo.yaml'}]\ngrpo:\n  prompts_per_step: 4\n")
    with pytest.raises(RecipeError, match=r"`grpo.prompts_per_step` is now `rl.prompts_per_step`"):
        load_recipe(str(old))
    cfg = load_recipe("asr/grpo", ["rl.kl_coef=0.1", "grpo.std_normalize=false"])
    assert cfg.rl.kl_coef == 0.1 and cfg.grpo.std_normalize is False


def test_dr_grpo_aggregation_is_accepted():
    assert load_recipe("asr/grpo", ["rl.loss_agg=seq_mean_token_sum_norm"]).rl.loss_agg == "seq_mean_token_sum_norm"


@pytest.mark.parametrize("key", ["train.eval_every", "train.checkpoint_every", "train.log_every",
                                 "run.save_rollouts_every"])
def test_every_knobs_take_zero_and_refuse_negatives(key):
    assert load_recipe("asr/grpo", [f"{key}=0"]) is not None  # 0 = only at the end (rollouts: never)
    with pytest.raises(RecipeError, match=f"`{key}` must be >= 0"):
        load_recipe("asr/grpo", [f"{key}=-1"])


def test_due_means_every_n_steps_and_the_last():
    from speechrl.rlhf.core.run_dir import due

    assert [s for s in range(1, 8) if due(s, 3, 7)] == [3, 6, 7]
    assert [s for s in range(1, 8) if due(s, 0, 7)] == [7]


def test_an_unknown_pretrained_backbone_lists_the_known_ones():
    with pytest.raises(RecipeError, match="`model.pretrained` is 'whisper-huge'; choose one of whisper-tiny.en"):
        load_recipe("asr/sft", ["model.pretrained=whisper-huge"])


def test_generated_texts_are_a_name_not_a_path():
    cfg = load_recipe("asr/real_sft", [])
    assert cfg.data.synthetic.texts == "smollm2-sentences" and cfg.model.pretrained == "whisper-tiny.en+smollm2-135m"
    with pytest.raises(RecipeError, match="`data.synthetic.texts` points to 'smollm2-sentence'"):
        load_recipe("asr/real_sft", ["data.synthetic.texts=smollm2-sentence"])
