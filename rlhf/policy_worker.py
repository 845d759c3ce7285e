"""The policy trainer as a Ray actor: the trainable model, a frozen reference, the optimizer.

One `update` call takes a step's scored samples and makes one optimizer step per epoch:
the clipped importance ratio is taken against the rollout engine's sampling logprobs, KL to
the reference is added per token, and the loss is aggregated by the recipe's rule. Every
piece is looked up by name in `speechrl.rlhf.algos`.
"""
from __future__ import annotations

from pathlib import Path

import torch

from speechrl.rlhf.algos import KL_ESTIMATORS, LOSS_AGGREGATIONS, POLICY_LOSSES
from speechrl.rlhf.backbone import allowed_token_ids, hub_state_dict, save_backbone
from speechrl.rlhf.config import RecipeConfig
from speechrl.rlhf.evaluate import evaluate_asr
from speechrl.rlhf.logprobs import build_token_batch, token_logprobs, unwrap, vocab_mask
from speechrl.rlhf.policy import build_policy, exportable_model, save_policy, seed_everything, set_threads


class PolicyWorker:
    def __init__(self, cfg: RecipeConfig, backbone_path: str, checkpoint: str | None = None,
                 allowed_ids: list[int] | None = None):
        set_threads(cfg.train.torch_threads)
        seed_everything(cfg.seed)
        self.cfg = cfg
        policy = build_policy(cfg, Path(backbone_path), Path(checkpoint) if checkpoint else None,
                              with_reference=cfg.grpo.kl_coef > 0 or cfg.algorithm == "online_dpo")
        self.backbone, self.model, self.optimizer = policy.backbone, policy.model, policy.optimizer
        self.reference = policy.reference
        self.eval_set = None
        vocab = self.backbone.model.get_output_embeddings().weight.shape[0]
        # the mode's decoding constraint (TTS: the codec's ids, which the driver knows); ASR's by default
        self.allowed = vocab_mask(allowed_ids or allowed_token_ids(self.backbone.tokenizer, cfg.mode), vocab)
        if checkpoint:
            torch.set_rng_state(torch.load(Path(checkpoint) / "policy_rng.pt", weights_only=False))

    def ping(self) -> bool:
        return True

    def set_eval_set(self, dataset) -> None:
        self.eval_set = dataset

    def _loss(self, batch, old_logprobs, advantages, temperature):
        g = self.cfg.grpo
        logp = token_logprobs(self.model, batch, temperature, self.allowed)
        mask = batch.completion_mask
        per_token, metrics = POLICY_LOSSES.get(g.policy_loss)(logp, old_logprobs, advantages, mask,
                                                              clip_eps=g.clip_eps, clip_eps_high=g.clip_eps_high)
        if self.reference is not None:
            with torch.no_grad():
                ref_logp = token_logprobs(self.reference, batch, temperature, self.allowed)
            kl = KL_ESTIMATORS.get(g.kl_estimator)(logp, ref_logp)
            per_token = per_token + g.kl_coef * kl
            metrics["kl"] = (kl * mask).sum() / mask.sum().clamp(min=1)
        metrics["logprob_gap"] = ((logp.detach() - old_logprobs).abs() * mask).sum() / mask.sum().clamp(min=1)
        return LOSS_AGGREGATIONS.get(g.loss_agg)(per_token, mask), metrics

    def update(self, prompt_ids, completion_ids, sampling_logprobs, audios, advantages, temperature) -> dict:
        """One optimizer step per epoch over the step's samples, in micro-batches of train.batch_size.

        Micro-batch losses are weighted by their share of the samples, so accumulation matches
        one big batch for sequence-level aggregation (token_mean is then a per-micro-batch mean).
        """
        n, micro = len(prompt_ids), self.cfg.train.batch_size
        tok = self.backbone.tokenizer
        history: list[dict] = []
        for _ in range(self.cfg.grpo.epochs_per_step):
            sums: dict[str, float] = {}
            for start in range(0, n, micro):
                sl = slice(start, start + micro)
                batch = build_token_batch(self.backbone.processor, prompt_ids[sl], completion_ids[sl],
                                          audios[sl], tok.pad_token_id)
                old = torch.zeros(batch.completion_mask.shape)
                for i, lp in enumerate(sampling_logprobs[sl]):
                    old[i, batch.completion_mask[i]] = torch.tensor(lp, dtype=torch.float32)
                adv = torch.tensor(advantages[sl], dtype=torch.float32)
                loss, metrics = self._loss(batch, old, adv, temperature)
                share = len(adv) / n
                self.optimizer.backward(loss * share)
                for k, v in {"loss": loss, **metrics}.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v) * share
            sums.update(self.optimizer.step())
            history.append(sums)
        out = {f"train/{k}": v for k, v in history[0].items() if k not in ("grad_norm", "lr")}
        out.update(grad_norm=history[-1]["grad_norm"], lr=history[-1]["lr"])
        return out

    def dpo_update(self, prompt_ids, chosen_ids, rejected_ids) -> dict:
        """One optimizer step on preference pairs (online DPO), in micro-batches of train.batch_size pairs."""
        from speechrl.rlhf.dpo import preference_batch, preference_loss

        n, micro = len(prompt_ids), self.cfg.train.batch_size
        sums: dict[str, float] = {}
        for start in range(0, n, micro):
            sl = slice(start, start + micro)
            batch = preference_batch(self.backbone.processor, prompt_ids[sl], chosen_ids[sl], rejected_ids[sl],
                                     self.backbone.tokenizer.pad_token_id)
            pairs = len(prompt_ids[sl])
            loss, metrics = preference_loss(self.model, self.reference, batch, pairs, self.cfg.dpo, self.allowed)
            self.optimizer.backward(loss * pairs / n)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v * pairs / n
        stats = self.optimizer.step()
        return {**{f"train/{k}": v for k, v in sums.items()}, "grad_norm": stats["grad_norm"], "lr": stats["lr"]}

    def weights(self) -> list[tuple[str, torch.Tensor]]:
        """Hub-layout tensors for the rollout engines; LoRA runs send only the adapted layers, merged."""
        if self.cfg.model.lora.enabled:
            from speechrl.rollouts.sync import merged_lora_state

            return merged_lora_state(self.model)
        return [(k, v.detach().clone()) for k, v in hub_state_dict(unwrap(self.model).state_dict().items())]

    def evaluate(self) -> dict:
        result = evaluate_asr(exportable_model(self.model), self.backbone.processor, self.eval_set,
                              max_examples=self.cfg.data.max_eval_examples,
                              max_new_tokens=self.cfg.eval_max_new_tokens)
        result["examples"] = [list(map(str, e)) for e in result["examples"]]
        return result

    def save(self, path: str) -> None:
        path = Path(path)
        save_policy(self.model, self.backbone.processor, self.optimizer, path, self.cfg.model.lora.enabled)
        torch.save(torch.get_rng_state(), path / "policy_rng.pt")

    def save_final(self, path: str) -> str:
        return str(save_backbone(exportable_model(self.model), self.backbone.processor, Path(path)))


def make_policy_worker(cfg: RecipeConfig, backbone_path: str, checkpoint: str | None = None,
                       allowed_ids: list[int] | None = None):
    import ray

    gpus = 1 if torch.cuda.is_available() else 0
    return ray.remote(PolicyWorker).options(num_cpus=1, num_gpus=gpus, max_concurrency=1).remote(
        cfg, str(backbone_path), checkpoint, allowed_ids)
