"""The policy trainer as a Ray actor: trainable model, frozen reference, optimizer, and critic if asked.

`train` does what its `TrainBatch` holds, never what an algorithm is called: pairs take the preference
loss; otherwise epochs of the clipped policy loss, plus KL when kl_coef > 0 and the value loss when it
carries returns. The critic is a value head on the policy's own trunk (model/critic.py).

With train.num_ranks > 1 the driver starts one worker per rank, each holding a slice of the sharded
policy (model/sharding.py), and sends every call to all of them (policy_group.py: PolicyClient). Each
rank runs every num_ranks-th micro-batch of a minibatch, weighted by its share of the whole minibatch
as one rank would weight it, so N ranks take the step one rank takes (float summation order aside). Full weights
(engines, evaluation, checkpoints) are gathered to rank 0, which alone returns or writes them.
"""
from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import numpy as np
import torch

from speechrl.rlhf.algos import KL_ESTIMATORS, LOSS_AGGREGATIONS, POLICY_LOSSES
from speechrl.rlhf.algos.batch import TrainBatch, micro_batches
from speechrl.rlhf.algos.value_loss import clipped_value_loss
from speechrl.rlhf.model.backbone import hub_state_dict
from speechrl.rlhf.core.config import RecipeConfig
from speechrl.rlhf.core.devices import peak_memory_gib, train_device
from speechrl.rlhf.core.kernels import precision_report
from speechrl.rlhf.model.critic import ValueHead, token_values
from speechrl.rlhf.model.mtp import MTP_PREFIX, greedy_next_tokens
from speechrl.rlhf.model.logprobs import TokenBatch, build_token_batch, record_inputs, token_logprobs, unwrap, vocab_mask
from speechrl.rlhf.model.policy import build_policy, exportable_model, save_model, save_policy, unsharded_copy
from speechrl.rlhf.model.sharding import full_state_dict, shard_module
from speechrl.rlhf.workers.ranks import free_address, join, my_share
from speechrl.rlhf.core.seeding import seed_everything, set_threads
from speechrl.rlhf.model.layout import ReplyLayout
from speechrl.rollouts.lora import LoraAdapter, lora_adapter
from speechrl.rollouts.sync import StoredWeights

VALUE_HEAD = "value_head.pt"  # in a PPO checkpoint, beside the policy
MTP_DRAWS = "mtp_draws.pt"  # a checkpoint's state of the generator that picks the MTP heads' positions


class PolicyWorker:
    def __init__(self, cfg: RecipeConfig, backbone_path: str, checkpoint: str | None = None, *,
                 allowed_ids: list[int] | ReplyLayout, reference: bool = False, critic: bool = False,
                 rank: int = 0, world: int = 1, address: str | None = None):
        """`allowed_ids`: the mode's decoding constraint (a token list, or the realtime reply layout).
        `reference`: keep the starting weights frozen (KL terms, preference losses); `critic`: a value
        head on the policy's trunk, one forward for logprobs and values, trained by one optimizer.
        `rank` of `world` trainer ranks, meeting at `address` (host:port, workers/ranks.py)."""
        from transformers import AutoConfig

        set_threads(cfg.train.torch_threads, share=world)  # ranks compute at once
        seed_everything(cfg.seed)
        self.cfg, self.backbone_path = cfg, Path(backbone_path)
        self.rank, self.world = rank, world
        join(rank, world, address, train_device(cfg.train.device))
        self.value_head = None
        if critic:
            self.value_head = ValueHead(AutoConfig.from_pretrained(backbone_path).text_config.hidden_size)
            if checkpoint:
                self.value_head.load_state_dict(torch.load(Path(checkpoint) / VALUE_HEAD, weights_only=True))
            self.value_head.to(train_device(cfg.train.device))
            if world > 1:
                shard_module(self.value_head)
        policy = build_policy(cfg, Path(backbone_path), Path(checkpoint) if checkpoint else None,
                              with_reference=reference, updates_per_step=cfg.rl.epochs_per_step * cfg.rl.minibatches,
                              extra_params=list(self.value_head.parameters()) if critic else (),
                              train_mtp=cfg.model.mtp.train_in_rl)
        self.backbone, self.model, self.optimizer = policy.backbone, policy.model, policy.optimizer
        # MTP draft heads (model/mtp.py): carried to the engines and checkpoints; trained on the
        # policy's own samples where model.mtp.train_in_rl, so their drafts follow the moving policy
        self.mtp = policy.mtp
        self.train_mtp = self.mtp is not None and cfg.model.mtp.train_in_rl
        # which positions the heads train on (model.mtp.rl_positions): a stream of their own, so the
        # heads never change the policy's; checkpointed beside it, so a resumed run draws what it would have
        self.mtp_draws = torch.Generator(policy.device).manual_seed(cfg.seed)
        self.reference = policy.reference
        self.policy, self.device = policy, policy.device
        self.transfer = None  # vLLM's trainer-side weight-transfer engine (connect_engines), if the run uses one
        vocab = self.backbone.model.get_output_embeddings().weight.shape[0]
        self.allowed = vocab_mask(allowed_ids, vocab)
        if checkpoint:
            torch.set_rng_state(torch.load(Path(checkpoint) / "policy_rng.pt", weights_only=False))
            if (Path(checkpoint) / MTP_DRAWS).is_file():  # checkpoints from before the draws have none
                self.mtp_draws.set_state(torch.load(Path(checkpoint) / MTP_DRAWS, weights_only=False))

    def ping(self) -> bool:
        return True

    def node_id(self) -> str:
        """The Ray node this worker runs on (the run's placement.json records it)."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def precision(self) -> dict[str, str]:
        """The forward passes' dtype and the CPU kernels this worker computes on (placement.json)."""
        return precision_report(self.policy.dtype)

    def with_model(self, fn, *args):
        """`fn(model, processor, *args)` on the current weights (LoRA merged into a copy): a mode's
        held-out evaluation where it runs on the trainer's model, not on the engines. Rank 0's result."""
        model = self._full_model()
        return None if model is None else fn(exportable_model(model), self.backbone.processor, *args)

    def _full_model(self):
        """The policy with full weights: itself on one rank; a gathered copy on rank 0 of several (None
        on the others; every rank must call)."""
        if self.world == 1:
            return self.model
        return unsharded_copy(self.model, self.backbone_path, self.cfg.model.lora)

    def _loss(self, batch, old_logprobs, advantages, temperature, kl_coef, returns=None, old_values=None):
        """The aggregated loss of one micro-batch and its metrics. With `returns` and `old_values`
        ([B, T] on the completion grid), the value loss is added, weighted by ppo.vf_coef."""
        g = self.cfg.rl
        mask = batch.completion_mask
        critic = returns is not None
        with_hidden = critic or self.train_mtp  # the value head and the MTP heads read the last hidden states
        # below a frozen bottom the reference's hidden states are the policy's: taken from its passes
        fed = kl_coef > 0 and self.policy.reference_top is not None
        recording = record_inputs(self.model, self.policy.frozen_layers) if fed else contextlib.nullcontext()
        with self.policy.autocast(), recording as inputs:
            out = token_logprobs(self.model, batch, temperature, self.allowed, with_hidden=with_hidden)
        logp, hidden = out if with_hidden else (out, None)
        per_token, metrics = POLICY_LOSSES.get(g.policy_loss)(logp, old_logprobs, advantages, mask,
                                                              clip_eps=g.clip_eps, clip_eps_high=g.clip_eps_high)
        if kl_coef > 0:
            with torch.no_grad(), self.policy.autocast():
                ref_logp = token_logprobs(self.policy.reference_top, batch, temperature, self.allowed, feed=inputs) \
                    if fed else token_logprobs(self.reference, batch, temperature, self.allowed)
            kl = KL_ESTIMATORS.get(g.kl_estimator)(logp, ref_logp)
            per_token = per_token + kl_coef * kl
            metrics["kl"] = (kl * mask).sum() / mask.sum().clamp(min=1)
        if critic:
            value_loss, value_metrics = clipped_value_loss(self.value_head(hidden), old_values, returns, mask,
                                                           self.cfg.ppo.value_clip)
            per_token = per_token + self.cfg.ppo.vf_coef * value_loss
            metrics.update(value_metrics, value_loss=(value_loss * mask).sum() / mask.sum().clamp(min=1))
        metrics["logprob_gap"] = ((logp.detach() - old_logprobs).abs() * mask).sum() / mask.sum().clamp(min=1)
        loss = LOSS_AGGREGATIONS.get(g.loss_agg)(per_token, mask)
        if self.train_mtp:  # on detached hidden states: the heads learn the policy, the policy's update is unchanged
            with self.policy.autocast():
                following = None  # rl_targets: sampled, the batch's own tokens
                if self.cfg.model.mtp.rl_targets == "greedy":
                    allowed = self.allowed if isinstance(self.allowed, torch.Tensor) else None
                    following = greedy_next_tokens(self.model.get_output_embeddings(), hidden, batch.input_ids, mask,
                                                   allowed)
                mtp_loss, mtp_metrics = self.mtp.loss(hidden, batch.input_ids, mask, self.cfg.model.mtp.rl_positions,
                                                         self.mtp_draws, following)
            loss = loss + self.cfg.model.mtp.loss_weight * mtp_loss
            metrics.update(mtp_metrics)
        return loss, metrics

    def train(self, batch: TrainBatch) -> dict:
        """The optimizer step(s) a batch asks for (module docstring); the metrics."""
        if len(batch) == 0:  # every completion was empty or unscored: nothing to step on
            return {}
        metrics = self._preference_step(batch) if batch.is_preference else self._policy_steps(batch)
        return {**metrics, **peak_memory_gib(self.device)}

    def _policy_steps(self, b: TrainBatch) -> dict:
        """`rl.epochs_per_step` passes of `rl.minibatches` shuffled optimizer steps, in micro-batches.

        Micro-batches hold train.batch_size rows, and at most train.max_tokens_per_microbatch tokens when
        set (algos/batch.py: micro_batches). Their losses are weighted by their share of the minibatch so
        accumulation matches one big batch (token_mean is then per micro-batch). Metrics are the first
        epoch's, except `logprob_gap` (the first minibatch's, before the policy moved: the vLLM/trainer
        agreement check) and grad_norm/lr (the last).
        """
        n, micro, g = len(b), self.cfg.train.batch_size, self.cfg.rl
        tok = self.backbone.tokenizer
        first_epoch: dict[str, float] = {}
        for epoch in range(g.epochs_per_step):
            order = self._same_on_all_ranks(torch.randperm(n).tolist() if g.minibatches > 1 else list(range(n)))
            for part, rows in enumerate(np.array_split(np.asarray(order, dtype=int), g.minibatches)):
                if len(rows) == 0:
                    continue
                parts = micro_batches(b.prompt_ids, b.completion_ids, [int(i) for i in rows],
                                      self._micro(len(rows), micro), self.cfg.train.max_tokens_per_microbatch)
                for sl, real in my_share(parts, self.rank, self.world):
                    batch = self._on_device(build_token_batch(
                        self.backbone.processor, [b.prompt_ids[i] for i in sl], [b.completion_ids[i] for i in sl],
                        [b.audios[i] for i in sl], tok.pad_token_id))
                    mask = batch.completion_mask
                    per_token = not np.isscalar(b.advantages[sl[0]])
                    adv = _on_grid([b.advantages[i] for i in sl], mask) if per_token else \
                        torch.tensor([b.advantages[i] for i in sl], dtype=torch.float32, device=self.device)
                    critic = {} if not b.needs_critic else dict(
                        returns=_on_grid([b.returns[i] for i in sl], mask),
                        old_values=_on_grid([b.old_values[i] for i in sl], mask))
                    loss, metrics = self._loss(batch, _on_grid([b.sampling_logprobs[i] for i in sl], mask), adv,
                                               b.temperature, b.kl_coef, **critic)
                    share = len(sl) / len(rows) if real else 0.0  # not real: a weight-0 pass (ranks.py)
                    self.optimizer.backward(loss * share)
                    if epoch == 0 and real:
                        for k, v in {"loss": loss, **metrics}.items():
                            if k == "logprob_gap" and part > 0:
                                continue
                            weight = share if k == "logprob_gap" else len(sl) / n
                            value = float(v.detach() if torch.is_tensor(v) else v)
                            first_epoch[k] = first_epoch.get(k, 0.0) + value * weight
                stats = self.optimizer.step()
        out = {f"train/{k}": v for k, v in first_epoch.items()}
        out.update(grad_norm=stats["grad_norm"], lr=stats["lr"])
        return out

    def _micro(self, rows: int, batch_size: int) -> int:
        """Rows per micro-batch: train.batch_size, but small enough that each of several ranks gets a
        micro-batch of `rows` (one micro-batch on two ranks would leave one rank a weight-0 pass)."""
        return min(batch_size, max(1, -(-rows // self.world)))

    def _on_device(self, batch: TokenBatch) -> TokenBatch:
        """`batch` on the trainer's device. Several ranks: every batch takes the shared-prompt path
        (a group per row where no rows share a prompt), so every rank runs the same passes whatever its
        rows: their collectives pair up."""
        if self.world > 1 and batch.audio_index is None:
            batch = dataclasses.replace(batch, audio_index=torch.arange(len(batch.input_ids)))
        return batch.to(self.device)

    def _same_on_all_ranks(self, value):
        """Rank 0's `value` on every rank (a shuffled order: the ranks' random streams differ)."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _preference_step(self, b: TrainBatch) -> dict:
        """One optimizer step on preference pairs, in micro-batches of train.batch_size pairs."""
        from speechrl.rlhf.trainers.dpo import preference_batch, preference_loss

        n = len(b)
        micro = self._micro(n, self.cfg.train.batch_size)
        sums: dict[str, float] = {}
        for sl, real in my_share([slice(s, s + micro) for s in range(0, n, micro)], self.rank, self.world):
            batch = preference_batch(self.backbone.processor, b.prompt_ids[sl], b.completion_ids[sl],
                                     b.rejected_ids[sl], self.backbone.tokenizer.pad_token_id, b.audios[sl])
            pairs = len(b.prompt_ids[sl])
            with self.policy.autocast():
                loss, metrics = preference_loss(self.model, self.reference, self._on_device(batch), pairs,
                                                self.cfg.dpo, self.allowed)
            self.optimizer.backward(loss * (pairs / n if real else 0.0))
            for k, v in metrics.items() if real else ():
                sums[k] = sums.get(k, 0.0) + v * pairs / n
        stats = self.optimizer.step()
        return {**{f"train/{k}": v for k, v in sums.items()}, "grad_norm": stats["grad_norm"], "lr": stats["lr"]}

    @torch.no_grad()
    def values(self, b: TrainBatch) -> dict:
        """The samples as they were at rollout time, before the update: the critic's value of each
        completion token's state, and the reference's logprob of each token (None without a reference);
        `rows`: which of the batch's rows they are (each rank computes its share)."""
        values, ref, rows = [], [] if self.reference is not None else None, []
        micro = self._micro(len(b), self.cfg.train.batch_size)
        for sl, real in my_share([slice(s, s + micro) for s in range(0, len(b), micro)], self.rank, self.world):
            batch = self._on_device(build_token_batch(self.backbone.processor, b.prompt_ids[sl], b.completion_ids[sl],
                                                      b.audios[sl], self.backbone.tokenizer.pad_token_id))
            mask = batch.completion_mask
            with self.policy.autocast():
                v = token_values(self.model, self.value_head, batch).float()  # the trunk without its LM head
                r = None if ref is None else token_logprobs(self.reference, batch, b.temperature, self.allowed)
            if not real:
                continue
            rows += list(range(len(b)))[sl]
            values += [v[i][mask[i]].tolist() for i in range(len(mask))]
            if ref is not None:
                ref += [r[i][mask[i]].tolist() for i in range(len(mask))]
        return {"values": values, "ref_logprobs": ref, "rows": rows}

    def weights(self, copy: bool = True) -> list[tuple[str, torch.Tensor]] | LoraAdapter:
        """What the rollout engines load: hub-layout tensors, or in a LoRA run the adapter alone (the
        engines hold the frozen base already). Several ranks: gathered, rank 0's (None on the others).
        `copy=False`: one rank's tensors may be the model's own, which the next step changes."""
        state = self._full_state(self.model)
        if state is None:
            return None
        if self.cfg.model.lora.enabled:
            return lora_adapter(unwrap(self.model), state)
        live = copy and self.world == 1  # the model's own tensors: copy them
        heads = [] if self.mtp is None else [(f"{MTP_PREFIX}{k}", v) for k, v in self.mtp.state_dict().items()]
        return [(k, v.detach().clone() if live else v.detach()) for k, v in [*hub_state_dict(state.items()), *heads]]

    def stored_weights(self) -> StoredWeights | LoraAdapter | None:
        """What a sync sends (OnlineRecipe.sync): the dense weights put in Ray's object store from here,
        which copies them there before the next step can change them (the driver gets the reference
        only; passing the tensors through it cost two more copies, 12 s a sync for the 30-layer small
        real backbone); a LoRA adapter, small, by value."""
        import ray

        weights = self.weights(copy=False)
        if weights is None or isinstance(weights, LoraAdapter):
            return weights
        return StoredWeights(ray.put([(k, v.to("cpu")) for k, v in weights]))

    def connect_engines(self, engines: list, transport: str, tp_sizes: list[int]) -> None:
        """Form a weight-transfer group with the rollout `engines` (rollout.weight_transport "nccl",
        "ipc" or "gloo"; rollouts/weight_transfer.py), replacing any earlier one. Every rank calls;
        rank 0 opens the group on its node and sends, the others take part in the gather only."""
        from speechrl.rollouts.weight_transfer import PolicySource, trainer_engine

        self._drop_transfer()
        device = None if transport == "gloo" else self.device  # NCCL and IPC send from the GPU
        host, port = free_address().rsplit(":", 1)  # where rank 0 listens (only rank 0 opens the group)
        self.transfer = trainer_engine(transport, engines, tp_sizes, PolicySource(self._main_weights, device),
                                       rank=self.rank, address=host, port=int(port))

    def push_weights(self) -> StoredWeights | None:
        """The policy's weights to the connected engines, sent from here through vLLM's weight transfer;
        returns the MTP draft heads (in the object store) for the object-store path, None without any."""
        import ray

        if self.transfer is None:
            raise RuntimeError("push_weights: no weight-transfer group; connect_engines first")
        self._heads = None
        try:
            self.transfer.send_weights()
        except BaseException:
            self._drop_transfer()  # closes the group: an engine still waiting in it fails now, not at its timeout
            raise
        return StoredWeights(ray.put(self._heads)) if self._heads else None

    def _main_weights(self) -> list[tuple[str, torch.Tensor]] | None:
        """The hub-layout weights weight transfer sends (the gather runs on every rank; None on the ranks
        that hold none after it); the MTP heads are kept aside for the object store."""
        weights = self.weights(copy=False)
        if isinstance(weights, LoraAdapter):
            raise RuntimeError("weight transfer carries dense weights; a LoRA run sends its adapter by the object store")
        if weights is None:
            return None
        self._heads = [(k, v.to("cpu")) for k, v in weights if k.startswith(MTP_PREFIX)]
        return [(k, v) for k, v in weights if not k.startswith(MTP_PREFIX)]

    def _drop_transfer(self) -> None:
        if self.transfer is not None:
            self.transfer.shutdown()
            self.transfer = None

    def _full_state(self, module) -> dict | None:
        """`module`'s full state dict: its own tensors on one rank; gathered CPU copies on rank 0 of
        several, None on the others (every rank must call)."""
        if self.world == 1:
            return unwrap(module).state_dict()
        return full_state_dict(module) or None

    def save(self, path: str) -> None:
        """A checkpoint in the same files whatever the number of ranks (rank 0 writes them)."""
        path = Path(path)
        save_policy(self._full_model(), self.backbone.processor, self.optimizer, path, self.cfg.model.lora.enabled,
                    self.mtp)
        head = None if self.value_head is None else self._full_state(self.value_head)
        if self.rank == 0:
            if head is not None:
                torch.save(head, path / VALUE_HEAD)
            torch.save(torch.get_rng_state(), path / "policy_rng.pt")
            torch.save(self.mtp_draws.get_state(), path / MTP_DRAWS)

    def save_final(self, path: str) -> str | None:
        model = self._full_model()
        if model is None:
            return None
        return str(save_model(model, self.backbone.processor, Path(path), self.mtp))


def _on_grid(rows: list, mask: torch.Tensor) -> torch.Tensor:
    """Per-token values (one list per row, a value per completion token) on the [B, L-1] grid of
    `mask` (completion positions), 0 elsewhere."""
    out = torch.zeros(mask.shape, device=mask.device)
    for i, values in enumerate(rows):
        out[i, mask[i]] = torch.tensor(values, dtype=torch.float32, device=mask.device)
    return out
