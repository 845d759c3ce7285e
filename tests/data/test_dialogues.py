"""Dialogues: the format, its checks naming file, line and field, personas by id or inline, the
builtin generator, espeak-ng speech for text-only user turns (cached), and codec ids vs a codec."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from speechrl.data import synth
from speechrl.data.audio import load_audio, write_wav
from speechrl.data.builtin_personas import builtin_dialogues, builtin_personas
from speechrl.data.dialogues import (
    Dialogue, DialogueError, Turn, check_codec_ids, read_dialogues, synthesize_user_turns, write_dialogues,
)
from speechrl.data.personas import PersonaError

DOCS = Path(__file__).resolve().parents[2] / "docs" / "personas.md"
CARDS = builtin_personas()
ROW = {"id": "d1", "persona": "margo", "turns": [
    {"role": "user", "text": "Do you have any pets?"},
    {"role": "assistant", "text": "Oui, a grey cat called Brioche.", "codec_ids": [1, 9, 2, 10]}]}


def write_rows(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def error_of(tmp_path: Path, row: dict) -> str:
    path = write_rows(tmp_path / "d.jsonl", [row])
    with pytest.raises(DialogueError) as e:
        read_dialogues(path, personas=CARDS, on_bad="fail")
    return str(e.value)


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("clips") / "audio" / "hello.wav"
    write_wav(path, synth.synthesize("hello there", "en-us", 175, 50, 16000), 16000)
    return path


def test_round_trip_by_id_and_inline(tmp_path, clip):
    margo, sam = CARDS[0], CARDS[2]
    dialogues = [
        Dialogue("d1", margo, (Turn("user", "hello there", audio=str(clip), meta={"task": "t"}),
                               Turn("assistant", "Bonjour!", codec_ids=[3, 11], audio=str(clip)),
                               Turn("user", audio=str(clip))), meta={"split": "train"}),
        Dialogue("d2", sam, (Turn("user", "How old are you, mate?"),)),
    ]
    by_id = write_dialogues(tmp_path / "out" / "by_id.jsonl", dialogues)
    row = json.loads(by_id.read_text().splitlines()[0])
    assert row["persona"] == "margo"
    assert row["turns"][0]["audio"] == os.path.relpath(clip, tmp_path / "out")  # movable with its folder
    assert read_dialogues(by_id, personas=CARDS, on_bad="fail") == dialogues
    inline = write_dialogues(tmp_path / "inline.jsonl", dialogues, inline_personas=True)
    assert json.loads(inline.read_text().splitlines()[1])["persona"]["id"] == "sam"
    assert read_dialogues(inline, on_bad="fail") == dialogues
    assert dialogues[0].turns[1].codec_ids == (3, 11)


def test_yaml_dialogue_and_line_numbers(tmp_path):
    (tmp_path / "d.yaml").write_text(
        "id: y1\npersona: aiko\nturns:\n  - role: user\n    text: Where do you work?\n"
        "  - role: assistant\n    text: At the observatory.\n    codec_ids: [1, -2]\n")
    with pytest.raises(DialogueError, match=r"d.yaml:8: field 'turns\[1\].codec_ids\[1\]': is -2; codec ids "
                                            r"are ints >= 0"):
        read_dialogues(tmp_path / "d.yaml", personas=CARDS, on_bad="fail")


@pytest.mark.parametrize("change, field, problem", [
    ({"turns": [{"role": "narrator", "text": "Once upon a time"}]}, "turns[0].role",
     "'narrator' is not a role; use one of ['user', 'assistant']"),
    ({"turns": [{"text": "hi"}]}, "turns[0].role", "missing"),
    ({"turns": [{"role": "user"}]}, "turns[0].text", "missing; a user turn needs its text, its audio, or both"),
    ({"turns": [{"role": "user", "text": " "}]}, "turns[0].text", "empty"),
    ({"turns": [{"role": "user", "text": "hi", "codec_ids": [1]}]}, "turns[0].codec_ids",
     "only assistant turns carry codec ids"),
    ({"turns": [{"role": "user", "text": "hi"}, {"role": "assistant", "codec_ids": [1]}]}, "turns[1].text",
     "missing; an assistant turn needs the text"),
    ({"turns": [{"role": "user", "text": "hi"}, {"role": "assistant", "text": "yo", "codec_ids": "1 2 3"}]},
     "turns[1].codec_ids", "must be a non-empty list of ints, got '1 2 3'"),
    ({"turns": [{"role": "user", "text": "hi"}, {"role": "assistant", "text": "yo", "codec_ids": []}]},
     "turns[1].codec_ids", "must be a non-empty list of ints"),
    ({"turns": [{"role": "user", "text": "hi"}, {"role": "assistant", "text": "yo", "codec_ids": [4, 2.5]}]},
     "turns[1].codec_ids[1]", "is 2.5; codec ids are ints >= 0"),
    ({"turns": [{"role": "user", "text": "hi"}, {"role": "assistant", "text": "yo", "codec_ids": [True]}]},
     "turns[1].codec_ids[0]", "is True"),
    ({"turns": [{"role": "user", "text": "hi", "audio": "nope.wav"}]}, "turns[0].audio", "file not found:"),
    ({"turns": [{"role": "user", "txt": "hi"}]}, "turns[0].txt", "unknown field; did you mean 'text'?"),
    ({"turns": [{"role": "assistant", "text": "Hello!"}]}, "turns", "has no user turn"),
    ({"turns": []}, "turns", "got []"),
    ({"turns": None}, "turns", "missing"),
    ({"turns": ["hi"]}, "turns[0]", "expected a mapping"),
    ({"persona": "nobody"}, "persona", "unknown persona id 'nobody' (known: aiko, juno, margo, sam)"),
    ({"persona": None}, "persona", "missing; give a persona id or an inline card"),
    ({"persona": {"id": "x", "name": "X"}}, "persona.identity", "missing"),
    ({"persona": {"id": "x", "name": "X", "identity": "Y", "never_say": [""]}}, "persona.never_say[0]", "empty"),
    ({"persona": {**CARDS[0].__dict__, "facts": [], "meta": {}}}, "persona.id",
     "a different card with id 'margo' is already in the personas passed in"),
    ({"id": ["a"]}, "id", "must be a string or a number"),
    ({"meta": "x"}, "meta", "must be a mapping"),
    ({"speaker": "x"}, "speaker", "unknown field"),
])
def test_each_check_names_file_line_and_field(tmp_path, change, field, problem):
    row = {k: v for k, v in {**ROW, **change}.items() if v is not None}
    message = error_of(tmp_path, row)
    assert message.startswith(f"{tmp_path / 'd.jsonl'}:1: field {field!r}: {problem}"), message


def test_bad_dialogues_cost_only_themselves(tmp_path):
    rows = [ROW, {**ROW, "id": "d2", "persona": "nobody"}, "{oops", {**ROW, "id": None}, {**ROW, "id": "d1"}]
    dialogues = read_dialogues(write_rows(tmp_path / "d.jsonl", rows), personas=CARDS)
    assert [d.id for d in dialogues] == ["d1", "d.jsonl:4"]  # no id: <file>:<line>
    assert dialogues.summary()["dialogues"] == 5 and dialogues.summary()["bad"] == 3
    reasons = [r.removeprefix(f"{tmp_path}/") for r in dialogues.summary()["reasons"]]
    assert reasons[0].startswith("d.jsonl:2: field 'persona': unknown persona id 'nobody'")
    assert reasons[1].startswith("d.jsonl:3: not valid JSON")
    assert reasons[2].startswith("d.jsonl:5: field 'id': duplicate id 'd1' (first at")
    assert isinstance(dialogues.bad[0], PersonaError)  # one except clause catches cards and dialogues
    with pytest.raises(FileNotFoundError):
        read_dialogues(tmp_path / "none.jsonl")


def test_builtin_dialogues_are_deterministic_and_probe_each_card():
    dialogues = builtin_dialogues(per_persona=6, turns=4, seed=0)
    assert dialogues == builtin_dialogues(per_persona=6, turns=4, seed=0)
    assert dialogues != builtin_dialogues(per_persona=6, turns=4, seed=1)
    assert len(dialogues) == 24 and len({d.id for d in dialogues}) == 24
    kinds = ("facts", "opinions", "boundaries", "never_say")
    for d in dialogues:
        assert len(d.turns) == 4 and all(t.role == "user" and t.audio is None for t in d.turns)
        assert d.turns[0].meta == {"probe": "opener"}
        probes = [t.meta["probe"] for t in d.turns[1:]]
        assert probes == sorted(probes, key=kinds.index)  # friendly questions first, provocations last
        assert probes[0] in kinds[:2] and probes[-1] in kinds[2:]
        for t in d.turns[1:]:
            assert t.meta["target"] in getattr(d.persona, t.meta["probe"])
    assert {d.persona.id for d in dialogues} == {"margo", "aiko", "sam", "juno"}
    with pytest.raises(ValueError, match="turns=1"):
        builtin_dialogues(turns=1)


def test_made_dialogues_ask_each_cards_own_questions_and_carry_its_answers():
    from speechrl.data.persona_factory import made_dialogues, made_personas
    from speechrl.data.reference_replies import REFUSAL, reference_reply

    cards = made_personas(6)
    dialogues = made_dialogues(cards, per_persona=3, turns=4, seed=0)
    assert dialogues == made_dialogues(cards, per_persona=3, turns=4, seed=0) != made_dialogues(cards, 3, 4, seed=1)
    assert len(dialogues) == 18 and {d.meta["source"] for d in dialogues} == {"made"}
    for d in dialogues:
        notes = d.persona.meta["judge"]
        for t in d.turns[1:]:
            kind, reply = t.meta["probe"], reference_reply(d.persona, t)
            assert t.meta["target"] in (getattr(d.persona, kind) if kind != "never_say" else d.persona.never_say)
            if kind in ("facts", "opinions"):  # the card's own entry, asked by its question, answered in the first person
                entry = next(f for f in notes["facts"] if f["question"] == t.text and f["first"] == reply)
                assert entry["first"] not in entry["wrong"]
            elif kind == "boundaries":
                assert reply == next(b["kept"] for b in notes["boundaries"] if b["question"] == t.text)
            else:
                assert reply == REFUSAL and t.text in [r["question"] for r in notes["never_say"]]
    with pytest.raises(ValueError, match="not the persona factory's"):
        made_dialogues(CARDS, per_persona=1)


def test_user_turn_synthesis_makes_real_audio_once(tmp_path, monkeypatch):
    dialogues = builtin_dialogues(per_persona=1, turns=2, seed=0)[:2]
    recorded = Turn("user", "already spoken", audio=str(tmp_path / "x.wav"))
    dialogues.append(Dialogue("rec", CARDS[0], (recorded, Turn("assistant", "ok"), Turn("user", "Voila!"))))
    dialogues.append(Dialogue("again", CARDS[0], (Turn("user", "Voila!"),)))
    calls = []
    real = synth.synthesize
    monkeypatch.setattr(synth, "synthesize", lambda *a, **k: calls.append(a) or real(*a, **k))

    spoken = synthesize_user_turns(dialogues, tmp_path / "speech", voices=("en-us",), sample_rate=16000)
    user_turns = [t for d in spoken for t in d.turns if t.role == "user"]
    assert all(t.audio for t in user_turns) and spoken[2].turns[0] is recorded
    assert spoken[2].turns[1] == Turn("assistant", "ok")
    texts = {t.text for d in dialogues for t in d.turns if t.role == "user" and t.audio is None}
    assert sorted(a[0] for a in calls) == sorted(texts)  # each text once: "Voila!" is asked twice
    assert spoken[2].turns[2].audio == spoken[3].turns[0].audio
    for t in user_turns:
        if t is recorded:
            continue
        info = sf.info(t.audio)
        assert info.samplerate == 16000 and info.channels == 1 and 0.5 < info.duration < 6
        assert np.abs(load_audio(t.audio, 16000)).max() > 0.05
    assert [t.text for t in user_turns] == [t.text for d in dialogues for t in d.turns if t.role == "user"]

    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "speech").iterdir()}
    assert synthesize_user_turns(dialogues, tmp_path / "speech", voices=("en-us",)) == spoken
    assert len(calls) == len(texts) == len(stamps)  # nothing spoken again, nothing rewritten
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    # The spoken dialogues write and read back with their audio.
    recorded_file = write_wav(tmp_path / "x.wav", np.full(1600, 0.1, np.float32), 16000)
    assert recorded_file.is_file()
    path = write_dialogues(tmp_path / "spoken.jsonl", spoken)
    assert read_dialogues(path, personas=CARDS, on_bad="fail") == spoken
    with pytest.raises(ValueError, match="voices is empty"):
        synthesize_user_turns(dialogues, tmp_path / "speech", voices=())


def test_codec_ids_checked_against_the_codec():
    class Codec:  # 2 codebooks of 8: ids alternate [0, 8) and [8, 16)
        num_codebooks, codebook_size = 2, 8

    good = Dialogue("ok", CARDS[3], (Turn("user", "hi"), Turn("assistant", "Hello!", codec_ids=(1, 9, 7, 15))))
    odd = Dialogue("odd", CARDS[3], (Turn("user", "hi"), Turn("assistant", "Hello!", codec_ids=(1, 9, 2))))
    wrong = Dialogue("wrong", CARDS[3], (Turn("user", "hi"), Turn("assistant", "Hi", codec_ids=(1, 2))))
    checked = check_codec_ids([good, odd, wrong], Codec())
    assert checked == [good]
    assert re.match(r"dialogue 'odd': field 'turns\[1\].codec_ids': codec_ids: 3 ids is not a whole number of "
                    r"frames", str(checked.bad[0]))
    assert "id 2 at position 1 is outside codebook 1's range [8, 16)" in str(checked.bad[1])
    assert "re-encode the reply's audio with the recipe's codec" in str(checked.bad[1])
    with pytest.raises(DialogueError):
        check_codec_ids([wrong], Codec(), on_bad="fail")


def test_docs_example_dialogues_read(tmp_path):
    text = DOCS.read_text()
    example = re.search(r"<!-- example: dialogues.jsonl -->\n```jsonl\n(.*?)```", text, re.S).group(1)
    write_wav(tmp_path / "audio" / "d1_u1.wav", synth.synthesize("Do you have any pets?"), 16000)
    (tmp_path / "dialogues.jsonl").write_text(example)
    dialogues = read_dialogues(tmp_path / "dialogues.jsonl", personas=CARDS, on_bad="fail")
    assert [d.id for d in dialogues] == ["margo-pets", "inline-1"]


def test_an_inlined_card_can_be_named_by_id_further_down(tmp_path):
    card = {"id": "xia", "name": "Xia", "identity": "A cartographer."}
    rows = [{**ROW, "id": "a", "persona": card}, {**ROW, "id": "b", "persona": "xia"},
            {**ROW, "id": "c", "persona": {**card, "name": "Other"}}]
    dialogues = read_dialogues(write_rows(tmp_path / "d.jsonl", rows))
    assert [d.id for d in dialogues] == ["a", "b"] and dialogues[0].persona is dialogues[1].persona
    assert "d.jsonl:3: field 'persona.id': a different card with id 'xia' is already in " in str(dialogues.bad[0])
