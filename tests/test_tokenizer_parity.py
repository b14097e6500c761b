"""Ids and offsets identical to HF's fast BERT tokenizer on real and adversarial text, cased and uncased.

References: ``transformers.BertTokenizerFast.from_pretrained`` on the real bert-base-uncased vocabulary (uncased,
and the same vocabulary with do_lower_case=False) and on a cased vocabulary trained here with HF's WordPiece
trainer. Real text: the installed Python's own sources (every machine has them) and, when installed, Debian's
``bible-kjv`` and ``fortunes``. Where HF's fast and slow tokenizers disagree we follow the fast one; the cases are
listed in test_fast_and_slow_disagree_and_we_follow_fast.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sysconfig
import warnings
from functools import cache
from pathlib import Path

import pytest

from fastbert.tokenizer import WordPieceTokenizer

transformers = pytest.importorskip("transformers")

CORPUS_BYTES = 600_000  # per real source: enough lines to meet most of the vocabulary, quick to compare

ADVERSARIAL = [
    "",
    " \t\n ",
    "Hello, World! Unaffable naïve café résumé Ångström ØRESUND straße İstanbul ΟΔΟΣ Σίσυφος",
    "e\u0301 a\u0300\u0301\u0302 \u0061\u030a\u0323 Z\u0351\u0348\u0324\u0318a\u0352\u034dl\u0325g\u0344o",
    "中文字符测试，日本語のテキスト、한국어 텍스트 and 𠀀𪚥 ext-B and \uf900\uf902 compat \u2f00\u3000ideographs",
    "ภาษาไทยไม่มีช่องว่างระหว่างคำ ไทย ๑๒๓",
    "العربية: مرحبا بالعالم، كيف حالك؟ \u064b\u0650\u0651 עברית שָׁלוֹם",
    "emoji 😀😃 👨‍👩‍👧‍👦 👍🏽 🏳️‍🌈 🇫🇷 ❤️ \U0001f970 keycap 1\ufe0f\u20e3",
    "control\x00chars\x01\x02\x07\x1b[0m and\x7f del \x85nel \u200b\u200c\u200d\u2060\ufeff format \u00adsoft-hyphen",
    "line\nbreaks\r\nand\ttabs\x0bvt\x0cff\u2028ls\u2029ps\u00a0nbsp\u3000ideographic\u2009thin",
    "replacement \ufffd\ufffd char and private use \ue000\U000f0000 and unassigned \u0378\U0010ffff",
    "[CLS] [SEP][MASK]x[PAD][UNK] [cls] [ SEP ] [[SEP]] [SEP [MASK]]] ##ing ## # ### a##b",
    "punctuation !\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~ ¡¿«»„“”‘’‹›—–…•·※‰′″‴⁂⸮ ՛ ։ ፡ ᠁ 〜 ・",
    "symbols $€£¥₹ ©®™ ±×÷ ∑∫√∞ ≠≤≥ →⇒ ♠♥ ° ^ ` ~ |",
    "numbers 1234567890 ١٢٣ ०१२ 一二三 ⅰⅱⅲ ① ²³ ½ 3.14159 1,000,000 10^9",
    "ﬁne ﬂow Ⅻ ㎏ ＦＵＬＬＷＩＤＴＨ ｈａｌｆ ｶﾀｶﾅ ℌ ℍ ℕ 𝐁𝐨𝐥𝐝 𝔉𝔯𝔞𝔨",
    "x" * 99 + " " + "y" * 100 + " " + "z" * 101 + " " + "é" * 101 + " " + "ab" * 500,
    "supercalifragilisticexpialidocious pneumonoultramicroscopicsilicovolcanoconiosis antidisestablishmentarianism",
    "İI ıi ǅǄǆ ẞß ꞵ ꟶ ᏸ Ꭓ \U0001e922\U0001e900 ꭰ",  # case-mapping corners (Turkish, titlecase, Cherokee, Adlam)
    "Hangul 한국어 decomposes: 각 ᄀ ᅡ ᆨ, Vietnamese Tiếng Việt có dấu, Devanagari हिन्दी क्षत्रिय",
]


def _long_words() -> list[str]:
    """Words around the 100-character limit, which counts characters after normalization (a Hangul syllable is
    three jamo once uncased, a precomposed é one character), and 1,000-character words."""
    rng = random.Random(3)
    letters = "abcdefghijklmnopqrstuvwxyzéü中"
    random_words = ["".join(rng.choice(letters) for _ in range(n)) for n in (100, 101, 1000)]
    return random_words + [
        "한" * 33,
        "한" * 34,
        "İ" * 100,
        "İ" * 101,
        "e\u0301" * 50 + "e",
        "e\u0301" * 51,
        "ǅ" * 60,
        "ß" * 101,
        "\u1e9e" * 100,
        "x" * 1000 + " y",
    ]


@cache
def python_source_lines() -> tuple[str, ...]:
    """Lines of the installed Python's own standard library sources, a fixed sample."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.rglob("*.py") if "test" not in p.parts and "site-packages" not in p.parts)
    random.Random(0).shuffle(files)
    lines, size = [], 0
    for path in files:
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            lines.append(line)
            size += len(line)
        if size >= CORPUS_BYTES:
            break
    return tuple(lines)


@cache
def debian_lines(source: str) -> tuple[str, ...]:
    """Lines of a Debian text package, or none when it is not installed."""
    if source == "bible":
        if shutil.which("bible") is None:
            return ()
        out = subprocess.run(["bible", "-f", "gen1:1-rev22:21"], capture_output=True, check=True).stdout
        lines = out.decode("utf-8", errors="replace").splitlines()
        random.Random(1).shuffle(lines)
    else:
        root = Path("/usr/share/games/fortunes")
        if not root.is_dir():
            return ()
        lines = []
        for path in sorted(p for p in root.iterdir() if p.is_file() and p.suffix in ("", ".u8")):
            try:
                lines += path.read_bytes().decode("utf-8").splitlines()
            except UnicodeDecodeError:
                continue  # legacy-encoded files (fortunes-zh's GB2312 ones) have a .u8 twin
        random.Random(2).shuffle(lines)
    kept, size = [], 0
    for line in lines:
        kept.append(line)
        size += len(line)
        if size >= CORPUS_BYTES:
            break
    return tuple(kept)


def reference(directory: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.BertTokenizerFast.from_pretrained(str(directory))


@pytest.fixture(scope="module")
def cased_vocab_dir(tmp_path_factory, vocab_path) -> Path:
    """The real bert-base-uncased vocabulary declared cased."""
    directory = tmp_path_factory.mktemp("uncased_vocab_cased")
    shutil.copy(vocab_path, directory / "vocab.txt")
    (directory / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
    return directory


@pytest.fixture(scope="module")
def trained_cased_dir(tmp_path_factory) -> Path:
    """A cased vocabulary with real subwords in many scripts, trained with HF's WordPiece trainer."""
    tokenizers = pytest.importorskip("tokenizers")
    directory = tmp_path_factory.mktemp("trained_cased")
    trainer_input = list(python_source_lines()[:20000]) + ADVERSARIAL * 20
    model = tokenizers.BertWordPieceTokenizer(lowercase=False)
    model.train_from_iterator(
        trainer_input,
        vocab_size=6000,
        min_frequency=1,
        show_progress=False,
        special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
    )
    model.save_model(str(directory))
    (directory / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
    return directory


@pytest.fixture(scope="module", params=["uncased", "uncased-vocab-cased", "trained-cased"])
def pair(request, minilm_dir, cased_vocab_dir, trained_cased_dir):
    """(ours, HF fast) over the same vocabulary and casing."""
    directory = {"uncased": minilm_dir, "uncased-vocab-cased": cased_vocab_dir, "trained-cased": trained_cased_dir}[
        request.param
    ]
    ours = WordPieceTokenizer.from_pretrained(directory)
    hf = reference(directory)
    assert ours.do_lower_case == (request.param == "uncased")
    return ours, hf


def assert_same(ours: WordPieceTokenizer, hf, texts: list[str], offsets: bool = True) -> None:
    expected = hf(texts, return_offsets_mapping=offsets)
    got = ours(texts, return_offsets_mapping=offsets)
    for i, text in enumerate(texts):
        assert got["input_ids"][i] == expected["input_ids"][i], f"ids differ on line {i}: {text[:200]!r}"
        if offsets:
            assert got["offset_mapping"][i] == [tuple(o) for o in expected["offset_mapping"][i]], (
                f"offsets differ on line {i}: {text[:200]!r}"
            )
    assert ours.encode_batch(texts) == expected["input_ids"]


def test_adversarial_text(pair):
    ours, hf = pair
    assert_same(ours, hf, ADVERSARIAL + _long_words())
    for text in ADVERSARIAL:
        assert ours.tokenize(text) == hf.tokenize(text), text


def test_python_sources(pair):
    ours, hf = pair
    assert_same(ours, hf, list(python_source_lines()))


@pytest.mark.parametrize("source", ["bible", "fortunes"])
def test_debian_text(pair, source):
    lines = debian_lines(source)
    if not lines:
        pytest.skip(f"Debian text package for {source} is not installed (apt-get install bible-kjv fortunes)")
    ours, hf = pair
    assert_same(ours, hf, list(lines))


@pytest.mark.parametrize("lowercase", [True, False])
def test_every_code_point_in_context(minilm_dir, cased_vocab_dir, lowercase):
    """All of Unicode, each code point between letters, 256 code points to a line."""
    directory = minilm_dir if lowercase else cased_vocab_dir
    ours, hf = WordPieceTokenizer.from_pretrained(directory), reference(directory)
    code_points = [cp for cp in range(0x110000) if not 0xD800 <= cp <= 0xDFFF]
    lines = [" ".join(f"a{chr(cp)}b" for cp in code_points[i : i + 256]) for i in range(0, len(code_points), 256)]
    expected = hf(lines)["input_ids"]
    got = ours.encode_batch(lines)
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g == e, f"line {i} (from U+{code_points[i * 256]:04X}) differs"


def test_ten_megabyte_line(minilm_dir, hf_tokenizer):
    ours = WordPieceTokenizer.from_pretrained(minilm_dir)
    text = " ".join(python_source_lines())
    text = (text * (10_000_000 // len(text) + 1))[:10_000_000]
    assert "\n" not in text
    assert ours.encode(text) == hf_tokenizer(text)["input_ids"]


def test_fast_and_slow_disagree_and_we_follow_fast(minilm_dir, vocab_path):
    """HF's Python BertTokenizer (now BertTokenizerLegacy) and its Rust fast tokenizer differ on these inputs; each
    case asserts that they still differ (so the list stays true) and that we give the fast tokenizer's ids."""
    legacy = pytest.importorskip("transformers.models.bert.tokenization_bert_legacy")
    cases = [
        (True, "ΟΔΟΣ", "slow lowercases with final-sigma context (ς), fast maps each Σ to σ"),
        (True, "a\u2e43b", "U+2E43 (Unicode 10 punctuation) is punctuation to slow, a letter to fast"),
        (True, "a\u166db", "U+166D was punctuation in fast's older tables, a symbol to slow"),
        (True, "a\u0898b", "U+0898 (Unicode 14 nonspacing mark) is stripped by slow, kept by fast"),
        (True, "a\u0890b", "U+0890 (Unicode 14 format character) is removed by slow, kept by fast"),
        (True, "a\U0002b820b", "U+2B820 (CJK Extension E) is isolated as an ideograph by slow, not by fast"),
        (False, "\uf902", "CJK compatibility U+F902: slow NFC-maps it to U+8ECA when cased, fast keeps it"),
        (False, "a\u037eb", "U+037E GREEK QUESTION MARK: slow NFC-maps it to ';', fast keeps it"),
    ]
    for lowercase, text, why in cases:
        ours = WordPieceTokenizer.from_vocab(vocab_path, do_lower_case=lowercase)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            slow = legacy.BertTokenizerLegacy(vocab_file=str(vocab_path), do_lower_case=lowercase)
        fast = transformers.BertTokenizerFast.from_pretrained(str(minilm_dir), do_lower_case=lowercase)
        expected = fast(text)["input_ids"]
        assert slow(text)["input_ids"] != expected, f"no longer a disagreement: {why}"
        assert ours.encode(text) == expected, why
