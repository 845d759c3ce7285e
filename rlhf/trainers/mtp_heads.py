"""MTP head self-distillation (`algorithm: mtp_heads`): a checkpoint's draft heads (model/mtp.py) trained
alone on the policy's own greedy continuations, decoded once by vLLM, the policy's weights copied
unchanged to `final/`. Verified decoding keeps a draft where it equals the policy's next greedy token,
so that (not the dataset's reference, `mtp_heads.targets: reference`) is the target that pays (docs/mtp.md).
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from speechrl.rlhf.core.config import RecipeConfig, RecipeError
from speechrl.rlhf.core.devices import compute_dtype, peak_rss_mib, release_memory, train_device
from speechrl.rlhf.core.run_dir import (RunLogger, resume_run, stop_on_write_error, write_trainer_state,
                                        writing_checkpoint)
from speechrl.rlhf.model.backbone import load_backbone
from speechrl.rlhf.model.logprobs import build_token_batch, token_logprobs
from speechrl.rlhf.model.mtp import MTP_DIR, AcceptanceMeter, has_heads, heads_for
from speechrl.rlhf.model.optim import Optimizer
from speechrl.rlhf.model.policy import TrainablePolicy
from speechrl.rlhf.modes import get_mode
from speechrl.rlhf.modes.base import batch_indices, first
from speechrl.rlhf.trainers.sft import SFTRecipe

log = logging.getLogger(__name__)

CONTINUATIONS = "continuations.jsonl"
STATES_BATCH = 32  # rows per no-grad forward when the policy's hidden states are taken


class Continuations:
    """Rows of (last hidden states on a completion [len, H], its ids [len]): what the heads learn from.
    `batch(idx)` lays rows out on the grid MtpHeads.loss reads (hidden state t predicts token t+1)."""

    def __init__(self, rows: list[tuple[torch.Tensor, torch.Tensor]]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, idx) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = [self.rows[int(i)] for i in idx]
        width = max(len(ids) for _, ids in rows)
        hidden = rows[0][0].new_zeros((len(rows), width, rows[0][0].shape[1]))
        ids = torch.zeros((len(rows), width + 1), dtype=torch.long, device=hidden.device)
        mask = torch.zeros((len(rows), width), dtype=torch.bool, device=hidden.device)
        for r, (h, c) in enumerate(rows):
            hidden[r, : len(c)] = h
            ids[r, 1 : len(c) + 1] = c  # column 0 stands for the prompt's last token, whose state predicts c[0]
            mask[r, : len(c)] = True
        return hidden, ids, mask


class MtpHeadsRecipe(SFTRecipe):
    """SFT's loop (log, evaluate, checkpoint, resume) over the heads alone; the policy only reads."""

    plot_keys = ["train/mtp_loss", "eval/mtp_loss", "eval/mtp_acc_1"]
    headline_key = "eval/mtp_acc_1"

    def setup(self) -> None:
        cfg = self.cfg
        checkpoint = self.open_run()
        self.mode = get_mode(cfg)
        self.path = self.mode.backbone_path()
        self.backbone = load_backbone(self.path)
        self.had_heads = has_heads(self.path)
        # modes whose replies need a layout (realtime, duplex) do not list mtp_heads: vLLM's verified
        # decoding cannot constrain them, so their heads would never draft (docs/mtp.md)
        self.task = self.mode.setup_task(self.backbone.processor)
        self.train_set, self.eval_set = self.mode.datasets(self.backbone.max_audio_seconds)
        self.logger = RunLogger(self.run_dir, cfg, plot_keys=self.plot_keys)
        self.start_step = resume_run(checkpoint, self.logger) if checkpoint else 0
        log.info("run directory: %s", self.run_dir)
        self.eval_items = first(self.eval_set, cfg.data.max_eval_examples)
        # checks.py made sure heads_for has heads to give (model.mtp.num_heads > 0, one plain rank); taken
        # before decoding, so that heads the recipe cannot use stop the run before the engine's minutes
        heads = heads_for(cfg, checkpoint / "model" if checkpoint else self.path,
                          self.backbone.model.get_output_embeddings())
        train_items = first(self.train_set, cfg.mtp_heads.max_examples or len(self.train_set))
        # held-out rows are always the policy's own continuations: what a kept draft must match
        own = cfg.mtp_heads.targets == "policy"
        rows = self.decode({"eval": (self.eval_items, self.eval_set),
                            **({"train": (train_items, self.train_set)} if own else {})})
        if not own:
            rows["train"] = [self.task.sft_example(ex, audio, self.train_set) for ex, audio in train_items]

        device = train_device(cfg.train.device)  # after decoding: the engine had the GPU to itself
        model = self.backbone.model.to(device).eval().requires_grad_(False)
        heads.to(device)
        optimizer = Optimizer(heads, cfg.train, cfg.train.steps)
        if checkpoint:
            optimizer.load(checkpoint)
        self.policy = TrainablePolicy(self.backbone, model, optimizer, None, device,
                                      compute_dtype(cfg.train.dtype, device), heads)
        self.model, self.optimizer, self.heads = model, optimizer, heads
        self.data, self.held_out = self.states(rows["train"], "train"), self.states(rows["eval"], "eval")

    # --- data -----------------------------------------------------------------------------------
    def decode(self, splits: dict[str, tuple[list, object]]) -> dict[str, list]:
        """{split: [(prompt ids, completion ids, clip)]} for {split: (items, dataset)}: the policy's greedy
        continuations, all splits on one engine, written to the run directory once and read back on resume."""
        cache = {name: self.run_dir / name / CONTINUATIONS for name in splits}
        requests = {name: [self.task.request(ex, audio, dataset) for ex, audio in items]
                    for name, (items, dataset) in splits.items()}
        missing = [name for name in splits if not cache[name].is_file()]
        if missing:
            engine = self.engine(self.path, 0)
            for name in missing:
                samples = self.greedy(engine, requests[name])
                cache[name].parent.mkdir(parents=True, exist_ok=True)
                partial = cache[name].with_suffix(".partial")  # renamed when whole: a cut-off write is not read back
                with stop_on_write_error(self.run_dir, f"the {name} continuations"):
                    partial.write_text("".join(
                        json.dumps({"id": ex.id, "prompt_ids": s.prompt_ids, "completion_ids": s.completion_ids}) + "\n"
                        for s, (ex, _) in zip(samples, splits[name][0])))
                    partial.replace(cache[name])
            del engine
            release_memory(train_device(self.cfg.train.device))
        out = {}
        for name, (items, _) in splits.items():
            rows = [json.loads(line) for line in cache[name].read_text().splitlines()]
            if [r["id"] for r in rows] != [ex.id for ex, _ in items]:
                raise RecipeError(f"{cache[name]}: decoded for other examples than this recipe's {name} set; resume "
                                  "with the recipe the run started with, or start a new run")
            # the prompt's clip (ASR), or none (TTS: the example's audio is the target, not the prompt)
            out[name] = [(r["prompt_ids"], r["completion_ids"], req.audio) for r, req in zip(rows, requests[name])]
        return out

    def engine(self, path: Path, k: int):
        """An in-process vLLM engine over `path`, drafting with k heads (0: plain decoding)."""
        from speechrl.rollouts.engine import RolloutEngine

        r = self.cfg.rollout
        return RolloutEngine(str(path), kv_cache_gib=r.kv_cache_gib, gpu_memory_utilization=r.gpu_memory_utilization,
                             enforce_eager=r.enforce_eager, max_model_len=r.max_model_len,
                             threads=torch.get_num_threads(), mtp_tokens=k, dtype=r.dtype)

    def greedy(self, engine, requests: list) -> list:
        return engine.generate(requests, n=1, temperature=0.0, top_p=1.0, max_new_tokens=self.cfg.eval_max_new_tokens,
                               allowed_token_ids=self.task.allowed_ids, stop_token_ids=self.task.stop_ids)

    def emitted(self, path: Path) -> float:
        """Tokens a greedy decoding step emits over the held-out items on an engine drafting with every head."""
        engine = self.engine(path, self.heads.num_heads)
        meter = AcceptanceMeter()
        meter.update([engine.spec_stats()], "eval")  # from the engine's start: zero drafts so far
        self.greedy(engine, [self.task.request(ex, audio, self.eval_set) for ex, audio in self.eval_items])
        emitted = meter.update([engine.spec_stats()], "eval").get("eval/mtp_emitted", float("nan"))
        del engine
        release_memory(self.policy.device)
        return emitted

    @torch.no_grad()
    def states(self, rows: list, split: str) -> Continuations:
        """The policy's last hidden states on each row's completion (rows without a token for the first
        head to predict are left out)."""
        if not rows:
            raise RecipeError(f"mtp_heads: the {split} set has no examples; check data.max_eval_examples, "
                              "mtp_heads.max_examples and the dataset")
        kept = [r for r in rows if len(r[1]) >= 2]
        if not kept:
            raise RecipeError(f"mtp_heads: none of the {len(rows)} {split} continuations has 2 tokens or more, so no "
                              "head has a target; check eval_max_new_tokens and that the checkpoint "
                              "(run.init_from) is trained")
        pad = self.backbone.tokenizer.pad_token_id
        out = []
        for start in tqdm(range(0, len(kept), STATES_BATCH), desc=f"{split} hidden states", unit="batch", leave=False):
            chunk = kept[start:start + STATES_BATCH]
            batch = build_token_batch(self.backbone.processor, *map(list, zip(*chunk)), pad).to(self.policy.device)
            with self.policy.autocast():
                _, hidden = token_logprobs(self.model, batch, with_hidden=True)
            for h, mask, (_, completion, _) in zip(hidden, batch.completion_mask, chunk):
                out.append((h[mask].float(), torch.tensor(completion, device=self.policy.device)))
        return Continuations(out)

    # --- SFTRecipe's hooks ----------------------------------------------------------------------
    def step_loss(self, step: int) -> tuple:
        idx = batch_indices(len(self.data), self.cfg.train.batch_size, step, self.cfg.seed)
        loss, metrics = self.heads.loss(*self.data.batch(idx))
        return loss, metrics

    def evaluate(self, step: int) -> dict:
        with torch.no_grad(), self.policy.autocast():
            _, metrics = self.heads.loss(*self.held_out.batch(range(len(self.held_out))))
        return {f"eval/{k}": v for k, v in metrics.items()}

    def save_checkpoint(self, step: int) -> Path:
        with writing_checkpoint(self.run_dir, step, self.cfg.train.keep_checkpoints) as path:
            self.heads.save(path / "model")
            self.optimizer.save(path)
            write_trainer_state(path, step)
        return path

    def finish(self) -> dict:
        final = self.run_dir / "final"
        with stop_on_write_error(self.run_dir, "the final weights"):
            # the policy's files as they came (its dtype too), the new heads beside them
            shutil.copytree(self.path, final, ignore=shutil.ignore_patterns(MTP_DIR), dirs_exist_ok=True)
            self.heads.save(final)
        self.model.to("cpu")  # the engines that measure the heads get the GPU
        release_memory(self.policy.device)
        k = self.heads.num_heads
        measured = {}
        if self.cfg.mtp_heads.measure:
            for label, path in (("before", self.path), ("after", final)):
                if label == "before" and not self.had_heads:
                    continue
                measured[label] = self.emitted(path)
            self.logger.log(self.cfg.train.steps, {f"eval/mtp_emitted_{label}": v for label, v in measured.items()})
        first_acc, last_acc = self.logger.first("eval/mtp_acc_1"), self.logger.last("eval/mtp_acc_1")
        table = {
            "run": str(self.run_dir),
            "steps": self.cfg.train.steps,
            "targets": self.cfg.mtp_heads.targets,
            "continuations (train / held-out)": f"{len(self.data)} / {len(self.held_out)}",
            "held-out draft 1 kept (teacher forced)": f"{first_acc:.3f} -> {last_acc:.3f}",
            **({f"held-out tokens per decoding step, k={k} (vLLM, greedy)":
                " -> ".join(f"{v:.2f}" for v in measured.values())} if measured else {}),
            "train wall time (s)": round(self.elapsed, 1),
            "peak RSS (MiB)": peak_rss_mib(),
            "final weights": str(final),
        }
        return self.logger.finish(table)


def run_mtp_heads(cfg: RecipeConfig, resume: Optional[str] = None) -> dict:
    recipe = MtpHeadsRecipe(cfg, resume)
    recipe.setup()
    return recipe.train()
