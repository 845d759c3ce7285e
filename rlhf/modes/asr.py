"""ASR: audio in, transcript out. Prompt = the clip + "Transcribe the audio."; reply = transcript
tokens, then <|im_end|>. Rewards read the clip (`audio`, `sample_rate`) and the reference `text`;
held-out WER/CER is decoded greedily by the policy worker's transformers model (the same numbers
SFT reports), not by the engines."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np

from speechrl.rewards.asr import char_error_rate, word_error_rate
from speechrl.rlhf.core.config import RecipeConfig, RecipeError
from speechrl.rlhf.core.intervals import write_example_scores
from speechrl.rlhf.core.registry import MODES
from speechrl.rlhf.model.backbone import IM_END, text_token_ids
from speechrl.rlhf.model.prompts import render_prompt
from speechrl.rlhf.modes.base import Mode, batch_indices, first
from speechrl.rlhf.modes.pairs import PreferenceRow, read_pair_rows
from speechrl.rollouts.local import greedy_transcribe
from speechrl.rollouts.types import RolloutRequest

log = logging.getLogger(__name__)


class AsrTask:
    def __init__(self, cfg: RecipeConfig, processor):
        self.cfg, self.processor, self.tokenizer = cfg, processor, processor.tokenizer
        self.prompt = render_prompt(processor, "asr")
        self.allowed_ids = text_token_ids(self.tokenizer)
        self.stop_ids: Optional[list[int]] = None  # the end-of-turn is vLLM's eos already
        self.reward_codec = None
        self._prompt_ids: dict[str, list[int]] = {}

    def request(self, ex, audio: np.ndarray, dataset=None) -> RolloutRequest:
        return RolloutRequest(self.prompt, audio, self.cfg.data.sample_rate,
                              {"id": ex.id, "text": ex.text, "speaker": ex.speaker})

    def sft_example(self, ex, audio: np.ndarray, dataset=None) -> tuple[list[int], list[int], Optional[np.ndarray]]:
        """(prompt ids, completion ids, the clip the prompt's audio placeholder stands for)."""
        from speechrl.rlhf.model.logprobs import prompt_ids_for

        # prompt ids depend on the clip only through its length (placeholder count): once per example
        if ex.id not in self._prompt_ids:
            self._prompt_ids[ex.id] = prompt_ids_for(self.processor, self.prompt, audio)
        target = self.tokenizer(ex.text, add_special_tokens=False)["input_ids"]
        return self._prompt_ids[ex.id], target + [self.tokenizer.convert_tokens_to_ids(IM_END)], audio


def projector_ctc_loss(model, batch, end_id: int) -> "torch.Tensor":
    """CTC of each clip's projected audio frames against its transcript (the completion without its
    end token). A frame's logits are its dot products with the decoder's input embeddings (detached:
    only what makes the audio embeddings trains), the blank being the audio placeholder's row; so the
    loss falls as the projector puts each spoken token's own embedding where the decoder reads it."""
    import torch
    import torch.nn.functional as F

    from speechrl.rlhf.model.logprobs import audio_model

    index = batch.audio_index if batch.audio_index is not None else torch.arange(len(batch.input_ids),
                                                                                 device=batch.input_ids.device)
    targets = {}
    for row, clip in enumerate(index.tolist()):  # rows sharing a clip share its transcript
        ids = batch.input_ids[row, 1:][batch.completion_mask[row]]
        targets.setdefault(clip, ids[:-1] if len(ids) and int(ids[-1]) == end_id else ids)
    logp = _frame_logprobs(model, batch.input_features, batch.feature_attention_mask)
    frames = max(len(x) for x in logp)
    padded = torch.stack([F.pad(x, (0, 0, 0, frames - len(x))) for x in logp], dim=1)  # [T, N, V]
    return F.ctc_loss(padded, torch.cat([targets[i] for i in range(len(logp))]),
                      torch.tensor([len(x) for x in logp]), torch.tensor([len(targets[i]) for i in range(len(logp))]),
                      blank=audio_model(model).config.audio_token_id, zero_infinity=True)


def _frame_logprobs(model, features, feature_mask) -> list:
    """Per clip, [frames, vocab] log-probs of the projected audio frames over the decoder's input
    embeddings (detached), the classifier of projector_ctc_loss."""
    from speechrl.rlhf.model.logprobs import audio_model, encode_audio

    table = audio_model(model).get_input_embeddings().weight.detach()
    clips = encode_audio(model, features, feature_mask)  # a frozen tower: cached (tower_cache.py)
    return [(c @ table.T).float().log_softmax(-1) for c in clips]


def ctc_transcribe(model, processor, audios: list) -> list[str]:
    """Greedy CTC reading of the projector's frames (repeats merged, blanks dropped): what the audio
    embeddings already say before the decoder reads them; logged as eval/ctc_wer when asr.ctc_weight > 0."""
    import torch

    from speechrl.rlhf.model.logprobs import audio_features, audio_model

    blank = audio_model(model).config.audio_token_id
    texts = []
    with torch.no_grad():
        for i in range(0, len(audios), 16):
            features = [t.to(model.device) for t in audio_features(processor, audios[i : i + 16])]
            for logp in _frame_logprobs(model, *features):
                ids = torch.unique_consecutive(logp.argmax(-1))
                texts.append(processor.tokenizer.decode(ids[ids != blank].tolist(), skip_special_tokens=True).strip())
    return texts


def log_examples(result: dict, log) -> dict:
    """Log (and drop from `result`) the few ref/hyp pairs kept for eyeballing; returns the metrics."""
    for ref, hyp in result.pop("examples"):
        log.info("eval  ref: %s\n      hyp: %s", ref, hyp)
    return result


def evaluate_asr(model, processor, dataset, *, max_examples: int, max_new_tokens: int, ctc: bool = False) -> dict:
    """Mean WER/CER over the first `max_examples` held-out clips, a few examples to eyeball and every
    clip's scores (`rows`: id, reference, transcript, eval/wer, eval/cer); with `ctc`, also the WER of the
    projector's greedy CTC reading of the same clips (eval/ctc_wer)."""
    items = first(dataset, max_examples)
    audios, refs = [a for _, a in items], [ex.text for ex, _ in items]
    hyps = greedy_transcribe(model, processor, audios, max_new_tokens=max_new_tokens)
    wers = [word_error_rate(h, r) for h, r in zip(hyps, refs)]
    cers = [char_error_rate(h, r) for h, r in zip(hyps, refs)]
    rows = [{"id": str(ex.id), "text": r, "transcript": h, "eval/wer": w, "eval/cer": c}
            for (ex, _), r, h, w, c in zip(items, refs, hyps, wers, cers)]
    result = {"eval/wer": float(np.mean(wers)), "eval/cer": float(np.mean(cers)),
              "examples": list(zip(refs[:3], hyps[:3])), "rows": rows}
    if ctc:
        ctc_wers = [word_error_rate(h, r) for h, r in zip(ctc_transcribe(model, processor, audios), refs)]
        result["eval/ctc_wer"] = float(np.mean(ctc_wers))
        for row, w in zip(rows, ctc_wers):
            row["eval/ctc_wer"] = w
    return result


def heldout_asr(model, processor, dataset, max_examples: int, max_new_tokens: int) -> dict:
    """`evaluate_asr` with its examples as plain strings: what a Ray worker sends back."""
    result = evaluate_asr(model, processor, dataset, max_examples=max_examples, max_new_tokens=max_new_tokens)
    result["examples"] = [list(map(str, e)) for e in result["examples"]]
    return result


SCORES_GLOB = "scores/step-*.jsonl"  # every held-out clip's WER/CER at each evaluation, under a run's folder


def write_rows(result: dict, out_dir: Path, step: int) -> dict:
    """Write (and drop from `result`) its per-clip rows as `<out_dir>/scores/step-<step>.jsonl`."""
    write_example_scores(Path(out_dir) / SCORES_GLOB.replace("*", str(step)), result.pop("rows"))
    return result


@MODES.register("asr")
class AsrMode(Mode):
    name = "asr"
    algorithms = ("sft", "grpo", "ppo", "online_dpo", "dpo", "mtp_heads")
    default_algorithm = "grpo"
    headlines = [("held-out WER", "eval/wer"), ("held-out CER", "eval/cer")]
    example_scores_glob = SCORES_GLOB
    example_unit = "clips"
    # SFT stops while the model still confuses words, so GRPO has errors left to remove in the demo
    demo_sft_overrides = ["train.steps=150", "train.eval_every=150", "train.checkpoint_every=150"]

    transcribes = True
    examples: list = []  # the last offline evaluation's (ref, hyp) pairs, printed by `speechrl eval`

    @classmethod
    def check(cls, cfg: RecipeConfig, source: str) -> None:
        if cfg.algorithm == "reward_model":  # said before the generic "not implemented": why, and what instead
            raise RecipeError(f"{source}: `algorithm: reward_model` is not implemented for mode 'asr', and need not "
                              "be: ASR's reward is verifiable (WER against the reference transcript, `asr_wer`), so "
                              "there is nothing for a learned reward to add. To learn from ranked transcripts, use "
                              "asr/online_dpo (pairs from the policy's own samples) or asr/dpo (dpo.data=<pairs>)")
        super().check(cfg, source)

    def transcriber(self, model, processor):
        return lambda audios: greedy_transcribe(model, processor, list(audios),
                                                max_new_tokens=self.cfg.eval_max_new_tokens)

    def sft_loss(self, model, batch, heads=None) -> tuple:
        loss, metrics = super().sft_loss(model, batch, heads)
        weight = self.cfg.asr.ctc_weight
        if not weight:
            return loss, metrics
        ctc = projector_ctc_loss(model, batch, self.task.tokenizer.convert_tokens_to_ids(IM_END))
        return loss + weight * ctc, {"token_loss": loss.item(), **metrics, "ctc_loss": ctc.item()}

    def make_task(self, processor, codec=None) -> AsrTask:
        return AsrTask(self.cfg, processor)

    def setup_online(self, run_dir: Path, logger, window_seconds: float) -> None:
        self.train_set, self.eval_set = self.datasets(window_seconds)
        self.run_dir = Path(run_dir)  # where each evaluation's per-clip scores go
        self.audio_paths = {ex.id: ex.audio for ex, _ in self.train_set.items}  # for online DPO's saved pairs

    def rollout(self, step: int, generate) -> tuple[list[RolloutRequest], list]:
        idx = batch_indices(len(self.train_set), self.cfg.rl.prompts_per_step, step, self.cfg.seed)
        requests = [self.task.request(*self.train_set[int(i)], self.train_set) for i in idx]
        return requests, generate(requests)

    def reward_columns(self, samples, requests) -> dict:
        # each prompt's clip once per sample; the object store ships each distinct array once
        return {"sample_rate": self.cfg.data.sample_rate, "audio": [requests[s.prompt_index].audio for s in samples]}

    def rollout_row(self, sample) -> dict:
        return {"completion": sample.text}

    def save_pairs(self, path: Path, step: int, samples, total: np.ndarray, pairs: list[tuple[int, int]]) -> None:
        """Online DPO's pairs of one round, one JSON row each: the clip (its id, corpus audio file and
        reference transcript) and the better and worse sampled transcripts with their rewards."""
        import json

        def transcript(i: int) -> dict:  # the sampled ids too: offline DPO trains on them, not on re-tokenized text
            return {"text": samples[i].text, "completion_ids": [int(t) for t in samples[i].completion_ids],
                    "reward": float(total[i])}

        rows = [{"id": samples[c].metadata["id"], "audio": self.audio_paths.get(samples[c].metadata["id"]),
                 "reference": samples[c].metadata["text"], "chosen": transcript(c), "rejected": transcript(r)}
                for c, r in pairs]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))

    def preference_rows(self, source: str) -> tuple[list[PreferenceRow], dict]:
        """Pairs of transcripts of one clip, as `save_pairs` writes them: a .jsonl file, or a folder of
        them (an online DPO run's `pairs/`). Each row needs `audio` (a file) and `chosen`/`rejected`
        with their sampled `completion_ids` (online DPO saves them) or, in a file made by hand, their
        `text`; a bad row is skipped with a warning naming its file, line and field, or stops the run
        under data.on_bad_example=fail."""
        from speechrl.data.audio import load_audio
        from speechrl.rlhf.model.logprobs import prompt_ids_for

        end = [self.task.tokenizer.convert_tokens_to_ids(IM_END)]
        fe = self.task.processor.feature_extractor
        window = fe.n_samples / fe.sampling_rate  # the encoder's window: a longer clip is a bad row
        clips: dict[str, tuple] = {}  # audio file -> (clip, prompt ids): each read once, shared by its pairs
        allowed = set(self.task.allowed_ids)

        def completion(reply, key: str) -> list[int]:
            """The sampled ids where the row has them (token in, token out); else the text, tokenized."""
            if not isinstance(reply, dict):
                raise ValueError(f"`{key}` must be {{\"text\": ...}} or {{\"completion_ids\": [...]}}")
            ids = reply.get("completion_ids")
            if ids is not None:
                if not ids or not all(isinstance(t, int) and t in allowed for t in ids):
                    raise ValueError(f"`{key}.completion_ids` must be transcript token ids (ASR's decoding constraint)")
                return list(ids)
            if not isinstance(reply.get("text"), str):
                raise ValueError(f"`{key}.text` must be a transcript (it may be empty)")
            return self.task.tokenizer(reply["text"], add_special_tokens=False)["input_ids"] + end

        def row_of(row: dict) -> PreferenceRow:
            audio = row.get("audio")
            if not isinstance(audio, str):
                raise ValueError("`audio` must name the clip's file")
            chosen, rejected = (completion(row.get(key), key) for key in ("chosen", "rejected"))
            if audio not in clips:
                clip = load_audio(audio, self.cfg.data.sample_rate, max_seconds=window)
                clips[audio] = (clip, prompt_ids_for(self.task.processor, self.task.prompt, clip))
            clip, prompt = clips[audio]
            return PreferenceRow(prompt, chosen, rejected, clip)

        return read_pair_rows(source, row_of, self.cfg.data.on_bad_example)

    def evaluate_online(self, step, generate, score_batch, score, policy) -> dict:
        c = self.cfg
        result = policy.with_model(heldout_asr, self.eval_set, c.data.max_eval_examples, c.eval_max_new_tokens)
        return log_examples(write_rows(result, self.run_dir, step), log)

    def evaluate_offline(self, step, model, processor, eval_set, run_dir, logger) -> dict:
        result = evaluate_asr(model, processor, eval_set, max_examples=self.cfg.data.max_eval_examples,
                              max_new_tokens=self.cfg.eval_max_new_tokens, ctc=bool(self.cfg.asr.ctc_weight))
        self.examples = list(result["examples"])  # what `speechrl eval` prints beside the metrics
        return log_examples(write_rows(result, run_dir, step), log)

    def report_checkpoint(self, metrics: dict, out_dir: Path) -> str:
        pairs = [f"ref: {ref}\nhyp: {hyp}" for ref, hyp in self.examples]
        return "\n".join([*pairs, " ".join(f"{k}={v:.4f}" for k, v in metrics.items())])
