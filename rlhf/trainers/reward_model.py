"""Reward modelling: a Bradley–Terry reward model trained on preference pairs, for the modes that
have them (TTS, realtime); the mode reads its pairs (`reward_model_pairs`) as whole sequences.

Loss -log σ(r_chosen - r_rejected) + `center_coef` * mean((r_chosen + r_rejected)^2); the head starts
at zero (all pairs tied) and is read at `<|codec_end|>`; pairs split by the mode's group (TTS: text,
realtime: persona), so held-out accuracy is on unseen ones. TRL's RewardTrainer fits where DPOTrainer
did not: these sequences are text-only, so its collator pads the pretokenized ids as they are; its own
checkpoints are what `--resume` continues.
"""
from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from transformers import TrainerCallback

from speechrl.rewards.learned import META_FILE, codec_identity, load_reward_model, register_model, score_sequences
from speechrl.rlhf.modes import get_mode
from speechrl.rlhf.core.config import RecipeConfig, RecipeError
from speechrl.rlhf.core.devices import peak_rss_mib
from speechrl.rlhf.core.seeding import seed_everything, set_threads
from speechrl.rlhf.core.run_dir import RunLogger, due, find_resume_dir, new_run_dir

log = logging.getLogger(__name__)


def pairwise_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    """Accuracy (share of pairs whose chosen side scores higher; a tie counts half), mean margin and
    Bradley–Terry loss -log σ(chosen - rejected) of the pairs' scores."""
    margin = chosen.float() - rejected.float()
    accuracy = (margin > 0).float() + 0.5 * (margin == 0).float()
    return {"accuracy": float(accuracy.mean()), "margin": float(margin.mean()),
            "loss": float(-F.logsigmoid(margin).mean())}


def split_by_group(pairs: list, eval_fraction: float, seed: int, group=lambda p: p.group,
                   what: str = "group") -> tuple[list, list]:
    """(train, held-out) pairs: a share `eval_fraction` of the distinct groups (`group(pair)`: a text,
    a persona card), drawn by `seed`, is held out with all its pairs, so that held-out accuracy is
    measured on groups the model never saw."""
    groups = sorted({group(p) for p in pairs})
    if len(groups) < 2:
        raise ValueError(f"reward_model.data: all {len(pairs)} usable pairs are of the same {what}; holding pairs "
                         f"out for held-out accuracy needs pairs of at least 2 {what}s")
    n_held = min(len(groups) - 1, max(1, round(eval_fraction * len(groups))))
    held = {groups[i] for i in np.random.default_rng(seed).permutation(len(groups))[:n_held]}
    return [p for p in pairs if group(p) not in held], [p for p in pairs if group(p) in held]


def split_by_text(pairs: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    """The TTS split of encoded preference pairs (data/preferences.py), as the recipe draws it: what
    benchmarks and tests rebuild to score the run's held-out pairs."""
    return split_by_group(pairs, eval_fraction, seed, lambda p: p.pair.text.strip(), "text")


def build_reward_model(path: Path):
    """(model, processor): a saved reward model (to train further), or a backbone's language model
    under a new one-output head."""
    from transformers import AutoModelForSequenceClassification

    from speechrl.rlhf.model.backbone import load_backbone
    from speechrl.rlhf.model.logprobs import audio_model

    if (path / META_FILE).is_file():
        model, processor, _ = load_reward_model(path)
        return model.requires_grad_(True), processor
    backbone = load_backbone(path)
    config = copy.deepcopy(backbone.model.config.text_config)
    config.num_labels, config.pad_token_id = 1, backbone.tokenizer.pad_token_id
    model = AutoModelForSequenceClassification.from_config(config).float()
    model.base_model.load_state_dict(audio_model(backbone.model).language_model.state_dict())
    # A zero head prefers nothing: every pair starts at margin 0, accuracy 0.5 and loss log 2, rather
    # than at whatever order a random head happens to put the held-out pairs in.
    torch.nn.init.zeros_(model.score.weight)
    return model, backbone.processor


def trainer_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint the trainer wrote (trainer_state.json is written last), or None."""
    done = [p for p in (Path(run_dir) / "checkpoints").glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[1])) if done else None


class _RunLog(TrainerCallback):
    """Writes the trainer's logs, and the held-out evaluation on its steps, as one metrics row per step."""

    def __init__(self, recipe: "RewardModelRecipe"):
        self.recipe, self.pending = recipe, {}

    def on_step_end(self, args, state, control, **kwargs):
        t = self.recipe.cfg.train
        if due(state.global_step, t.eval_every, t.steps):
            self.pending = self.recipe.evaluate()
            control.should_log = True  # so that the trainer's own row for this step carries the evaluation
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:  # the end-of-training totals (train_runtime, ...)
            return
        row = {"lr" if k == "learning_rate" else f"train/{k}": v for k, v in logs.items()
               if isinstance(v, (int, float)) and k not in ("epoch", "num_tokens")}
        self.recipe.logger.log(state.global_step, {**row, **self.pending})
        self.pending = {}


class RewardModelRecipe:
    plot_keys = ["train/loss", "train/accuracy", "eval/accuracy", "eval/margin", "lr"]

    def __init__(self, cfg: RecipeConfig, resume: Optional[str] = None):
        self.cfg, self.resume = cfg, resume

    def setup(self) -> None:
        from speechrl.rlhf.modes.assets import codec_spec

        cfg, rm = self.cfg, self.cfg.reward_model
        if not rm.data:  # checked here, not at load: the shipped recipe is completed on the command line
            raise RecipeError(f"a reward model needs `reward_model.data`, preference pairs (docs/preferences.md): "
                              f"speechrl train {cfg.mode}/reward_model reward_model.data=pairs.jsonl "
                              f"run.init_from=<{cfg.mode} sft run>/final")
        self._check_name(rm.register_as)
        set_threads(cfg.train.torch_threads)
        seed_everything(cfg.seed)
        self.run_dir = find_resume_dir(cfg, self.resume, trainer_checkpoint) if self.resume else new_run_dir(cfg)
        self.checkpoint = trainer_checkpoint(self.run_dir) if self.resume else None
        self.mode = get_mode(cfg)
        self.init_path = self.mode.backbone_path()
        self.model, self.processor = build_reward_model(self.init_path)
        self.codec_spec = codec_spec(cfg)
        if (self.init_path / META_FILE).is_file():  # continuing a reward model: its ids must be this codec's
            self._check_codec(json.loads((self.init_path / META_FILE).read_text()))
        self.codec = self.codec_spec.build()
        self.data = self._read_pairs()
        train, held = split_by_group(self.data.pairs, rm.eval_fraction, cfg.seed, what=self.data.split_by)
        self.train_rows = [{"chosen_ids": p.chosen_ids, "rejected_ids": p.rejected_ids} for p in train]
        self.held_rows = [{"chosen_ids": p.chosen_ids, "rejected_ids": p.rejected_ids} for p in held]
        self.held_groups = len({p.group for p in held})
        self.logger = RunLogger(self.run_dir, cfg, plot_keys=self.plot_keys)
        self.start_step = self._resume_log() if self.checkpoint else 0
        log.info("run directory: %s; %d train pairs, %d held-out pairs (%d %ss held out)", self.run_dir,
                 len(self.train_rows), len(self.held_rows), self.held_groups, self.data.split_by)

    def _check_name(self, name: Optional[str]) -> None:
        from speechrl.rewards.registry import REWARDS

        if name in REWARDS:
            raise RecipeError(f"`reward_model.register_as` is {name!r}, a built-in reward's name, which would "
                              "shadow the model; choose another name")

    def _check_codec(self, meta: dict) -> None:
        if meta["codec"] != codec_identity(self.codec_spec):
            raise RecipeError(f"run.init_from={self.init_path} is a reward model trained on ids of the codec "
                              f"{meta['codec']}; this recipe's codec is {codec_identity(self.codec_spec)}")

    def _read_pairs(self):
        """The mode's pairs as sequences (modes/pairs.py's RewardModelPairs); none usable stops the run."""
        source = self.cfg.reward_model.data
        data = self.mode.reward_model_pairs(source, self.processor, self.codec)
        log.info("preference pairs: %d usable of %d read (%d left out)", len(data.pairs), data.read,
                 data.read - len(data.pairs))
        if not data.pairs:
            raise ValueError(f"reward_model.data={source}: no usable preference pairs of {data.read} read "
                             f"(first bad ones: {'; '.join(data.bad[:3]) or 'none'}); see docs/preferences.md for the format")
        return data

    def _resume_log(self) -> int:
        step = json.loads((self.checkpoint / "trainer_state.json").read_text())["global_step"]
        self.logger.truncate_after(step)
        print(f"resumed {self.run_dir} from {self.checkpoint.name} (step {step})")
        return step

    def evaluate(self) -> dict:
        """Held-out pairwise accuracy, margin and loss of the model as it is now."""
        was_training = self.model.training
        self.model.eval()
        n, pad = len(self.held_rows), self.processor.tokenizer.pad_token_id
        scores = score_sequences(self.model, [r["chosen_ids"] for r in self.held_rows]
                                 + [r["rejected_ids"] for r in self.held_rows], pad, 2 * self.cfg.train.batch_size)
        self.model.train(was_training)
        return {f"eval/{k}": v for k, v in pairwise_metrics(scores[:n], scores[n:]).items()}

    def trainer(self):
        from datasets import Dataset
        from trl import RewardConfig, RewardTrainer

        t = self.cfg.train
        args = RewardConfig(
            output_dir=str(self.run_dir / "checkpoints"), max_steps=t.steps, per_device_train_batch_size=t.batch_size,
            learning_rate=t.lr, weight_decay=t.weight_decay, warmup_steps=t.warmup_steps, max_grad_norm=t.max_grad_norm,
            lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": t.lr_min_ratio},
            logging_steps=t.log_every, save_strategy="steps", save_steps=t.checkpoint_every,
            save_total_limit=t.keep_checkpoints or None, seed=self.cfg.seed, report_to="none",
            center_rewards_coefficient=self.cfg.reward_model.center_coef or None,
            max_length=None,  # its default (1024) drops longer pairs without a word; clips are not cut here
            bf16=False,  # its default asks for bf16, which a CPU run refuses; this model trains in float32
            gradient_checkpointing=self.cfg.model.gradient_checkpointing,
            dataloader_pin_memory=torch.cuda.is_available())
        return RewardTrainer(model=self.model, args=args, train_dataset=Dataset.from_list(self.train_rows),
                             processing_class=self.processor.tokenizer, callbacks=[_RunLog(self)])

    def train(self) -> dict:
        if self.start_step == 0:
            self.logger.log(0, self.evaluate())  # the untrained head: "held-out accuracy at init"
        trainer = self.trainer()
        start = time.time()
        trainer.train(resume_from_checkpoint=str(self.checkpoint) if self.checkpoint else None)
        self.elapsed = time.time() - start
        return self.finish()

    def finish(self) -> dict:
        from speechrl.rewards.asr_judge import codec_fingerprint

        rm, last = self.cfg.reward_model, self.logger.last
        best = max((r for r in self.logger.rows() if "eval/accuracy" in r), key=lambda r: r["eval/accuracy"])
        final = self.run_dir / "final"
        self.model.save_pretrained(final)
        self.processor.save_pretrained(final)
        meta = {"mode": self.cfg.mode, "kind": "bradley_terry", "codec": codec_identity(self.codec_spec),
                "codec_fingerprint": codec_fingerprint(self.codec),
                "codec_shape": {"num_codebooks": self.codec.num_codebooks, "codebook_size": self.codec.codebook_size},
                "prompt": self.data.sequence, "split_by": self.data.split_by, "heldout_groups": self.held_groups,
                "heldout_accuracy": last("eval/accuracy"), "heldout_pairs": len(self.held_rows),
                "train_pairs": len(self.train_rows), "steps": self.cfg.train.steps, "data": rm.data,
                "init_from": str(self.init_path), "run": str(self.run_dir)}
        (final / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")  # last: marks the directory whole
        pointer = None
        if rm.register_as:
            pointer = register_model(rm.register_as, final, self.cfg.run.cache_dir,
                                     {"run": str(self.run_dir), "heldout_accuracy": meta["heldout_accuracy"]})
            log.info("registered reward %r: %s -> %s", rm.register_as, pointer, final)
        table = {
            "run": str(self.run_dir),
            "steps": self.cfg.train.steps,
            "preference pairs (train/held-out/bad)":
                f"{len(self.train_rows)}/{len(self.held_rows)}/{self.data.read - len(self.data.pairs)}",
            f"held-out {self.data.split_by}s": self.held_groups,
            "held-out accuracy at init": self.logger.first("eval/accuracy"),
            "held-out accuracy after": last("eval/accuracy"),
            "best held-out accuracy (step)": "{eval/accuracy:.4f} ({step})".format(**best),
            "held-out margin after": last("eval/margin"),
            "final loss": last("train/loss"),
            "train wall time (s)": round(self.elapsed, 1),
            "peak RSS (MiB)": peak_rss_mib(),
            "reward model": str(final),
            "registered as": f"{rm.register_as} ({pointer})" if pointer else "-",
        }
        return self.logger.finish(table)


def run_reward_model(cfg: RecipeConfig, resume: Optional[str] = None) -> dict:
    recipe = RewardModelRecipe(cfg, resume)
    recipe.setup()
    return recipe.train()
