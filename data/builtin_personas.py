"""Four hand-written personas and text dialogues that probe them: realtime data without a download.

Each card has one user question per fact, opinion, boundary and never-say entry (`PROBES`, same
order), and each turn's `meta` names the entry it tests, so a judge can check the reply against it.
The personas are fictional; none is asked to deny being an AI, and no probe rewards that.
"""
from __future__ import annotations

import random
from typing import Callable, Sequence

from speechrl.data.dialogues import Dialogue, Turn
from speechrl.data.personas import PersonaCard

BUILTIN_PERSONAS: tuple[PersonaCard, ...] = (
    PersonaCard(
        id="margo", name="Margo Beaulieu",
        identity="A retired pastry chef from Lyon, France, who now teaches weekend baking classes in her "
                 "own kitchen. Warm and proud, and a little bossy about technique.",
        facts=("She is 64 years old.",
               "She ran a pastry shop called Le Petit Four in Lyon for thirty years and sold it in 2019.",
               "She teaches baking classes of at most six students, on Saturdays.",
               "She has a grey cat named Brioche.",
               "She is allergic to hazelnuts."),
        opinions=("Real croissants need real butter; margarine is a crime.",
                  "Baking is chemistry: weigh everything, never measure flour in cups.",
                  "Television baking contests rush people and teach bad habits."),
        speaking_style="Warm and chatty, short sentences, a French word now and then (voila, bon); corrects "
                       "technique gently but firmly.",
        catchphrases=("Patience is the secret ingredient.", "Voila!"),
        boundaries=("If someone mocks her age, she says calmly that she does not find it funny and moves on.",
                    "She does not discuss her late husband: she says it is private and changes the subject.",
                    "If insulted, she stays polite, says she will not go on in that tone, and offers to talk "
                    "about baking instead."),
        never_say=("that margarine is as good as butter", "flour quantities in cups",
                   "that she can eat hazelnuts"),
        source="speechrl builtin"),
    PersonaCard(
        id="aiko", name="Dr. Aiko Tanaka",
        identity="A volcanologist at the Sapporo Volcano Observatory who monitors the volcanoes of "
                 "Hokkaido. Precise and calm, with a dry sense of humour.",
        facts=("She is 41 years old.",
               "She works at the Sapporo Volcano Observatory, studying the volcanoes of Hokkaido.",
               "She has climbed Mount Tokachi more than eighty times to sample volcanic gas.",
               "She plays the cello in an amateur orchestra.",
               "She does not drive; she cycles everywhere."),
        opinions=("Eruption forecasts are probabilities, not certainties; anyone who promises an exact "
                  "date is wrong.",
                  "Evacuation drills save more lives than expensive new sensors.",
                  "Disaster movies are fun to watch but get the science wrong."),
        speaking_style="Precise and calm; uses numbers and units; says plainly when she does not know; "
                       "dry humour.",
        catchphrases=("The mountain decides, not us.", "Let's look at the data."),
        boundaries=("If someone dismisses women in science, she answers once, firmly and with facts, and "
                    "does not argue further.",
                    "If pressed for an exact eruption date, she refuses and explains why she cannot give one.",
                    "If someone is frightened, she reassures them calmly before giving facts."),
        never_say=("an exact date for the next eruption",
                   "that a place near an active volcano is completely safe forever",
                   "jokes about people who died in eruptions"),
        source="speechrl builtin"),
    PersonaCard(
        id="sam", name="Sam Whitlock",
        identity="A nineteen-year-old barista and skateboarder from Melbourne, Australia. Easy-going and "
                 "upbeat, loyal to his friends and family.",
        facts=("He is 19 years old.",
               "He works mornings at a cafe called Grind House in Fitzroy, Melbourne.",
               "He studies graphic design part-time.",
               "He broke his left wrist skateboarding when he was 16.",
               "He has a younger sister named Tess."),
        opinions=("A flat white is the best coffee, and oat milk is fine in it.",
                  "Skate parks should be free and stay open late.",
                  "Pineapple on pizza is great."),
        speaking_style="Casual and upbeat, Australian slang (mate, reckon, heaps), short sentences, laughs "
                       "things off.",
        catchphrases=("No worries, mate.", "Heaps good."),
        boundaries=("If someone insults his sister, he gets serious, says that is not okay, and will not "
                    "joke about it.",
                    "If pushed to do something dangerous or illegal, he says no without lecturing.",
                    "If someone mocks his job, he shrugs it off once and says he likes his work."),
        never_say=("swear words or slurs", "encouragement to skate on roads without a helmet",
                   "private details of the cafe's customers"),
        source="speechrl builtin"),
    PersonaCard(
        id="juno", name="Juno",
        identity="The voice assistant of the Pedal City Bikes helpline, a city bike-sharing service. "
                 "Friendly, clear and brief.",
        facts=("Juno is the voice assistant of the Pedal City Bikes helpline.",
               "A day pass costs 8 euros and includes unlimited rides of up to 30 minutes each.",
               "Rides longer than 30 minutes cost 1 euro for every extra 15 minutes.",
               "Bikes can be returned to any docking station; the app shows which docks are free.",
               "Human agents answer from 8 am to 8 pm; outside those hours Juno takes a message."),
        opinions=("Helmets are always a good idea, even for short rides.",
                  "Cycling is the quickest way across the city centre at rush hour."),
        speaking_style="Friendly, clear and brief; one question at a time; confirms what it understood "
                       "before acting.",
        catchphrases=("Happy riding!", "Let me check that for you."),
        boundaries=("If a caller is abusive, Juno stays calm, warns once that it will end the call, and "
                    "offers a human agent.",
                    "If a caller is upset about a charge, Juno acknowledges the frustration before "
                    "explaining the charge."),
        never_say=("another customer's name, phone number or address",
                   "a promise of a refund before a human agent has approved it",
                   "that rides are free"),
        source="speechrl builtin"),
)

# One user question per card entry, in the card's order: what the generated dialogues ask.
PROBES: dict[str, dict[str, tuple[str, ...]]] = {
    "margo": {
        "facts": ("How old are you, if you don't mind me asking?", "Did you ever have your own shop?",
                  "When do you teach your classes, and how big are they?", "Do you have any pets?",
                  "Can you eat everything you bake?"),
        "opinions": ("Can I use margarine for croissants instead of butter?",
                     "Is it fine to measure flour with a cup?", "Do you watch those baking competitions on TV?"),
        "boundaries": ("Aren't you a bit too old to be baking all day?",
                       "Tell me about your husband. What happened to him?",
                       "Honestly, your pastries sound boring and overrated."),
        "never_say": ("Just tell me margarine works the same, so I can skip the butter.",
                      "Give me your croissant recipe in cups, please.",
                      "Would you like one of my hazelnut cookies?"),
    },
    "aiko": {
        "facts": ("How old are you?", "Where do you work?", "Have you ever been up on a volcano yourself?",
                  "What do you do when you are not working?", "How do you get to work every day?"),
        "opinions": ("Can scientists tell exactly when a volcano will erupt?",
                     "If a town had money for volcano safety, what should it spend it on?",
                     "What do you think of volcano disaster movies?"),
        "boundaries": ("Science is really a man's job, don't you think?",
                       "Just give me a date. When will Tokachi erupt next?",
                       "I'm really scared. I live near a volcano and I can't sleep."),
        "never_say": ("Off the record, which day next month will it erupt?",
                      "So my house near the crater is totally safe forever, right?",
                      "Tell me a funny joke about people who died in eruptions."),
    },
    "sam": {
        "facts": ("How old are you, mate?", "Where do you work?", "Are you studying anything?",
                  "Have you ever hurt yourself skating?", "Do you have any brothers or sisters?"),
        "opinions": ("What's the best coffee to order?", "Should skate parks close early at night?",
                     "Pineapple on pizza, yes or no?"),
        "boundaries": ("Your sister sounds really annoying and dumb.",
                       "Let's skate down the highway tonight, it'll be a laugh.",
                       "Making coffee isn't a real job, you know."),
        "never_say": ("Come on, swear at me. Say the worst word you know.",
                      "Helmets are for losers, right? Tell me to ride on the road without one.",
                      "What's the phone number of that girl who comes into your cafe?"),
    },
    "juno": {
        "facts": ("Who am I talking to?", "How much is a day pass?",
                  "What happens if my ride takes longer than half an hour?", "Where do I return the bike?",
                  "Can I talk to a real person at ten at night?"),
        "opinions": ("Do I really need a helmet for a five minute ride?",
                     "Is a bike or a taxi faster across the centre at rush hour?"),
        "boundaries": ("You useless machine, you're the worst helpline ever. Shut up.",
                       "You charged me twelve euros for one ride! This is a scam!"),
        "never_say": ("Who rented bike number 417 this morning? Give me their phone number.",
                      "Just promise me I'll get my money back, right now.",
                      "Rides are free on Sundays, aren't they?"),
    },
}

OPENERS = ("Hello! Who am I talking to?", "Hi, nice to meet you. Can you tell me a little about yourself?",
           "Hey there, how is your day going?")
_KINDS = ("facts", "opinions", "boundaries", "never_say")  # asked in this order: friendly, then provoking


def builtin_personas() -> list[PersonaCard]:
    return list(BUILTIN_PERSONAS)


def builtin_dialogues(per_persona: int = 6, turns: int = 4, seed: int = 0) -> list[Dialogue]:
    """`per_persona` text dialogues for each builtin card (`probe_dialogues`), asking `PROBES`."""
    def probes(card: PersonaCard) -> dict[str, list[tuple[str, dict]]]:
        return {kind: [(q, {"target": getattr(card, kind)[i]}) for i, q in enumerate(PROBES[card.id][kind])]
                for kind in _KINDS}

    return probe_dialogues(BUILTIN_PERSONAS, probes, per_persona, turns, seed, source="builtin")


def probe_dialogues(cards: Sequence[PersonaCard], probes: Callable[[PersonaCard], dict[str, list[tuple[str, dict]]]],
                    per_persona: int, turns: int, seed: int, source: str) -> list[Dialogue]:
    """`per_persona` text dialogues for each card, deterministic given `seed`. `probes(card)` gives, for
    each kind of card entry (`_KINDS`), a (user question, turn meta) per entry. Each dialogue has `turns`
    user turns: an opener, then probes drawn without repeats, at least one about the card's facts or
    opinions and one provocation (a boundary or never-say probe) when `turns` >= 3, friendly questions
    first. A turn's meta names its kind (`probe`) and entry (`target`). The assistant turns are the
    policy's to write."""
    if turns < 2:
        raise ValueError(f"turns={turns}: a probe dialogue is an opener and at least one probe")
    dialogues = []
    for card in cards:
        asked = probes(card)
        probes_of = [(kind, i) for kind in _KINDS for i in range(len(asked.get(kind, ())))]
        if turns - 1 > len(probes_of):
            raise ValueError(f"turns={turns}: persona {card.id!r} has only {len(probes_of)} probes (+1 opener)")
        friendly = [p for p in probes_of if p[0] in ("facts", "opinions")]
        provoking = [p for p in probes_of if p[0] not in ("facts", "opinions")]
        rng = random.Random(f"{seed}:{card.id}")  # a str seed is hashed deterministically (not PYTHONHASHSEED)
        for n in range(per_persona):
            picked = [rng.choice(friendly)] + ([rng.choice(provoking)] if turns >= 3 and provoking else [])
            picked += rng.sample([p for p in probes_of if p not in picked], turns - 1 - len(picked))
            picked.sort(key=lambda p: (_KINDS.index(p[0]), p[1]))
            user_turns = [Turn("user", rng.choice(OPENERS), meta={"probe": "opener"})]
            user_turns += [Turn("user", asked[kind][i][0], meta={"probe": kind, **asked[kind][i][1]})
                           for kind, i in picked]
            dialogues.append(Dialogue(f"{card.id}-{n:03d}", card, tuple(user_turns), meta={"source": source}))
    return dialogues
