"""Realtime: persona dialogue with spoken replies. A prompt is the persona card, the dialogue so far
(text) and the user's latest turn (audio); the reply is text, then codec tokens, then
<|codec_end|>, under a three-phase layout constraint (rlhf/model/layout.py). Rollouts are
multi-turn episodes (episodes.py); held-out evaluation is drift by turn (drift.py)."""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from speechrl.rlhf.algos import UPDATES
from speechrl.rlhf.core.config import RecipeConfig, RecipeError
from speechrl.rlhf.core.registry import MODES
from speechrl.rlhf.model.backbone import IM_END, text_token_ids
from speechrl.rlhf.model.prompts import render_prompt, render_realtime_text_prompt
from speechrl.rlhf.modes.base import Mode, batch_indices
from speechrl.rlhf.modes.pairs import PreferenceRow, RewardModelPairs, RewardPair, read_pair_rows
from speechrl.rlhf.modes.tts import SpeakingTask, check_codec_fits_the_tiny_backbone
from speechrl.rollouts.types import RolloutRequest

NAMED_PERSONAS = ("builtin", "made", "personagym")  # realtime.personas other than a path


@dataclass(frozen=True)
class SpokenReply:
    """A realtime completion read back: its text part, its audio part, and when the audio began."""

    text: str  # the text tokens before the first codec token, decoded
    codec_ids: list[int]  # codec-local ids of the audio part (up to <|codec_end|>)
    ttfa_tokens: Optional[int]  # tokens generated before the first audio token; None: no audio at all
    ended: bool  # closed by <|codec_end|> (False: cut at the length cap)
    seconds: float  # duration of the audio part, from the codec's frame rate


class RealtimeTask(SpeakingTask):
    """Persona dialogue, spoken replies. Layout and decoding constraint: rollouts/layout.py; the
    prompt: data/prompts.py (`realtime`); earlier turns are text, the user's latest is audio."""

    def __init__(self, cfg: RecipeConfig, processor, codec=None):
        from speechrl.rlhf.model.layout import ReplyLayout

        super().__init__(cfg, processor, codec)
        text = [i for i in text_token_ids(self.tokenizer) if i != self.tokenizer.convert_tokens_to_ids(IM_END)]
        self.layout = ReplyLayout(tuple(text), tuple(int(i) for i in self.tokens.token_ids), self.tokens.end_id,
                                  cfg.realtime.max_text_tokens)
        self.allowed_ids = self.layout
        self.reward_codec = self.codec_spec if cfg.realtime.decode_replies else None
        self._prompts: dict[str, list[int]] = {}  # turn example id -> its prompt ids (placeholder expanded)

    def render(self, persona: str, history, user_text: Optional[str] = None) -> str:
        """The prompt text: the rendered card, the earlier turns ({"role", "text"}), the audio placeholder,
        and with `realtime.user_transcript` the latest turn's text after it."""
        example = {"persona": persona, "history": list(history)}
        if self.cfg.realtime.user_transcript:
            if not user_text:
                raise ValueError("realtime.user_transcript is on, but a user turn has no transcript; give every "
                                 "user turn its `text` in the dialogues file, or set realtime.user_transcript=false")
            example["user_text"] = user_text
        return render_prompt(self.processor, "realtime", example)

    def request(self, persona: str, history, audio: np.ndarray, metadata: dict) -> RolloutRequest:
        prompt = self.render(persona, history, metadata.get("user_text"))
        return RolloutRequest(prompt, audio, self.cfg.data.sample_rate, metadata)

    def reply_ids(self, text: str, codec_ids) -> list[int]:
        """A reply as completion ids in the layout: text tokens, codec tokens, <|codec_end|>."""
        return (self.tokenizer(text, add_special_tokens=False)["input_ids"] + self.tokens.to_backbone(codec_ids)
                + [self.tokens.end_id])

    def sft_example(self, ex, audio: np.ndarray, dataset=None) -> tuple[list[int], list[int], np.ndarray]:
        """(prompt ids, the reference reply's completion ids, the user clip) of a realtime_data.TurnExample."""
        from speechrl.data.audio import load_audio
        from speechrl.rlhf.model.logprobs import prompt_ids_for

        if ex.id not in self._targets:
            codec_ids = ex.reply_codec_ids
            if codec_ids is None:
                rate = self.cfg.data.sample_rate
                codec_ids = self.codec.encode(load_audio(ex.reply_audio, rate, min_seconds=0.0), rate)
            self._targets[ex.id] = self.reply_ids(ex.reply_text, codec_ids)
            self._prompts[ex.id] = prompt_ids_for(self.processor, self.render(ex.persona, ex.history, ex.user_text),
                                                 audio)
        return self._prompts[ex.id], self._targets[ex.id], audio

    def parse(self, completion_ids: list[int]) -> SpokenReply:
        """Split a completion into its text and audio parts (the layout guarantees text comes first)."""
        codec = self.layout.codec_set
        first = next((k for k, t in enumerate(completion_ids) if t in codec), None)
        text_ids = completion_ids if first is None else completion_ids[:first]
        codec_ids = [] if first is None else self.tokens.from_backbone(completion_ids[first:])
        per_second = self.codec.frame_rate * self.codec.num_codebooks
        return SpokenReply(text=self.tokenizer.decode(text_ids, skip_special_tokens=True).strip(), codec_ids=codec_ids,
                           ttfa_tokens=first, ended=bool(completion_ids) and completion_ids[-1] == self.tokens.end_id,
                           seconds=len(codec_ids) / per_second)

    def codec_ids(self, completion_ids: list[int]) -> list[int]:
        """The audio part's codec-local ids, what the reward side decodes."""
        return self.parse(completion_ids).codec_ids


@MODES.register("realtime")
class RealtimeMode(Mode):
    name = "realtime"
    algorithms = ("sft", "grpo", "ppo", "online_dpo", "dpo", "reward_model")
    default_algorithm = "ppo"
    headlines = [("drift judge score", "drift/judge"), ("drift out-of-character rate", "drift/ooc_rate"),
                 ("drift judge score, last turn", "drift/judge_last_turn"), ("drift check", "drift/check"),
                 ("drift check, last turn", "drift/check_last_turn"), ("held-out reply loss", "eval/loss")]
    evaluates_on_engines = True
    example_scores_glob = "drift/scores/step-*.jsonl"  # every drift reply, by dialogue (drift.py)
    example_unit = "dialogues"

    @classmethod
    def check(cls, cfg: RecipeConfig, source: str) -> None:
        super().check(cfg, source)
        r = cfg.realtime
        if r.personas not in NAMED_PERSONAS and not Path(os.path.expanduser(r.personas)).exists():
            raise RecipeError(f"{source}: `realtime.personas` is {r.personas!r}: neither \"builtin\", \"made\", "
                              "\"personagym\" nor a persona cards file or folder (docs/personas.md)")
        if r.personas not in NAMED_PERSONAS and r.dialogues is None:
            raise RecipeError(f"{source}: cards of your own (`realtime.personas`={r.personas!r}) need their dialogues: "
                              "set `realtime.dialogues` to a dialogues .jsonl (docs/personas.md)")
        check_codec_fits_the_tiny_backbone(cfg, source)
        keys = [spec.key for spec in cfg.rewards]
        for name, value in (("drift_judge", r.drift_judge), ("drift_check", r.drift_check)):
            if cfg.algorithm in UPDATES and value is not None and value not in keys:  # online runs evaluate drift
                raise RecipeError(f"{source}: `realtime.{name}` is {value!r}, which is not among the rewards "
                                  f"({', '.join(keys)}); drift evaluation reads that reward's score")

    def own_backbone_path(self) -> Path:
        """A tiny backbone whose tokenizer learnt the persona cards and dialogues, so prompts stay short
        (a given or pretrained backbone keeps its own tokenizer)."""
        from speechrl.rlhf.modes import assets

        texts = self.tokenizer_texts()
        return assets.tiny_backbone(self.cfg, texts, suffix=f"realtime-{assets.texts_key(texts)}")

    def tokenizer_texts(self) -> list[str]:
        from speechrl.rlhf.modes import realtime_data

        return realtime_data.tokenizer_texts(self.cfg)

    def datasets(self, max_audio_seconds: float):
        from speechrl.rlhf.modes.realtime_data import realtime_datasets

        return realtime_datasets(self.cfg, max_audio_seconds)

    def make_task(self, processor, codec=None) -> RealtimeTask:
        return RealtimeTask(self.cfg, processor, codec)

    def setup_online(self, run_dir: Path, logger, window_seconds: float) -> None:
        from speechrl.rlhf.modes.drift import DriftEvaluation
        from speechrl.rlhf.modes.realtime_data import UserSpeech, load_dialogues

        self.dialogues, drift = load_dialogues(self.cfg)
        self.speech = UserSpeech(self.cfg.data.sample_rate, window_seconds)
        self.drift = DriftEvaluation(self.cfg, self.task, drift, self.speech, run_dir)

    def rollout(self, step: int, generate) -> tuple[list[RolloutRequest], list]:
        """A prompt is one turn of one episode: the step's episodes play all their turns."""
        from speechrl.rlhf.modes.episodes import run_episodes

        idx = batch_indices(len(self.dialogues), self.cfg.rl.prompts_per_step, step, self.cfg.seed)
        return run_episodes(self.task, [self.dialogues[int(i)] for i in idx], self.speech, self.cfg.realtime.max_turns,
                            generate, n=self.cfg.rollout.sampling.n)

    def reward_columns(self, samples, requests) -> dict:
        """The reply's codec ids (decoded into `audio` reward-side) and its text part (`reply_text`, None
        where it has none: a listening reward leaves that reply unscored), which a listening reward
        compares with what the audio says."""
        parsed = [self.task.parse(s.completion_ids) for s in samples]
        return {"codec_ids": [p.codec_ids for p in parsed], "reply_text": [p.text or None for p in parsed]}

    def rollout_row(self, sample) -> dict:
        """The reply (sampled ids, its text part, its codec ids) and the user turn's audio file: what
        annotation tasks show and an export of them hands to offline DPO (docs/annotation.md)."""
        reply = self.task.parse(sample.completion_ids)
        return {"codec_ids": [int(c) for c in reply.codec_ids], "reply_text": reply.text, "completion": sample.text,
                "completion_ids": [int(t) for t in sample.completion_ids],
                "user_audio": self.user_audio(sample.metadata)}

    def evaluate_online(self, step, generate, score_batch, score, policy) -> dict:
        """Greedy drift dialogues on the engines, which hold the current weights."""
        return self.drift.evaluate(step, lambda requests: generate(requests, n=1, temperature=0.0,
                                                                   max_new_tokens=self.cfg.eval_max_new_tokens), score)

    def save_pairs(self, path: Path, step: int, samples, total: np.ndarray, pairs: list[tuple[int, int]]) -> None:
        """One row per pair: the turn's context (its id, persona, history, user turn) and both replies."""
        def reply(i: int) -> dict:
            parsed = self.task.parse(samples[i].completion_ids)
            return {"text": parsed.text, "codec_ids": [int(c) for c in parsed.codec_ids], "reward": float(total[i]),
                    "completion_ids": [int(t) for t in samples[i].completion_ids]}  # what offline DPO trains on

        rows = [{key: samples[c].metadata[key] for key in ("id", "persona", "history", "user_text")}
                | {"user_audio": self.user_audio(samples[c].metadata), "chosen": reply(c), "rejected": reply(r)}
                for c, r in pairs]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))

    def user_audio(self, columns: dict) -> Optional[str]:
        """The audio file of a turn's user speech (its dialogue's k-th user turn), or None if unknown."""
        dialogues = {d.id: d for d in getattr(self, "dialogues", ())}
        dialogue = dialogues.get(columns.get("dialogue_id"))
        users = [t for t in dialogue.turns if t.role == "user"] if dialogue else []
        turn = columns.get("turn")
        return users[turn].audio if isinstance(turn, int) and turn < len(users) else None

    def preference_rows(self, source: str) -> tuple[list[PreferenceRow], dict]:
        """Reply pairs as `save_pairs` writes them (a .jsonl file, or a folder of them: an online DPO
        run's `pairs/`), or an annotation export's pairs.jsonl (`reply_pair_fields`): the prompt
        rebuilt from the row's card, history and user audio file, each reply its sampled ids or, without
        them, text + codec ids + <|codec_end|> in the reply layout."""
        from speechrl.rlhf.model.logprobs import prompt_ids_for
        from speechrl.rlhf.modes.realtime_data import UserSpeech

        fe = self.task.processor.feature_extractor
        speech = UserSpeech(self.cfg.data.sample_rate, fe.n_samples / fe.sampling_rate)
        task = self.task

        def row_of(row: dict) -> PreferenceRow:
            row = reply_pair_fields(row)
            if not isinstance(row.get("persona"), str) or not isinstance(row.get("history", []), list):
                raise ValueError("`persona` (the rendered card) and `history` (a list of turns) are required")
            if not isinstance(row.get("user_audio"), str):
                raise ValueError("`user_audio` must name the user turn's audio file: the prompt holds the user's "
                                 "turn as audio (rollouts saved before speechrl recorded it lack it; "
                                 "realtime/reward_model, text-only, reads such rows)")
            replies = []
            for key in ("chosen", "rejected"):
                reply = row.get(key)
                if not isinstance(reply, dict) or not isinstance(reply.get("text", ""), str) or \
                        not isinstance(reply.get("codec_ids", []), list):
                    raise ValueError(f"`{key}` must be {{\"text\": ..., \"codec_ids\": [...]}}")
                # the sampled ids where saved (token in, token out); else text + codec ids in the layout
                ids = reply.get("completion_ids") or task.reply_ids(reply.get("text", ""),
                                                                   [int(c) for c in reply.get("codec_ids", [])])
                if not task.layout.admits(ids):
                    raise ValueError(f"`{key}` does not fit the reply layout (text tokens, at most "
                                     f"realtime.max_text_tokens={self.cfg.realtime.max_text_tokens}, then codec tokens)")
                replies.append(list(ids))
            clip = speech(row["user_audio"])
            prompt = prompt_ids_for(task.processor, task.render(row["persona"], row.get("history", []),
                                                                     row.get("user_text")), clip)
            return PreferenceRow(prompt, replies[0], replies[1], clip)

        return read_pair_rows(source, row_of, self.cfg.data.on_bad_example)

    def reward_model_pairs(self, source: str, processor, codec) -> RewardModelPairs:
        """The reward model's pairs (`reward_model.data`): rows as `save_pairs` writes them (a .jsonl file,
        a glob of them, or a folder: an online DPO run's `pairs/`) or an annotation export's pairs.jsonl
        (`reply_pair_fields`), each side the dialogue as text (card, history, the user's turn from
        `user_text`) then the reply's text and codec tokens; grouped by persona card, so that held-out
        accuracy is on personas the model never saw."""
        from speechrl.rewards.learned import dialogue_sequence
        from speechrl.rollouts.codec import CodecTokens

        tokens = CodecTokens(processor.tokenizer, codec)

        def row_of(row: dict) -> RewardPair:
            row = reply_pair_fields(row)
            persona, history, user = row.get("persona"), row.get("history", []), row.get("user_text")
            if not isinstance(persona, str) or not persona.strip() or not isinstance(history, list):
                raise ValueError("`persona` (the rendered card) and `history` (a list of turns) are required")
            if not isinstance(user, str) or not user.strip():  # the reward model is text-only: no user_audio
                raise ValueError("`user_text` (the user's turn as text) is required: the reward model reads the "
                                 "dialogue as text; add it to the row")
            sides = []
            for key in ("chosen", "rejected"):
                reply = row.get(key)
                if not isinstance(reply, dict) or not isinstance(reply.get("text", ""), str) or \
                        not isinstance(reply.get("codec_ids", []), list):
                    raise ValueError(f"`{key}` must be {{\"text\": ..., \"codec_ids\": [...]}}")
                sides.append(dialogue_sequence(processor, tokens, persona, history, user, reply.get("text"),
                                               [int(c) for c in reply.get("codec_ids", [])]))
            return RewardPair(persona.strip(), *sides)

        pairs, summary = read_pair_rows(source, row_of, self.cfg.data.on_bad_example, key="reward_model.data")
        context = render_realtime_text_prompt(processor, "<persona card>", [{"role": "user", "text": "<earlier turns>"}],
                                              "<user turn>")
        return RewardModelPairs(pairs, summary["read"], summary["bad"], split_by="persona",
                                sequence=context + "<reply text><codec tokens><|codec_end|>")

    def label_evaluation(self, label: str) -> None:
        self.drift.label = label

    def summary_rows(self) -> dict:
        return {"drift plot": str(self.drift.plot_path)}

    def evaluate_offline(self, step, model, processor, eval_set, run_dir, logger) -> dict:
        """The held-out turns' reference-reply loss (spoken replies are generated by the RL drivers'
        engines, which score drift; SFT reports how well it fits)."""
        return {"eval/loss": heldout_loss(self.task, model, processor, eval_set, self.cfg)}

    def report_checkpoint(self, metrics: dict, out_dir: Path) -> str:
        curves = json.loads((self.drift.dir / "step-00000.json").read_text())
        lines = [f"{'turn':>4}  {'judge score':>11}  {'out-of-character':>16}  {'replies scored':>14}"]
        for turn, judge, ooc, scored in zip(curves["turn"], curves["judge"], curves["ooc"], curves["scored"]):
            lines.append(f"{turn:>4}  {judge:>11.4f}  {ooc:>16.2f}  {scored:>14}")
        r = self.cfg.realtime
        lines.append(f"all turns: judge score {metrics['drift/judge']:.4f}, out-of-character rate "
                     f"{metrics['drift/ooc_rate']:.2f} (judge: {r.drift_judge}, threshold {r.ooc_threshold:g})")
        lines.append(f"replies: {self.drift.dir / 'step-00000.json'}\nplot: {self.drift.plot_path}")
        return "\n".join(lines)

    def demo_report(self, sft: dict, rl: dict, minutes: float) -> dict:
        """The drift curves of the RL run's first (before: the SFT weights) and last evaluations."""
        runs = sorted((Path(rl["run"]) / "drift").glob("step-*.json"))
        before, after = (json.loads(p.read_text()) for p in (runs[0], runs[-1]))
        checked = "check" in before and "check" in after
        lines = [f"{'turn':>4}  {'judge before':>12}  {'judge after':>11}  {'OOC before':>10}  {'OOC after':>9}"
                 + (f"  {'check before':>12}  {'check after':>11}" if checked else "")]
        for k, turn in enumerate(before["turn"]):
            lines.append(f"{turn:>4}  {before['judge'][k]:>12.3f}  {after['judge'][k]:>11.3f}  "
                         f"{before['ooc'][k]:>10.2f}  {after['ooc'][k]:>9.2f}"
                         + (f"  {before['check'][k]:>12.3f}  {after['check'][k]:>11.3f}" if checked else ""))
        result = {"sft heldout loss": sft.get("held-out reply loss after", float("nan")),
                  "judge before": rl.get("drift judge score before"), "judge after": rl.get("drift judge score after"),
                  "ooc before": rl.get("drift out-of-character rate before"),
                  "ooc after": rl.get("drift out-of-character rate after"),
                  "check before": rl.get("drift check before"), "check after": rl.get("drift check after"),
                  # drift itself: the last turn against the first (a flatter curve is closer to 0)
                  "ooc last turn before": before["ooc"][-1], "ooc last turn after": after["ooc"][-1],
                  "judge slope before": before["judge"][-1] - before["judge"][0],
                  "judge slope after": after["judge"][-1] - after["judge"][0],
                  "minutes": minutes}
        print(f"\ndrift over {len(before['turn'])} turns (judge score in [0, 1]; out of character: score < "
              f"{before['threshold']:g}; check: {self.cfg.realtime.drift_check}, the rule check beside the judge), "
              f"before (step {before['step']}) and after (step {after['step']}) PPO:")
        print("\n".join(lines))
        check = (f", check {result['check before']:.3f} -> {result['check after']:.3f}"
                 if result["check before"] is not None and result["check after"] is not None else "")
        print(f"all turns: judge {result['judge before']:.3f} -> {result['judge after']:.3f}, out-of-character rate "
              f"{result['ooc before']:.2f} -> {result['ooc after']:.2f}{check}   ({minutes:.1f} min)")
        for change in self.print_run_intervals(rl["run"]):  # the changes against the evaluation's noise
            result[f"{change.label} change"] = (change.change, change.low, change.high)
        print(f"last turn: out-of-character rate {result['ooc last turn before']:.2f} -> "
              f"{result['ooc last turn after']:.2f}; judge score, last turn minus first: "
              f"{result['judge slope before']:+.3f} -> {result['judge slope after']:+.3f}")
        for name, run in (("before", before), ("after", after)):  # a judge being gamed shows as one reply
            common = _common_replies(run.get("replies", []))          # taking over, whatever was asked
            if common:
                result[f"distinct replies {name}"] = len({r["reply"] for r in run["replies"]})
                print(f"most common drift replies {name} (of {len(run['replies'])}; "
                      f"{result[f'distinct replies {name}']} distinct), with their mean judge score:")
                print("\n".join(f"  {n:>3} x {score:.2f}  {text!r}" for text, n, score in common))
        judge = next((r for r in self.cfg.rewards if r.key == self.cfg.realtime.drift_judge), None)
        if judge is not None and (judge.kwargs or {}).get("model") == "tiny":
            print("The judge is the tiny random LM (model: tiny): its scores exercise the machinery and carry no meaning.")
        print(f"plot: {rl['drift plot']}")
        return result


def reply_pair_fields(row: dict) -> dict:
    """A reply pair's fields as `save_pairs` writes them: the row itself, or, in the pairs.jsonl of
    `speechrl annotate export` (whose top level is the TTS preference format: clips, votes), the
    row's `realtime` object (docs/annotation.md, "Realtime batches")."""
    if "realtime" in row:
        if not isinstance(row["realtime"], dict):
            raise ValueError(f"`realtime` must be an object (the reply pair's fields), got "
                             f"{type(row['realtime']).__name__}")
        return row["realtime"]
    if row.get("mode") not in (None, "realtime"):
        raise ValueError(f"a {row['mode']} preference pair (`mode`: {row['mode']!r}); realtime recipes read "
                         "realtime reply pairs")
    if row.get("mode") == "realtime" and "persona" not in row:  # an export made before it carried the pair
        raise ValueError("an annotation export row without its `realtime` object: export the batch again with "
                         "`speechrl annotate export`")
    return row


def heldout_loss(task, model, processor, eval_set, cfg: RecipeConfig) -> float:
    """Mean next-token loss on the first held-out turns' reference replies."""
    import torch

    from speechrl.rlhf.model.logprobs import build_token_batch, sft_loss

    n = min(len(eval_set), cfg.data.max_eval_examples)
    size, losses = cfg.train.batch_size, []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, n, size):
                rows = [task.sft_example(*eval_set[i], eval_set) for i in range(start, min(n, start + size))]
                batch = build_token_batch(processor, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows],
                                          processor.tokenizer.pad_token_id).to(model.device)
                losses.append((float(sft_loss(model, batch)), len(rows)))
    finally:
        model.train(was_training)
    return sum(loss * k for loss, k in losses) / max(1, sum(k for _, k in losses))


def _common_replies(replies: list[dict], top: int = 3, width: int = 80) -> list[tuple[str, int, float]]:
    """The `top` most frequent drift replies: (text cut to `width`, count, mean judge score)."""
    counts = Counter(r["reply"] for r in replies)
    out = []
    for text, n in counts.most_common(top):
        scores = [r["judge"] for r in replies if r["reply"] == text and r.get("judge") is not None]
        cut = text if len(text) <= width else text[:width - 3] + "..."
        out.append((cut, n, sum(scores) / len(scores) if scores else float("nan")))
    return out
