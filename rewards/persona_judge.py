"""`persona_judge`: an LLM judge of how well a realtime reply stays in character.

The score is not parsed from text: it is the expected rating E under the judge's next-token distribution
after "Rating: ", renormalized over the rating tokens, mapped to (E - 1) / (scale - 1). The rationale is
generated after the rating, so it never changes the score. Pairwise `compare` asks in both orders to
cancel the judge's position bias. Answers are cached by (judge fingerprint, labels, prompt text).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Optional, Sequence

from speechrl.rewards.api import Unscored
from speechrl.rewards.judge_backends import TransformersJudge, VllmJudge, ensure_tiny_judge, token_matches
from speechrl.rewards.judge_cache import JudgeCache, cache_key
from speechrl.rewards.judge_endpoint import OpenAIJudge
from speechrl.rewards.learned import default_cache_dir
from speechrl.rewards.trained_judge import PersonaJudgeBuild, read_judge_card, trained_judge_dir
from speechrl.rewards.persona_prompts import (ANCHORS, DEFAULT_RUBRIC, MAX_HISTORY_CHARS, PAIR_CUE, RATE_CUE, SCALE,
                                              context_text, pair_body, rate_body)

log = logging.getLogger(__name__)

MODES = ("pointwise", "pairwise")


def label_masses(judge, prompts: Sequence[str], labels: Sequence[str]) -> list[Any]:
    """Per prompt, {label: probability} under the judge's next tokens (not renormalized), or an error string.

    A multi-token label is followed token by token: p("10") = p("1") * p("0" | "1"), and "1" keeps
    p("1") * (1 - p("0" | "1")). Servers that cannot continue a prompt (chat) read single tokens only.
    """
    labels = list(labels)
    prefixes = {label[:i] for label in labels for i in range(1, len(label) + 1)}
    out: list[Any] = [dict.fromkeys(labels, 0.0) for _ in prompts]
    frontier = [(i, p, "", 0.0) for i, p in enumerate(prompts)]  # (prompt index, text so far, answer so far, logp)
    while frontier:
        acc = frontier[0][2]
        level = [f for f in frontier if f[2] == acc]
        frontier = [f for f in frontier if f[2] != acc]
        wanted = frozenset(p[len(acc):] for p in prefixes if p.startswith(acc) and len(p) > len(acc))
        answers = judge.next_logprobs([text for _, text, _, _ in level], wanted, at_start=not acc)
        for (i, text, _, logp), answer in zip(level, answers):
            if isinstance(out[i], str):
                continue
            if isinstance(answer, str):
                out[i] = answer
                continue
            for token, lp in answer.items():
                piece = token_matches(token, wanted, at_start=not acc)
                if piece is None:
                    continue
                mass = math.exp(logp + lp)
                if acc in out[i]:  # "1" continued into "10": that mass leaves "1"
                    out[i][acc] -= mass
                if acc + piece in out[i]:
                    out[i][acc + piece] += mass
                if judge.continues and any(p.startswith(acc + piece) and p != acc + piece for p in prefixes):
                    frontier.append((i, text + token, acc + piece, logp + lp))
    return [o if isinstance(o, str) else {k: max(v, 0.0) for k, v in o.items()} for o in out]


class PersonaJudgeReward:
    """reward in [0, 1]: how in character the reply is, by an LLM judge (see the module docstring).

    Reads `completions`, `persona`, and optionally `history` and `user_text` (docs/rewards.md). Watch the
    logged `rating_mass`, the probability on any rating token: low means the judge ignores the format.
    """

    def __init__(
        self,
        model: Optional[str] = None,  # local model directory ("trained": SmolLM2 trained here as a judge; "tiny": a
        # random tiny LM for tests), or the endpoint's model name
        endpoint: Optional[str] = None,  # OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1; null: run `model` here
        api: str = "completions",  # endpoint API: "completions" (prompt text, cue included) or "chat"
        api_key_env: Optional[str] = "OPENAI_API_KEY",  # environment variable holding the endpoint's API key
        backend: str = "vllm",  # local model: "vllm" (in-process engine) or "transformers"
        rubric: Optional[str] = None,  # the criteria text, or a path to a .txt file; null: DEFAULT_RUBRIC
        scale: int = SCALE,  # ratings 1..scale: 5 or 10
        mode: str = "pointwise",  # "pointwise" (rate each reply) or "pairwise" (mean win rate within a prompt)
        rationale: bool = True,  # generate a short reason for each new rating, and log a few per batch
        max_rationale_tokens: int = 48,
        log_rationales: int = 2,  # rationales logged (INFO) per batch
        cache_dir: Optional[str] = None,  # on-disk answer cache (and the tiny judge); null: memory only
        cache_size: int = 50_000,  # answers kept in memory; 0: none
        chat_template: bool = False,  # local model: wrap the prompt in its chat template (instruct judges)
        top_logprobs: int = 20,  # endpoint: top-k logprobs asked for; rating tokens outside them count 0
        max_history_chars: int = MAX_HISTORY_CHARS,  # the dialogue so far is cut to its last this many characters
        max_model_len: int = 4096,  # vLLM: longest prompt + answer, in tokens
        kv_cache_gib: float = 0.25,  # vLLM on CPU: KV-cache size
        threads: int = 0,  # vLLM on CPU: torch threads (0: leave as is; a Ray worker starts with 1)
        timeout_s: float = 60.0,  # endpoint: per request
        retries: int = 2,  # endpoint: further attempts after a timeout, lost connection or 429/5xx
        backoff_s: float = 0.5,  # endpoint: sleep before retry k is backoff_s * 2**k, with jitter
        max_concurrency: int = 8,  # endpoint: requests in flight
        build: Optional[dict] = None,  # model=trained: settings of its build (rewards/trained_judge.py); null: defaults
    ):
        if scale not in ANCHORS:
            raise ValueError(f"persona_judge: scale={scale}; use one of {sorted(ANCHORS)}")
        if mode not in MODES:
            raise ValueError(f"persona_judge: mode={mode!r}; use one of {', '.join(MODES)}")
        if rubric is not None and rubric.endswith(".txt"):
            rubric = Path(rubric).expanduser().read_text(encoding="utf-8").strip()
        path = self._local_path(model, build, cache_dir) if model and not endpoint else None
        trained = read_judge_card(path) if path else None
        if trained and trained["scale"] != scale:
            raise ValueError(f"persona_judge: scale={scale}, but the judge at {path} was trained to rate 1 to "
                             f"{trained['scale']}; set scale: {trained['scale']}")
        # a trained judge is asked as it was trained: with its own rubric, unless the recipe gives one
        self.rubric = rubric or (trained["rubric"] if trained else DEFAULT_RUBRIC)
        self.scale, self.mode, self.labels = scale, mode, [str(k) for k in range(1, scale + 1)]
        self.rationale, self.max_rationale_tokens, self.log_rationales = rationale, max_rationale_tokens, log_rationales
        self.max_history_chars = max_history_chars
        self.cache = JudgeCache(cache_size, Path(cache_dir).expanduser() / "persona_judge.sqlite" if cache_dir else None)
        if endpoint:
            self.judge = OpenAIJudge(endpoint, model, api=api, api_key_env=api_key_env, top_logprobs=top_logprobs,
                                     timeout_s=timeout_s, retries=retries, backoff_s=backoff_s,
                                     max_concurrency=max_concurrency)
        elif model:
            if backend == "vllm":
                self.judge = VllmJudge(str(path), chat_template=chat_template, max_model_len=max_model_len,
                                       kv_cache_gib=kv_cache_gib, threads=threads)
            elif backend == "transformers":
                self.judge = TransformersJudge(str(path), chat_template=chat_template)
            else:
                raise ValueError(f"persona_judge: backend={backend!r}; use 'vllm' or 'transformers'")
        else:
            raise ValueError("persona_judge: set `model` (a local model directory) or `endpoint` and `model` "
                             "(an OpenAI-compatible server and its model name)")
        self.last_rationales: list[Optional[str]] = []  # the latest batch's rationales (None: cached or off)

    @staticmethod
    def _local_path(model: str, build: Optional[dict], cache_dir: Optional[str]) -> Path:
        cache = cache_dir or default_cache_dir()
        if model == "tiny":
            return ensure_tiny_judge(cache)
        if model == "trained":
            path = trained_judge_dir(cache, PersonaJudgeBuild.from_kwargs(build))
            if read_judge_card(path) is None:
                raise FileNotFoundError(
                    f"persona_judge: the trained judge is not built yet ({path}); `speechrl build-judges --recipe "
                    "<your recipe>` builds it (a trainer builds it before it starts), or give model: <directory>")
            return path
        return Path(model).expanduser()

    # --- prompts ---------------------------------------------------------------------------------------
    def _context(self, persona: Any, history: Any, user_text: Optional[str]) -> str:
        return context_text(self.rubric, persona, history, user_text, self.max_history_chars)

    def rate_prompt(self, context: str, reply: str) -> str:
        return self.judge.format(rate_body(context, reply, self.scale), RATE_CUE)

    def pair_prompt(self, context: str, first: str, second: str) -> str:
        return self.judge.format(pair_body(context, first, second), PAIR_CUE)

    # --- asking, through the cache ----------------------------------------------------------------------
    def _ask(self, prompts: list[str], labels: list[str], explain: bool) -> tuple[list[Any], list[bool]]:
        """{label: mass} (or an error string) per prompt, and whether each came from the cache.
        Each distinct prompt is asked once; with `explain`, new answers get a rationale."""
        keys = [cache_key(self.judge.fingerprint, labels, p) for p in prompts]
        found = {k: self.cache.get(k) for k in dict.fromkeys(keys)}
        todo = {k: p for k, p in zip(keys, prompts) if found[k] is None}
        if todo:
            answers = label_masses(self.judge, list(todo.values()), labels)
            fresh = {k: {"masses": a} for k, a in zip(todo, answers) if not isinstance(a, str)}
            if explain:
                self._add_rationales(todo, fresh, labels)
            self.cache.put_many(fresh)
            found.update(fresh)
            found.update({k: a for k, a in zip(todo, answers) if isinstance(a, str)})
        return [found[k] for k in keys], [k not in todo for k in keys]

    def _add_rationales(self, prompts: dict[str, str], fresh: dict[str, dict], labels: list[str]) -> None:
        keys = [k for k in fresh if sum(fresh[k]["masses"].values()) > 0]
        if not keys:
            return
        # the rationale follows the likeliest rating where the answer can be prefilled
        asks = [f"{prompts[k]}{max(labels, key=fresh[k]['masses'].get)}\nReason:" if self.judge.continues
                else prompts[k] for k in keys]
        for k, text in zip(keys, self.judge.generate(asks, self.max_rationale_tokens)):
            fresh[k]["rationale"] = text.strip()

    # --- pointwise ---------------------------------------------------------------------------------------
    def __call__(self, completions: list[str], persona: Sequence[Any], history: Optional[Sequence[Any]] = None,
                 user_text: Optional[Sequence[Optional[str]]] = None, **columns: Any) -> dict[str, list[float]]:
        n = len(completions)
        history = history if history is not None else [None] * n
        user_text = user_text if user_text is not None else [None] * n
        contexts = [self._context(p, h, u) for p, h, u in zip(persona, history, user_text)]
        if self.mode == "pairwise":
            return self._pairwise(contexts, list(completions))
        answers, hits = self._ask([self.rate_prompt(c, r) for c, r in zip(contexts, completions)], self.labels,
                                  self.rationale)
        out: dict[str, list[float]] = {"reward": [], "expected_rating": [], "rating_mass": [], "cache_hit": []}
        self.last_rationales = []
        for answer, hit in zip(answers, hits):
            reward, expected, mass = self._rating(answer)
            out["reward"].append(reward)
            out["expected_rating"].append(expected)
            out["rating_mass"].append(mass)
            out["cache_hit"].append(float(hit))
            self.last_rationales.append(None if hit or isinstance(answer, str) else answer.get("rationale"))
        self._log(out["expected_rating"], columns.get("id"))
        return out

    def _rating(self, answer: Any) -> tuple[float, float, float]:
        """(reward in [0, 1], expected rating, mass on rating tokens); Unscored where there is none."""
        if isinstance(answer, str):
            return Unscored(f"persona judge: {answer}"), math.nan, math.nan
        masses = answer["masses"]
        total = sum(masses.values())
        if total <= 0:
            return (Unscored(f"persona judge: no rating token ({', '.join(self.labels)}) among the judge's "
                             "top logprobs"), math.nan, 0.0)
        expected = sum(int(k) * m for k, m in masses.items()) / total
        return (expected - 1) / (self.scale - 1), expected, total

    def _log(self, expected: list[float], ids: Any) -> None:
        shown = 0
        for i, (rating, why) in enumerate(zip(expected, self.last_rationales)):
            if why is None or shown >= self.log_rationales:
                continue
            name = f"id {ids[i]!r}" if isinstance(ids, (list, tuple)) else f"sample {i}"
            log.info("persona judge: %s rated %.2f/%d: %s", name, rating, self.scale, why)
            shown += 1

    # --- pairwise ----------------------------------------------------------------------------------------
    def compare_many(self, pairs: Sequence[tuple[str, str, str]]) -> tuple[list[float], list[float]]:
        """P(first reply better) for each (context, a, b), averaged over both orders; and the
        fraction of the two answers that came from the cache. Unscored where the judge gave none."""
        prompts = [q for c, a, b in pairs for q in (self.pair_prompt(c, a, b), self.pair_prompt(c, b, a))]
        answers, hits = self._ask(prompts, ["1", "2"], explain=False)  # no rationale for comparisons
        probs, hit_rates = [], []
        for k in range(len(pairs)):
            ab, ba = self._first_wins(answers[2 * k]), self._first_wins(answers[2 * k + 1])
            bad = next((x for x in (ab, ba) if isinstance(x, str)), None)
            # a wins as Reply 1 in the first order, as Reply 2 in the second
            probs.append(Unscored(f"persona judge: {bad}") if bad else 0.5 * (ab + (1.0 - ba)))
            hit_rates.append(0.5 * (hits[2 * k] + hits[2 * k + 1]))
        return probs, hit_rates

    def compare(self, a: str, b: str, persona: Any, history: Any = None, user_text: Optional[str] = None) -> float:
        """P(reply `a` is more in character than reply `b`), position bias cancelled: the judge is
        asked with a first and with b first, and the two answers averaged. compare(b, a) is
        1 - compare(a, b) up to rounding, and costs no judge call once compare(a, b) is cached."""
        return self.compare_many([(self._context(persona, history, user_text), a, b)])[0][0]

    @staticmethod
    def _first_wins(answer: Any) -> Any:
        if isinstance(answer, str):
            return answer
        m1, m2 = answer["masses"]["1"], answer["masses"]["2"]
        return m1 / (m1 + m2) if m1 + m2 > 0 else "no '1' or '2' among the judge's top logprobs"

    def _pairwise(self, contexts: list[str], replies: list[str]) -> dict[str, list[float]]:
        """Each sample's mean win probability against the other samples of its prompt (same
        context); a prompt with one sample in the batch has nothing to compare with."""
        groups: dict[str, list[int]] = {}
        for i, c in enumerate(contexts):
            groups.setdefault(c, []).append(i)
        pairs = [(i, j) for g in groups.values() for x, i in enumerate(g) for j in g[x + 1:]]
        probs, hit_rates = self.compare_many([(contexts[i], replies[i], replies[j]) for i, j in pairs])
        wins: list[list[float]] = [[] for _ in replies]
        hits: list[list[float]] = [[] for _ in replies]
        for (i, j), p, h in zip(pairs, probs, hit_rates):
            wins[i].append(p)
            wins[j].append(1.0 - p if not isinstance(p, Unscored) else p)
            hits[i].append(h)
            hits[j].append(h)
        reward = []
        for w in wins:
            bad = next((p for p in w if isinstance(p, Unscored)), None)
            reward.append(Unscored("persona judge (pairwise): the batch holds no other sample of this prompt")
                          if not w else bad if bad is not None else sum(w) / len(w))
        self.last_rationales = [None] * len(replies)
        return {"reward": reward, "cache_hit": [sum(h) / len(h) if h else math.nan for h in hits]}
