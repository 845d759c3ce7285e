"""Full duplex: listening while speaking, on one clock of `duplex.chunk_seconds` (160 ms by default).

Each chunk is one decision: the prompt holds the user's channel up to the chunk's end (the one audio
placeholder: the encoder's last window of it) and the assistant's own chunks so far (its tokens, each
chunk closed by `<|codec_end|>`); the completion is the assistant's next chunk, under a reply layout
(rlhf/model/layout.py) with `silent_end`, `audio_start` and `max_audio_tokens`: `<|codec_end|>` alone
(listen), `<|audio_bos|>` then up to one chunk of codec tokens (speak), either after a tool call as
JSON text of at most `duplex.max_action_tokens` tokens (the action channel's rate limit). Speaking
opens with one token so that the decision is one token against another: greedy decoding would
otherwise weigh `<|codec_end|>` against each codec token alone, and never speak. The same layout
masks vLLM's sampling and the trainer's logprobs.

Rollouts are episodes on the clock: every chunk of a dialogue is a request with n samples (a GRPO
group), scored by rewards/duplex.py against the chunk's label, and the dialogue goes on with the
first sample, as realtime episodes do with turns. Held-out evaluation plays the held-out dialogues
(sampled at `duplex.eval_temperature`, or greedily) and measures Full-Duplex-Bench-style metrics on the clock (`timeline_metrics`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np

from speechrl.rlhf.core.config import RecipeConfig, RecipeError
from speechrl.rlhf.core.registry import MODES
from speechrl.rlhf.model.backbone import AUDIO_BOS, AUDIO_TOKEN, IM_END, text_token_ids
from speechrl.rlhf.model.prompts import render_duplex_prompt
from speechrl.rlhf.modes.base import Mode, batch_indices, safe_name
from speechrl.rlhf.modes.duplex_chunks import FALSE_START, LATE_START, ChunkDataset, ChunkExample
from speechrl.rlhf.modes.duplex_data import ACT, KINDS, Dialogue, load_dialogues, plan_dialogues, plan_texts, window
from speechrl.rlhf.modes.duplex_eval import TARGETS, decision_scores, summarize, timeline_metrics
from speechrl.rlhf.modes.tts import SpeakingTask, check_codec_fits_the_tiny_backbone
from speechrl.rollouts.types import RolloutRequest

class ChunkOut(NamedTuple):
    """A chunk's completion read back."""

    action: Optional[str]  # the action channel's text (a tool call), None without one
    codec_ids: list[int]  # codec-local ids of its audio
    speaks: bool  # it opens its audio (`<|audio_bos|>`)


def chunk_frames(chunk_seconds: float, frame_rate: float, what: str) -> int:
    """Codec frames in one chunk of the clock; a RecipeError naming `what` (the codec) where it is not whole."""
    frames = chunk_seconds * frame_rate
    if abs(frames - round(frames)) > 1e-6 or round(frames) < 1:
        raise RecipeError(f"`duplex.chunk_seconds`={chunk_seconds} is {frames:g} frames of {what} ({frame_rate:g} "
                          "frames/s); make it a whole number of frames (0.16 s = 4 frames of 40 ms)")
    return int(round(frames))


class DuplexTask(SpeakingTask):
    """Prompts, references and the chunk layout (the module docstring)."""

    def __init__(self, cfg: RecipeConfig, processor, codec=None):
        from speechrl.rlhf.model.layout import ReplyLayout
        from speechrl.rlhf.model.logprobs import prompt_ids_for

        super().__init__(cfg, processor, codec)
        d = cfg.duplex
        self.per_chunk = chunk_frames(d.chunk_seconds, self.codec.frame_rate, "the codec") * self.codec.num_codebooks
        text = [i for i in text_token_ids(self.tokenizer) if i != self.tokenizer.convert_tokens_to_ids(IM_END)]
        self.speak_id = self.tokenizer.convert_tokens_to_ids(AUDIO_BOS)  # opens a chunk's speech
        self.layout = ReplyLayout(tuple(text), tuple(int(i) for i in self.tokens.token_ids), self.tokens.end_id,
                                  d.max_action_tokens, silent_end=True, max_audio_tokens=self.per_chunk,
                                  audio_start=self.speak_id)
        self.allowed_ids = self.layout
        self.reward_codec = None  # the turn-taking reward reads decisions, not audio
        rate = cfg.data.sample_rate
        fe = processor.feature_extractor
        self.chunk_samples = int(round(d.chunk_seconds * rate))
        self.window_samples = int(fe.n_samples / fe.sampling_rate * rate)
        self.history_chunks = max(1, self.window_samples // self.chunk_samples)  # 25 at 4 s and 160 ms
        # the prompt's text tokens: what max_model_len leaves after a whole window of audio and one chunk
        self.prompt_budget = 10**9
        audio_tokens = len(prompt_ids_for(processor, AUDIO_TOKEN, np.zeros(self.window_samples, np.float32)))
        self.prompt_budget = (cfg.rollout.max_model_len - audio_tokens + 1
                              - max(cfg.rollout.sampling.max_new_tokens, cfg.eval_max_new_tokens))
        if self.prompt_budget < len(self.tokenizer(self.prompt([]), add_special_tokens=False)["input_ids"]) + 2 * d.max_action_tokens:
            raise RecipeError(f"rollout.max_model_len={cfg.rollout.max_model_len} leaves {self.prompt_budget} prompt "
                              f"tokens after {audio_tokens} audio tokens and one chunk: too few for the duplex prompt "
                              "and the assistant's recent chunks; raise `rollout.max_model_len`")
        self._codes: dict[str, list[int]] = {}  # reply wav -> its backbone codec ids
        self._references: dict[str, list[list[int]]] = {}  # dialogue id -> each chunk's reference completion

    # --- prompts and references ------------------------------------------------------------------
    def prompt(self, stream: list[list[int]]) -> str:
        """The prompt after the chunks `stream`: the last `history_chunks` of them, the same stretch of
        the clock as the audio window, so the prompt stays bounded however long the dialogue (a
        policy that fills every chunk with a tool call and speech would otherwise outgrow
        rollout.max_model_len). Before the dialogue's start the assistant listened: fewer chunks are
        preceded by silent ones, so the prompt does not count the chunks since the start (a clock the
        first demo's policy read instead of the user's audio; `window` keeps the audio's the same way)."""
        recent = list(stream[-self.history_chunks:])
        recent = [[self.tokens.end_id]] * (self.history_chunks - len(recent)) + recent
        while True:
            text = render_duplex_prompt(self.processor, [t for chunk in recent for t in chunk])
            # sampled text (a tool call) can re-tokenize longer than it was sampled: count the text's tokens
            if not recent or len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) <= self.prompt_budget:
                return text
            recent = recent[1:]

    def request(self, dialogue: Dialogue, chunk: int, stream: list[list[int]]) -> RolloutRequest:
        meta = {"id": f"{dialogue.id}/c{chunk}", "dialogue_id": dialogue.id, "kind": dialogue.kind, "chunk": chunk,
                "duplex_label": dialogue.labels[chunk],
                "duplex_action": dialogue.action if dialogue.labels[chunk] == ACT else None}
        return RolloutRequest(self.prompt(stream), window(dialogue, chunk, self.chunk_samples, self.window_samples),
                              self.cfg.data.sample_rate, meta)

    def reference(self, dialogue: Dialogue) -> list[list[int]]:
        """Each chunk's reference completion: the tool call's tokens, or `<|audio_bos|>` and the reply's
        codec tokens of that chunk, or nothing; each closed by `<|codec_end|>`."""
        from speechrl.data.audio import load_audio

        if dialogue.id in self._references:
            return self._references[dialogue.id]
        out, end = [], self.tokens.end_id
        for c, label in enumerate(dialogue.labels):
            ids: list[int] = []
            if label == ACT:
                ids = self.tokenizer(dialogue.action, add_special_tokens=False)["input_ids"]
                if len(ids) > self.layout.max_text_tokens:
                    raise ValueError(f"duplex dialogue {dialogue.id}: the tool call {dialogue.action} is {len(ids)} "
                                     f"tokens, over duplex.max_action_tokens={self.layout.max_text_tokens}; raise it")
            elif c in dialogue.reply:
                wav, k = dialogue.reply[c]
                if wav not in self._codes:
                    rate = self.cfg.data.sample_rate
                    self._codes[wav] = self.tokens.to_backbone(self.codec.encode(load_audio(wav, rate, min_seconds=0.0), rate))
                ids = [self.speak_id] + self._codes[wav][k * self.per_chunk:(k + 1) * self.per_chunk]
            out.append(list(ids) + [end])
        self._references[dialogue.id] = out
        return out

    def sft_example(self, ex: ChunkExample, audio: np.ndarray, dataset=None) -> tuple[list[int], list[int], np.ndarray]:
        from speechrl.rlhf.model.logprobs import prompt_ids_for

        history, target = self.history_and_target(ex)
        return prompt_ids_for(self.processor, self.prompt(history), audio), target, audio

    def history_and_target(self, ex: ChunkExample) -> tuple[list[list[int]], list[int]]:
        """The assistant's chunks before `ex.chunk` and the chunk to write there: the reference's, or for
        a recovery example (`recovery_examples`) the reference's with the mistake in it. A false start
        speaks the answer's first chunk one chunk early; a late start leaves the answer's chunks so
        far silent, and the target starts the answer from its first chunk."""
        reference, c = self.reference(ex.dialogue), ex.chunk
        history, target = [list(x) for x in reference[:c]], reference[c]
        silent = [self.tokens.end_id]
        if ex.variant == FALSE_START:  # the answer's first chunk, one chunk early
            history[-1] = list(next(reference[k] for k in sorted(ex.dialogue.reply) if ex.dialogue.reply[k][1] == 0))
        elif ex.variant == LATE_START:
            onset = c - ex.dialogue.reply[c][1]
            history[onset:] = [silent] * (c - onset)
            target = reference[onset]
        elif ex.variant:
            raise ValueError(f"duplex example {ex.id}: unknown variant {ex.variant!r}")
        return history, target

    def credit(self, completion_ids: list[int]) -> list[float]:
        """1 for the tokens up to and including `<|audio_bos|>` (the decision and any tool call), 0 for
        the codec tokens and the `<|codec_end|>` after them; a silent chunk's one token gets 1."""
        opened = next((k for k, t in enumerate(completion_ids) if t == self.speak_id), None)
        cut = len(completion_ids) if opened is None else opened + 1
        return [1.0] * cut + [0.0] * (len(completion_ids) - cut)

    def parse(self, completion_ids: list[int]) -> ChunkOut:
        codec = self.layout.codec_set
        first = next((k for k, t in enumerate(completion_ids) if t in codec or t == self.speak_id),
                     len(completion_ids))
        text = [t for t in completion_ids[:first] if t != self.tokens.end_id]
        action = self.tokenizer.decode(text, skip_special_tokens=True).strip() or None
        codec_ids = self.tokens.from_backbone([t for t in completion_ids[first:] if t in codec])
        return ChunkOut(action, codec_ids, first < len(completion_ids))


def play(task: DuplexTask, dialogues: list[Dialogue], generate):
    """Play dialogues on the clock (the module docstring): each chunk of each live dialogue is one request
    (`generate(requests)` samples n completions of each), and the dialogue goes on with its first sample. Returns (requests, samples, each
    dialogue's chunks as played: ChunkOuts); a sample's `prompt_index` points into the requests."""
    streams: list[list[list[int]]] = [[] for _ in dialogues]
    played: list[list[ChunkOut]] = [[] for _ in dialogues]
    requests, samples = [], []
    for chunk in range(max(d.num_chunks for d in dialogues)):
        live = [i for i, d in enumerate(dialogues) if chunk < d.num_chunks]
        batch = [task.request(dialogues[i], chunk, streams[i]) for i in live]
        out = generate(batch)
        for s in out:
            s.prompt_index += len(requests)
        first = {s.prompt_index: s for s in out if s.sample_index == 0}
        for k, i in enumerate(live):
            ids = list(first[len(requests) + k].completion_ids)
            streams[i].append(ids if ids and ids[-1] == task.tokens.end_id else ids + [task.tokens.end_id])
            played[i].append(task.parse(ids))
        requests += batch
        samples += out
    return requests, samples, played


@MODES.register("duplex")
class DuplexMode(Mode):
    name = "duplex"
    algorithms = ("sft", "grpo")
    default_algorithm = "grpo"
    headlines = [("pause take-over rate", "duplex/pause_takeover"),
                 ("backchannel take-over rate", "duplex/backchannel_takeover"),
                 ("interruptions stopped within 2 chunks", "duplex/interrupt_stop_2"),
                 ("response latency (median chunks)", "duplex/response_latency"),
                 ("tool-call exact match", "duplex/tool_exact"), ("barge-in rate", "duplex/barge_in"),
                 ("held-out chunk loss", "eval/loss"), ("held-out decision accuracy", "eval/decision_accuracy"),
                 ("P(answer) where an answer starts", "eval/onset_speak")]
    evaluates_on_engines = True
    shares_backbone = False  # not (yet) among model.tiny.texts: all_modes (docs/duplex.md)

    @classmethod
    def check(cls, cfg: RecipeConfig, source: str) -> None:
        super().check(cfg, source)
        d = cfg.duplex
        unknown = [k for k in d.kinds if k not in KINDS]
        if not d.kinds or unknown or len(set(d.kinds)) != len(d.kinds):
            raise RecipeError(f"{source}: `duplex.kinds` is {list(d.kinds)}; list each of {', '.join(KINDS)} at most "
                              "once, at least one")
        for kind, count in d.dialogues_by_kind.items():  # ints (the typed config); a kind not in duplex.kinds: unused
            if kind not in KINDS or not 1 <= count <= 100_000:
                raise RecipeError(f"{source}: `duplex.dialogues_by_kind.{kind}` is {count!r}; name a dialogue kind "
                                  f"({', '.join(KINDS)}) with a count in [1, 100000]")
        if "tool" in d.kinds and d.max_action_tokens < 1:
            raise RecipeError(f"{source}: `duplex.kinds` has tool but `duplex.max_action_tokens` is 0: a tool call "
                              "needs action tokens (about 15)")
        check_codec_fits_the_tiny_backbone(cfg, source)
        if not cfg.tts.codec:  # the embedded codec's frame rate is known before it is built
            hop, rate = cfg.tts.embedded_codec.hop_length, cfg.data.sample_rate
            try:
                frames = chunk_frames(d.chunk_seconds, rate / hop, f"the embedded codec (`tts.embedded_codec.hop_length`"
                                                                  f"={hop} at {rate} Hz)")
            except RecipeError as e:
                raise RecipeError(f"{source}: {e}") from None
            need = d.max_action_tokens + frames * cfg.tts.embedded_codec.num_codebooks + 2
            for key, value in (("rollout.sampling.max_new_tokens", cfg.rollout.sampling.max_new_tokens),
                               ("eval_max_new_tokens", cfg.eval_max_new_tokens)):
                if value < need:
                    raise RecipeError(f"{source}: `{key}` is {value}; a chunk can hold {need} tokens "
                                      f"(`duplex.max_action_tokens`={d.max_action_tokens}, <|audio_bos|>, one chunk of "
                                      f"codec tokens, <|codec_end|>): set it to at least {need}, or lower "
                                      "`duplex.max_action_tokens`")

    def own_backbone_path(self) -> Path:
        """A tiny backbone whose tokenizer learnt what the dialogues say and the tool calls."""
        from speechrl.rlhf.modes import assets

        texts = self.tokenizer_texts()
        return assets.tiny_backbone(self.cfg, texts, suffix=f"duplex-{assets.texts_key(texts)}")

    def tokenizer_texts(self) -> list[str]:
        from speechrl.rlhf.model.prompts import DUPLEX_INSTRUCTION

        plans = plan_dialogues(self.cfg, "train") + plan_dialogues(self.cfg, "heldout")
        return [DUPLEX_INSTRUCTION] * 50 + plan_texts(plans)

    def data_fingerprints(self) -> dict[str, str]:
        """The dialogues': every dialogue's labels and user channel, and the reference replies' speech."""
        from speechrl.rlhf.core.fingerprint import fingerprint

        train, held = load_dialogues(self.cfg)
        replies = sorted({wav for d in train + held for wav, _ in d.reply.values()})
        return {"dialogues": fingerprint(*(x for d in train + held for x in (d.id, ",".join(d.labels), d.audio.tobytes())),
                                         *(Path(w) for w in replies))}

    def datasets(self, max_audio_seconds: float):
        train, held = load_dialogues(self.cfg)
        rate = self.cfg.data.sample_rate
        chunk, win = int(round(self.cfg.duplex.chunk_seconds * rate)), int(max_audio_seconds * rate)
        d = self.cfg.duplex
        return ChunkDataset(train, chunk, win, d.event_repeats, d.recovery_repeats, d.call_repeats), ChunkDataset(held, chunk, win)

    def make_task(self, processor, codec=None) -> DuplexTask:
        return DuplexTask(self.cfg, processor, codec)

    # --- the online loop ---------------------------------------------------------------------------
    def setup_online(self, run_dir: Path, logger, window_seconds: float) -> None:
        self.dialogues, self.heldout = load_dialogues(self.cfg)
        self.out_dir = Path(run_dir) / "duplex"
        self.label = None

    def rollout(self, step: int, generate):
        """The step's dialogues played on the clock. Each sample's policy-loss credit is on its decision
        and its tool call (the tokens before its audio, and `<|audio_bos|>`): the turn-taking reward
        judges those, not the codec tokens of the speech that follows, which would otherwise share the
        advantage and its noise (algos/updates.py, TOKEN_CREDIT)."""
        from speechrl.rlhf.algos.updates import TOKEN_CREDIT

        idx = batch_indices(len(self.dialogues), self.cfg.rl.prompts_per_step, step, self.cfg.seed)
        requests, samples, _ = play(self.task, [self.dialogues[int(i)] for i in idx], generate)
        for s in samples:
            s.metadata[TOKEN_CREDIT] = self.task.credit(s.completion_ids)
        return requests, samples

    def reward_columns(self, samples, requests) -> dict:
        parsed = [self.task.parse(s.completion_ids) for s in samples]
        return {"speaks": [p.speaks for p in parsed], "action_text": [p.action for p in parsed]}

    def rollout_row(self, sample) -> dict:
        out = self.task.parse(sample.completion_ids)
        return {"speaks": out.speaks, "action_text": out.action, "codec_ids": [int(c) for c in out.codec_ids],
                "completion_ids": [int(t) for t in sample.completion_ids]}

    def evaluate_online(self, step, generate, score_batch, score, policy) -> dict:
        """The held-out dialogues played once each at `duplex.eval_temperature` (sampled, as a duplex
        model runs; 0 = greedy); their timelines go to duplex/step-N.json."""
        def once(requests):
            return generate(requests, n=1, temperature=self.cfg.duplex.eval_temperature,
                            max_new_tokens=self.cfg.eval_max_new_tokens)

        _, _, played = play(self.task, self.heldout, once)
        rows = [{"id": d.id, **timeline_metrics(d, p)} for d, p in zip(self.heldout, played)]
        metrics = summarize(rows)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        name = f"step-{step:05d}.json" if self.label is None else f"{safe_name(self.label)}.json"
        self.last_written = self.out_dir / name
        (self.out_dir / name).write_text(json.dumps({"step": step, "metrics": metrics, "dialogues": rows}, indent=1))
        return metrics

    def label_evaluation(self, label: str) -> None:
        self.label = label

    def summary_rows(self) -> dict:
        return {"duplex timelines": str(self.out_dir)}

    # --- SFT and `speechrl eval` -------------------------------------------------------------------
    def evaluate_offline(self, step, model, processor, eval_set, run_dir, logger) -> dict:
        """On held-out chunks spread over every dialogue kind: the reference chunks' loss, and the
        decisions teacher-forced (each chunk after the reference's own chunks so far): how often the
        likeliest of listen / speak / call is the right one, and the probability of speaking where an
        answer starts. Decisions on the clock, each after the policy's own, are played by the RL
        drivers' engines (`evaluate_online`)."""
        from speechrl.rlhf.modes.realtime import heldout_loss

        spread = eval_set.spread(self.cfg.data.max_eval_examples)
        return {"eval/loss": heldout_loss(self.task, model, processor, spread, self.cfg),
                **decision_scores(self.task, model, processor, spread, self.cfg.train.batch_size)}

    def report_checkpoint(self, metrics: dict, out_dir: Path) -> str:
        return "\n".join(f"{label}: {metrics.get(key, float('nan')):.3f}  (target {target})"
                         for key, label, target, _ in TARGETS) + f"\ntimelines: {self.last_written}"

    def demo_report(self, sft: dict, rl: dict, minutes: float) -> dict:
        """Each metric on the held-out dialogues after SFT (the RL run's first evaluation) and after RL."""
        runs = sorted((Path(rl["run"]) / "duplex").glob("step-*.json"))
        before, after = (json.loads(p.read_text())["metrics"] for p in (runs[0], runs[-1]))
        t = self.cfg.duplex.eval_temperature
        print(f"\nheld-out duplex dialogues ({len(self.cfg.duplex.kinds)} kinds x {self.cfg.duplex.heldout_per_kind}), "
              f"{'greedy' if t == 0 else f'sampled at temperature {t:g}'} on the "
              f"{self.cfg.duplex.chunk_seconds * 1000:.0f} ms clock:")
        print(f"{'metric':<40} {'target':>7} {'after SFT':>10} {'after GRPO':>11}  met")
        result = {"minutes": minutes, "sft heldout loss": sft.get("held-out chunk loss after", float("nan"))}
        for key, label, target, met in TARGETS:
            b, a = before.get(key, float("nan")), after.get(key, float("nan"))
            print(f"{label:<40} {target:>7} {b:>10.3f} {a:>11.3f}  {'yes' if np.isfinite(a) and met(a) else 'no'}")
            result[f"{key} sft"], result[f"{key} rl"] = b, a
        for key in ("duplex/response_within_2", "duplex/barge_in", "duplex/false_call", "duplex/interrupted_speaking",
                    "duplex/interrupt_stop_latency"):
            print(f"{key.split('/')[1]:<40} {'':>7} {before.get(key, float('nan')):>10.3f} "
                  f"{after.get(key, float('nan')):>11.3f}")
        print("(a policy that never speaks takes over no pause: read the pause rate beside the response latency; "
              "stops are measured where it was speaking as the user cut in, interrupted_speaking of them)")
        print(f"({minutes:.1f} min)  timelines: {Path(rl['run']) / 'duplex'}")
        return result
