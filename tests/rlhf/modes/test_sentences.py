"""SmolLM2's sentences for a real model's corpus: only plain words a synthesizer reads one way."""
from __future__ import annotations

import pytest

from speechrl.rlhf.modes.sentences import clean_sentence


@pytest.mark.parametrize("reply, kept", [
    ("The garden is full of roses. It smells lovely.", "The garden is full of roses."),
    ("Is there a more creative way to use a picnic?", "Is there a more creative way to use a picnic?"),
    ("A bell is just a bell.", "A bell is just a bell."),
    ('"What a lovely morning it is!"', "What a lovely morning it is!"),
])
def test_the_first_plain_sentence_is_kept(reply, kept):
    assert clean_sentence(reply) == kept


@pytest.mark.parametrize("reply", [
    "It costs 20 dollars at the market.",  # digits read several ways
    "A loving family friend, Mr.",  # cut at an abbreviation
    "Bread.",  # too short
    "Sure! Here is a sentence: the sea is blue",  # no end mark on the sentence kept
    "The city at night (in winter) is cold.",  # brackets
    "word " * 25 + "end.",  # too long
])
def test_anything_else_is_dropped(reply):
    assert clean_sentence(reply) is None
