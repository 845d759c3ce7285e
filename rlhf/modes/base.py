"""The `Mode` interface: everything that differs between operational modes, behind one object.

A mode owns its data, its task (prompts, decoding constraint, stop tokens), the shape of its
rollouts (one turn, or episodes), the columns its rewards read, its evaluation and headline
metrics, and the algorithms it supports. Trainers and workers call these methods and never test a
mode's name; a new mode is one file here plus its recipes (docs/architecture.md).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional

import numpy as np

from speechrl.rlhf.algos.registry import RECIPE_CHECKS
from speechrl.rlhf.core.config import RecipeConfig, RecipeError
from speechrl.rlhf.core.intervals import Change, describe, first_and_last, paired_changes
from speechrl.rlhf.core.registry import MODES
from speechrl.rlhf.modes.pairs import PreferenceRow, RewardModelPairs
from speechrl.rollouts.types import RolloutRequest

Generate = Callable[..., list]  # generate(requests, n=None, temperature=None, max_new_tokens=None) -> samples


class Mode:
    name: ClassVar[str]
    algorithms: ClassVar[tuple[str, ...]]  # the `algorithm:` values this mode's recipes may name
    default_algorithm: ClassVar[str]  # its RL algorithm in the demo (DESIGN.md's table)
    headlines: ClassVar[list[tuple[str, str]]]  # (summary label, metric key), the first is the main one
    demo_sft_overrides: ClassVar[list[str]] = []  # the demo's SFT settings on top of <mode>/sft
    evaluates_on_engines: ClassVar[bool] = False  # `speechrl eval` needs vLLM engines (else in-process)
    transcribes: ClassVar[bool] = False  # its replies are transcripts: `speechrl eval --real-speech` applies
    shares_backbone: ClassVar[bool] = True  # its texts are among `model.tiny.texts: all_modes` (the shared tokenizer)
    offline_evaluation_scores: ClassVar[bool] = False  # evaluate_offline runs the recipe's rewards (their judges are built first)
    # where an evaluation at step N writes its per-example scores, under a run or `speechrl eval` folder
    # ("step-*" stands for "step-N"); None where the mode keeps none (no paired intervals)
    example_scores_glob: ClassVar[Optional[str]] = None
    example_unit: ClassVar[str] = "examples"  # what one id of those files is, in the intervals' wording

    def __init__(self, cfg: RecipeConfig):
        self.cfg = cfg
        self.task = None

    @classmethod
    def check(cls, cfg: RecipeConfig, source: str) -> None:
        """Recipe checks of this mode (after the generic ones); a RecipeError names the key."""
        if cfg.algorithm not in cls.algorithms:
            raise RecipeError(f"{source}: `algorithm: {cfg.algorithm}` is not implemented for mode {cls.name!r} "
                              f"(it supports {', '.join(cls.algorithms)})")
        if cfg.algorithm in RECIPE_CHECKS:  # what the algorithm asks of the rest of the recipe
            RECIPE_CHECKS.get(cfg.algorithm)(cfg, source)

    # --- what runs on ----------------------------------------------------------------------------
    def backbone_path(self) -> Path:
        """What the recipe starts from (modes/assets.py); on the embedded default with
        `model.tiny.texts: all_modes`, the one tiny backbone whose tokenizer learnt every mode's texts."""
        from speechrl.rlhf.modes import assets

        cfg = self.cfg
        if cfg.run.init_from or cfg.model.path or cfg.model.pretrained:
            return assets.backbone_path(cfg)
        if cfg.model.tiny.texts == "all_modes":
            texts = assets.shared_tokenizer_texts(cfg)
            return assets.tiny_backbone(cfg, texts, suffix=f"shared-{assets.texts_key(texts)}")
        return self.own_backbone_path()

    def own_backbone_path(self) -> Path:
        """The embedded tiny backbone for this mode alone (`model.tiny.texts: mode`)."""
        from speechrl.rlhf.modes import assets

        return assets.backbone_path(self.cfg)

    def tokenizer_texts(self) -> list[str]:
        """What a tiny backbone's tokenizer learns from for this mode: the corpus' texts by default."""
        from speechrl.rlhf.modes import assets

        return assets.tokenizer_texts(self.cfg)

    def data_fingerprints(self) -> dict[str, str]:
        """Fingerprints of the data this mode built into run.cache_dir (the demo prints them): the
        synthetic corpus's, as its build recorded it, where it was built."""
        import json

        from speechrl.rlhf.modes.assets import corpus_dir

        marker = corpus_dir(self.cfg) / "corpus.json"
        recorded = json.loads(marker.read_text()).get("fingerprint") if marker.is_file() else None
        return {"corpus": recorded} if recorded else {}

    def datasets(self, max_audio_seconds: float):
        """(train, held-out) datasets of (example, audio) pairs."""
        from speechrl.rlhf.modes import assets

        return assets.load_datasets(self.cfg, max_audio_seconds)

    def make_task(self, processor, codec=None):
        raise NotImplementedError

    def setup_task(self, processor, codec=None):
        self.task = self.make_task(processor, codec)
        return self.task

    # --- the online loop (GRPO, PPO, online DPO) -------------------------------------------------
    def setup_online(self, run_dir: Path, logger, window_seconds: float) -> None:
        """Load what rollouts and evaluation need (after `setup_task`)."""
        raise NotImplementedError

    def rollout(self, step: int, generate: Generate) -> tuple[list[RolloutRequest], list]:
        """The step's prompts and their samples (`Sample.prompt_index` points into the prompts)."""
        raise NotImplementedError

    def reward_columns(self, samples, requests) -> dict[str, Any]:
        """What this mode's rewards read beside `completions`/`completion_ids` and the samples' metadata."""
        return {}

    def rollout_row(self, sample) -> dict[str, Any]:
        """Mode-specific fields of a saved rollout row (rollouts/step-N.jsonl)."""
        return {}

    def evaluate_online(self, step: int, generate: Generate, score_batch: Callable, score: Callable,
                        policy) -> dict:
        """Held-out metrics with the current weights (on the engines, or on the policy worker)."""
        raise NotImplementedError

    def save_pairs(self, path: Path, step: int, samples, total: np.ndarray, pairs: list[tuple[int, int]]) -> None:
        """Online DPO's (chosen, rejected) samples of one round, in this mode's format."""
        raise NotImplementedError(f"mode {self.name!r} has no preference-pair format")

    def preference_rows(self, source: str) -> tuple[list[PreferenceRow], dict]:
        """Offline DPO's pairs read from `dpo.data` (after `setup_task`), as token rows, and a summary
        of what was read and left out."""
        raise NotImplementedError(f"mode {self.name!r} has no offline preference format")

    def reward_model_pairs(self, source: str, processor, codec) -> "RewardModelPairs":
        """The reward model's preference pairs read from `reward_model.data`, each side a whole token
        sequence, grouped (by text, persona) so that held-out pairs are of groups never trained on."""
        raise NotImplementedError(f"mode {self.name!r} has no reward-model pair format")

    def label_evaluation(self, label: str) -> None:
        """Name the evaluation's outputs (`speechrl eval` names the checkpoint); nothing by default."""

    def summary_rows(self) -> dict:
        """Rows this mode adds to an online run's summary table."""
        return {}

    # --- offline trainers (SFT, DPO) and `speechrl eval` ------------------------------------------
    def sft_loss(self, model, batch, heads=None) -> tuple:
        """SFT's loss on a batch of reference completions and its metrics (floats, logged as train/<name>):
        the mean next-token loss, plus the MTP `heads`' loss (model/mtp.py) weighted by
        model.mtp.loss_weight where the recipe trains heads; a mode may add a term of its own."""
        from speechrl.rlhf.model.logprobs import completion_nll, sft_loss, token_logprobs

        if heads is None:
            return sft_loss(model, batch), {}
        logp, hidden = token_logprobs(model, batch, with_hidden=True)
        token_loss = completion_nll(logp, batch.completion_mask)
        mtp_loss, metrics = heads.loss(hidden, batch.input_ids, batch.completion_mask)
        return token_loss + self.cfg.model.mtp.loss_weight * mtp_loss, {"token_loss": token_loss.item(), **metrics}

    def evaluate_offline(self, step: int, model, processor, eval_set, run_dir: Path, logger) -> dict:
        """Held-out metrics of an in-process transformers model."""
        raise NotImplementedError

    def transcriber(self, model, processor):
        """audios -> transcripts with `model`, for modes that transcribe (`transcribes`)."""
        raise NotImplementedError(f"mode {self.name!r} does not transcribe")

    def report_checkpoint(self, metrics: dict, out_dir: Path) -> str:
        """What `speechrl eval` prints for a checkpoint's metrics."""
        return "\n".join(f"{k}={v:.4f}" for k, v in metrics.items())

    def example_scores(self, out_dir: Path) -> dict[int, Path]:
        """Every evaluation's per-example scores file under `out_dir` (a run's folder, or `speechrl eval`'s,
        whose one evaluation is step 0), by step: JSON lines of {"id", <metric key>: value or null, ...}
        (an id may repeat; core/intervals.py), which the paired intervals resample."""
        if self.example_scores_glob is None:
            return {}
        found = {}
        for path in Path(out_dir).glob(self.example_scores_glob):
            step = re.search(r"step-(\d+)", str(path.relative_to(out_dir)))
            if step:
                found[int(step.group(1))] = path
        return found

    # --- the demo ----------------------------------------------------------------------------------
    def demo_report(self, sft: dict, rl: dict, minutes: float) -> dict:
        """Print the demo's before/after story from the two runs' summaries; the numbers."""
        label, fmt = self.headlines[0][0], "{:.3f}"
        result = {"untrained": sft[f"{label} before"], "sft": sft[f"{label} after"], "rl": rl[f"{label} after"],
                  "minutes": minutes}
        print(f"\n{label}: untrained {fmt.format(result['untrained'])} -> after SFT {fmt.format(result['sft'])} "
              f"-> after {self.default_algorithm.upper()} {fmt.format(result['rl'])}   ({minutes:.1f} min)")
        for change in self.print_run_intervals(rl["run"]):
            result[f"{change.label} change"] = (change.change, change.low, change.high)
        return result

    def print_run_intervals(self, run: str) -> list[Change]:
        """An RL run's change from its first evaluation (the warm start's weights) to its last, with a 95 %
        interval over the held-out examples, where the mode keeps per-example scores."""
        files = first_and_last(self.example_scores(Path(run)))
        if not files:
            return []
        changes = paired_changes(self.headlines, files, self.cfg.seed)
        print(f"{self.default_algorithm.upper()}'s change, {files[0][0]} (the SFT weights) to {files[1][0]}, "
              f"with a 95% bootstrap interval over the held-out {self.example_unit}:")
        print(describe(changes, self.example_unit))
        return changes

    # --- summaries ---------------------------------------------------------------------------------
    def plot_keys(self) -> list[str]:
        return [key for _, key in self.headlines]

    def headline_rows(self, logger) -> dict:
        """"<label> before" / "<label> after" rows of the summary table, for metrics the run logged."""
        rows = {}
        for label, key in self.headlines:
            before, after = logger.first(key), logger.last(key)
            if not (np.isnan(before) and np.isnan(after)):
                rows[f"{label} before"], rows[f"{label} after"] = before, after
        return rows


def get_mode(cfg: RecipeConfig) -> Mode:
    """The recipe's mode object."""
    return MODES.get(cfg.mode)(cfg)


def safe_name(name: str) -> str:
    """An example id as a file name."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name))[:80]


def first(dataset, n: int) -> list:
    """The first `n` (example, audio) items of `dataset` (all of them where it has fewer)."""
    return [dataset[i] for i in range(min(len(dataset), n))]


def batch_indices(num_examples: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """The examples of step `step`: epoch-wise permutations seeded by (seed, epoch), so a resumed
    run draws what the uninterrupted one would have."""
    per_epoch = max(1, num_examples // batch_size)
    epoch, offset = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
    return perm[offset * batch_size : (offset + 1) * batch_size]


def optional(value) -> Optional[float]:
    value = float(value)
    return value if np.isfinite(value) else None
