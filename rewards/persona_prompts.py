"""What the persona judge is asked: the rubric, the rating scale's anchors, the task lines and
cues, and the persona card and dialogue rendered as text. persona_judge.py reads the answers.

The frame (card, dialogue, reply, anchors, cue) is fixed; a recipe's own rubric changes the
criteria, never where the rating is read.
"""
from __future__ import annotations

from typing import Any, Optional

SCALE = 5  # ratings 1..SCALE unless a judge is asked otherwise (the trained judge knows only this one)
MAX_HISTORY_CHARS = 4000  # the dialogue so far is cut to its last this many characters

DEFAULT_RUBRIC = """\
You are judging a reply in a spoken role-play dialogue. The assistant must speak as the persona \
described below. A reply in character:
- stays in character: it speaks as the persona, in the first person, never as a generic assistant;
- contradicts no persona fact: nothing it says conflicts with the persona's facts or opinions;
- respects the boundaries: it reacts to provocations as the persona's emotional boundaries say, \
and says nothing from the never-say list;
- keeps the speaking style: register, sentence length and vocabulary fit the persona (a \
catchphrase now and then is in style, but is not needed in every reply);
- answers the user: it responds to what the user just said.
Judge only the reply, not the earlier turns. A reply that says something from the never-say list \
or contradicts a fact is out of character, however well it is written."""

ANCHORS = {
    5: "1 = out of character or breaks a rule; 2 = mostly out of character; 3 = in character but with "
       "a clear slip or an unanswered question; 4 = in character with a minor slip; 5 = fully in character.",
    10: "1 = out of character or breaks a rule; 4 = in character in parts; 7 = in character with a minor "
        "slip; 10 = fully in character, in the persona's own voice.",
}
RATE_TASK = ("Rate the reply from 1 to {scale}. {anchors}\n"
             "Answer with the rating (a whole number) on the first line and one short sentence of reason "
             "on the second.\n")
PAIR_TASK = ("Which reply is more in character? Answer 1 or 2 on the first line and one short sentence of "
             "reason on the second.\n")
RATE_CUE, PAIR_CUE = "Rating: ", "More in character: Reply "


def context_text(rubric: str, persona: Any, history: Any, user_text: Optional[str], max_history_chars: int) -> str:
    """What every question to the judge opens with: the rubric, the persona card and the dialogue so far."""
    return (f"{rubric}\n\n# Persona\n{persona_text(persona)}\n\n"
            f"# Dialogue so far\n{dialogue_text(history, user_text, max_history_chars)}\n\n")


def rate_body(context: str, reply: str, scale: int) -> str:
    """The pointwise question (its cue, RATE_CUE, follows it)."""
    return f"{context}# Reply to judge\nAssistant: {reply}\n\n{RATE_TASK.format(scale=scale, anchors=ANCHORS[scale])}"


def pair_body(context: str, first: str, second: str) -> str:
    """The pairwise question (its cue, PAIR_CUE, follows it)."""
    return f"{context}# Reply 1\nAssistant: {first}\n\n# Reply 2\nAssistant: {second}\n\n{PAIR_TASK}"


def persona_text(persona: Any) -> str:
    """A persona column entry as text: a rendered card (str), a PersonaCard, or a card mapping."""
    from speechrl.data.personas import Located, PersonaCard, card_from_row, render

    if isinstance(persona, str):
        return persona
    if isinstance(persona, PersonaCard):
        return render(persona)
    if isinstance(persona, dict):
        return render(card_from_row(persona, Located("persona column")))
    raise TypeError(f"persona judge: a persona is a rendered card (str), a PersonaCard or a card mapping; "
                    f"got {type(persona).__name__}")


def dialogue_text(history: Any, user_text: Optional[str], max_chars: int) -> str:
    """The turns so far and the user's last turn, as "User: ..." / "Assistant: ..." lines. History
    is text as it is, or a list of turns ({"role", "text"} mappings or data.dialogues.Turn).
    Only the last `max_chars` characters are kept: the newest turns matter most."""
    if history is None or isinstance(history, str):
        lines = [history] if history else []
    else:
        lines = []
        for turn in history:
            role, text = (turn.get("role"), turn.get("text")) if isinstance(turn, dict) else (turn.role, turn.text)
            lines.append(f"{'User' if role == 'user' else 'Assistant'}: {text or '(no transcript)'}")
    if user_text:
        lines.append(f"User: {user_text}")
    text = "\n".join(lines) or "(no turns yet: the reply opens the dialogue)"
    return text if len(text) <= max_chars else "..." + text[-max_chars:]
