"""`learned_preference`: a reward model trained on preference pairs (trainers/reward_model.py) as a reward.

It scores what the policy wrote at `<|codec_end|>`, one forward per batch: a TTS model the TTS prompt,
voice prompt and codec tokens; a realtime model the dialogue as text (card, history, the user's turn)
and the reply's text and codec tokens. Bradley–Terry fixes only differences between samples, not the
scale, so `normalize: true` suits it. A model is a directory or a name from `reward_model.register_as`
(a pointer in `<cache>/reward_models/NAME.json`; cache: `cache_dir`, else $SPEECHRL_CACHE_DIR, else
~/.cache/speechrl).
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator, Optional, Sequence

from speechrl.rewards.api import Unscored
from speechrl.rlhf.core.registry import REWARD_NAME

META_FILE = "reward_model.json"  # written last into a model directory: marks it whole
DECODE_ONLY = ("griffin_lim_iters", "smooth_frames")  # embedded-codec settings that do not change its ids
SCORED_MODES = ("tts", "realtime")  # the modes whose replies a reward model can be trained on and score


def default_cache_dir() -> Path:
    """$SPEECHRL_CACHE_DIR, else ~/.cache/speechrl (the default run.cache_dir)."""
    return Path(os.environ.get("SPEECHRL_CACHE_DIR") or "~/.cache/speechrl").expanduser()


def registry_dir(cache_dir: Optional[str | Path] = None) -> Path:
    return (Path(cache_dir).expanduser() if cache_dir else default_cache_dir()) / "reward_models"


def registered_names(cache_dir: Optional[str | Path] = None) -> list[str]:
    return sorted(p.stem for p in registry_dir(cache_dir).glob("*.json"))


def register_model(name: str, model_dir: Path, cache_dir: str | Path, info: dict) -> Path:
    """Point `name` at `model_dir` (replacing an earlier model of that name); returns the pointer file."""
    if not REWARD_NAME.fullmatch(name):
        raise ValueError(f"reward model name {name!r}: use letters, digits, _ and -")
    path = registry_dir(cache_dir) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")  # atomic: a reward worker never reads half a pointer
    tmp.write_text(json.dumps({"path": str(Path(model_dir).resolve()), **info}, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def resolve_model_dir(model: str, cache_dir: Optional[str | Path] = None) -> Path:
    """The reward-model directory `model` names: a path, or a registered name."""
    path = Path(str(model)).expanduser()
    if (path / META_FILE).is_file():
        return path
    pointer = registry_dir(cache_dir) / f"{model}.json"
    if REWARD_NAME.fullmatch(str(model)) and pointer.is_file():
        target = Path(json.loads(pointer.read_text())["path"])
        if not (target / META_FILE).is_file():
            raise FileNotFoundError(f"reward model {model!r}: {pointer} points at {target}, which is no longer a "
                                    f"reward-model directory (no {META_FILE}); train it again or delete {pointer}")
        return target
    if path.exists() or not REWARD_NAME.fullmatch(str(model)):
        problem = f"no {META_FILE} in {path}" if path.is_dir() else f"{path} is not a directory"
        raise FileNotFoundError(f"reward model {model!r}: {problem}; point `model` at a reward-model run's final/ "
                                "(speechrl train <mode>/reward_model) or at a registered name")
    raise FileNotFoundError(
        f"reward model {model!r}: not a directory, nor a name registered in {registry_dir(cache_dir)} (registered: "
        f"{', '.join(registered_names(cache_dir)) or 'none'}). Train one with `speechrl train <tts|realtime>/reward_model "
        f"reward_model.data=pairs.jsonl reward_model.register_as={model}`, or, if it was registered under another "
        "run.cache_dir, pass that as the reward's cache_dir or set SPEECHRL_CACHE_DIR")


def read_meta(model_dir: Path) -> dict:
    return json.loads((Path(model_dir) / META_FILE).read_text())


def codec_identity(spec) -> dict:
    """What decides which audio a codec id stands for (a rollouts.codec.CodecSpec): the codec's
    directory, or the embedded codec's settings less those only decoding reads."""
    if spec.path:
        return {"path": str(Path(spec.path).expanduser().resolve())}
    settings = {k: v for k, v in dict(spec.embedded).items() if k not in DECODE_ONLY}
    fit_on, clips = settings.pop("fit_on", "espeak"), settings.pop("fit_clips", None)
    identity = {"embedded": settings}
    if fit_on == "corpus":  # codebooks fit on the recipe's corpus: its manifest decides them too
        import hashlib

        manifest = hashlib.sha1(Path(spec.fit_manifest).expanduser().read_bytes()).hexdigest()[:12]
        identity["fit"] = {"clips": clips, "manifest": manifest}
    return identity


def codec_tokens(tokenizer, meta: dict):
    """The codec-id <-> backbone-token map the model was trained with. Only the codec's shape
    decides it, so the codec itself need not be built (a stand-in with its shape serves)."""
    from speechrl.rollouts.codec import CodecTokens

    return CodecTokens(tokenizer, SimpleNamespace(**meta["codec_shape"]))


def preference_sequence(processor, tokens, text: str, codec_ids: Sequence[int],
                        voice: Optional[Sequence[int]] = None) -> list[int]:
    """What the reward model reads, as the policy wrote it: the TTS prompt (`voice`, codec-local
    ids, as its voice prompt), the codec tokens of `codec_ids`, `<|codec_end|>`."""
    from speechrl.rlhf.model.prompts import render_tts_prompt

    voice_ids = tokens.to_backbone(voice) if voice is not None and len(voice) else None
    prompt = processor.tokenizer(render_tts_prompt(processor, text, voice_ids), add_special_tokens=False)["input_ids"]
    return list(prompt) + tokens.to_backbone(codec_ids) + [tokens.end_id]


def dialogue_sequence(processor, tokens, persona: str, history, user_text: str, reply_text: Optional[str],
                      codec_ids: Sequence[int]) -> list[int]:
    """What a realtime reward model reads: the realtime prompt with the user's turn as text, then the
    reply laid out as the policy writes it (its text tokens, codec tokens, `<|codec_end|>`). Rebuilt
    from text and codec-local ids rather than the sampled ids: the model's tokenizer need not be the
    policy's, and a pair file and a reward batch then give it one and the same sequence."""
    from speechrl.rlhf.model.prompts import render_realtime_text_prompt

    tokenizer = processor.tokenizer
    prompt = tokenizer(render_realtime_text_prompt(processor, persona, history, user_text),
                       add_special_tokens=False)["input_ids"]
    reply = tokenizer(reply_text, add_special_tokens=False)["input_ids"] if reply_text else []
    return list(prompt) + list(reply) + tokens.to_backbone(codec_ids) + [tokens.end_id]


def score_sequences(model, seqs: list[list[int]], pad_id: int, batch_size: int = 32):
    """The model's scalar for each token sequence (a float tensor on the CPU), without gradients."""
    import torch
    from torch.nn.utils.rnn import pad_sequence

    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for start in range(0, len(seqs), batch_size):
            chunk = [torch.tensor(s, dtype=torch.long) for s in seqs[start:start + batch_size]]
            ids = pad_sequence(chunk, batch_first=True, padding_value=pad_id)  # right padding
            lengths = torch.tensor([len(s) for s in chunk])
            mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
            out.append(model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, 0].float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def load_reward_model(model_dir: Path, device: str = "cpu"):
    """(model in eval mode, processor, meta) of a reward-model directory."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from speechrl.rlhf.model.backbone import load_processor

    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).to(device)
    return model.eval().requires_grad_(False), load_processor(model_dir), read_meta(model_dir)


class LearnedPreferenceReward:
    """reward = the reward model's score of a reply in its context; component "reward".

    A TTS model reads (text, voice prompt, codec tokens); a realtime model (meta "mode": "realtime")
    reads `persona`, `history`, `user_text`, the reply's `reply_text` and codec ids, the columns the
    realtime mode hands its rewards. `model` resolves when the reward is built, so a wrong name fails
    at load; weights load at the first batch. A reward worker given the recipe's codec first calls
    `check_codec`: a model trained on another codec's ids would score noise (`match_codec: false` skips
    the check). A sample it cannot read is unscored, saying why.
    """

    def __init__(
        self,
        model: str,  # a reward-model directory, or the name it was registered as
        cache_dir: Optional[str] = None,  # where names are registered; null: $SPEECHRL_CACHE_DIR or ~/.cache/speechrl
        batch_size: int = 32,  # sequences per forward pass
        device: str = "auto",  # "auto" takes the GPU if there is one
        match_codec: bool = True,  # refuse a recipe whose codec differs from the one the model was trained with
        text_column: str = "text",  # TTS: the text said
        codec_column: str = "codec_ids",
        voice_column: str = "reference_codec_ids",  # TTS: the voice prompt
    ):
        self.model_dir = resolve_model_dir(model, cache_dir)
        self.meta = read_meta(self.model_dir)
        self.mode = self.meta.get("mode")
        if self.mode not in SCORED_MODES:
            raise ValueError(f"learned_preference: {self.model_dir} is a {self.mode!r} reward model; only "
                             f"{' and '.join(SCORED_MODES)} reward models can score")
        self.batch_size, self.device, self.match_codec = batch_size, device, match_codec
        self.text_column, self.codec_column, self.voice_column = text_column, codec_column, voice_column
        self.columns = ((codec_column, text_column) if self.mode == "tts"
                        else (codec_column, "reply_text", "persona", "user_text"))
        self._loaded = None

    def check_codec(self, spec) -> None:
        """Raise if `spec` (the recipe's CodecSpec) is not the codec the model's pairs were encoded with."""
        if self.match_codec and codec_identity(spec) != self.meta["codec"]:
            raise ValueError(f"learned_preference: {self.model_dir} was trained on ids of the codec "
                             f"{self.meta['codec']}, but this recipe's codec is {codec_identity(spec)}; ids of one "
                             "codec mean nothing to a model of another. Train the reward model with this recipe's "
                             "tts.codec / tts.embedded_codec, or set the reward's kwarg match_codec: false")

    def _load(self):
        if self._loaded is None:
            import torch

            device = ("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device
            model, processor, meta = load_reward_model(self.model_dir, device)
            self._loaded = model, processor, codec_tokens(processor.tokenizer, meta)
        return self._loaded

    def __call__(self, completions: list[str], **columns: Any) -> dict[str, list]:
        if columns.get("mode", self.mode) != self.mode:
            raise ValueError(f"learned_preference: {self.model_dir} is a {self.mode} reward model; it cannot score "
                             f"{columns['mode']} replies. Train one on {columns['mode']} pairs "
                             f"(speechrl train {columns['mode']}/reward_model)")
        for column in self.columns:
            if column not in columns:
                raise KeyError(f"learned_preference: no column {column!r} in the batch (columns: "
                               f"{', '.join(sorted(columns))}); a {self.mode} reward model reads "
                               f"{', '.join(self.columns)}")
        model, processor, tokens = self._load()
        read = self._tts_sequences if self.mode == "tts" else self._dialogue_sequences
        out: list[Any] = [None] * len(columns[self.codec_column])
        seqs, where = [], []
        for i, seq in enumerate(read(processor, tokens, columns)):
            if isinstance(seq, Unscored):
                out[i] = seq
            else:
                seqs.append(seq)
                where.append(i)
        scores = score_sequences(model, seqs, processor.tokenizer.pad_token_id, self.batch_size)
        for i, score in zip(where, scores.tolist()):
            out[i] = score
        return {"reward": out}

    def _tts_sequences(self, processor, tokens, columns) -> Iterator[list[int] | Unscored]:
        codec_ids, texts = columns[self.codec_column], columns[self.text_column]
        voices = columns.get(self.voice_column) or [None] * len(codec_ids)
        for i, (ids, text, voice) in enumerate(zip(codec_ids, texts, voices)):
            if ids is None or len(ids) == 0:
                yield Unscored("the completion has no audio tokens")
            elif not isinstance(text, str) or not text.strip():
                yield Unscored(f"no text in {self.text_column!r}")
            else:
                try:
                    yield preference_sequence(processor, tokens, text, ids, voice)
                except ValueError as e:  # ids outside the model's codec
                    yield Unscored(f"sample {i}: {e}")

    def _dialogue_sequences(self, processor, tokens, columns) -> Iterator[list[int] | Unscored]:
        # a reply without audio is still scored: it is a reply (a silent one), as in the pairs trained on
        codec_ids, replies = columns[self.codec_column], columns["reply_text"]
        histories = columns.get("history") or [None] * len(codec_ids)
        for i, (ids, reply, persona, history, user) in enumerate(
                zip(codec_ids, replies, columns["persona"], histories, columns["user_text"])):
            if not isinstance(persona, str) or not persona.strip():
                yield Unscored("no persona card in 'persona'")
            elif not isinstance(user, str) or not user.strip():
                yield Unscored("no user turn in 'user_text'")
            else:
                try:
                    yield dialogue_sequence(processor, tokens, persona, history, user, reply, [] if ids is None else ids)
                except ValueError as e:  # ids outside the model's codec, a history turn of another role
                    yield Unscored(f"sample {i}: {e}")


def registered_reward(name: str) -> Optional[type]:
    """For rewards/registry.py: `LearnedPreferenceReward` with `model` bound to `name` if a model is
    registered under that name in the default cache dir, else None. A class, so that the recipe's
    kwargs (batch_size, device, ...) still reach it."""
    if not REWARD_NAME.fullmatch(name) or not (registry_dir() / f"{name}.json").is_file():
        return None
    init = functools.partialmethod(LearnedPreferenceReward.__init__, name)
    return type(name, (LearnedPreferenceReward,), {"__init__": init, "__doc__": LearnedPreferenceReward.__doc__})
