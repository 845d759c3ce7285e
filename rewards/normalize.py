"""Text normalization for scoring transcripts: two spellings of the same words must score as equal.

Counting "Go 10 meters." and "go ten meters" as different teaches the policy a spelling convention
instead of listening. The number speller (0..999,999,999) is ours, not num2words: we need one
convention (no "and", no commas) in one language, not many languages and an output style to pin.
"""
from __future__ import annotations

import re
import unicodedata

_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen"
).split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_SCALES = ((1_000_000, "million"), (1_000, "thousand"))
_MAX_SPELLED = 999_999_999
_ORDINAL_IRREGULAR = {
    "one": "first", "two": "second", "three": "third", "five": "fifth",
    "eight": "eighth", "nine": "ninth", "twelve": "twelfth",
}

# "1,200" (thousands separators), "3.5" (a decimal), "21st" (an ordinal); ASCII digits only,
# after NFKC has folded full-width and other compatibility digits into them.
_NUMBER = re.compile(r"(?<![0-9])([0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.([0-9]+))?(?:(st|nd|rd|th)\b)?(?![0-9])")
# Han (with extension A, compatibility ideographs and the supplementary-plane extensions),
# Hiragana, Katakana, Hangul syllables and jamo: scripts written without spaces between words.
_CJK = re.compile(
    "([\u1100-\u11ff\u3040-\u309f\u30a0-\u30ff\u3130-\u318f\u3400-\u4dbf\u4e00-\u9fff"
    "\uac00-\ud7af\uf900-\ufaff\U00020000-\U0002fa1f])"
)


def spell_number(n: int) -> str:
    """English words for 0 <= n <= 999,999,999: 1200 -> "one thousand two hundred"."""
    if not 0 <= n <= _MAX_SPELLED:
        raise ValueError(f"spell_number: {n} is outside 0..{_MAX_SPELLED}")
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + (f" {_ONES[ones]}" if ones else "")
    if n < 1000:
        hundreds, rest = divmod(n, 100)
        return f"{_ONES[hundreds]} hundred" + (f" {spell_number(rest)}" if rest else "")
    for scale, word in _SCALES:
        if n >= scale:
            high, rest = divmod(n, scale)
            return f"{spell_number(high)} {word}" + (f" {spell_number(rest)}" if rest else "")
    raise AssertionError(n)  # unreachable: every n >= 1000 has a scale


def _ordinal(words: str) -> str:
    head, _, last = words.rpartition(" ")
    if last in _ORDINAL_IRREGULAR:
        last = _ORDINAL_IRREGULAR[last]
    elif last.endswith("y"):
        last = last[:-1] + "ieth"
    else:
        last += "th"
    return f"{head} {last}" if head else last


def _digits(s: str) -> str:
    return " ".join(_ONES[int(d)] for d in s)


def _spell_match(m: re.Match) -> str:
    integer, decimals, suffix = m.group(1).replace(",", ""), m.group(2), m.group(3)
    # Leading zeros ("007") and numbers past the speller's range are read digit by digit,
    # as codes and long numbers are spoken.
    if (len(integer) > 1 and integer[0] == "0") or int(integer) > _MAX_SPELLED:
        words = _digits(integer)
    else:
        words = spell_number(int(integer))
    if decimals:
        words += " point " + _digits(decimals)
    elif suffix:
        words = _ordinal(words)
    return f" {words} "  # spaces so "10km" becomes "ten km", not "tenkm"


def _is_separator(ch: str) -> bool:
    # Punctuation (P*) and symbols (S*) separate words; combining marks (M*) belong to letters.
    return unicodedata.category(ch)[0] in "PS"


def normalize_text(s: str, split_cjk: bool = True) -> str:
    """Canonical form of a transcript for WER/CER.

    Punctuation and symbols become spaces (so "twenty-one" splits into words), except apostrophes inside
    words ("don't"). With split_cjk, each CJK character is its own token, so WER over CJK text counts
    characters, as CER does.
    """
    s = unicodedata.normalize("NFKC", s).lower()
    s = s.replace("\u2019", "'").replace("\u2018", "'")  # typographic apostrophes; NFKC keeps them
    s = _NUMBER.sub(_spell_match, s)
    s = "".join(" " if ch != "'" and _is_separator(ch) else ch for ch in s)
    s = re.sub(r"(?<!\w)'|'(?!\w)", " ", s)  # quotes and trailing apostrophes, not "don't"
    if split_cjk:
        s = _CJK.sub(r" \1 ", s)
    return " ".join(s.split())
