"""The trained persona judge's build, on the tiny random judge (fast): packed training computes what
the prompts one by one compute, a step moves only the top layers, the data split keeps held-out cards
out, and `persona_judge model=trained` finds a built judge and asks it with its own rubric. The real
build (SmolLM2, 2 steps) is in tests/e2e/test_small_real_e2e.py."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from speechrl.data.persona_judgments import KINDS
from speechrl.rewards.judge_backends import ensure_tiny_judge
from speechrl.rewards.registry import resolve_reward
from speechrl.rewards.trained_judge import (JUDGE_CARD, TRAINED_RUBRIC, PersonaJudgeBuild, heldout_table,
                                            trained_judge_dir)
from speechrl.rlhf.trainers import persona_judge_build as pj

SMALL = PersonaJudgeBuild(made_personas=24, personagym=False, steps=2, batch_size=2, eval_per_kind=1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = ensure_tiny_judge(tmp_path_factory.mktemp("judges"))
    return path, AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_packed_groups_give_each_prompts_own_loss(tiny):
    path, model, tokenizer = tiny
    groups = pj.training_groups(pj.judgment_sets(SMALL)[0], seed=0)[:3]
    answers = {a: tokenizer.convert_tokens_to_ids(a) for g in groups for _, a in g}
    with torch.no_grad():
        packed = pj._packed_loss(model, tokenizer, groups, answers)
        alone = [torch.nn.functional.cross_entropy(model(tokenizer(p, return_tensors="pt").input_ids).logits[:, -1],
                                                   torch.tensor([answers[a]])) for g in groups for p, a in g]
    assert packed.item() == pytest.approx(torch.stack(alone).mean().item(), rel=1e-5)


def test_each_judgment_trains_both_ratings_and_the_pair_in_both_orders():
    """Four prompts per judgment: the good reply rated top, the bad one bottom, and the pair asked in
    both orders, each answered by the good reply's position, so position alone predicts nothing."""
    items = pj.judgment_sets(SMALL)[0]
    groups = pj.training_groups(items, seed=0)
    assert len(groups) == len(items) and groups != pj.training_groups(items, seed=1)  # shuffled by the seed
    by_good = {(i.good, i.bad): i for i in items}
    for group in groups:
        assert [a for _, a in group] == ["5", "1", "1", "2"]
        item = next(i for (g, b), i in by_good.items() if group[0][0].endswith(pj.RATE_CUE) and g in group[0][0]
                    and b in group[1][0])
        first, second = group[2][0], group[3][0]
        assert first.index(item.good) < first.index(item.bad) and second.index(item.bad) < second.index(item.good)
        assert first.endswith(pj.PAIR_CUE) and second.endswith(pj.PAIR_CUE)


def test_training_moves_the_top_layers_only_and_lowers_the_loss(tiny):
    _, model, tokenizer = tiny
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny[0])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    groups = pj.training_groups(pj.judgment_sets(SMALL)[0], seed=0)[:2]
    build = PersonaJudgeBuild(steps=20, batch_size=2, lr=3e-3, train_layers=1)
    losses = pj.fit_judge(model, tokenizer, groups, build)  # the same two batches, over and over
    assert losses[-1] < losses[0] * 0.7
    moved = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert moved and all(k.startswith(("model.layers.1.", "model.norm.")) for k in moved), moved


def test_held_out_cards_never_reach_training():
    train, heldout = pj.judgment_sets(SMALL)
    seen = {i.persona.id for i in train}
    assert seen and not seen & {i.persona.id for items in heldout.values() for i in items}
    assert set(heldout) == {"made", "builtin"}  # personagym=False
    for items in heldout.values():  # eval_per_kind of each kind the cards allow
        assert len(items) == len({i.kind for i in items})
    with pytest.raises(ValueError, match="no training judgments"):
        pj.fit_judge(None, None, [], SMALL)


def test_reward_finds_the_built_judge_and_asks_with_its_rubric(tiny, tmp_path):
    path = trained_judge_dir(tmp_path, SMALL)
    with pytest.raises(FileNotFoundError, match="speechrl build-judges"):
        resolve_reward("persona_judge", model="trained", cache_dir=str(tmp_path), build={"steps": 2})
    shutil.copytree(tiny[0], path)  # a judge built elsewhere: the tiny one, with a judge card
    (path / JUDGE_CARD).write_text(json.dumps({"rubric": TRAINED_RUBRIC, "scale": 5, "heldout": {}}))
    kwargs = dict(model="trained", cache_dir=str(tmp_path), backend="transformers", rationale=False,
                  build={k: v for k, v in vars(SMALL).items()})
    judge = resolve_reward("persona_judge", **kwargs)
    assert judge.rubric == TRAINED_RUBRIC
    assert resolve_reward("persona_judge", **kwargs, rubric="Mine.").rubric == "Mine."
    with pytest.raises(ValueError, match="trained to rate 1 to 5; set scale: 5"):
        resolve_reward("persona_judge", **kwargs, scale=10)
    with pytest.raises(ValueError, match="unknown key.*stepz"):
        resolve_reward("persona_judge", **{**kwargs, "build": {"stepz": 2}})


def test_a_build_cut_off_while_measuring_resumes_at_the_measurement(tiny, tmp_path, monkeypatch):
    """Training is the long part (about an hour on 2 CPU cores): weights trained and saved are never
    trained again; the judge appears only once measured, its card written."""
    path = trained_judge_dir(tmp_path, SMALL)
    trained = path.with_name(path.name + ".trained")
    shutil.copytree(tiny[0], trained)  # as a build leaves its weights before measuring them
    (trained / pj.TRAINING_LOG).write_text(json.dumps({"losses": [1.0, 0.5], "seconds": 3600.0}))

    def never(*args, **kwargs):
        raise AssertionError("trained again")

    def cut_off(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pj, "fit_judge", never)
    monkeypatch.setattr(pj, "judge_accuracy", cut_off)
    with pytest.raises(KeyboardInterrupt):
        pj.ensure_persona_judge(tmp_path, SMALL, eval_backend="transformers")
    assert not path.exists() and (trained / "model.safetensors").is_file()
    monkeypatch.undo()
    monkeypatch.setattr(pj, "fit_judge", never)
    assert pj.ensure_persona_judge(tmp_path, SMALL, eval_backend="transformers") == path
    card = json.loads((path / JUDGE_CARD).read_text())
    assert card["train_seconds"] == 3600.0 and card["final_loss"] == 0.75 and not trained.exists()
    assert set(card["heldout"]) == {"made", "builtin"} and card["heldout"]["made"]["judgments"]["all"] == len(KINDS)


@pytest.mark.parametrize("bad,match", [({"train_layers": 31}, "build.train_layers=31.*1 to 30"),
                                       ({"batch_size": 0}, "build.batch_size=0"), ({"heldout": 1.0}, "build.heldout=1.0"),
                                       ({"lr": float("nan")}, "build.lr=nan"), ({"made_personas": -1}, "made_personas=-1")])
def test_build_settings_out_of_range_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        PersonaJudgeBuild.from_kwargs(bad)


def test_heldout_table_reads_a_judge_card():
    scores = {"made": {"pairwise": {"contradiction": 0.9, "all": 0.95}, "pointwise": {"contradiction": 0.8, "all": 0.9},
                       "judgments": {"contradiction": 10, "all": 20}}}
    table = heldout_table(scores)
    assert "| made | 0.90 (0.80) | 0.95 (0.90) | 20 |" in table and table.startswith("| held-out cards |")
