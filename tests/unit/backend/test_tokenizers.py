"""Tokenizers of the text path."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from throttllem.backend.triton_model.tokenizer import (
    ByteTokenizer,
    TokenizerError,
    load_tokenizer,
)


@given(st.text(max_size=200))
def test_bytes_round_trip(text: str) -> None:
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text


def test_large_ids_decode_to_readable_words() -> None:
    words = ByteTokenizer().decode([91055, 56562, 300])
    assert words.startswith(" ") and words.replace(" ", "").isalpha() and len(words) >= 9


def test_no_tokenizer_dir_means_bytes() -> None:
    assert load_tokenizer(None).name == "bytes" and load_tokenizer("").name == "bytes"


def test_a_missing_tokenizer_dir_is_named(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="tokenizer_dir"):
        load_tokenizer(str(tmp_path / "nope"))


def test_a_tokenizer_dir_without_the_libraries_says_what_to_install(tmp_path: Path) -> None:
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("tokenizers is installed here")
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(TokenizerError, match="pip install tokenizers"):
        load_tokenizer(str(tmp_path))
