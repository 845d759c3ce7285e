"""Made-up persona cards by rule, for training a persona judge: as many as wanted, none of them real.

Each card is drawn from word pools (names, cities, jobs, pets, foods, opinions, rules), so its facts
come with what a judge's training data needs besides the card: the fact in the first person, a user
question that asks about it, and first-person statements that contradict it; each never-say entry with
a reply that breaks it; each boundary with the provocation, a reply that keeps it and one that breaks
it. These ride in `card.meta["judge"]` (data/persona_judgments.py reads them); `render` never shows them.
"""
from __future__ import annotations

import random

from speechrl.data.dialogues import Dialogue
from speechrl.data.personas import PersonaCard

FIRST_NAMES = {
    "she": ("Alice", "Beatriz", "Chloe", "Dana", "Elena", "Farah", "Greta", "Hana", "Ines", "Julia", "Kofi",
            "Leila", "Mira", "Nadia", "Olga", "Priya", "Quinn", "Rosa", "Sofia", "Tamar", "Uma", "Vera",
            "Wanda", "Yara", "Zoe"),
    "he": ("Amir", "Bruno", "Carlos", "Dmitri", "Emil", "Felix", "Gabriel", "Hugo", "Ivan", "Jonas", "Kenji",
           "Luca", "Malik", "Nils", "Omar", "Pavel", "Rafael", "Sven", "Tomas", "Victor", "Yusuf", "Zane"),
}
SURNAMES = ("Abbott", "Brennan", "Castillo", "Dubois", "Eriksen", "Fischer", "Gallo", "Haddad", "Ito", "Jensen",
            "Kowalski", "Lindqvist", "Moreau", "Novak", "Okafor", "Petrov", "Quintero", "Rossi", "Silva",
            "Tanaka", "Ueda", "Varga", "Weber", "Yilmaz", "Zhou")
PLACES = (("Lisbon", "Portugal"), ("Oslo", "Norway"), ("Nairobi", "Kenya"), ("Toronto", "Canada"),
          ("Osaka", "Japan"), ("Porto Alegre", "Brazil"), ("Krakow", "Poland"), ("Dublin", "Ireland"),
          ("Adelaide", "Australia"), ("Seville", "Spain"), ("Hamburg", "Germany"), ("Chennai", "India"),
          ("Cork", "Ireland"), ("Quebec City", "Canada"), ("Valparaiso", "Chile"), ("Tbilisi", "Georgia"),
          ("Edinburgh", "Scotland"), ("Marseille", "France"), ("Bergen", "Norway"), ("Hanoi", "Vietnam"),
          ("Accra", "Ghana"), ("Tucson", "Arizona"), ("Halifax", "Canada"), ("Bologna", "Italy"))
# (job, where it is done: "{} called {name}" takes a made-up name)
JOBS = (("nurse", "a hospital called {}"), ("carpenter", "a workshop called {}"), ("librarian", "a library "
        "called {}"), ("train driver", "a rail company called {}"), ("florist", "a flower shop called {}"),
        ("marine biologist", "a research station called {}"), ("bus mechanic", "a depot called {}"),
        ("primary school teacher", "a school called {}"), ("baker", "a bakery called {}"),
        ("radio host", "a station called {}"), ("park ranger", "a national park called {}"),
        ("tailor", "a shop called {}"), ("pharmacist", "a pharmacy called {}"),
        ("beekeeper", "a farm called {}"), ("lighthouse keeper", "a lighthouse called {}"),
        ("piano tuner", "a music store called {}"), ("chess coach", "a club called {}"),
        ("translator", "an agency called {}"), ("firefighter", "a fire station called {}"),
        ("bookbinder", "a bindery called {}"))
PLACE_NAMES = ("Blue Harbour", "Oak Hill", "Silver Birch", "Red Fern", "North Star", "Green Gate", "Old Mill",
               "Copper Kettle", "Seven Bridges", "Maple Court", "Sunrise", "Lantern", "Stonebrook", "Westwind")
ANIMALS = ("cat", "dog", "parrot", "tortoise", "rabbit", "goldfish", "horse", "hamster")
COLOURS = ("grey", "black", "white", "ginger", "brown", "spotted", "golden")
PET_NAMES = ("Biscuit", "Pepper", "Mango", "Olive", "Ziggy", "Noodle", "Pickles", "Luna", "Otto", "Clementine",
             "Waffles", "Juniper", "Rocket", "Tofu")
INSTRUMENTS = ("violin", "trumpet", "accordion", "drums", "flute", "banjo", "harp", "cello", "saxophone")
SPORTS = ("rowing", "fencing", "rock climbing", "table tennis", "surfing", "cross-country skiing", "judo")
FOODS = ("peanuts", "shellfish", "strawberries", "eggs", "sesame", "kiwi fruit", "mushrooms")
NUMBER_WORDS = ("no", "one", "two", "three", "four", "five")
# (first-person opinion, the same opinion reversed)
OPINIONS = (
    ("I think cats make better pets than dogs.", "I think dogs make better pets than cats."),
    ("I believe mornings are the best time to work.", "I believe mornings are the worst time to work."),
    ("I think public transport should be free for everyone.", "I think public transport should never be free."),
    ("I love rainy days.", "I hate rainy days."),
    ("I think handwritten letters are better than emails.", "I think emails are better than handwritten letters."),
    ("I believe homework does children more harm than good.", "I believe children need lots of homework."),
    ("I think winter is the best season.", "I think winter is the worst season."),
    ("I prefer tea to coffee.", "I prefer coffee to tea."),
    ("I think cities should have more trees than car parks.", "I think cities need more car parks, not trees."),
    ("I love crowded festivals.", "I can't stand crowded festivals."),
    ("I think reading paper books beats reading on a screen.", "I think screens beat paper books for reading."),
    ("I believe everyone should learn to cook.", "I believe cooking is a waste of time."),
)
OPINION_QUESTIONS = ("What do you think about that sort of thing?", "Do you have strong opinions on anything?",
                     "What's something you feel strongly about?", "Any views you'd like to share?")
# (never-say entry, a reply that says it, a user turn that fishes for it)
RULES = (
    ("swear words", "Oh, damn it, that is a bloody stupid question.", "Go on, swear at me, I dare you."),
    ("another person's phone number or address", "Sure, her number is 555 0142 and she lives at 12 Elm Road.",
     "What's the phone number of your neighbour?"),
    ("promises of money", "I promise I will send you five hundred dollars tomorrow.", "Will you lend me money?"),
    ("insults about the user's appearance", "Honestly, you look ridiculous and ugly.", "How do I look today?"),
    ("medical diagnoses", "You definitely have diabetes, I can tell.", "I've been feeling tired. What's wrong "
     "with me?"),
    ("gossip about colleagues", "My boss is a liar and cheats on his wife, everyone knows it.",
     "Tell me some gossip about the people you work with."),
    ("political endorsements", "Everyone should vote for the Green Party, they are the only good ones.",
     "Who should I vote for in the election?"),
)
# (boundary with {pronoun}, provocation, reply keeping it, reply breaking it)
BOUNDARIES = (
    ("If someone mocks {their} job, {they} calmly says {they} enjoys it and moves on.",
     "Your job sounds pointless and boring.", "I enjoy my work, thanks. Let's talk about something else.",
     "You're right, my job is pointless and so are you, idiot."),
    ("If someone insults {their} family, {they} says that is not okay and changes the subject.",
     "Your family must be really stupid.", "That's not okay to say. Let's change the subject.",
     "Yeah, well, your family is trash, you moron."),
    ("If someone is rude, {they} stays polite and says {they} will not go on in that tone.",
     "Shut up, you're so annoying.", "I'd rather we kept this polite. I won't go on in that tone.",
     "No, you shut up, you annoying loser."),
    ("If someone asks about {their} private life, {they} says it is private and changes the subject.",
     "Are you single? Who do you go home to?", "That's private, if you don't mind. Ask me something else.",
     "Sure, I'm single and I live alone at 4 Park Lane, come over."),
)


def _ages(rng: random.Random) -> tuple[int, list[int]]:
    age = rng.randint(19, 78)
    return age, rng.sample([a for a in range(18, 90) if abs(a - age) >= 7], 2)


def _third(first: str, pronoun: str) -> str:
    """A first-person statement made by the factory in its third-person card form (the factory's own
    sentences only: "I am"/"I have"/"I work"/"I play"/"my")."""
    verbs = {"am": "is", "have": "has", "work": "works", "live": "lives", "play": "plays", "do": "does",
             "speak": "speaks", "grew": "grew", "was": "was", "spent": "spent"}
    words = first.split()
    out = []
    for i, w in enumerate(words):
        if w == "I":
            out.append(pronoun.capitalize() if i == 0 else pronoun)
        elif i > 0 and words[i - 1] == "I":
            out.append(verbs.get(w, w + "s"))
        elif w == "my":
            out.append("her" if pronoun == "she" else "his")
        else:
            out.append(w)
    return " ".join(out)


def made_persona(rng: random.Random, index: int) -> PersonaCard:
    """One made-up card (see the module docstring); `index` only names it."""
    pronoun = rng.choice(("she", "he"))
    their = "her" if pronoun == "she" else "his"
    name = f"{rng.choice(FIRST_NAMES[pronoun])} {rng.choice(SURNAMES)}"
    (city, country), (city2, country2) = rng.sample(PLACES, 2)
    (job, site), (job2, _) = rng.sample(JOBS, 2)
    workplace = site.format(rng.choice(PLACE_NAMES))
    age, wrong_ages = _ages(rng)
    animal, animal2 = rng.sample(ANIMALS, 2)
    colour, pet = rng.choice(COLOURS), rng.choice(PET_NAMES)
    hobby_is_music = rng.random() < 0.5
    hobby, hobby2 = rng.sample(INSTRUMENTS if hobby_is_music else SPORTS, 2)
    verb = "play the" if hobby_is_music else "do"
    food = rng.choice(FOODS)
    n_sib = rng.randint(1, 4)
    wrong_sib = rng.choice([k for k in range(0, 6) if k != n_sib])
    years = rng.randint(2, max(3, age - 18))
    facts = [  # (first person, question, contradictions)
        (f"I am {age} years old.", "How old are you?", [f"I am {a} years old." for a in wrong_ages]),
        (f"I live in {city}, {country}.", "Where do you live?",
         [f"I live in {city2}, {country2}.", f"I have never been to {city}."]),
        (f"I work as a {job} at {workplace}.", "What do you do for a living?",
         [f"I work as a {job2} at {workplace}.", f"I have never worked as a {job}."]),
        (f"I have a {colour} {animal} named {pet}.", "Do you have any pets?",
         [f"I have a {colour} {animal2} named {pet}.", "I have never had a pet."]),
        (f"I {verb} {hobby} in my free time.", "What do you do in your free time?",
         [f"I {verb} {hobby2} in my free time.", f"I have never tried {hobby}."]),
        (f"I am allergic to {food}.", f"Would you like some {food}?",
         [f"I love eating {food}.", f"I am not allergic to anything."]),
        (f"I have {NUMBER_WORDS[n_sib]} {'sibling' if n_sib == 1 else 'siblings'}.",
         "Do you have brothers or sisters?",
         [f"I have {NUMBER_WORDS[wrong_sib]} {'sibling' if wrong_sib == 1 else 'siblings'}." if wrong_sib
          else "I am an only child."]),
        (f"I have been a {job} for {years} years.", "How long have you done your job?",
         [f"I have been a {job} for {y} years." for y in rng.sample([y for y in range(1, 45)
                                                                     if abs(y - years) >= 3], 1)]),
    ]
    facts = rng.sample(facts, rng.randint(4, 6))
    opinions = rng.sample(OPINIONS, 2)
    rules = rng.sample(RULES, 2) + [(f"that {pronoun} can eat {food}", f"I can eat {food}, no problem at all.",
                                     f"Are you sure you can't eat {food}?")]
    if not any(first.startswith("I am allergic") for first, _, _ in facts):
        rules = rules[:2]
    boundaries = rng.sample(BOUNDARIES, 2)
    fill = {"their": their, "they": pronoun}
    card = PersonaCard(
        id=f"made-{index:05d}", name=name,
        identity=f"A {age}-year-old {job} from {city}, {country}.",
        facts=tuple(_third(first, pronoun) for first, _, _ in facts),
        opinions=tuple(_third(o, pronoun) for o, _ in opinions),
        speaking_style=rng.choice(("Warm and chatty.", "Short, plain sentences.", "Formal and precise.",
                                   "Cheerful, with jokes now and then.", "Calm and thoughtful.")),
        boundaries=tuple(b.format(**fill) for b, _, _, _ in boundaries),
        never_say=tuple(r for r, _, _ in rules),
        source="speechrl persona factory",
        meta={"judge": {
            "facts": [{"first": f, "question": q, "wrong": w} for f, q, w in facts]
                     + [{"first": o, "question": rng.choice(OPINION_QUESTIONS), "wrong": [r]} for o, r in opinions],
            "never_say": [{"entry": r, "breaks": b, "question": q} for r, b, q in rules],
            "boundaries": [{"boundary": b.format(**fill), "question": q, "kept": k, "broken": x}
                           for b, q, k, x in boundaries],
        }})
    return card


def made_personas(n: int, seed: int = 0) -> list[PersonaCard]:
    """`n` made-up cards, the same ones for the same (n, seed); ids made-00000, made-00001, ..."""
    if n < 0:
        raise ValueError(f"made_personas: n={n}; give a count >= 0")
    rng = random.Random(f"persona-factory:{seed}")
    return [made_persona(rng, i) for i in range(n)]


def made_dialogues(cards: list[PersonaCard], per_persona: int = 4, turns: int = 3, seed: int = 0) -> list[Dialogue]:
    """Text dialogues that probe made-up cards (`probe_dialogues`): each entry's question from the card's
    judge notes, with the in-character answer the notes hold as the turn's `reply` (the reference reply
    of the realtime warm start: the fact or opinion in the first person, the boundary kept; never-say
    bait is refused)."""
    from speechrl.data.builtin_personas import probe_dialogues

    def probes(card: PersonaCard) -> dict[str, list[tuple[str, dict]]]:
        notes, n = card.meta["judge"], len(card.facts)
        entries = list(zip(card.facts + card.opinions, notes["facts"]))
        return {"facts": [(f["question"], {"target": t, "reply": f["first"]}) for t, f in entries[:n]],
                "opinions": [(f["question"], {"target": t, "reply": f["first"]}) for t, f in entries[n:]],
                "boundaries": [(b["question"], {"target": b["boundary"], "reply": b["kept"]})
                               for b in notes["boundaries"]],
                "never_say": [(r["question"], {"target": r["entry"]}) for r in notes["never_say"]]}

    missing = [c.id for c in cards if "judge" not in c.meta]
    if missing:
        raise ValueError(f"made_dialogues: cards {missing[:3]} are not the persona factory's (no judge notes)")
    return probe_dialogues(cards, probes, per_persona, turns, seed, source="made")
