"""MTP head self-distillation (`algorithm: mtp_heads`): a checkpoint's draft heads (model/mtp.py) trained
alone on what the policy itself says.

Verified greedy decoding keeps a draft where it equals the policy's own next greedy token, so the
target that pays is the policy's continuation, not the dataset's reference: where the two differ
(the policy's errors, its own spelling of a number), heads trained on references draft what the
policy then rejects. This is Medusa-2's self-distillation, done offline and cheaply:

1. every training prompt of the mode is decoded greedily, once, on an in-process vLLM engine
   (`train/` and `eval/continuations.jsonl` in the run directory, which `--resume` reuses);
2. the policy runs once over prompt + continuation, without gradient, and keeps its last hidden
   states on the continuation (the states the engine drafts from);
3. only the heads train, `train.steps` steps of `train.batch_size` continuations, on those states:
   the policy's weights are written to `final/` exactly as they came.

Held-out: the heads' per-position top-1 accuracy on the policy's own greedy continuations of the
held-out prompts (teacher forced, so it is the chance that a draft is kept given the ones before it
were), and at the end the tokens a decoding step emits, measured on a vLLM engine that drafts with the
heads, before (where the checkpoint had heads) and after. `mtp_heads.targets: reference` trains on
the dataset's completions instead, the comparison that shows what the policy's own targets add.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from speechrl.rlhf.core.config import RecipeConfig, RecipeError
from speechrl.rlhf.core.devices import peak_rss_mib, train_device
from speechrl.rlhf.core.run_dir import (RunLogger, due, find_resume_dir, latest_checkpoint, new_run_dir, resume_run,
                                        stop_on_write_error, write_trainer_state, writing_checkpoint)
from speechrl.rlhf.core.seeding import seed_everything, set_threads
from speechrl.rlhf.model.backbone import load_backbone
from speechrl.rlhf.model.logprobs import build_token_batch, token_logprobs
from speechrl.rlhf.model.mtp import AcceptanceMeter, has_heads, heads_for
from speechrl.rlhf.model.optim import Optimizer
from speechrl.rlhf.model.policy import save_model
from speechrl.rlhf.modes import get_mode
from speechrl.rlhf.modes.base import batch_indices

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


class MtpHeadsRecipe:
    def __init__(self, cfg: RecipeConfig, resume: Optional[str] = None):
        self.cfg = cfg
        self.resume = resume

    def setup(self) -> None:
        cfg = self.cfg
        set_threads(cfg.train.torch_threads)
        seed_everything(cfg.seed)
        self.run_dir = find_resume_dir(cfg, self.resume) if self.resume else new_run_dir(cfg)
        checkpoint = latest_checkpoint(self.run_dir) if self.resume else None
        self.mode = get_mode(cfg)
        self.path = self.mode.backbone_path()
        self.device = train_device(cfg.train.device)
        self.backbone = load_backbone(self.path)
        self.model = self.backbone.model.to(self.device).eval().requires_grad_(False)
        self.had_heads = has_heads(self.path)
        # checks.py made sure heads_for has heads to give (model.mtp.num_heads > 0, one plain rank)
        self.heads = heads_for(cfg, checkpoint / "model" if checkpoint else self.path, self.model.get_output_embeddings())
        self.optimizer = Optimizer(self.heads, cfg.train, cfg.train.steps)
        if checkpoint:
            self.optimizer.load(checkpoint)
        # modes whose replies need a layout (realtime, duplex) do not list mtp_heads: vLLM's verified
        # decoding cannot constrain them, so their heads would never draft (docs/mtp.md)
        self.task = self.mode.setup_task(self.backbone.processor)
        self.train_set, self.eval_set = self.mode.datasets(self.backbone.max_audio_seconds)
        self.logger = RunLogger(self.run_dir, cfg, plot_keys=["train/mtp_loss", "eval/mtp_loss", "eval/mtp_acc_1"])
        self.start_step = resume_run(checkpoint, self.logger) if checkpoint else 0
        log.info("run directory: %s", self.run_dir)

    # --- data -----------------------------------------------------------------------------------
    def items(self, dataset, limit: int) -> list:
        return [dataset[i] for i in range(min(len(dataset), limit or len(dataset)))]

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
                with stop_on_write_error(self.run_dir, f"the {name} continuations"):
                    cache[name].write_text("".join(
                        json.dumps({"id": ex.id, "prompt_ids": s.prompt_ids, "completion_ids": s.completion_ids}) + "\n"
                        for s, (ex, _) in zip(samples, splits[name][0])))
            del engine
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
                             threads=torch.get_num_threads(), mtp_tokens=k)

    def greedy(self, engine, requests: list) -> list:
        return engine.generate(requests, n=1, temperature=0.0, top_p=1.0, max_new_tokens=self.cfg.eval_max_new_tokens,
                               allowed_token_ids=self.task.allowed_ids, stop_token_ids=self.task.stop_ids)

    def emitted(self, path: Path, items: list, dataset) -> float:
        """Tokens a greedy decoding step emits over `items` on an engine drafting with every head."""
        engine = self.engine(path, self.heads.num_heads)
        meter = AcceptanceMeter()
        meter.update([engine.spec_stats()], "eval")  # from the engine's start: zero drafts so far
        self.greedy(engine, [self.task.request(ex, audio, dataset) for ex, audio in items])
        return meter.update([engine.spec_stats()], "eval").get("eval/mtp_emitted", float("nan"))

    @torch.no_grad()
    def states(self, rows: list) -> Continuations:
        """The policy's last hidden states on each row's completion (rows without a token for the first
        head to predict are left out)."""
        rows = [r for r in rows if len(r[1]) >= 2]
        if not rows:
            raise RecipeError("mtp_heads: no continuation has 2 tokens or more, so no head has a target; check "
                              "eval_max_new_tokens and that the checkpoint (run.init_from) is trained")
        pad = self.backbone.tokenizer.pad_token_id
        out = []
        for start in tqdm(range(0, len(rows), STATES_BATCH), desc="hidden states", unit="batch", leave=False):
            chunk = rows[start:start + STATES_BATCH]
            batch = build_token_batch(self.backbone.processor, *map(list, zip(*chunk)), pad).to(self.device)
            _, hidden = token_logprobs(self.model, batch, with_hidden=True)
            for h, mask, (_, completion, _) in zip(hidden, batch.completion_mask, chunk):
                out.append((h[mask], torch.tensor(completion, device=self.device)))
        return Continuations(out)

    # --- training -------------------------------------------------------------------------------
    def evaluate(self) -> dict:
        with torch.no_grad():
            loss, metrics = self.heads.loss(*self.held_out.batch(range(len(self.held_out))))
        return {f"eval/{k}": v for k, v in metrics.items()}

    def train(self) -> dict:
        cfg = self.cfg
        train_items = self.items(self.train_set, cfg.mtp_heads.max_examples)
        eval_items = self.items(self.eval_set, cfg.data.max_eval_examples)
        # held-out rows are always the policy's own continuations: what a kept draft must match
        own = self.cfg.mtp_heads.targets == "policy"
        rows = self.decode({"eval": (eval_items, self.eval_set), **({"train": (train_items, self.train_set)} if own else {})})
        if not own:
            rows["train"] = [self.task.sft_example(ex, audio, self.train_set) for ex, audio in train_items]
        self.data, self.held_out = self.states(rows["train"]), self.states(rows["eval"])
        if self.start_step == 0:
            self.logger.log(0, self.evaluate())
        start = time.time()
        bar = tqdm(range(self.start_step, cfg.train.steps), initial=self.start_step, total=cfg.train.steps,
                   desc="mtp_heads", unit="step", dynamic_ncols=True)
        history = []
        for step in bar:
            idx = batch_indices(len(self.data), cfg.train.batch_size, step, cfg.seed)
            loss, metrics = self.heads.loss(*self.data.batch(idx))
            self.optimizer.backward(loss)
            history.append({**metrics, **self.optimizer.step()})
            done, row = step + 1, {}
            if due(done, cfg.train.log_every, cfg.train.steps):
                row = {f"train/{k}": float(np.mean([h[k] for h in history])) for k in history[0]}
                history = []
            if due(done, cfg.train.eval_every, cfg.train.steps):
                row.update(self.evaluate())
                bar.set_postfix({"held-out acc 1": f"{row['eval/mtp_acc_1']:.3f}"})
            if row:
                self.logger.log(done, row)
            if due(done, cfg.train.checkpoint_every, cfg.train.steps):
                with writing_checkpoint(self.run_dir, done, cfg.train.keep_checkpoints) as path:
                    self.heads.save(path / "model")
                    self.optimizer.save(path)
                    write_trainer_state(path, done)
        self.elapsed = time.time() - start
        return self.finish(eval_items)

    def finish(self, eval_items: list) -> dict:
        with stop_on_write_error(self.run_dir, "the final weights"):
            final = save_model(self.model, self.backbone.processor, self.run_dir / "final", self.heads)
        k = self.heads.num_heads
        measured = {}
        if self.cfg.mtp_heads.measure:
            for label, path in (("before", self.path), ("after", final)):
                if label == "before" and not self.had_heads:
                    continue
                measured[label] = self.emitted(path, eval_items, self.eval_set)
            self.logger.log(self.cfg.train.steps, {f"eval/mtp_emitted_{label}": v for label, v in measured.items()})
        first, last = self.logger.first("eval/mtp_acc_1"), self.logger.last("eval/mtp_acc_1")
        table = {
            "run": str(self.run_dir),
            "steps": self.cfg.train.steps,
            "targets": self.cfg.mtp_heads.targets,
            "continuations (train / held-out)": f"{len(self.data)} / {len(self.held_out)}",
            "held-out draft 1 kept (teacher forced)": f"{first:.3f} -> {last:.3f}",
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
