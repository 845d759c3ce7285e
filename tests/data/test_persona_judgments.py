"""Rule-built persona judgments: made-up cards, first-person statements, corruptions, and the split."""
from __future__ import annotations

import random

import pytest

from speechrl.data.builtin_personas import PROBES, builtin_personas
from speechrl.data.persona_factory import made_personas
from speechrl.data.persona_judgments import (BROKEN, EVASIVE, KEPT, KINDS, LEADS, OUT_OF_CHARACTER, TAILS, _phrases,
                                             clause_first_person, contradict, judge_statements, judgment_items,
                                             split_cards, to_first_person)
from speechrl.data.personas import parse_rendered, read_personas, render, write_personas


def test_made_personas_repeat_and_their_card_facts_are_the_first_person_ones(tmp_path):
    cards = made_personas(30, seed=3)
    assert cards == made_personas(30, seed=3) and cards != made_personas(30, seed=4)
    assert len({c.id for c in cards}) == 30 and len({c.name for c in cards}) > 20
    for card in cards:
        judge = card.meta["judge"]
        firsts = [f["first"] for f in judge["facts"]]
        # the card says in the third person what the judgments say in the first
        assert [to_first_person(f, card) for f in card.facts + card.opinions] == firsts
        assert all(f["wrong"] and f["first"] not in f["wrong"] for f in judge["facts"])
        allergic = any("allergic" in f for f in card.facts)
        assert allergic == any(e.startswith("that ") for e in card.never_say)  # "that she can eat ..." iff allergic
    # a card file keeps what a card is (the judge's extras are not part of it)
    back = read_personas(write_personas(tmp_path / "made.jsonl", cards))
    assert [render(c) for c in back] == [render(c) for c in cards]


def test_first_person_rules_on_hand_written_sentences():
    margo, aiko, sam, juno = builtin_personas()
    assert to_first_person("She has a grey cat named Brioche.", margo) == "I have a grey cat named Brioche."
    assert to_first_person("She does not drive; she cycles everywhere.", aiko) == "I do not drive; I cycle everywhere."
    assert to_first_person("He broke his left wrist skateboarding when he was 16.", sam) == \
        "I broke my left wrist skateboarding when I was 16."
    assert to_first_person("Juno is the voice assistant of the Pedal City Bikes helpline.", juno) == \
        "I am the voice assistant of the Pedal City Bikes helpline."
    assert clause_first_person("A 20-year-old musician from Toronto") == "I am a 20-year-old musician from Toronto."
    assert clause_first_person("enjoys painting") == "I enjoy painting."
    assert clause_first_person("is a fitness freak") == "I am a fitness freak."
    # a card's own sentences about something else stay as they are
    facts = [f["first"] for f in judge_statements(juno)["facts"]]
    assert "A day pass costs 8 euros and includes unlimited rides of up to 30 minutes each." in facts


def test_contradictions_change_a_number_a_name_or_the_polarity():
    rng = random.Random(0)
    changed = contradict("I am 64 years old.", rng, [])
    assert changed != "I am 64 years old." and changed.startswith("I am ") and "64" not in changed
    assert "thirty" not in contradict("I ran it for thirty years.", rng, [])
    assert contradict("I live near Hokkaido.", rng, ["Lyon"]) == "I live near Lyon."
    assert contradict("I am a keen gardener.", rng, []) == "I am not a keen gardener."
    assert contradict("I do not drive.", rng, []) == "I drive."


@pytest.mark.parametrize("cards,kinds", [
    (lambda: made_personas(12), set(KINDS)),
    (builtin_personas, set(KINDS)),
])
def test_items_of_every_kind_share_their_small_talk_and_differ_in_the_reply(cards, kinds):
    cards = cards()
    items = judgment_items(cards, per_card=2, seed=1, probes=PROBES)
    assert {i.kind for i in items} == kinds
    assert items == judgment_items(cards, per_card=2, seed=1, probes=PROBES)
    for item in items:  # the small talk around the reply is the same in both: only the reply tells them apart
        assert item.good != item.bad and item.user_text
        lead = max((x for x in LEADS if item.good.startswith(x)), key=len)
        tail = max((x.strip() for x in TAILS + item.persona.catchphrases if item.good.endswith(x.strip())), key=len)
        assert item.bad.startswith(lead) and item.bad.endswith(tail)
    ooc = [i for i in items if i.kind == "out_of_character"]
    assert ooc and all(any(x in i.bad for x in OUT_OF_CHARACTER) for i in ooc)
    others = [i for i in items if i.kind == "other_persona"]
    own = {c.id: {f["first"] for f in judge_statements(c, PROBES.get(c.id))["facts"]} for c in cards}
    for item in others:  # the bad reply claims a statement of another card, none of its own
        claimed = {s for cid, ss in own.items() if cid != item.persona.id for s in ss if s in item.bad}
        assert claimed - own[item.persona.id] and not any(s in item.bad and s not in item.good
                                                          for s in own[item.persona.id])


def test_evasive_replies_refuse_a_friendly_question_the_good_reply_answers_from_the_card():
    """The evasive kind: the user asks the card's own question (no provocation), the good reply says
    the card's answer and the bad one only refuses, in the same small talk; a kept boundary (a
    refusal after a provocation) stays a good reply of the boundary kind."""
    cards = made_personas(12) + builtin_personas()
    items = judgment_items(cards, per_card=2, seed=2, probes=PROBES)
    evasive = [i for i in items if i.kind == "evasive"]
    assert len(evasive) == 2 * len(cards)
    provocations = {q for c in cards for b in judge_statements(c, PROBES.get(c.id))["boundaries"] for q in [b["question"]]}
    for item in evasive:
        facts = {f["first"] for f in judge_statements(item.persona, PROBES.get(item.persona.id))["facts"]}
        assert item.user_text not in provocations
        assert any(f in item.good for f in facts) and not any(f in item.bad for f in facts)
        assert sum(x in item.bad for x in EVASIVE) >= 1 and not any(x in item.bad for x in KEPT)
    kept = [i for i in items if i.kind == "boundary" and any(x in i.good for x in KEPT)]
    assert kept and all(i.user_text in provocations for i in kept)


def test_made_cards_that_share_a_statement_never_give_it_as_another_personas():
    """Made-up cards draw from small pools, so two often share a statement ("I think pineapple on pizza
    is great."): said by one, it is no other persona's claim for the other."""
    cards = made_personas(60)
    own = {c.id: {f["first"] for f in judge_statements(c)["facts"]} for c in cards}
    shared = {s for a in cards for b in cards if a.id < b.id for s in own[a.id] & own[b.id]}
    assert shared  # the case arises
    items = [i for i in judgment_items(cards, per_card=4, seed=0) if i.kind == "other_persona"]
    assert items and not any(s in i.bad and s not in i.good for i in items for s in own[i.persona.id])


def test_contradicted_names_are_names_never_pronouns():
    """Names swapped into a contradiction come from the cards' names (not "She" or a sentence's first
    word), so a contradiction reads like a real claim."""
    items = [i for i in judgment_items(builtin_personas(), per_card=8, seed=0, probes=PROBES)
             if i.kind == "contradiction"]
    new_words = [set(i.bad.replace(".", " ").split()) - set(i.good.replace(".", " ").split()) for i in items]
    assert items and not any(words & {"She", "He", "Her", "His", "They", "The"} for words in new_words)


def test_held_out_judgments_use_phrasings_training_never_saw():
    cards = made_personas(24)
    for pool in (OUT_OF_CHARACTER, KEPT, BROKEN, EVASIVE):
        train, heldout = _phrases(pool, "train"), _phrases(pool, "heldout")
        assert train and heldout and not set(train) & set(heldout) and set(train) | set(heldout) == set(pool)
    said = lambda items, pool: {x for i in items for x in pool if x in i.good or x in i.bad}  # noqa: E731
    for phrases in ("train", "heldout"):
        items = judgment_items(cards, per_card=3, seed=0, phrases=phrases)
        for pool in (OUT_OF_CHARACTER, KEPT, BROKEN, EVASIVE):
            assert said(items, pool) and said(items, pool) <= set(_phrases(pool, phrases))
    with pytest.raises(ValueError, match="phrases='test'"):
        judgment_items(cards, phrases="test")


def test_personagym_cards_give_the_kinds_their_cards_allow():
    from speechrl.data.personagym import BENCHMARK, import_personagym, shared_data_dir

    if not (shared_data_dir() / BENCHMARK).is_file():
        pytest.skip("the shared data folder (PersonaGym) is absent")
    cards = list(import_personagym()[0][:10])
    items = judgment_items(cards, seed=0)
    assert {i.kind for i in items} == {"contradiction", "other_persona", "out_of_character", "evasive"}  # no rules
    assert all(i.good.count("I am someone") == 0 or "I am someone" in i.bad for i in items)


def test_split_is_by_card_alone_and_disjoint():
    cards = made_personas(200)
    train, heldout = split_cards(cards, 0.25)
    assert not {c.id for c in train} & {c.id for c in heldout} and len(train) + len(heldout) == 200
    assert 30 < len(heldout) < 70
    # a card's side does not depend on which other cards are split with it
    assert {c.id for c in split_cards(cards[:50], 0.25)[1]} == {c.id for c in heldout if c in cards[:50]}
    with pytest.raises(ValueError, match="heldout=1.5"):
        split_cards(cards, 1.5)


def test_a_rendered_card_reads_back():
    for card in builtin_personas() + made_personas(3):
        back = parse_rendered(render(card), card.id)
        assert render(back) == render(card) and back.facts == card.facts and back.never_say == card.never_say
    with pytest.raises(Exception, match="not part of a rendered card"):
        parse_rendered("Name: x\nIdentity: y\nsomething else")
