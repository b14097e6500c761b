"""The C++ vocab.txt loader: the real BERT vocab, and every malformed file named with its line."""

from __future__ import annotations

import pytest

from fastbert import _wordpiece


def test_real_vocab_matches_transformers(vocab_path, hf_tokenizer):
    vocab = _wordpiece.Vocab.from_file(str(vocab_path))
    reference = hf_tokenizer.get_vocab()
    assert len(vocab) == len(reference) == 30522
    assert all(vocab.token_to_id(token) == i for token, i in reference.items())
    assert vocab.id_to_token(103) == "[MASK]" and vocab.token_to_id("no-such-token") is None
    assert "##ing" in vocab


@pytest.mark.parametrize(
    "content,message",
    [
        (b"[PAD]\n[UNK]\n\nhello\n", r"bad\.txt:3: empty line"),
        (b"[PAD]\nhello\nworld\nhello\n", r"bad\.txt:4: duplicate token 'hello' \(first on line 2\)"),
        (b"[PAD]\ncaf\xc3\n", r"bad\.txt:2: invalid UTF-8 at byte 3"),
        (b"[PAD]\n\xed\xa0\x80\n", r"bad\.txt:2: invalid UTF-8 at byte 0"),  # a UTF-8-encoded surrogate
        (b"[PAD]\n\xc0\xaf\n", r"bad\.txt:2: invalid UTF-8"),  # overlong '/'
        (b"[PAD]\nhello \n", r"bad\.txt:2: token 'hello ' has leading or trailing whitespace"),
        (b"", r"bad\.txt: the vocabulary is empty"),
    ],
)
def test_malformed_vocab_is_named(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        _wordpiece.Vocab.from_file(str(path))


def test_crlf_bom_and_missing_final_newline_are_accepted():
    vocab = _wordpiece.Vocab.from_text(b"\xef\xbb\xbf[PAD]\r\n[UNK]\r\nd\xc3\xa9j\xc3\xa0", "v.txt")
    assert vocab.tokens == ["[PAD]", "[UNK]", "déjà"]


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"nope\.txt: cannot open"):
        _wordpiece.Vocab.from_file(str(tmp_path / "nope.txt"))


def test_id_out_of_range_is_named():
    vocab = _wordpiece.Vocab.from_text(b"a\nb\n")
    with pytest.raises(IndexError, match=r"token id 2 is outside the vocabulary \[0, 2\)"):
        vocab.id_to_token(2)


@pytest.mark.parametrize(
    "data,expected",
    [
        (b"plain ascii", None),
        ("ok \u00e9\u4e2d\U0001f600".encode(), None),
        (b"ab\xff", 2),
        (b"\xf4\x90\x80\x80", 0),  # above U+10FFFF
        (b"a\xe2\x82", 1),  # truncated sequence
    ],
)
def test_find_invalid_utf8_agrees_with_python(data, expected):
    assert _wordpiece.find_invalid_utf8(data) == expected
    try:
        data.decode("utf-8")
        assert expected is None
    except UnicodeDecodeError as e:
        assert e.start == expected
