"""Tokenizers: text <-> token ids, behind one interface.

- `char`: one token per character of the training corpus (the classic baby GPT).

Every tokenizer serialises to a JSON object (`to_json`) that holds everything
needed to encode and decode without the corpus; `tokenizer_from_json` reads it back.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path

from minigpt.atomic import write_json_atomic
from minigpt.errors import MinigptError


class StreamDecoder:
    """Turns token ids into text as they arrive, for streaming output.

    `push(ids)` returns the text that is complete so far; `flush()` returns the rest.
    The base version decodes each token on its own, which is right for tokenizers
    whose tokens are whole characters.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def push(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def flush(self) -> str:
        return ""


class Tokenizer(ABC):
    """Maps text to token ids and back."""

    kind: str
    """Short name saved in tokenizer.json: 'char', 'bpe', or a tiktoken encoding name."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of token ids; every id is in [0, vocab_size)."""

    @property
    def eot_id(self) -> int | None:
        """Id of the end-of-text token that separates documents, or None if there is none."""
        return None

    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: list[int]) -> str: ...

    def stream_decoder(self) -> StreamDecoder:
        """A fresh incremental decoder for streaming generated tokens."""
        return StreamDecoder(self)

    @abstractmethod
    def to_json(self) -> dict:
        """Everything needed to rebuild this tokenizer, as a JSON-able dict with 'kind'."""

    def describe(self) -> str:
        return f"{self.kind} (vocab {self.vocab_size})"


class CharTokenizer(Tokenizer):
    """One token per character; the vocabulary is the sorted set of the corpus's characters."""

    kind = "char"

    def __init__(self, chars: list[str], unknown: str | None = None):
        self.chars = list(chars)
        self.stoi = {ch: i for i, ch in enumerate(self.chars)}
        if unknown is not None and unknown not in self.stoi:
            raise MinigptError(
                f"fallback character {unknown!r} is not in the vocabulary",
                hint="choose a character that occurs in the training corpus",
            )
        self.unknown = unknown

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        stoi = self.stoi
        try:
            return [stoi[ch] for ch in text]
        except KeyError:
            pass
        unseen = sorted({ch for ch in text if ch not in stoi})
        if self.unknown is not None:
            fallback = stoi[self.unknown]
            return [stoi.get(ch, fallback) for ch in text]
        shown = ", ".join(repr(ch) for ch in unseen[:10]) + (" ..." if len(unseen) > 10 else "")
        raise MinigptError(
            f"the text has {len(unseen)} character(s) the char tokenizer never saw: {shown}",
            hint="remove them, or map them to a known character with an unknown-character fallback",
        )

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def to_json(self) -> dict:
        return {"kind": self.kind, "chars": self.chars}


def tokenizer_from_json(data: dict) -> Tokenizer:
    """Rebuild a tokenizer from its `to_json()` dict."""
    kind = data.get("kind")
    if kind == "char":
        return CharTokenizer(data["chars"])
    raise MinigptError(
        f"unknown tokenizer kind {kind!r} in tokenizer.json",
        hint="the run was written by a newer minigpt, or the file is damaged",
    )


def save_tokenizer(tokenizer: Tokenizer, path: str | Path) -> None:
    """Write tokenizer.json atomically."""
    write_json_atomic(path, tokenizer.to_json())


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise MinigptError(
            f"no tokenizer at {path}", hint="is this a minigpt run directory?"
        ) from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MinigptError(
            f"{path} is not valid JSON", hint="the file is damaged; retrain or restore it"
        ) from err
    return tokenizer_from_json(data)
