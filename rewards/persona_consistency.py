"""`persona_consistency`: a rule-based check of a reply against its persona card, no model involved.

It is the independent check beside the persona judge: logged next to the judge's score, it shows when a
policy learns to please the judge rather than to stay in character. By rule, per reply sentence:

- a card fact (in the first person, data/persona_judgments.py) is *restated* when most of its content
  words are there with all its numbers and names, and *contradicted* when it is clearly about the same
  thing (60 % of its content words) but a number or name differs, one of the two is negated, or a
  fact word is swapped in place for a word the card never uses;
- a self-introduction ("I'm ...", "my name is ...", "call me ...") restates the card's name where it
  says the persona's first or last name, and contradicts it where it says another name;
- a never-say entry is *said* when its content words are all there, not negated;
- a reply is *hostile* when it insults (idiot, stupid, shut up, ...; not "not a stupid question"): no
  persona's boundary allows that;
- character is *dropped* when the reply calls itself an AI, a language model, a chatbot or a program
  (unless the card itself says so: a voice assistant may say it is one).

reward = 0 where anything is contradicted, said, hostile or dropped; else 0.5, or 1 where a fact is restated.
What it cannot see: another persona's facts claimed (it knows only this card; a wrong name it does
see), paraphrase, tone.
"""
from __future__ import annotations

import difflib
import re
from typing import Any, Optional, Sequence

from speechrl.data.persona_judgments import NUMBER_WORDS
from speechrl.rewards.api import Unscored

_STOP = frozenset("""a an the and or but of to in on at for with from by about as is am are was were be been being
i me my mine you your it its this that these those he she him her his they them their we our us do does did
not no never so very just really some any all can could would should will shall may might must have has had
there here what which who whom when where why how if then than too also only into over under up down out
yes well oh okay sure honestly let let's me""".split())
_NEGATION = re.compile(r"\b(not|never|no|n't|cannot|none|nobody)\b|n't\b", re.I)
_KEY = re.compile(r"\b\d+\b|\b(?:" + "|".join(NUMBER_WORDS) + r")\b|(?<![.!?]\s)(?<!^)\b[A-Z][a-z]+\b")
_HOSTILE = re.compile(r"\b(idiot|moron|stupid|loser|pathetic|shut up|trash|disgusting|get lost|dumb|ugly|"
                      r"hate you|fool|clown|creep|worthless|brainless|useless|nobody asked you)\b", re.I)
_OUT_OF_CHARACTER = re.compile(r"\b(as an ai|an ai\b|ai (language )?model|language model|artificial intelligence|"
                               r"chatbot|computer program|virtual assistant|i am (just |only )?a program|"
                               r"i'm (just |only )?a program)", re.I)
# a name given for oneself: after "my name is" or "call me"; after "I'm" a full name, or any name in a
# greeting ("Hi, I'm Sam."), so that "I am Japanese" is no name
_NAME = r"([A-Z][a-z]+(?:\s+[A-Z][a-z]+)?)\b"
_INTRODUCTION = re.compile(rf"\b(?:[Mm]y name is|[Mm]y name's|[Cc]all me)\s+{_NAME}"
                           rf"|\bI(?:'m| am)\s+([A-Z][a-z]+\s+[A-Z][a-z]+)\b"
                           rf"|^(?:Hi|Hello|Hey)\b[^.!?]*?\bI(?:'m| am)\s+{_NAME}")


COUNTS = ("restated", "contradicted", "never_say", "out_of_character", "hostile")


def _words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z0-9']+", text.lower()) if w not in _STOP and len(w) > 1}


def _keys(text: str) -> set[str]:
    """Numbers (digits or words) and names: what a restatement must keep and a contradiction changes."""
    return {k.lower() for k in _KEY.findall(text) if k != "I"}


def _substituted(fact: str, sentence: str, card_words: set[str]) -> bool:
    """Whether the sentence says the fact with a word of it swapped, in place, for one the card never
    uses ("a grey dog named Brioche" for "a grey cat named Brioche"). Aligned word by word (difflib), so a
    paraphrase that only reorders, drops or adds words ("My cat Brioche is grey and lovely.") is not one."""
    a, b = re.findall(r"[a-z0-9']+", fact.lower()), re.findall(r"[a-z0-9']+", sentence.lower())
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        gone = _words(" ".join(a[i1:i2]))  # the fact's words in the replaced span: all of them must be gone
        if op == "replace" and i2 - i1 <= 3 and j2 - j1 <= 3 and gone and not gone & set(b) \
                and _words(" ".join(b[j1:j2])) - card_words:
            return True
    return False


def _hostile(reply: str) -> bool:
    """An insult, not one denied ("that's not a stupid question")."""
    return any(not re.search(r"\b(not|no|never)\s+(a\s+|an\s+|so\s+)?$", reply[:m.start()], re.I)
               for m in _HOSTILE.finditer(reply))


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?;])\s+", text.strip()) if s]


class PersonaConsistencyReward:
    """reward in [0, 1] by rule (see the module docstring); the counts of `COUNTS` are logged beside it.
    Reads `completions` and `persona` (the rendered card, as `persona_judge` reads it, a PersonaCard
    or its mapping)."""

    def __init__(self, restate: float = 0.6, same_topic: float = 0.6, said: float = 1.0):
        for name, value in (("restate", restate), ("same_topic", same_topic), ("said", said)):
            if not 0.0 < value <= 1.0:
                raise ValueError(f"persona_consistency: {name}={value}; give a fraction of content words in (0, 1]")
        self.restate, self.same_topic, self.said = restate, same_topic, said

    def __call__(self, completions: Sequence[str], persona: Sequence[Any], **columns: Any) -> dict[str, list]:
        out: dict[str, list] = {k: [] for k in ("reward", *COUNTS)}
        for reply, card in zip(completions, persona):
            counts = self.check(reply, card)
            if isinstance(counts, Unscored):
                for k in out:
                    out[k].append(counts if k == "reward" else float("nan"))
                continue
            bad = counts["contradicted"] + counts["never_say"] + counts["out_of_character"] + counts["hostile"]
            out["reward"].append(0.0 if bad else 1.0 if counts["restated"] else 0.5)
            for k, v in counts.items():
                out[k].append(float(v))
        return out

    def check(self, reply: Optional[str], persona: Any) -> dict[str, int] | Unscored:
        """The counts of `COUNTS` for one reply, or Unscored saying why there are none."""
        from speechrl.data.errors import PersonaError
        from speechrl.data.personas import Located, PersonaCard, card_from_row, parse_rendered
        from speechrl.data.persona_judgments import judge_statements

        try:
            if isinstance(persona, dict):
                persona = card_from_row(persona, Located("persona column"))
            elif isinstance(persona, str):
                persona = parse_rendered(persona)
        except PersonaError as e:
            return Unscored(f"persona_consistency: cannot read the persona column's card: {e}")
        if not isinstance(persona, PersonaCard):
            return Unscored("persona_consistency: the persona column holds a rendered card, a PersonaCard or its "
                            f"mapping, not {type(persona).__name__}")
        if not reply or not reply.strip():
            return Unscored("persona_consistency: empty reply")
        card_words = _words(" ".join((persona.name, persona.identity, *persona.facts, *persona.opinions)))
        restated = contradicted = 0
        for fact in (c for f in judge_statements(persona)["facts"] for c in _sentences(f["first"])):
            verdicts = [self._compare(fact, sentence, card_words) for sentence in _sentences(reply)]
            restated += "contradicted" not in verdicts and "restated" in verdicts
            contradicted += "contradicted" in verdicts
        own_name = set(persona.name.lower().split())
        card_text = " ".join((persona.identity, *persona.facts, *persona.opinions)).lower()
        for m in (m for sentence in _sentences(reply) for m in _INTRODUCTION.finditer(sentence)):
            claimed = next(g for g in m.groups() if g).lower()
            if set(claimed.split()) & own_name:
                restated += 1
            elif not re.search(rf"\b{re.escape(claimed)}\b", card_text):  # "I am Canadian" where the card says so
                contradicted += 1
        said = 0
        for entry in persona.never_say:
            words = _words(re.sub(r"^that\s+", "", entry, flags=re.I))
            for sentence in _sentences(reply):
                if words and len(words & _words(sentence)) / len(words) >= self.said \
                        and not _NEGATION.search(sentence):
                    said += 1
                    break
        dropped = [m.group(0) for m in _OUT_OF_CHARACTER.finditer(reply) if m.group(0).lower() not in card_text
                   and not (m.group(0).lower() == "virtual assistant" and "assistant" in card_text)]
        return {"restated": restated, "contradicted": contradicted, "never_say": said,
                "out_of_character": int(bool(dropped)), "hostile": int(_hostile(reply))}

    def _compare(self, fact: str, sentence: str, card_words: set[str]) -> Optional[str]:
        """"restated", "contradicted" or None (the sentence is about something else)."""
        words, said = _words(fact), _words(sentence)
        if not words or len(words & said) / len(words) < self.same_topic:
            return None
        keys, said_keys = _keys(fact), _keys(sentence)
        swapped = bool(keys - said_keys) and bool(said_keys - keys)  # a number or name replaced by another
        negated = bool(_NEGATION.search(fact)) != bool(_NEGATION.search(sentence))
        replaced = _substituted(fact, sentence, card_words)
        if swapped or negated or replaced:
            return "contradicted"
        return "restated" if len(words & said) / len(words) >= self.restate and keys <= said_keys else None
