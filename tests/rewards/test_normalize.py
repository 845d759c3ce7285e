import pytest

from speechrl.rewards.normalize import normalize_text, spell_number


@pytest.mark.parametrize("n, words", [
    (0, "zero"), (10, "ten"), (21, "twenty one"), (100, "one hundred"), (115, "one hundred fifteen"),
    (1200, "one thousand two hundred"), (1_000_001, "one million one"),
    (999_999_999, "nine hundred ninety nine million nine hundred ninety nine thousand nine hundred ninety nine"),
])
def test_spell_number(n, words):
    assert spell_number(n) == words


def test_spell_number_rejects_out_of_range():
    with pytest.raises(ValueError, match="1000000000"):
        spell_number(1_000_000_000)


@pytest.mark.parametrize("text, expected", [
    ("Go 10 meters.", "go ten meters"),
    ("go ten meters", "go ten meters"),
    ("Twenty-one", "twenty one"),
    ("1,200 people", "one thousand two hundred people"),
    ("the 21st floor", "the twenty first floor"),
    ("pi is 3.14", "pi is three point one four"),
    ("agent 007", "agent zero zero seven"),
    ("１０ＫＭ", "ten km"),  # NFKC folds full-width digits and letters
    ("Don't say 'hello', dogs'!", "don't say hello dogs"),
    ("It’s  fine\n\t ok", "it's fine ok"),
    ("well-known", "well known"),
    ("naïve CAFÉ", "naïve café"),
])
def test_normalize_text(text, expected):
    assert normalize_text(text) == expected


def test_cjk_characters_become_tokens():
    assert normalize_text("我爱北京。") == "我 爱 北 京"
    assert normalize_text("こんにちは、カタカナ") == "こ ん に ち は カ タ カ ナ"
    assert normalize_text("안녕 세계") == "안 녕 세 계"
    assert normalize_text("用GPU训练") == "用 gpu 训 练"
    assert normalize_text("我爱北京", split_cjk=False) == "我爱北京"
