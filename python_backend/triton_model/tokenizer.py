"""Tokenizers for the text path (preprocessing / postprocessing models).

- `HfTokenizer`: the Hugging Face tokenizer in `tokenizer_dir` (tokenizer.json through the
  `tokenizers` package, else `transformers.AutoTokenizer`). Neither is a dependency of this
  project: install one (`pip install tokenizers`) where a real tokenizer is wanted.
- `ByteTokenizer`: the fallback when no `tokenizer_dir` is set, meant for the twin: a prompt's
  UTF-8 bytes are its token ids (so prompt length in tokens = length in bytes), and ids decode
  back to their byte. The twin generates ids from a real vocabulary (up to ~128k); ids >= 256
  decode to short pseudo-words, so generated "text" is readable placeholder text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

_SYLLABLES = (
    "ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "da", "pe", "zu", "fo", "gi", "ha", "ju", "be",
)  # fmt: skip


class TokenizerError(RuntimeError):
    """A tokenizer that cannot be loaded (the message says what to install or fix)."""


class Tokenizer(Protocol):
    name: str

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as token ids; ids beyond a byte decode to pseudo-words."""

    name = "bytes"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        out: list[str] = []
        pending = bytearray()
        for token in ids:
            if 0 <= token < 256:
                pending.append(token)
                continue
            if pending:
                out.append(pending.decode("utf-8", errors="replace"))
                pending.clear()
            out.append(_pseudo_word(token))
        if pending:
            out.append(pending.decode("utf-8", errors="replace"))
        return "".join(out)


def _pseudo_word(token: int) -> str:
    n = len(_SYLLABLES)
    word = _SYLLABLES[token % n] + _SYLLABLES[(token // n) % n]
    if (token // (n * n)) % 3 == 0:
        word += _SYLLABLES[(token // 7) % n]
    return " " + word


class HfTokenizer:
    """A Hugging Face tokenizer directory."""

    def __init__(self, tokenizer_dir: str | Path) -> None:
        path = Path(tokenizer_dir)
        if not path.is_dir():
            raise TokenizerError(f"parameter 'tokenizer_dir': {path} is not a directory")
        self.name = str(path)
        self._fast: Any = None
        self._auto: Any = None
        tokenizer_json = path / "tokenizer.json"
        try:
            from tokenizers import Tokenizer as FastTokenizer  # type: ignore[import-not-found]
        except ImportError:
            FastTokenizer = None
        if FastTokenizer is not None and tokenizer_json.is_file():
            self._fast = FastTokenizer.from_file(str(tokenizer_json))
            return
        try:
            from transformers import AutoTokenizer  # type: ignore[import-not-found]
        except ImportError:
            raise TokenizerError(
                f"parameter 'tokenizer_dir' ({path}) needs the 'tokenizers' package (for "
                "tokenizer.json) or 'transformers', and neither is installed: "
                "pip install tokenizers"
            ) from None
        self._auto = AutoTokenizer.from_pretrained(str(path))

    def encode(self, text: str) -> list[int]:
        if self._fast is not None:
            return list(self._fast.encode(text).ids)
        return list(self._auto.encode(text))

    def decode(self, ids: list[int]) -> str:
        if self._fast is not None:
            return str(self._fast.decode(ids, skip_special_tokens=True))
        return str(self._auto.decode(ids, skip_special_tokens=True))


def load_tokenizer(tokenizer_dir: str | None) -> Tokenizer:
    if not tokenizer_dir:
        return ByteTokenizer()
    return HfTokenizer(tokenizer_dir)
