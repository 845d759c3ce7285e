"""The policy worker's micro-batching by token budget (train.max_tokens_per_microbatch): which rows
share a forward pass, and that the update does not depend on it."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from speechrl.rlhf.algos.batch import TrainBatch, forward_tokens, micro_batches


def test_micro_batches_respect_rows_and_tokens_and_keep_shared_prompts_together():
    prompts = [[1] * 50] * 4 + [[2] * 10] * 4 + [[3] * 30]
    completions = [[0] * n for n in (5, 40, 6, 7, 3, 4, 60, 5, 8)]
    rows = list(range(9))
    assert micro_batches(prompts, completions, rows, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8]], "no budget: in order"
    parts = micro_batches(prompts, completions, rows, 4, max_tokens=120)
    assert sorted(i for p in parts for i in p) == rows, "every row exactly once"
    for part in parts:
        assert len(part) <= 4
        assert len(part) == 1 or forward_tokens(prompts, completions, part) <= 120
    assert [6] in parts, "a row past the budget (10 + 60 tokens, with company more) runs alone"
    # bucketed: by prompt length, the rows of one prompt neighbours, each prompt's by completion length
    order = [4, 5, 7, 6, 8, 0, 2, 3, 1]
    assert [i for p in parts for i in p] == order and parts[0] == [4, 5, 7]
    assert micro_batches(prompts, completions, rows, 4, max_tokens=1) == [[i] for i in order]


def _grpo_batch(worker, rng, seconds: tuple, lengths: list[int], kl_coef: float = 0.0) -> TrainBatch:
    """A GRPO batch: one completion of each of `lengths` per clip of each of `seconds`, with its
    sampling logprobs under `worker`'s policy now and a random advantage per row. (test_ranks.py keeps
    its own: it draws clips and completions interleaved, and its 2e-6 weight tolerances were set on
    that data; on this order its LoRA test misses them.)"""
    from speechrl.rlhf.model.logprobs import build_token_batch, prompt_ids_for, token_logprobs
    from speechrl.rlhf.model.prompts import render_prompt

    proc = worker.backbone.processor
    prompts, completions, audios = [], [], []
    for clip in [rng.normal(0, 0.1, 16000 * s).astype(np.float32) for s in seconds]:
        ids = prompt_ids_for(proc, render_prompt(proc, "asr"), clip)
        for n in lengths:
            prompts.append(ids)
            completions.append(rng.integers(0, 300, n).tolist())
            audios.append(clip)
    batch = build_token_batch(proc, prompts, completions, audios, worker.backbone.tokenizer.pad_token_id)
    with torch.no_grad():
        logp = token_logprobs(worker.model, batch, 1.0, worker.allowed)
    sampled = [logp[i][batch.completion_mask[i]].tolist() for i in range(len(prompts))]
    return TrainBatch(prompts, completions, audios, 1.0, sampling_logprobs=sampled,
                      advantages=rng.normal(size=len(prompts)).tolist(), kl_coef=kl_coef)


def test_the_update_is_the_same_whatever_the_token_budget(sft_config, sft_assets):
    """Sequence-mean losses weighted by each micro-batch's share of rows: cutting the minibatch by
    tokens instead of rows moves the weights the same (float summation order aside)."""
    from speechrl.rlhf.workers.policy_worker import PolicyWorker

    rng = np.random.default_rng(0)
    # the MTP heads read every position: a random share of them would be drawn per micro-batch
    base = ["rl.loss_agg=seq_mean_token_mean", "train.warmup_steps=0", "train.lr=1e-3", "rl.kl_coef=0",
            "train.batch_size=6", "model.mtp.rl_positions=1"]
    workers = {budget: PolicyWorker(sft_config(f"pw-{budget}", *base, f"train.max_tokens_per_microbatch={budget}"),
                                    str(sft_assets[0]), allowed_ids=list(range(300)))
               for budget in (0, 150)}
    train = _grpo_batch(workers[0], rng, (1, 2), [2, 7, 12])
    assert len(micro_batches(train.prompt_ids, train.completion_ids, list(range(6)), 6, 150)) > 1, \
        "the budget splits the batch"
    metrics = {budget: w.train(train) for budget, w in workers.items()}
    assert metrics[0]["train/loss"] == pytest.approx(metrics[150]["train/loss"], abs=1e-5)
    assert metrics[0]["grad_norm"] == pytest.approx(metrics[150]["grad_norm"], rel=1e-4) and metrics[0]["grad_norm"] > 0
    for (name, a), b in zip(workers[0].model.named_parameters(), workers[150].model.parameters()):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-4, msg=name)


def test_a_frozen_bottom_feeds_the_reference_and_the_steps_are_the_full_references(sft_config, sft_assets):
    """model.freeze_decoder_layers=1 with a KL term: the reference runs from layer 1 on the policy's own
    hidden states (model/policy.py: reference_above); two GRPO steps give the loss, KL and weights of a
    worker whose reference runs in full."""
    from speechrl.rlhf.workers.policy_worker import PolicyWorker

    rng = np.random.default_rng(0)
    cfg = sft_config("pw-frozen", "model.freeze_decoder_layers=1", "train.warmup_steps=0", "train.lr=1e-3",
                     "model.mtp.num_heads=0")
    fed, full = (PolicyWorker(cfg, str(sft_assets[0]), allowed_ids=list(range(300)), reference=True) for _ in range(2))
    full.policy.reference_top = None  # this one runs its whole reference
    assert fed.policy.reference_top is not None
    for _ in range(2):
        train = _grpo_batch(fed, rng, (1,), [3, 5, 7, 9], kl_coef=0.1)
        a, b = fed.train(train), full.train(train)
        for key in ("train/loss", "train/kl", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    assert a["train/kl"] > 0, "the second step's policy has moved from the reference"
    for (name, p), q in zip(fed.model.named_parameters(), full.model.parameters()):
        torch.testing.assert_close(p, q, atol=2e-6, rtol=1e-4, msg=name)
