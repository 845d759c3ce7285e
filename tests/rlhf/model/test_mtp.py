"""MTP heads (model/mtp.py): their targets, their training beside SFT without moving the policy,
their files, and the recipe checks around them. Decoding with them in vLLM: tests/rollouts/test_mtp_decoding.py."""
from __future__ import annotations

import json

import pytest
import torch

from speechrl.rlhf.core.config import RecipeError, load_recipe
from speechrl.rlhf.model.mtp import MTP_DIR, MtpHeads, acceptance, greedy_next_tokens


def test_head_i_at_position_t_predicts_token_t_plus_2_plus_i():
    """Heads that copy a one-hot 'hidden state' of token t+2+i reach zero loss only with the right shift."""
    vocab, width = 6, 7
    ids = torch.tensor([[5, 0, 1, 2, 3, 4, 1, 2]])  # prompt: 5, 0; completion: 1 2 3 4 1 2
    comp = torch.zeros(1, width, dtype=torch.bool)
    comp[0, 1:] = True  # position t predicts token t+1: positions 1..6 predict the completion
    heads = MtpHeads(2, vocab, vocab)
    with torch.no_grad():
        for block in heads.blocks:
            block.layers[0].weight.zero_()
    for i, head in enumerate(heads.lm_heads):
        hidden = torch.zeros(1, width, vocab)
        for t in range(width - 1 - i):
            hidden[0, t, ids[0, t + 2 + i]] = 1.0  # the token head i must predict at position t
        with torch.no_grad():
            for other in heads.lm_heads:
                other.weight.copy_(20 * torch.eye(vocab))
        _, metrics = heads.loss(hidden, ids, comp)
        assert metrics[f"mtp_acc_{i + 1}"] == 1.0
        assert metrics[f"mtp_acc_{2 - i}"] < 1.0  # the other head, read with this shift, is wrong


def test_heads_read_a_random_share_of_positions_from_their_own_generator():
    """RL's model.mtp.rl_positions: the loss is the cross-entropy over the drawn positions exactly, the
    draw comes from the given generator (the global one is not touched), and 1.0 reads every position."""
    torch.manual_seed(0)
    heads = MtpHeads(1, 16, 12)
    hidden, ids = torch.randn(8, 40, 16), torch.randint(0, 12, (8, 41))
    comp = torch.zeros(8, 40, dtype=torch.bool)
    comp[:, 5:] = True
    state = torch.get_rng_state()
    sub, _ = heads.loss(hidden, ids, comp, 0.25, torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), state), "the draw leaves the global generator alone"
    drawn = comp & (torch.rand(comp.shape, generator=torch.Generator().manual_seed(3)) < 0.25)
    valid = drawn[:, :-1] & comp[:, 1:]
    assert 0.15 < valid.sum() / (comp[:, :-1] & comp[:, 1:]).sum() < 0.35
    logits = heads.lm_heads[0](heads.blocks[0](hidden[:, :-1][valid]))
    assert torch.allclose(sub, torch.nn.functional.cross_entropy(logits, ids[:, 2:][valid]))
    full, _ = heads.loss(hidden, ids, comp)
    assert torch.equal(full, heads.loss(hidden, ids, comp, 1.0, torch.Generator())[0]) and not torch.allclose(full, sub)


def test_rl_targets_are_the_policys_greedy_choice_among_the_allowed_ids():
    """model.mtp.rl_targets: greedy. Each completion position's target is the LM head's argmax over the
    allowed ids (what greedy verification keeps), the prompt's tokens stay the batch's own, and the
    heads' loss is the cross-entropy against those targets, shifted as for the batch's tokens."""
    torch.manual_seed(0)
    lm_head = torch.nn.Linear(16, 12, bias=False)
    hidden, ids = torch.randn(4, 20, 16), torch.randint(0, 12, (4, 21))
    comp = torch.zeros(4, 20, dtype=torch.bool)
    comp[:, 6:] = True
    allowed = torch.zeros(12, dtype=torch.bool)
    allowed[:7] = True
    following = greedy_next_tokens(lm_head, hidden, ids, comp, allowed)
    with torch.no_grad():
        best = lm_head(hidden).masked_fill(~allowed, float("-inf")).argmax(-1)
    assert torch.equal(following[comp], best[comp]) and bool((following[comp] < 7).all())
    assert torch.equal(following[~comp], ids[:, 1:][~comp])
    assert not torch.equal(following[comp], ids[:, 1:][comp]), "sampled tokens are not the greedy ones"
    # a head that is not a plain Linear (an adapted one) takes the full-vocabulary path: the same choice
    assert torch.equal(greedy_next_tokens(torch.nn.Sequential(lm_head), hidden, ids, comp, allowed), following)
    heads = MtpHeads.like(lm_head, 1)
    loss, _ = heads.loss(hidden, ids, comp, next_tokens=following)
    valid = comp[:, :-1] & comp[:, 1:]
    logits = heads.lm_heads[0](heads.blocks[0](hidden[:, :-1][valid]))
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(logits, following[:, 1:][valid]))


def test_heads_on_short_completions_and_acceptance_counts():
    heads = MtpHeads(3, 8, 10)
    ids = torch.tensor([[1, 2, 3]])
    comp = torch.tensor([[False, True]])  # one completion token: no head has a target
    loss, metrics = heads.loss(torch.randn(1, 2, 8), ids, comp)
    assert float(loss) == 0.0 and "mtp_loss" not in metrics
    stats = acceptance(10, [6, 3, 1])  # 10 steps: 6 kept draft 1, 3 kept 1-2, 1 kept all three
    assert stats["histogram"] == pytest.approx([0.4, 0.3, 0.2, 0.1])
    assert stats["mean_emitted"] == pytest.approx(2.0)
    assert acceptance(0, [0, 0])["drafts"] == 0


def test_acceptance_meter_reports_intervals_summed_over_engines():
    from speechrl.rlhf.model.mtp import AcceptanceMeter

    meter = AcceptanceMeter()
    assert meter.update([{"drafts": 0, "accepted_per_position": [0, 0]}], "rollout") == {}
    first = meter.update([{"drafts": 4, "accepted_per_position": [2, 1]},
                          {"drafts": 6, "accepted_per_position": [4, 1]}], "rollout")
    assert first == pytest.approx({"rollout/mtp_emitted": 1.8, "rollout/mtp_accepted_1": 0.6,
                                   "rollout/mtp_accepted_2": 0.2})
    # since the last call: 10 more steps, all keeping both drafts
    second = meter.update([{"drafts": 9, "accepted_per_position": [7, 6]},
                           {"drafts": 11, "accepted_per_position": [9, 6]}], "eval")
    assert second == pytest.approx({"eval/mtp_emitted": 3.0, "eval/mtp_accepted_1": 1.0, "eval/mtp_accepted_2": 1.0})
    # a replaced engine starts its counters again: that interval is not reported
    assert meter.update([{"drafts": 9, "accepted_per_position": [7, 6]},
                         {"drafts": 1, "accepted_per_position": [1, 0]}], "rollout") == {}


def test_sft_trains_heads_without_moving_the_policy(sft_config):
    """The same SFT run with and without heads ends with the same policy weights (detached hidden
    states, clipping of their own, their random init outside the run's generator), and the heads
    are saved in the checkpoint and the final weights in vLLM's Medusa layout."""
    from safetensors.torch import load_file

    from speechrl.rlhf.trainers.sft import run_sft

    steps = ["train.steps=4", "train.checkpoint_every=4", "train.log_every=1"]
    with_heads = load_recipe_dir(sft_config("mtp-on", *steps, "model.mtp.num_heads=3"))
    without = load_recipe_dir(sft_config("mtp-off", *steps, "model.mtp.num_heads=0"))
    run_sft(with_heads[0]), run_sft(without[0])
    a = load_file(str(with_heads[1] / "final" / "model.safetensors"))
    b = load_file(str(without[1] / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for folder in (with_heads[1] / "final", with_heads[1] / "checkpoints" / "step-4" / "model"):
        config = json.loads((folder / MTP_DIR / "config.json").read_text())
        assert config["model_type"] == "medusa" and config["num_heads"] == 3
    assert not (without[1] / "final" / MTP_DIR).exists()
    rows = [json.loads(line) for line in (with_heads[1] / "metrics.jsonl").read_text().splitlines()]
    plain = [json.loads(line) for line in (without[1] / "metrics.jsonl").read_text().splitlines()]
    # the policy's own loss, step by step, is the run's without heads (train/loss adds the heads' term)
    assert [r["train/token_loss"] for r in rows if "train/token_loss" in r] == \
        [r["train/loss"] for r in plain if "train/loss" in r]
    losses = [r["train/mtp_loss"] for r in rows if "train/mtp_loss" in r]
    assert len(losses) == 4 and losses[-1] < losses[0], "the heads learn"


def load_recipe_dir(cfg):
    from pathlib import Path

    return cfg, Path(cfg.run.output_dir) / cfg.run.name


def test_recipe_checks_name_the_mtp_settings(sft_overrides):
    with pytest.raises(RecipeError, match="rollout.mtp_tokens.*model.mtp.num_heads"):
        load_recipe("asr/grpo", [*sft_overrides("x"), "rollout.mtp_tokens=6", "model.mtp.num_heads=5"])
    with pytest.raises(RecipeError, match="model.mtp.loss_weight"):
        load_recipe("asr/sft", [*sft_overrides("x"), "model.mtp.loss_weight=0"])
    with pytest.raises(RecipeError, match="rollout.mtp_tokens.*num_ranks"):
        load_recipe("asr/grpo", [*sft_overrides("x"), "rollout.mtp_tokens=2", "train.num_ranks=2"])
    assert load_recipe("asr/sft", sft_overrides("x")).model.mtp.num_heads == 5  # ASR ships five heads


def test_heads_of_several_layers_start_as_the_lm_head_and_round_trip(tmp_path, sft_overrides):
    """`model.mtp.num_layers` deepens each head's residual block: new heads still start as the LM head
    (every layer zero), the Medusa config says how deep they are, and a recipe asking another depth
    than the saved heads' is told which to set."""
    from speechrl.rlhf.model.mtp import heads_for

    lm_head = torch.nn.Linear(8, 10, bias=False)
    heads = MtpHeads.like(lm_head, 3, num_layers=2)
    hidden = torch.randn(4, 8)
    for block, head in zip(heads.blocks, heads.lm_heads):
        assert len(block.layers) == 2
        assert torch.allclose(head(block(hidden)), lm_head(hidden))
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(0.1 * torch.randn_like(p))
    heads.save(tmp_path)
    assert json.loads((tmp_path / MTP_DIR / "config.json").read_text())["num_hidden_layers"] == 2
    loaded = MtpHeads.load(tmp_path)
    assert loaded.num_layers == 2 and torch.equal(loaded.blocks[1].layers[1].weight, heads.blocks[1].layers[1].weight)

    cfg = load_recipe("asr/sft", [*sft_overrides("x"), "model.mtp.num_heads=3"])  # one layer, the default
    with pytest.raises(ValueError, match="model.mtp.num_layers=1.*set it to 2"):
        heads_for(cfg, tmp_path, lm_head)
    cfg.model.mtp.num_layers = 2
    assert heads_for(cfg, tmp_path, lm_head).num_layers == 2
    with pytest.raises(RecipeError, match="model.mtp.num_layers"):
        load_recipe("asr/sft", [*sft_overrides("x"), "model.mtp.num_layers=0"])


def test_heads_under_one_shared_lm_head_save_it_once_and_keep_it_frozen(tmp_path):
    """`model.mtp.shared_lm_head`: one frozen LM head for every head (vLLM Medusa's original_lm_head),
    saved once as `lm_head`; a load gives the same heads; a recipe that asks otherwise is told which."""
    from speechrl.rlhf.model.mtp import heads_for

    torch.manual_seed(0)
    lm_head = torch.nn.Linear(8, 20, bias=False)
    heads = MtpHeads.like(lm_head, 3, shared_lm_head=True).requires_grad_(True)
    assert not heads.lm_head.weight.requires_grad and all(h is heads.lm_head for h in heads.lm_heads)
    with torch.no_grad():
        for block in heads.blocks:
            block.layers[0].weight.normal_()
    heads.save(tmp_path)
    config = json.loads((tmp_path / MTP_DIR / "config.json").read_text())
    assert config["original_lm_head"] is True and config["num_heads"] == 3
    loaded = MtpHeads.load(tmp_path)
    assert loaded.shared_lm_head and loaded.state_dict().keys() == heads.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), heads.state_dict().values()))
    hidden, ids = torch.randn(2, 6, 8), torch.randint(0, 20, (2, 7))
    comp = torch.ones(2, 6, dtype=torch.bool)
    assert torch.equal(loaded.loss(hidden, ids, comp)[0], heads.loss(hidden, ids, comp)[0])

    cfg = load_recipe("asr/sft", ["model.mtp.num_heads=3"])
    assert heads_for(cfg, tmp_path, lm_head).shared_lm_head, "unset, it follows the saved heads"
    assert not heads_for(cfg, tmp_path / "none", lm_head).shared_lm_head, "new heads: an LM head each"
    cfg.model.mtp.shared_lm_head = False
    with pytest.raises(ValueError, match="model.mtp.shared_lm_head=false asked; set it to true"):
        heads_for(cfg, tmp_path, lm_head)
    # no optimizer sees the shared head: it is a buffer, whatever requires_grad_ a caller asks
    assert [n for n, _ in torch.nn.Sequential(heads).requires_grad_(True).named_parameters()] == \
        [f"0.blocks.{i}.layers.0.weight" for i in range(3)]
