"""TTS: text in, codec tokens out. Prompt = [voice prompt] + "Say: <text>"; reply = codec tokens of
the recipe's codec, then <|codec_end|>. Rewards get the codec ids and decode them to audio on
their side; held-out texts are synthesized (on the engines in RL, in-process in SFT/DPO), scored
by the recipe's rewards and written as wav samples (tts_eval.py)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from speechrl.rlhf.core.config import RecipeConfig, RecipeError
from speechrl.rlhf.core.registry import MODES
from speechrl.rlhf.model.backbone import codec_token_ids
from speechrl.rlhf.model.prompts import render_tts_prompt
from speechrl.rlhf.modes.base import Mode, batch_indices
from speechrl.rlhf.modes.pairs import PreferenceRow, RewardModelPairs, RewardPair
from speechrl.rlhf.modes.tts_eval import SCORES, TtsEvaluation
from speechrl.rollouts.types import RolloutRequest

log = logging.getLogger(__name__)


class SpeakingTask:
    """What the modes that emit codec tokens share: the recipe's codec (built once, or the one
    given), its tokens in the backbone's vocabulary, and `<|codec_end|>` as the stop token."""

    def __init__(self, cfg: RecipeConfig, processor, codec=None):
        from speechrl.rlhf.modes.assets import codec_spec
        from speechrl.rollouts.codec import CodecTokens

        self.cfg, self.processor, self.tokenizer = cfg, processor, processor.tokenizer
        self.codec_spec = codec_spec(cfg)
        self.codec = codec or self.codec_spec.build()
        self.tokens = CodecTokens(self.tokenizer, self.codec)
        self.stop_ids = [self.tokens.end_id]
        self._targets: dict[str, list[int]] = {}  # example id -> the completion ids it is trained toward


def check_codec_fits_the_tiny_backbone(cfg: RecipeConfig, source: str) -> None:
    """The embedded codec's ids must fit the embedded backbone's codec-token block; otherwise the
    run would stop at its first encode (rollouts/codec.py). Other backbones are checked there."""
    c, tiny = cfg.tts.embedded_codec, cfg.model.tiny
    embedded = not (cfg.tts.codec or cfg.model.path or cfg.model.pretrained or cfg.run.init_from)
    if embedded and c.num_codebooks * c.codebook_size > tiny.num_codec_tokens:
        raise RecipeError(f"{source}: the embedded codec needs `tts.embedded_codec.num_codebooks` x "
                          f"`tts.embedded_codec.codebook_size` = {c.num_codebooks * c.codebook_size} codec tokens, but "
                          f"`model.tiny.num_codec_tokens` is {tiny.num_codec_tokens}; lower the codec or raise the backbone's")


class TtsTask(SpeakingTask):
    def __init__(self, cfg: RecipeConfig, processor, codec=None):
        from speechrl.rollouts.codec import vocab_size

        super().__init__(cfg, processor, codec)
        self.allowed_ids = codec_token_ids(self.tokenizer, vocab_size(self.codec))
        self.reward_codec = self.codec_spec
        self._voices: dict[str, list[int]] = {}

    # --- prompts ---------------------------------------------------------------------------------
    def render(self, text: str, voice_ids: Optional[list[int]] = None) -> str:
        return render_tts_prompt(self.processor, text, voice_ids)

    def prompt_ids(self, text: str, voice_ids: Optional[list[int]] = None) -> list[int]:
        return self.tokenizer(self.render(text, voice_ids), add_special_tokens=False)["input_ids"]

    def encode(self, audio: np.ndarray, sample_rate: int, max_seconds: Optional[float] = None) -> list[int]:
        """A clip as the backbone's codec token ids (no end token)."""
        if max_seconds:
            audio = audio[: int(max_seconds * sample_rate)]
        return self.tokens.to_backbone(self.codec.encode(audio, sample_rate))

    def target(self, ex, audio: np.ndarray) -> list[int]:
        if ex.id not in self._targets:
            self._targets[ex.id] = self.encode(audio, self.cfg.data.sample_rate) + [self.tokens.end_id]
        return self._targets[ex.id]

    def voice(self, ex, dataset) -> Optional[list[int]]:
        """With tts.voice_prompt: another clip of the example's speaker, as codec token ids; None otherwise."""
        if not self.cfg.tts.voice_prompt:
            return None
        if ex.id not in self._voices:
            ref = _reference_clip(ex, dataset)
            self._voices[ex.id] = [] if ref is None else self.encode(ref, self.cfg.data.sample_rate,
                                                                       self.cfg.tts.max_voice_seconds)
        return self._voices[ex.id] or None

    # --- what trainers and rollouts take ---------------------------------------------------------
    def request(self, ex, audio: np.ndarray, dataset=None) -> RolloutRequest:
        voice = self.voice(ex, dataset) if dataset is not None else None
        meta = {"id": ex.id, "text": ex.text, "speaker": ex.speaker}
        if voice:
            meta["reference_codec_ids"] = self.tokens.from_backbone(voice)
        return RolloutRequest(self.render(ex.text, voice), None, self.cfg.data.sample_rate, meta)

    def sft_example(self, ex, audio: np.ndarray, dataset=None) -> tuple[list[int], list[int], None]:
        voice = self.voice(ex, dataset) if dataset is not None else None
        return self.prompt_ids(ex.text, voice), self.target(ex, audio), None

    def codec_ids(self, completion_ids: list[int]) -> list[int]:
        """A completion's codec-local ids (up to `<|codec_end|>`), what the reward side decodes."""
        return self.tokens.from_backbone(completion_ids)


def _reference_clip(ex, dataset) -> Optional[np.ndarray]:
    """The first other example of the same speaker in `dataset` (deterministic), or None."""
    for other, audio in dataset.items:
        if other.speaker == ex.speaker and other.id != ex.id:
            return audio
    return None


def rl_prompt_pool(cfg: RecipeConfig, eval_set) -> Optional[list]:
    """RL prompts from `tts.prompt_texts` (see its comment), held-out texts left out; None = the train set.

    "grammar" keeps the SFT texts: the grammar has about 350 sentences and the corpus reads most of
    them, so leaving those out too left 80 prompts, and from one SFT checkpoint GRPO then ended at
    held-out CER 0.79 against 0.70 with them kept (docs/results.md, TTS demo)."""
    from speechrl.data.manifest import Example
    from speechrl.data.synth import command_sentences, read_text_list
    from speechrl.rlhf.modes.assets import corpus_texts

    source = cfg.tts.prompt_texts
    if not source:
        return None
    if source == "grammar" or (source == "corpus" and not cfg.data.synthetic.texts):
        texts = command_sentences(5000, seed=cfg.seed + 1)
    elif source == "corpus":  # the corpus' own sentences: a text file, the composed commands or SmolLM2's
        texts = corpus_texts(cfg)
    else:
        texts = read_text_list(source)
    held = {ex.text for ex, _ in eval_set.items}
    texts = list(dict.fromkeys(t for t in texts if t.strip() and t not in held))
    if not texts:
        raise RecipeError(f"tts.prompt_texts={source!r}: no prompt texts left after removing the held-out ones")
    log.info("RL prompts: %d texts from %s (held-out texts left out)", len(texts), source)
    return [Example(id=f"prompt-{i:05d}", text=t) for i, t in enumerate(texts)]


@MODES.register("tts")
class TtsMode(Mode):
    name = "tts"
    algorithms = ("sft", "grpo", "ppo", "dpo", "online_dpo", "reward_model", "mtp_heads")
    default_algorithm = "grpo"
    offline_evaluation_scores = True  # held-out synthesis is scored by the recipe's rewards (the judge ASR)
    # the reward caps each sample's error at error_cap (1): the mean uncapped CER is ruled by the few
    # samples a judge hears as long hallucinations, so the capped one (what GRPO optimizes) is shown too
    headlines = [("held-out intelligibility CER", "eval/tts_intelligibility/cer"),
                 ("held-out intelligibility reward (-CER capped)", "eval/tts_intelligibility/reward"),
                 ("held-out intelligibility WER", "eval/tts_intelligibility/wer"),
                 ("held-out DNSMOS", "eval/dnsmos/reward"),
                 ("held-out sanity penalty", "eval/speech_sanity/reward"),
                 ("held-out speaking rate (chars/s)", "eval/speech_sanity/chars_per_second"),
                 ("held-out samples ended by <|codec_end|>", "eval/ended")]
    example_scores_glob = f"samples/step-*/{SCORES}"  # every completion of each evaluation (tts_eval.py)
    example_unit = "texts"

    offline_evaluation: Optional[TtsEvaluation] = None  # SFT/DPO/eval's held-out set, built at the first evaluation

    @classmethod
    def check(cls, cfg: RecipeConfig, source: str) -> None:
        super().check(cfg, source)
        check_codec_fits_the_tiny_backbone(cfg, source)

    def make_task(self, processor, codec=None) -> TtsTask:
        return TtsTask(self.cfg, processor, codec)

    def setup_online(self, run_dir: Path, logger, window_seconds: float) -> None:
        self.train_set, self.eval_set = self.datasets(window_seconds)
        self.prompt_pool = rl_prompt_pool(self.cfg, self.eval_set)
        self.evaluation = TtsEvaluation(self.cfg, self.task, self.eval_set, run_dir, logger)

    def rollout(self, step: int, generate) -> tuple[list[RolloutRequest], list]:
        k, seed = self.cfg.rl.prompts_per_step, self.cfg.seed
        if self.prompt_pool is not None:  # text-only prompts: no clip, no voice prompt
            idx = batch_indices(len(self.prompt_pool), k, step, seed)
            requests = [self.task.request(self.prompt_pool[int(i)], None) for i in idx]
        else:
            idx = batch_indices(len(self.train_set), k, step, seed)
            requests = [self.task.request(*self.train_set[int(i)], self.train_set) for i in idx]
        return requests, generate(requests)

    def reward_columns(self, samples, requests) -> dict:
        return {"codec_ids": [self.task.codec_ids(s.completion_ids) for s in samples]}  # decoded reward-side

    def rollout_row(self, sample) -> dict:
        row = {"codec_ids": [int(c) for c in self.task.codec_ids(sample.completion_ids)]}
        if sample.metadata.get("reference_codec_ids") is not None:
            row["voice_codec_ids"] = [int(c) for c in sample.metadata["reference_codec_ids"]]
        return row

    def evaluate_online(self, step, generate, score_batch, score, policy) -> dict:
        # held-out synthesis on the engines, which hold the policy's current weights
        requests = [RolloutRequest(p, None, self.cfg.data.sample_rate) for p in self.evaluation.prompts]
        samples = generate(requests, n=self.evaluation.repeats, temperature=self.cfg.tts.eval_temperature,
                           max_new_tokens=self.cfg.eval_max_new_tokens)
        return self.evaluation.evaluate(step, [s.completion_ids for s in samples], score_batch)

    def save_pairs(self, path: Path, step: int, samples, total: np.ndarray, pairs: list[tuple[int, int]]) -> None:
        """Pairs in the preference format (docs/preferences.md): offline DPO reads them back."""
        from speechrl.data.preferences import PreferencePair, Speech, write_preferences

        codec = self.task.codec_ids
        rows = [PreferencePair(
            id=f"round{step}-{samples[c].metadata.get('id', c)}", text=samples[c].metadata["text"],
            chosen=Speech(codec_ids=tuple(codec(samples[c].completion_ids))),
            rejected=Speech(codec_ids=tuple(codec(samples[r].completion_ids))),
            annotator="rewards:" + "+".join(spec.key for spec in self.cfg.rewards),
            reason=f"total reward {total[c]:.3f} vs {total[r]:.3f}")
            for c, r in pairs if codec(samples[c].completion_ids) and codec(samples[r].completion_ids)]
        write_preferences(path, rows)

    def preference_rows(self, source: str) -> tuple[list[PreferenceRow], dict]:
        """The preference format (docs/preferences.md): each pair's text (and voice) as the prompt, its
        chosen and rejected speech as the recipe codec's ids."""
        from speechrl.data.preferences import encode_pairs, read_preferences

        on_bad = self.cfg.data.on_bad_example
        pairs = read_preferences(source, on_bad=on_bad)
        encoded = encode_pairs(pairs, self.task.codec, on_bad=on_bad)
        log.info("preference pairs: %d usable of %d (%d bad rows, %d not encodable)", len(encoded),
                 pairs.num_pairs, len(pairs.bad), len(encoded.bad))
        task, end = self.task, self.task.tokens.end_id
        rows = [PreferenceRow(task.prompt_ids(p.pair.text, None if p.voice is None else task.tokens.to_backbone(p.voice)),
                              task.tokens.to_backbone(p.chosen) + [end], task.tokens.to_backbone(p.rejected) + [end],
                              None) for p in encoded]
        return rows, {"read": pairs.summary(), "encoded": encoded.summary()}

    def reward_model_pairs(self, source: str, processor, codec) -> RewardModelPairs:
        """The reward model's pairs (`reward_model.data`: the preference format, a file, folder or glob
        of them), each side the TTS prompt and its speech as `codec`'s tokens; grouped by text."""
        import glob
        import os

        from speechrl.data.preferences import encode_pairs, read_preferences
        from speechrl.rewards.learned import preference_sequence
        from speechrl.rollouts.codec import CodecTokens

        on_bad, tokens = self.cfg.data.on_bad_example, CodecTokens(processor.tokenizer, codec)
        files = [read_preferences(path, on_bad=on_bad) for path in sorted(glob.glob(os.path.expanduser(source)))]
        read, bad = sum(f.num_pairs for f in files), [str(e) for f in files for e in f.bad]
        encoded = encode_pairs([p for f in files for p in f], codec, on_bad=on_bad)
        log.info("preference pairs: %d usable of %d in %d file(s) (%d bad rows, %d not encodable)", len(encoded),
                 read, len(files), len(bad), len(encoded.bad))

        def seq(p, ids):
            return preference_sequence(processor, tokens, p.pair.text, ids, p.voice)
        pairs = [RewardPair(p.pair.text.strip(), seq(p, p.chosen), seq(p, p.rejected)) for p in encoded]
        return RewardModelPairs(pairs, read, bad + [str(e) for e in encoded.bad], split_by="text",
                                sequence=render_tts_prompt(processor, "<text>") + "<codec tokens><|codec_end|>")

    def evaluate_offline(self, step, model, processor, eval_set, run_dir, logger) -> dict:
        from speechrl.rewards.worker import RewardWorker
        from speechrl.rollouts.local import synthesize_ids

        if self.offline_evaluation is None:  # built once: it writes the reference clips
            self.offline_evaluation = TtsEvaluation(self.cfg, self.task, eval_set, run_dir, logger)
            # the rewards, in this process: SFT, offline DPO and `speechrl eval` run without Ray
            self.scorer = RewardWorker(self.cfg.rewards, self.task.codec_spec)
        evaluation = self.offline_evaluation
        prompts = [p for p in evaluation.prompt_ids for _ in range(evaluation.repeats)]
        with torch.random.fork_rng():  # the same draws at every evaluation; training's RNG untouched
            torch.manual_seed(self.cfg.seed)
            completions = synthesize_ids(model, self.task, prompts, max_new_tokens=self.cfg.eval_max_new_tokens,
                                         temperature=self.cfg.tts.eval_temperature)
        return evaluation.evaluate(step, completions, self.scorer.score)

    def report_checkpoint(self, metrics: dict, out_dir: Path) -> str:
        return "\n".join([*(f"{k}={v:.4f}" for k, v in metrics.items()),
                          f"samples: {self.offline_evaluation.samples_dir}"])

    def demo_report(self, sft: dict, rl: dict, minutes: float) -> dict:
        result = super().demo_report(sft, rl, minutes)
        labels = [k[: -len(" before")] for k in sft if k.endswith(" before")]
        width = max(len(label) for label in labels)
        lines = [f"{'':<{width}}  {'untrained':>9}  {'SFT':>9}  {'GRPO':>9}"]
        for label in labels:
            values = (sft[f"{label} before"], sft[f"{label} after"], rl.get(f"{label} after", float("nan")))
            lines.append(f"{label:<{width}}  " + "  ".join(f"{v:>9.3f}" for v in values))
        print("\n".join(lines))
        print(f"listen: {sft['run']}/samples/step-*/  and  {rl['run']}/samples/step-*/ "
              "(reference/ holds the corpus recordings and their codec round trip)")
        return result
