"""Finding a reward by the name a recipe gives it.

Lookup order: registered name, dotted path, entry point in group "speechrl.rewards" (so a team ships
a reward as its own package), then a learned reward model registered under that name. Built-ins are
registered at the bottom of this file, not decorated where defined, so reward modules never import
this one and there is no import cycle.
"""
from __future__ import annotations

import functools
import importlib
import inspect
from importlib.metadata import entry_points
from typing import Any, Callable, Optional

from speechrl.rlhf.core.registry import Registry

from speechrl.rewards.asr import AsrWerReward
from speechrl.rewards.dialogue import EmotionReward, LatencyReward, ReplyLengthReward
from speechrl.rewards.duplex import DuplexTurnTakingReward
from speechrl.rewards.hosted import HfClassifierReward
from speechrl.rewards.intelligibility import TtsIntelligibilityReward
from speechrl.rewards.learned import LearnedPreferenceReward, registered_reward, registry_dir
from speechrl.rewards.persona_consistency import PersonaConsistencyReward
from speechrl.rewards.persona_judge import PersonaJudgeReward
from speechrl.rewards.persona_similarity import PersonaSimilarityReward
from speechrl.rewards.quality import DnsmosReward
from speechrl.rewards.remote import RemoteReward
from speechrl.rewards.speaker import SpeakerSimilarityReward
from speechrl.rewards.speech import SpeechSanityReward

ENTRY_POINT_GROUP = "speechrl.rewards"

REWARDS: Registry[Callable] = Registry("reward")
register_reward = REWARDS.register


def _from_dotted_path(name: str) -> Optional[Any]:
    """The object at "pkg.module:attr" or "pkg.module.attr"; None if that module does not exist."""
    module_name, sep, attr = name.partition(":")
    if not sep:
        module_name, _, attr = name.rpartition(".")
    if not module_name or not attr:
        return None
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        # Only a missing module means "not a dotted path"; an import failing inside the user's
        # module is their bug and must surface as it is.
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            return None
        raise
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise AttributeError(f"reward {name!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def _from_entry_point(name: str) -> Optional[Any]:
    found = list(entry_points(group=ENTRY_POINT_GROUP, name=name))
    if len(found) > 1:
        owners = ", ".join(f"{ep.value} ({ep.dist.name if ep.dist else '?'})" for ep in found)
        raise LookupError(f"reward {name!r}: several installed packages provide it: {owners}; uninstall all but one")
    return found[0].load() if found else None


def _instantiate(name: str, obj: Any, kwargs: dict[str, Any]) -> Callable:
    if inspect.isclass(obj):
        try:
            return obj(**kwargs)
        except TypeError as e:
            raise TypeError(f"reward {name!r}: cannot build {obj.__qualname__} with kwargs {kwargs}: {e}") from e
    if not callable(obj):
        raise TypeError(f"reward {name!r} resolves to {obj!r}, which is not callable; point it at a function or class")
    if not kwargs:
        return obj
    # Check the kwargs now, at load, rather than at the first batch. They must name parameters:
    # a reward's **kwargs is where batch columns land, so a misspelled option would vanish there.
    params = inspect.signature(obj).parameters.values()
    named = {p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY)}
    unknown = sorted(set(kwargs) - named)
    if unknown:
        raise TypeError(f"reward {name!r}: kwargs {unknown} are not parameters of {obj.__qualname__} ({', '.join(sorted(named))})")
    return functools.partial(obj, **kwargs)


def find_reward(name: str) -> Any:
    """The function or class `name` stands for, not yet built: lets a driver reject a misspelled
    reward before it starts workers, without loading the reward's models."""
    if name in REWARDS:
        return REWARDS.get(name)
    obj = _from_dotted_path(name) if ("." in name or ":" in name) else None
    if obj is None:
        obj = _from_entry_point(name)
    if obj is None:
        obj = registered_reward(name)
    if obj is None:
        raise KeyError(
            f"unknown reward {name!r}: not a registered name ({', '.join(REWARDS.names()) or 'none'}), "
            f"not an importable 'pkg.module:attr' path, no installed package has an entry point "
            f"{name!r} in group {ENTRY_POINT_GROUP!r}, and no reward model is registered as {name!r} "
            f"in {registry_dir()}"
        )
    return obj


def resolve_reward(name: str, **kwargs: Any) -> Callable:
    """The reward callable for `name`: classes are instantiated with kwargs, functions get them
    bound with functools.partial."""
    return _instantiate(name, find_reward(name), kwargs)


register_reward("asr_wer")(AsrWerReward)
register_reward("hf_classifier")(HfClassifierReward)
register_reward("remote")(RemoteReward)
register_reward("tts_intelligibility")(TtsIntelligibilityReward)
register_reward("learned_preference")(LearnedPreferenceReward)
register_reward("speaker_similarity")(SpeakerSimilarityReward)
register_reward("dnsmos")(DnsmosReward)
register_reward("speech_sanity")(SpeechSanityReward)
register_reward("persona_judge")(PersonaJudgeReward)
register_reward("persona_consistency")(PersonaConsistencyReward)
register_reward("persona_similarity")(PersonaSimilarityReward)
register_reward("reply_length")(ReplyLengthReward)
register_reward("latency")(LatencyReward)
register_reward("emotion")(EmotionReward)
register_reward("duplex_turn_taking")(DuplexTurnTakingReward)
