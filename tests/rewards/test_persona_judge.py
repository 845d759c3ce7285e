"""The persona judge on the tiny random judge: ratings from token probabilities, the two-token "10",
the vLLM and transformers paths against each other, an OpenAI-compatible server (a real local
one, judge_server.py) against the in-process computation, pairwise order swaps, and the cache.
The tiny judge has learned nothing, so these tests check the arithmetic and plumbing, not taste."""
from __future__ import annotations

import copy
import logging
import math

import pytest
import torch

from judge_server import openai_server
from speechrl.data.builtin_personas import builtin_dialogues
from speechrl.data.personas import card_to_row, render
from speechrl.rewards.api import Unscored
from speechrl.rewards.judge_backends import TransformersJudge, ensure_tiny_judge
from speechrl.rewards.judge_cache import JudgeCache
from speechrl.rewards.persona_judge import PersonaJudgeReward, label_masses
from speechrl.rewards.worker import RewardWorker

torch.set_num_threads(1)  # the machine's cores are shared


@pytest.fixture(scope="module")
def judge_dir(tiny_cache):
    return ensure_tiny_judge(tiny_cache)  # where the realtime recipes' runs find it too


@pytest.fixture(scope="module")
def hf_reward(judge_dir):
    return PersonaJudgeReward(model=str(judge_dir), backend="transformers", max_rationale_tokens=12)


@pytest.fixture(scope="module")
def vllm_reward(judge_dir):
    return PersonaJudgeReward(model=str(judge_dir), backend="vllm", threads=1, max_rationale_tokens=12)


def realtime_batch() -> dict:
    """Two builtin dialogues, two replies each (a prompt's samples consecutive), the persona given
    in each accepted form: a PersonaCard, a card mapping, its rendered text."""
    first, second = builtin_dialogues(per_persona=1, turns=3)[::2][:2]
    personas = [first.persona, first.persona, card_to_row(second.persona), render(second.persona)]
    replies = ["Oui, a grey cat called Brioche. Patience is the secret ingredient.", "I am an AI language model.",
               "Let's look at the data: I have climbed Tokachi eighty times.", "Margarine is as good as butter!"]
    batch = {"completions": replies, "persona": personas, "history": [], "user_text": [], "id": []}
    for i, d in enumerate((first, first, second, second)):
        batch["history"].append([{"role": "user", "text": d.turns[0].text},
                                 {"role": "assistant", "text": "Hello there."}])
        batch["user_text"].append(d.turns[-1].text)
        batch["id"].append(f"{d.id}/{i}")
    return batch


def digit_probs(judge: TransformersJudge, prompt: str, labels: list[str]) -> dict[str, float]:
    """p(label) after `prompt`, summed over the tokens spelling it with or without leading space."""
    lp = judge.full_logprobs(prompt).exp()
    texts = [judge.tokenizer.decode([i]) for i in range(len(judge.tokenizer))]
    return {k: float(sum(lp[i] for i, t in enumerate(texts) if t.strip() == k)) for k in labels}


# --- in process, transformers ---------------------------------------------------------------------------
def test_tiny_judge_is_built_once(judge_dir):
    before = (judge_dir / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_judge(judge_dir.parent.parent) == judge_dir
    assert (judge_dir / "model.safetensors").stat().st_mtime_ns == before


def test_score_is_the_probability_weighted_mean_rating(hf_reward):
    batch = realtime_batch()
    out = hf_reward(**batch)
    context = hf_reward._context(batch["persona"][0], batch["history"][0], batch["user_text"][0])
    p = digit_probs(hf_reward.judge, hf_reward.rate_prompt(context, batch["completions"][0]), ["1", "2", "3", "4", "5"])
    expected = sum(int(k) * v for k, v in p.items()) / sum(p.values())
    assert out["expected_rating"][0] == pytest.approx(expected, rel=1e-6)
    assert out["reward"][0] == pytest.approx((expected - 1) / 4, rel=1e-6)
    assert out["rating_mass"][0] == pytest.approx(sum(p.values()), rel=1e-6)
    assert all(0 <= r <= 1 for r in out["reward"]) and all(1 <= e <= 5 for e in out["expected_rating"])
    assert all(isinstance(why, str) for why in hf_reward.last_rationales)


def test_ten_point_scale_reads_ten_as_two_tokens(judge_dir):
    judge = TransformersJudge(str(judge_dir))
    prompt = "Rate the reply from 1 to 10.\nRating: "
    labels = [str(k) for k in range(1, 11)]
    masses = label_masses(judge, [prompt], labels)[0]
    root = judge.full_logprobs(prompt).exp()
    ones = {t: int(i) for t, i in judge.tokenizer.get_vocab().items() if judge.tokenizer.decode([i]) in ("1", " 1")}
    assert len(ones) == 2 and "10" not in judge.tokenizer.get_vocab()  # "10" is "1" then "0"
    zero = judge.tokenizer.convert_tokens_to_ids("0")
    # each spelling of "1" is continued on its own: p("10") = sum over them of p(one) * p("0" | prompt + one)
    ten = sum(float(root[i]) * float(judge.full_logprobs(prompt + judge.tokenizer.decode([i])).exp()[zero])
              for i in ones.values())
    one = sum(float(root[i]) for i in ones.values()) - ten
    assert masses["10"] == pytest.approx(ten, rel=1e-5) and masses["1"] == pytest.approx(one, rel=1e-5)
    assert masses["7"] == pytest.approx(float(root[judge.tokenizer.convert_tokens_to_ids("7")]), rel=1e-5)


def test_no_rating_mass_is_unscored_with_a_reason(hf_reward):
    reward, expected, mass = hf_reward._rating({"masses": dict.fromkeys(hf_reward.labels, 0.0)})
    assert isinstance(reward, Unscored) and "no rating token" in reward.reason and mass == 0.0
    reward, _, _ = hf_reward._rating("http://judge/v1/completions: timed out after 5 s")
    assert isinstance(reward, Unscored) and "timed out" in reward.reason


def test_registered_and_scored_by_a_reward_worker(tmp_path):
    specs = [{"name": "persona_judge", "normalize": False,
              "kwargs": {"model": "tiny", "backend": "transformers", "cache_dir": str(tmp_path), "rationale": False}}]
    result = RewardWorker(specs).score(realtime_batch())
    assert result.valid.all() and ((result.total >= 0) & (result.total <= 1)).all()
    assert set(result.components) == {"persona_judge/reward", "persona_judge/expected_rating",
                                      "persona_judge/rating_mass", "persona_judge/cache_hit"}
    assert (tmp_path / "judges").is_dir() and (tmp_path / "persona_judge.sqlite").is_file()


# --- an OpenAI-compatible server --------------------------------------------------------------------------
def test_endpoint_scores_match_in_process(judge_dir, hf_reward):
    batch = realtime_batch()
    with openai_server(TransformersJudge(str(judge_dir))) as (url, handler):
        remote = PersonaJudgeReward(model="tiny-judge", endpoint=url, top_logprobs=1000, max_rationale_tokens=12)
        out = remote(**batch)
        asked = handler.requests
    local = copy.copy(hf_reward)
    local.cache = JudgeCache(0)  # compute afresh, rationales included
    ref = local(**batch)
    assert out["reward"] == pytest.approx(ref["reward"], abs=1e-6)
    assert out["rating_mass"] == pytest.approx(ref["rating_mass"], rel=1e-5)
    assert remote.last_rationales == local.last_rationales
    assert asked == 2 * len(batch["completions"])  # one rating and one rationale request per reply


def test_endpoint_chat_api_and_scale_ten(judge_dir):
    with openai_server(TransformersJudge(str(judge_dir))) as (url, _):
        reward = PersonaJudgeReward(model="tiny-judge", endpoint=url, api="chat", scale=10, top_logprobs=1000,
                                    rationale=False)
        out = reward(**realtime_batch())
    assert all(0 <= r <= 1 for r in out["reward"]) and all(1 <= e <= 10 for e in out["expected_rating"])


def test_endpoint_api_key_and_dead_server(judge_dir, monkeypatch):
    batch = realtime_batch()
    with openai_server(TransformersJudge(str(judge_dir)), api_key="sekret") as (url, _):
        monkeypatch.delenv("JUDGE_KEY", raising=False)
        reward = PersonaJudgeReward(model="tiny-judge", endpoint=url, api_key_env="JUDGE_KEY", rationale=False)
        with pytest.raises(RuntimeError, match="401.*API key"):
            reward(**batch)
        monkeypatch.setenv("JUDGE_KEY", "sekret")
        reward = PersonaJudgeReward(model="tiny-judge", endpoint=url, api_key_env="JUDGE_KEY", rationale=False,
                                    top_logprobs=1000)
        assert all(0 <= r <= 1 for r in reward(**batch)["reward"])
    # the server is gone: no score, with the reason, and no exception
    reward = PersonaJudgeReward(model="tiny-judge", endpoint=url, retries=1, backoff_s=0.01, rationale=False)
    out = reward(**batch)["reward"]
    assert all(isinstance(r, Unscored) and "2 attempts" in r.reason for r in out)


# --- vLLM ------------------------------------------------------------------------------------------------
@pytest.mark.vllm
def test_vllm_scores_match_transformers(vllm_reward, hf_reward, caplog):
    batch = realtime_batch()
    with caplog.at_level(logging.INFO, logger="speechrl.rewards.persona_judge"):
        out = vllm_reward(**batch)
    ref = hf_reward(**batch)
    assert all(0 <= r <= 1 for r in out["reward"]) and out["cache_hit"] == [0.0] * 4
    assert out["reward"] == pytest.approx(ref["reward"], abs=1e-4)
    assert out["rating_mass"] == pytest.approx(ref["rating_mass"], rel=1e-3)
    assert sum("rated" in r.message for r in caplog.records) == vllm_reward.log_rationales


@pytest.mark.vllm
def test_vllm_deterministic_at_temperature_zero(vllm_reward):
    uncached = copy.copy(vllm_reward)
    uncached.cache = JudgeCache(0)
    batch = realtime_batch()
    calls = vllm_reward.judge.calls
    first, second = uncached(**batch), uncached(**batch)
    assert vllm_reward.judge.calls > calls  # both calls asked the engine
    assert first["reward"] == second["reward"] and first["rating_mass"] == second["rating_mass"]


@pytest.mark.vllm
def test_cache_hits_skip_the_engine(vllm_reward, judge_dir, tmp_path):
    cached = copy.copy(vllm_reward)
    cached.cache = JudgeCache(100, tmp_path / "persona_judge.sqlite")
    batch = realtime_batch()
    first = cached(**batch)
    calls = vllm_reward.judge.calls
    again = cached(**batch)
    assert vllm_reward.judge.calls == calls and again["cache_hit"] == [1.0] * 4
    assert again["reward"] == first["reward"] and cached.last_rationales == [None] * 4
    # another worker (here: the transformers backend on the same judge) reads the answers from disk
    other = PersonaJudgeReward(model=str(judge_dir), backend="transformers", cache_dir=str(tmp_path))
    assert other(**batch)["reward"] == first["reward"] and other.judge.calls == 0 and other.cache.hits == 4


@pytest.mark.vllm
def test_pairwise_order_swap(vllm_reward):
    card = realtime_batch()["persona"][0]
    a, b = "Oui, my cat Brioche is grey.", "I do not have any pets, sorry."
    p = vllm_reward.compare(a, b, card, user_text="Do you have any pets?")
    calls = vllm_reward.judge.calls
    q = vllm_reward.compare(b, a, card, user_text="Do you have any pets?")
    assert 0 <= p <= 1 and p + q == pytest.approx(1.0, abs=1e-12)
    assert vllm_reward.judge.calls == calls  # the swapped comparison asks the same two prompts: all cached
    assert vllm_reward.compare(a, a, card) == pytest.approx(0.5, abs=1e-12)


@pytest.mark.vllm
def test_pairwise_mode_ranks_within_each_prompt(vllm_reward):
    pairwise = copy.copy(vllm_reward)
    pairwise.mode = "pairwise"
    batch = realtime_batch()
    extra = ["Voila! Brioche is asleep on the oven.", "Hmm, hard to say, mate."]
    batch = {k: v[:2] + [v[0]] + v[2:4] + [v[2]] + [v[0]] for k, v in batch.items()}
    batch["completions"][2], batch["completions"][5] = extra
    batch["user_text"][6] = "Something else entirely?"  # a prompt with a single sample
    out = pairwise(**batch)
    assert all(0 <= r <= 1 for r in out["reward"][:6])
    assert sum(out["reward"][:3]) / 3 == pytest.approx(0.5, abs=1e-12)  # win probabilities share out 1 per pair
    assert sum(out["reward"][3:6]) / 3 == pytest.approx(0.5, abs=1e-12)
    assert isinstance(out["reward"][6], Unscored) and math.isnan(out["cache_hit"][6])


@pytest.mark.vllm
@pytest.mark.ray
def test_judge_on_vllm_in_a_ray_reward_worker_survives_its_engine_being_killed(ray_cluster, judge_dir, hf_reward):
    """The deployment path: a reward worker of its own (declared resources), its vLLM engine in-process.
    The engine's process is killed (SIGKILL) while a batch is being scored: Ray restarts the worker,
    which builds a new engine, and retries the call, which scores what the first call did."""
    import os
    import signal

    import ray

    from speechrl.rewards.worker import make_reward_actor

    specs = [{"name": "persona_judge", "normalize": False, "resources": {"num_cpus": 1},
              "kwargs": {"model": str(judge_dir), "threads": 1, "rationale": False}},
             {"name": "reply_length", "normalize": False, "kwargs": {"max": 12}}]
    batch = realtime_batch()
    router = make_reward_actor(specs, retries=1)
    result = ray.get(router.score.remote(batch), timeout=300)
    assert result.valid.all()
    assert result.rewards["persona_judge"] == pytest.approx(hf_reward(**batch)["reward"], abs=1e-4)
    assert result.rewards["reply_length"].tolist() == [0.0] * 4

    judge = ray.get(router.__ray_call__.remote(lambda router: router.groups[-1][0]))  # the declared worker
    engine_pid = lambda: ray.get(judge.__ray_call__.remote(lambda _: os.getpid()), timeout=300)  # noqa: E731
    killed = engine_pid()
    pending = router.score.remote(batch)
    os.kill(killed, signal.SIGKILL)
    again = ray.get(pending, timeout=300)
    assert engine_pid() != killed, "the judge's worker (and its engine) was started again"
    assert again.valid.all() and again.rewards["persona_judge"] == pytest.approx(result.rewards["persona_judge"], abs=1e-6)
