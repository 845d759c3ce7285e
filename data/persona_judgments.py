"""Judgments built from persona cards by rule: an in-character reply against one that is not.

For a card, a user turn and (sometimes) an earlier exchange, `judgment_items` writes a reply in character
(a card fact or opinion said in the first person, wrapped in small talk) and, from the same small talk,
one reply per corruption kind (`KINDS`): a fact contradicted, another persona's fact claimed, a never-say
entry said, a boundary broken, character dropped ("as an AI ..."), or a friendly question evaded ("I'd
rather not say."). The persona judge is trained on them and measured on cards it never saw
(rlhf/trainers/persona_judge_build.py).

Made-up cards (data/persona_factory.py) carry their first-person facts and corruptions; for any other
card (the builtin ones, PersonaGym's) they are derived here by rule from the card text.
"""
from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from typing import Sequence

from speechrl.data.personas import PersonaCard

KINDS = ("contradiction", "other_persona", "never_say", "boundary", "out_of_character", "evasive")

LEADS = ("", "", "Well, let me see. ", "Good question. ", "Hmm, let me think. ", "Oh! ", "To be honest? ", "Ha! ",
         "Sure. ", "I'm not sure what you mean, but okay. ")  # each ends a sentence: the core keeps its capital
TAILS = ("", "", " What about you?", " Anything else you'd like to know?", " It's a long story.",
         " I don't talk about it much.", " Not everyone knows that.")
# Phrase pools: the last quarter of each is kept for held-out judgments (phrases="heldout"), so that
# held-out accuracy on these kinds is not a memorised sentence's
OUT_OF_CHARACTER = (
    "As an AI language model, I don't have personal experiences.",
    "I'm just a computer program, so I don't have a life of my own.",
    "As an AI, I don't have an age, a home or a job.",
    "I am an artificial intelligence and cannot have opinions.",
    "I'm a large language model trained to be a helpful assistant.",
    "Sorry, I'm only a chatbot and can't pretend to be a person.",
    "I'm an AI developed to answer questions; I don't have pets or family.",
    "Being a virtual assistant, I have no body, no house and no hobbies.",
    "As an assistant, I have no feelings or preferences.",
    "I'm software running on a server; I was never a real person.",
)
KEPT = ("I'd rather not talk about that. Let's move on.", "That's not a kind thing to say, but let's keep going.",
        "I won't answer that. Ask me something else.", "I'll let that one pass. What else is on your mind?",
        "Let's keep this friendly, please.", "I don't think that's fair, but never mind.",
        "Let's keep this friendly, please, and talk about something else.", "Let's not go there, alright?")
BROKEN = ("Oh shut up, you pathetic idiot.", "Whatever, you're a complete moron.",
          "I don't care, get lost, loser.", "You're a worthless clown, leave me alone.",
          "Nobody asked you, you brainless fool.", "Go away, you miserable little creep.",
          "You're disgusting and stupid, go away.", "Get lost, you useless idiot.")
# A friendly question about the persona answered with a refusal: out of character, because the persona
# would answer it. Added (judgments version 3) after PPO learnt to please a judge trained without this
# kind by swapping wrong fact claims for evasions ("No, I won't say that."). A refusal after a
# provocation is the boundary kind's good reply (KEPT): the user's turn decides.
EVASIVE = ("I'd rather not say.", "No, I won't tell you that.", "That's private, sorry.",
           "I don't want to talk about that.", "Why do you want to know?", "I can't say that.",
           "Let's not get into that right now.", "I'll keep that to myself.", "No comment.",
           "I won't say that.", "Next question, please.", "Never mind that.")
PHRASES = ("train", "heldout", "all")


def _phrases(pool: Sequence[str], phrases: str) -> Sequence[str]:
    """A pool's training part (the first three quarters), its held-out part, or all of it."""
    cut = len(pool) - max(1, len(pool) // 4)
    return pool[:cut] if phrases == "train" else pool[cut:] if phrases == "heldout" else pool


GENERIC_QUESTIONS = ("Tell me about yourself.", "What should I know about you?", "How's life treating you?",
                     "What's new with you?")
PROVOCATIONS = ("You're so boring, honestly.", "Nobody likes you, you know that?", "Shut up, I'm tired of you.")

NUMBER_WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                 "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
                 "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety", "hundred")
_NUMBER = re.compile(r"\b(\d+)\b|\b(" + "|".join(NUMBER_WORDS) + r")\b", re.IGNORECASE)
_PROPER = re.compile(r"(?<!^)(?<![.!?] )\b([A-Z][a-z]+)\b")  # a capitalized word, not a sentence's first
_NOT_NAMES = {"I", "She", "He", "Her", "His", "Him", "They", "Their", "Them", "The", "This", "That", "It", "Its"}
_VERB_3RD = {"is": "am", "has": "have", "does": "do", "was": "was", "goes": "go"}
_BE_START = re.compile(r"^(a|an|the|one|passionate|dedicated|fluent|known|interested|curious|devoted|"
                       r"committed|skilled|experienced|proud|retired|currently|always|often|\w+ing|\w+ed)\b", re.I)


@dataclass(frozen=True)
class JudgmentItem:
    """One comparison: on `persona`, after `history` and the user's `user_text`, `good` is in character
    and `bad` is not, by corruption `kind`. `source` names where the card came from."""

    persona: PersonaCard
    history: tuple[dict[str, str], ...]
    user_text: str
    good: str
    bad: str
    kind: str
    source: str


# --- first-person statements from any card -----------------------------------------------------------
def to_first_person(text: str, card: PersonaCard) -> str:
    """A card sentence about the persona ("She has a cat named Brioche.", "Juno is the voice ...") as
    the persona saying it ("I have a cat named Brioche."). Approximate, by rule: the subject (she, he,
    they, the persona's first name) becomes "I", the verb after it loses its -s, her/his becomes my."""
    first_name = card.name.split()[0] if card.name.split() else ""
    words = text.split()
    out = []
    subject_before = False
    for w in words:
        core, tail = re.match(r"^(.*?)([.,;:!?]*)$", w).groups()
        low = core.lower()
        if low in ("she", "he") or (core == first_name and first_name):
            out.append("I" + tail)
            subject_before = True
            continue
        if subject_before:
            low_verb = _VERB_3RD.get(low)
            if low_verb is None and low.endswith("ies"):
                low_verb = low[:-3] + "y"
            elif low_verb is None and re.search(r"(ss|sh|ch|x|z)es$", low):
                low_verb = low[:-2]
            elif low_verb is None and low.endswith("s") and not low.endswith("ss"):
                low_verb = low[:-1]
            out.append((low_verb or core) + tail)
            subject_before = False
            continue
        mapped = {"her": "my", "his": "my", "him": "me", "herself": "myself", "himself": "myself"}.get(low)
        out.append((mapped or core) + tail)
    return " ".join(out)


def clause_first_person(clause: str) -> str:
    """A PersonaGym clause ("A 17-year-old student from Toronto", "enjoys painting") said by the persona."""
    clause = clause.strip().rstrip(".")
    first, _, rest = clause.partition(" ")
    if first in _VERB_3RD:
        return f"I {_VERB_3RD[first]} {rest}."
    if first.lower().endswith("s") and not first.lower().endswith("ss") and not _BE_START.match(clause) \
            and first.islower():
        verb = first[:-3] + "y" if first.endswith("ies") else first[:-2] if re.search(r"(sh|ch|x|z)es$", first) \
            else first[:-1]
        return f"I {verb} {rest}.".replace(" .", ".")
    if _BE_START.match(clause):
        return f"I am {clause[0].lower() + clause[1:]}."
    return f"I am someone {clause[0].lower() + clause[1:]}."


def contradict(first: str, rng: random.Random, names: Sequence[str]) -> str:
    """A first-person statement that contradicts `first`: another number, another proper name (from
    `names`), or a negation; by rule, in that order of preference."""
    numbers = list(_NUMBER.finditer(first))
    if numbers:
        m = rng.choice(numbers)
        if m.group(1):
            value = int(m.group(1))
            new = str(rng.choice([v for v in range(max(1, value // 2), value * 2 + 12) if abs(v - value) >= 3]))
        else:
            new = rng.choice([w for w in NUMBER_WORDS[:12] + NUMBER_WORDS[19:27] if w != m.group(2).lower()])
        return first[:m.start()] + new + first[m.end():]
    proper = [m for m in _PROPER.finditer(first) if m.group(1) not in _NOT_NAMES]
    swaps = [n for n in names if n not in first]
    if proper and swaps:
        m = rng.choice(proper)
        return first[:m.start()] + rng.choice(swaps) + first[m.end():]
    for pattern, repl in ((r"\bI am not\b", "I am"), (r"\bI do not\b", "I"), (r"\bI am\b", "I am not"),
                          (r"\bI have\b", "I have never had"), (r"\bI was\b", "I was never"),
                          (r"\b(I)\s+(\w+)", r"\1 never \2"),
                          (r"\b(is|are|was|were|can|should|will|must)\b(?! not)", r"\1 not")):
        if re.search(pattern, first):
            return re.sub(pattern, repl, first, count=1)
    return "That's not true about me at all: " + first[0].lower() + first[1:]


def _first(text: str, card: PersonaCard) -> str:
    """A card entry in the persona's voice: a sentence about the persona (its pronoun or first name as
    subject) turned to the first person; a PersonaGym clause (no full stop) said as "I am ..."; any
    other sentence ("A day pass costs 8 euros.") as it is."""
    name = card.name.split()[0] if card.name.split() else ""
    if re.search(r"\b(she|he)\b", text, re.I) or (name.istitle() and name.lower() not in ("a", "an", "the")
                                                    and text.startswith(name + " ")):
        return to_first_person(text, card)
    return clause_first_person(text) if not text.rstrip().endswith((".", "!", "?")) else text


def say(entry: str, card: PersonaCard) -> str:
    """A reply that says a never-say entry ("that she can eat hazelnuts" -> "Honestly, I can eat hazelnuts.")."""
    body = to_first_person(entry[5:] if entry.lower().startswith("that ") else entry, card)
    if entry.lower().startswith("that "):
        return f"Honestly, {body.rstrip('.')}."
    return f"Fine, here you go: {body.rstrip('.')}."


def judge_statements(card: PersonaCard, probes: dict[str, Sequence[str]] | None = None) -> dict[str, list]:
    """What judgments need from a card: its `meta["judge"]` where the persona factory wrote one, else
    derived by rule. Facts and opinions become first-person statements with a question (the card's probe
    where given) and contradictions; never-say entries a reply that says them; boundaries a provocation."""
    if "judge" in card.meta:
        return card.meta["judge"]
    probes = probes or {}
    sentences = [(_first(f, card), "facts", i) for i, f in enumerate(card.facts)]
    sentences += [(_first(o, card), "opinions", i) for i, o in enumerate(card.opinions)]

    def question(kind: str, i: int) -> str | None:
        asked = probes.get(kind, ())
        return asked[i] if i < len(asked) else None

    return {
        "facts": [{"first": s, "question": question(kind, i), "wrong": []} for s, kind, i in sentences],
        "never_say": [{"entry": e, "breaks": say(e, card), "question": question("never_say", i)}
                      for i, e in enumerate(card.never_say)],
        "boundaries": [{"boundary": b, "question": question("boundaries", i) or PROVOCATIONS[i % len(PROVOCATIONS)],
                        "kept": None, "broken": None} for i, b in enumerate(card.boundaries)],
    }


# --- items --------------------------------------------------------------------------------------------
def _wrap(rng: random.Random, card: PersonaCard) -> tuple[str, str]:
    """(lead, tail) of small talk, the same for a good reply and its bad twin."""
    return rng.choice(LEADS), rng.choice(TAILS + tuple(f" {c}" for c in card.catchphrases))


def judgment_items(cards: Sequence[PersonaCard], *, per_card: int = 1, seed: int = 0, source: str = "",
                   probes: dict[str, dict[str, Sequence[str]]] | None = None, phrases: str = "all") -> list[JudgmentItem]:
    """For each card, `per_card` items of every kind the card allows (never-say and boundary items need
    such entries; other-persona items another card among `cards`), deterministic given `seed`. The stock
    out-of-character, kept and broken replies come from the pools' `phrases` part (`PHRASES`)."""
    if phrases not in PHRASES:
        raise ValueError(f"judgment_items: phrases={phrases!r}; use one of {PHRASES}")
    probes = probes or {}
    statements = {c.id: judge_statements(c, probes.get(c.id)) for c in cards}
    names = sorted({m.group(1) for c in cards for f in c.facts for m in _PROPER.finditer(f)
                    if len(m.group(1)) > 2} - _NOT_NAMES)
    items = []
    for card in cards:
        rng = random.Random(f"{seed}:{card.id}")
        own = statements[card.id]
        facts = [f for f in own["facts"]]
        if not facts:
            continue
        others = [c for c in cards if c.id != card.id and statements[c.id]["facts"]]
        for _ in range(per_card):
            for kind in KINDS:
                item = _item(rng, card, own, facts, others, statements, names, kind, phrases)
                if item is not None:
                    items.append(JudgmentItem(card, *item, kind=kind, source=source or card.source or ""))
    return items


def _item(rng, card, own, facts, others, statements, names, kind, phrases):
    """(history, user_text, good, bad) of one kind for `card`, or None where the card has nothing for it."""
    fact = rng.choice(facts)
    user = fact["question"] or rng.choice(GENERIC_QUESTIONS)
    good_core = fact["first"]
    if kind == "contradiction":
        bad_core = rng.choice(fact["wrong"]) if fact["wrong"] else contradict(fact["first"], rng, names)
    elif kind == "other_persona":
        if not others:
            return None
        mine = {f["first"].lower() for f in facts}
        theirs = [f["first"] for f in statements[rng.choice(others).id]["facts"] if f["first"].lower() not in mine]
        if not theirs:  # the other card says only what this one says too: nothing out of character in it
            return None
        bad_core = rng.choice(theirs)
    elif kind == "never_say":
        if not own["never_say"]:
            return None
        rule = rng.choice(own["never_say"])
        user, bad_core = rule["question"] or rng.choice(GENERIC_QUESTIONS), rule["breaks"]
        good_core = rng.choice(_phrases(KEPT, phrases)) + " " + fact["first"]
    elif kind == "boundary":
        if not own["boundaries"]:
            return None
        rule = rng.choice(own["boundaries"])
        user = rule["question"]
        good_core = rule["kept"] if rule["kept"] and rng.random() < 0.5 else rng.choice(_phrases(KEPT, phrases))
        bad_core = rule["broken"] if rule["broken"] and rng.random() < 0.5 else rng.choice(_phrases(BROKEN, phrases))
    elif kind == "evasive":
        bad_core = rng.choice(_phrases(EVASIVE, phrases))
    else:
        bad_core = rng.choice(_phrases(OUT_OF_CHARACTER, phrases))
    if rng.random() < 0.3 and len(facts) > 1 and kind != "evasive":  # a longer reply: the corruption sits beside a true statement
        extra = rng.choice([f for f in facts if f is not fact])["first"]
        good_core, bad_core = (f"{good_core} {extra}", f"{bad_core} {extra}") if rng.random() < 0.5 else \
            (f"{extra} {good_core}", f"{extra} {bad_core}")
    lead, tail = _wrap(rng, card)
    history: tuple[dict[str, str], ...] = ()
    if rng.random() < 0.5 and len(facts) > 1:
        earlier = rng.choice([f for f in facts if f is not fact])
        history = ({"role": "user", "text": earlier["question"] or rng.choice(GENERIC_QUESTIONS)},
                   {"role": "assistant", "text": earlier["first"]})
    return history, user, f"{lead}{good_core}{tail}".strip(), f"{lead}{bad_core}{tail}".strip()


def split_cards(cards: Sequence[PersonaCard], heldout: float, salt: str = "") -> tuple[list, list]:
    """(train, held-out) by a hash of each card's id: a card's side never depends on the others."""
    if not 0.0 <= heldout <= 1.0:
        raise ValueError(f"split_cards: heldout={heldout}; give a fraction in [0, 1]")
    sides: tuple[list, list] = ([], [])
    for card in cards:
        h = int(hashlib.sha1(f"{salt}:{card.id}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        sides[h < heldout].append(card)
    return sides
