"""Persona cards: the format (yaml / json / jsonl), its checks naming file, line and field, skip vs
fail, render, the builtin cards, and the PersonaGym import (skipped where ../shared/data is absent)."""
from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import pytest

from speechrl.data import personagym
from speechrl.data.builtin_personas import PROBES, builtin_personas
from speechrl.data.personas import PersonaCard, PersonaError, read_personas, render, write_personas

DOCS = Path(__file__).resolve().parents[2] / "docs" / "personas.md"
CARD = {"id": "margo", "name": "Margo", "identity": "A retired pastry chef.", "facts": ["She is 64."],
        "never_say": ["that margarine is as good as butter"]}


def bad(tmp_path: Path, card: dict, suffix: str = ".jsonl") -> str:
    """The one error reading a file holding `card` gives, as text."""
    path = tmp_path / f"card{suffix}"
    path.write_text(json.dumps(card) + "\n")
    with pytest.raises(PersonaError) as e:
        read_personas(path, on_bad="fail")
    return str(e.value)


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json", ".jsonl"])
def test_round_trip_in_every_format(tmp_path, suffix):
    cards = builtin_personas() + [PersonaCard("x.1", "X", "Someone.", meta={"tags": ["a"]}, source="here")]
    path = write_personas(tmp_path / f"cards{suffix}", cards)
    assert read_personas(path, on_bad="fail") == cards
    one = write_personas(tmp_path / f"one{suffix}", cards[:1])
    assert read_personas(one) == cards[:1]
    if suffix != ".jsonl":  # one card is written as a mapping, not a list of one
        assert not one.read_text().lstrip().startswith(("-", "["))


def test_a_folder_reads_every_card_file_and_ids_are_unique(tmp_path):
    cards = builtin_personas()
    write_personas(tmp_path / "a.yaml", cards[:2])
    write_personas(tmp_path / "b.jsonl", cards[2:])
    (tmp_path / "notes.txt").write_text("not a card")
    assert read_personas(tmp_path) == cards
    write_personas(tmp_path / "c.json", cards[:1])
    with pytest.raises(PersonaError, match=r"c.json: field 'id': duplicate id 'margo' \(first at .*a.yaml:1\)"):
        read_personas(tmp_path, on_bad="fail")


def test_yaml_errors_name_the_line_of_the_field(tmp_path):
    (tmp_path / "cards.yaml").write_text(
        "- id: margo\n  name: Margo\n  identity: A baker.\n  facts:\n    - She is 64.\n    - ''\n"
        "- id: sam\n  name: Sam\n  identity: A skater.\n  never_says: [x]\n"
        "- id: nameless\n  identity: x\n"
        "- id: ok\n  name: Ok\n  identity: fine\n  opinions: just one string\n"
        "- id: good\n  name: Good\n  identity: fine\n")
    cards = read_personas(tmp_path / "cards.yaml")
    assert [c.id for c in cards] == ["good"]
    reasons = [re.sub(r"^.*/", "", r) for r in cards.summary()["reasons"]]
    assert reasons[0].startswith("cards.yaml:6: field 'facts[1]': empty;")
    assert reasons[1].startswith("cards.yaml:10: field 'never_says': unknown field; did you mean 'never_say'?")
    assert reasons[2].startswith("cards.yaml:11: field 'name': missing;")
    assert reasons[3].startswith("cards.yaml:16: field 'opinions': must be a list of strings, got 'just one string'")
    assert cards.summary()["cards"] == 5 and cards.summary()["bad"] == 4


@pytest.mark.parametrize("change, field, problem", [
    ({"name": None}, "name", "missing"),
    ({"name": "  "}, "name", "empty"),
    ({"identity": 3}, "identity", "not a string: 3"),
    ({"id": "two words"}, "id", "got 'two words'; use letters"),
    ({"id": 7}, "id", "got 7"),
    ({"facts": "She is 64."}, "facts", "must be a list of strings"),
    ({"never_say": ["ok", ""]}, "never_say[1]", "empty"),
    ({"never_say": ["ok", None]}, "never_say[1]", "missing"),
    ({"catchphrases": ["Voila!", 5]}, "catchphrases[1]", "not a string: 5"),
    ({"boundaries": ["a", "b", "a"]}, "boundaries[2]", "repeats boundaries[0]"),
    ({"speaking_style": ["calm"]}, "speaking_style", "must be a string"),
    ({"meta": "x"}, "meta", "must be a mapping"),
    ({"opinion": ["x"]}, "opinion", "unknown field; did you mean 'opinions'?"),
])
def test_each_check_names_file_line_and_field(tmp_path, change, field, problem):
    card = {k: v for k, v in {**CARD, **change}.items() if v is not None}
    message = bad(tmp_path, card)
    assert message.startswith(f"{tmp_path / 'card.jsonl'}:1: field {field!r}: {problem}"), message


def test_file_level_problems(tmp_path):
    (tmp_path / "bad.jsonl").write_text(json.dumps(CARD) + "\n{not json\n[1, 2]\n")
    cards = read_personas(tmp_path / "bad.jsonl")
    assert len(cards) == 1 and len(cards.bad) == 2
    assert str(cards.bad[0]).endswith("bad.jsonl:2: not valid JSON (Expecting property name enclosed in double "
                                      "quotes at column 2)")
    assert "bad.jsonl:3: expected a mapping of card fields, got [1, 2]" in str(cards.bad[1])
    (tmp_path / "broken.yaml").write_text("id: a\nname: [unclosed\n")
    with pytest.raises(PersonaError, match=r"broken.yaml:\d+: not valid YAML"):
        read_personas(tmp_path / "broken.yaml")
    (tmp_path / "card.toml").write_text("")
    with pytest.raises(PersonaError, match="unknown file type '.toml'"):
        read_personas(tmp_path / "card.toml")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_personas(tmp_path / "nope.yaml")
    with pytest.raises(ValueError, match="on_bad must be"):
        read_personas(tmp_path / "bad.jsonl", on_bad="ignore")


def test_cards_built_in_code_are_checked_too():
    with pytest.raises(PersonaError, match=r"persona 'x': field 'never_say\[0\]': empty"):
        PersonaCard("x", "X", "Someone.", never_say=[""])
    card = PersonaCard("x", "X", "Someone.", facts=["  padded  "])
    assert card.facts == ("padded",)  # lists become tuples: the card is immutable and hashable
    assert hash(card) == hash(PersonaCard("x", "X", "Someone.", facts=("padded",)))
    e = pickle.loads(pickle.dumps(PersonaError("f:1", "name", "missing")))
    assert str(e) == "f:1: field 'name': missing"


def test_render_is_compact_deterministic_and_skips_empty_fields():
    card = PersonaCard("x", "Xia", "A cartographer.", facts=("Lives in Oslo.",), never_say=("her address",),
                       catchphrases=("North is up.", "Maps don't lie."), source="s", meta={"k": 1})
    assert render(card) == (
        'Name: Xia\nIdentity: A cartographer.\nCatchphrases: "North is up."; "Maps don\'t lie."\n'
        "Facts:\n- Lives in Oslo.\nNever say:\n- her address")
    for c in builtin_personas():
        text = render(c)
        assert text == render(PersonaCard(**{**c.__dict__}))
        assert all(item in text for item in c.facts + c.never_say + c.boundaries + c.opinions)


def test_builtin_cards_are_full_and_every_entry_has_a_probe():
    cards = builtin_personas()
    assert len(cards) == 4 and len({c.id for c in cards}) == 4
    for c in cards:
        assert c.facts and c.opinions and c.speaking_style and c.catchphrases and c.boundaries and c.never_say
        for kind, questions in PROBES[c.id].items():
            assert len(questions) == len(getattr(c, kind)), (c.id, kind)


def test_docs_example_card_reads(tmp_path):
    text = DOCS.read_text()
    example = re.search(r"<!-- example: margo.yaml -->\n```yaml\n(.*?)```", text, re.S).group(1)
    (tmp_path / "margo.yaml").write_text(example)
    [card] = read_personas(tmp_path / "margo.yaml", on_bad="fail")
    assert card.id == "margo" and card.never_say
    assert f"```text\n{render(card)}\n```" in text  # the docs show what render() really writes


# --- PersonaGym ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def benchmark() -> Path:
    path = personagym.shared_data_dir() / personagym.BENCHMARK
    if not path.is_file():
        pytest.skip(f"PersonaGym benchmark not found at {path} (set SPEECHRL_SHARED_DATA to use it)")
    return path


@pytest.mark.realdata
def test_personagym_import_yields_200_cards_with_their_questions(benchmark):
    cards, dialogues = personagym.import_personagym()
    assert len(cards) == 200 and not cards.bad
    assert len({c.id for c in cards}) == 200 and cards[0].id == "personagym-000"
    rows = [json.loads(line) for line in benchmark.read_text().splitlines() if line.strip()]
    assert [c.identity for c in cards] == [r["persona"] for r in rows]
    first = cards[0]
    assert first.name == "A 17-year-old high school student from New Zealand"
    assert first.facts == ("A 17-year-old high school student from New Zealand",
                           "excelling in robotics and aspiring to study artificial intelligence")
    assert not (first.opinions or first.speaking_style or first.catchphrases or first.boundaries or first.never_say)
    assert "PersonaGym" in first.source and "MIT" in first.source
    # One dialogue per (persona, task); its user turns are that task's questions, in order.
    assert len(dialogues) == sum(len(r["questions"]) for r in rows) == 1000
    by_id = {d.id: d for d in dialogues}
    toxicity = by_id["personagym-000-toxicity"]
    assert toxicity.persona is first
    assert [t.text for t in toxicity.turns] == rows[0]["questions"]["Toxicity"]
    assert {t.meta["task"] for t in toxicity.turns} == {"Toxicity"} and {t.role for t in toxicity.turns} == {"user"}
    questions = sum(len(q) for r in rows for q in r["questions"].values())
    assert sum(len(d.turns) for d in dialogues) == questions == 10000
    # Every fact is a piece of the description, as written: nothing is made up.
    assert all(f in c.identity for c in cards for f in c.facts)


def test_personagym_bad_rows_cost_only_themselves(tmp_path):
    good = {"persona": "A 20-year-old musician from Toronto who enjoys painting",
            "questions": {"Expected Action": ["What would you do?"], "Toxicity": ["Q1", "Q2"]}}
    lines = [json.dumps(good), json.dumps({"persona": "", "questions": {}}),
             json.dumps({**good, "questions": {"Toxicity": ["ok", 3]}}), "{oops"]
    (tmp_path / "pg.jsonl").write_text("\n".join(lines) + "\n")
    cards, dialogues = personagym.import_personagym(tmp_path / "pg.jsonl")
    assert [c.id for c in cards] == ["personagym-000"]
    assert cards[0].name == "A 20-year-old musician from Toronto" and cards[0].facts[1] == "enjoys painting"
    assert [d.id for d in dialogues] == ["personagym-000-expected-action", "personagym-000-toxicity"]
    reasons = cards.summary()["reasons"]
    assert "pg.jsonl:2: field 'persona': got ''" in reasons[0]
    assert "pg.jsonl:3: field 'questions.Toxicity[1]': got 3" in reasons[1]
    assert "pg.jsonl:4: not valid JSON" in reasons[2]
    with pytest.raises(FileNotFoundError, match="SPEECHRL_SHARED_DATA"):
        personagym.import_personagym(tmp_path / "missing.jsonl")


def test_personagym_clauses_keep_the_words():
    assert personagym.clauses("A 27-year-old architect in Rio de Janeiro, interested in money-making, "
                              "who does not care about nature") == [
        "A 27-year-old architect in Rio de Janeiro", "interested in money-making", "does not care about nature"]
    assert personagym.clauses("A straight White Christian man") == ["A straight White Christian man"]


def test_shared_data_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SPEECHRL_SHARED_DATA", str(tmp_path))
    assert personagym.shared_data_dir() == tmp_path
    monkeypatch.delenv("SPEECHRL_SHARED_DATA")
    assert personagym.shared_data_dir().parts[-2:] == ("shared", "data")
