"""Tokenizers: text <-> token ids, behind one interface.

- `char`: one token per character of the training corpus (the classic baby GPT).
- `bpe`: byte-level BPE trained on the corpus with `rustbpe` (GPT-4 regex split) and
  run by `tiktoken`; the merge ranks live in tokenizer.json, so a run directory
  encodes and decodes without the corpus.
- `gpt2`, `r50k_base`, `cl100k_base`, `o200k_base`: tiktoken's published encodings,
  downloaded once by tiktoken and cached (TIKTOKEN_CACHE_DIR).

Every tokenizer serialises to a JSON object (`to_json`) that holds everything
needed to encode and decode without the corpus; `tokenizer_from_json` reads it back.
Byte-level tokenizers can split one character over several tokens, so their
stream decoder buffers incomplete UTF-8 instead of printing U+FFFD.
"""

from __future__ import annotations

import base64
import codecs
import copy
import json
import numbers
import socket
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from minigpt.atomic import write_json_atomic
from minigpt.bpe_training import CountedTexts, learn_merges
from minigpt.errors import MinigptError, os_error

ENDOFTEXT = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"
"""What a saved tokenizer is called, in a run directory and in a prepared data folder."""
NAMED_ENCODINGS = ("gpt2", "r50k_base", "cl100k_base", "o200k_base")
TOKENIZER_KINDS = ("char", "bpe", *NAMED_ENCODINGS)
DEFAULT_BPE_VOCAB_SIZE = 2048
MAX_BPE_VOCAB_SIZE = 1 << 20
"""The largest BPE vocabulary: rustbpe counts in u32, and 2**20 ids is far past what a small
GPT's corpus can fill (GPT-4's cl100k has about 100k)."""
# The GPT-4 (cl100k) split: contractions, words, 1-3 digit numbers, punctuation runs, whitespace.
GPT4_SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
# GPT-2's split, in the form tiktoken's r50k/gpt2 encodings use: the release's pattern
# (HF_GPT2_SPLIT_PATTERN) with possessive quantifiers, which cannot change a match here
# because nothing follows them, and its whitespace tail rewritten: `\s++$` takes trailing
# whitespace, and a lone `\s` is all `\s+` can still match once `\s+(?!\S)` has failed.
GPT2_SPLIT_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)
HF_GPT2_SPLIT_PATTERN = (
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)
"""The split exactly as the GPT-2 release and Hugging Face's ByteLevel pre-tokenizer write it."""
# the splits of tiktoken's cl100k_base and o200k_base (tiktoken_ext.openai_public, tiktoken 0.14)
CL100K_SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
O200K_SPLIT_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
LINE_CUT_PATTERNS = frozenset(
    {
        GPT4_SPLIT_PATTERN,
        GPT2_SPLIT_PATTERN,
        HF_GPT2_SPLIT_PATTERN,
        CL100K_SPLIT_PATTERN,
        O200K_SPLIT_PATTERN,
    }
)
"""Splits under which text cut at a line start (after a newline that ends a non-blank
line, before a letter or digit) encodes, half by half, to the ids of the whole: in each,
a piece that holds a newline ends there (or, after punctuation, at the newlines' end),
no piece reaches from a newline into a letter or digit, and the one whitespace character
left at a half's end is the piece it would be anyway. tests/test_tokenizer.py checks it."""


class TokenizerFileDamaged(MinigptError):
    """A saved tokenizer whose content is wrong (not one that cannot be read or fetched):
    a prepared data folder holding one is rebuilt rather than trusted."""


def _damaged(where: str, what: str) -> TokenizerFileDamaged:
    return TokenizerFileDamaged(
        f"{where} is damaged: {what}",
        hint="restore it from a copy, or prepare the data again",
    )


def _shown(value: object, limit: int = 40) -> str:
    """repr(value), cut short: a hostile file must not fill the terminal."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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


class ByteStreamDecoder(StreamDecoder):
    """Stream decoder for byte-level tokenizers: holds back an incomplete UTF-8 sequence.

    An emoji is 4 bytes and BPE may put them in different tokens; an incremental
    UTF-8 decoder emits a character only once all its bytes have arrived.
    """

    def __init__(self, tokenizer: Tokenizer):
        super().__init__(tokenizer)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, ids: list[int]) -> str:
        return self._utf8.decode(self.tokenizer.token_bytes(ids))

    def flush(self) -> str:
        """The text still held back; bytes that never formed a character become U+FFFD."""
        return self._utf8.decode(b"", final=True)


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

    @property
    def separator_id(self) -> int | None:
        """The id that separates documents in prepared data: end-of-text where the
        tokenizer has one, else (char) the newline every document ends with; None if
        neither exists. Sampling starts from it; the head probe leaves it out."""
        return self.eot_id

    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: list[int]) -> str: ...

    def encode_prompt(self, text: str) -> list[int]:
        """Encode a prompt typed by a person: as `encode`, except that a tokenizer with
        special tokens reads them where they are written (Hugging Face's tokenizers do
        the same, so "<|endoftext|>Hello" gives GPT-2 the ids it was trained on).
        Corpora are encoded with `encode`, so no document can forge a separator."""
        return self.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts; byte-level tokenizers do it on several threads."""
        return [self.encode(text) for text in texts]

    def encode_array(self, text: str) -> np.ndarray:
        """`encode` as a numpy array of ids: how corpora are tokenised (numpy lookups for
        char, tiktoken's buffer for byte-level BPE), without a Python int per token."""
        return np.asarray(self.encode(text), dtype=np.int64)

    def for_thread(self) -> Tokenizer:
        """This tokenizer, or a copy of it for one thread of many to use at full speed."""
        return self

    def cut_point(self, text: str, start: int) -> int | None:
        """A place at or after `start` where `text` may be cut so that its halves, encoded
        apart, give the ids of the whole; None where none is known. Lets a huge document
        be tokenised a piece at a time."""
        return None

    def stream_decoder(self) -> StreamDecoder:
        """A fresh incremental decoder for streaming generated tokens."""
        return StreamDecoder(self)

    @abstractmethod
    def to_json(self) -> dict:
        """Everything needed to rebuild this tokenizer, as a JSON-able dict with 'kind'."""

    def describe(self) -> str:
        return f"{self.kind} (vocab {self.vocab_size})"


class CharTokenizer(Tokenizer):
    """One token per character; the vocabulary is the sorted set of the corpus's characters.

    A character outside the vocabulary is an error, unless `unknown` names a
    vocabulary character that unseen characters are mapped to (opt-in, saved in to_json).
    """

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
    def from_text(cls, text: str, unknown: str | None = None) -> CharTokenizer:
        return cls(sorted(set(text)), unknown=unknown)

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    @property
    def separator_id(self) -> int | None:
        return self.stoi.get("\n")

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
            hint="a char model knows only the characters of its training corpus; leave the others out",
        )

    def encode_array(self, text: str) -> np.ndarray:
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        lookup = self._lookup()
        ids = lookup[np.minimum(codes, len(lookup) - 1)]  # the last entry is -1: unseen
        if len(ids) and ids.min() < 0:  # an unseen character: the fallback, or the error
            return np.asarray(self.encode(text), dtype=np.int64)
        return ids

    def _lookup(self) -> np.ndarray:
        """id of each code point up to the largest in the vocabulary, -1 where none; built once."""
        if getattr(self, "_lookup_table", None) is None:
            codes = np.array([ord(ch) for ch in self.chars], dtype=np.int64)
            table = np.full(int(codes.max()) + 2, -1, dtype=np.int32)  # 4 bytes an id
            table[codes] = np.arange(len(codes))
            self._lookup_table = table
        return self._lookup_table

    def cut_point(self, text: str, start: int) -> int | None:
        return start if start < len(text) else None  # one token per character: anywhere

    def decode(self, ids: list[int]) -> str:
        chars = self.chars
        bad = next((i for i in ids if not 0 <= i < len(chars)), None)  # -1 must not mean "last"
        if bad is not None:
            raise MinigptError(
                f"token id {bad} is outside the char vocabulary of {len(chars)}",
                hint="the ids come from a different tokenizer",
            )
        return "".join(chars[i] for i in ids)

    def to_json(self) -> dict:
        data: dict = {"kind": self.kind, "chars": self.chars}
        if self.unknown is not None:
            data["unknown"] = self.unknown
        return data


class TiktokenTokenizer(Tokenizer):
    """Shared machinery for tokenizers run by a `tiktoken.Encoding` (byte-level BPE).

    User text is encoded as ordinary text: a literal "<|endoftext|>" in a corpus is
    just characters; the end-of-text id is placed between documents by encode.py.
    """

    def __init__(self, encoding):  # encoding: tiktoken.Encoding
        self.encoding = encoding

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    @property
    def eot_id(self) -> int | None:
        return self.encoding.eot_token

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def encode_prompt(self, text: str) -> list[int]:
        return self.encoding.encode(text, allowed_special="all")

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.encoding.encode_ordinary_batch(texts)

    def encode_array(self, text: str) -> np.ndarray:
        # tiktoken's buffer, read by numpy in place; with no special token allowed it is
        # encode_ordinary's ids (and, like it, releases the GIL: threads tokenise in parallel)
        return self.encoding.encode_to_numpy(text, allowed_special=set(), disallowed_special=())

    def for_thread(self) -> TiktokenTokenizer:
        # threads sharing one tiktoken encoding hold each other up (bench/prepare.py
        # measures it); a copy of its tables costs milliseconds
        import tiktoken

        clone = copy.copy(self)
        e = self.encoding
        clone.encoding = tiktoken.Encoding(
            name=e.name,
            pat_str=e._pat_str,
            mergeable_ranks=e._mergeable_ranks,
            special_tokens=e._special_tokens,
        )
        return clone

    def cut_point(self, text: str, start: int) -> int | None:
        if self.encoding._pat_str not in LINE_CUT_PATTERNS:
            return None  # a split we do not know: never cut
        while (newline := text.find("\n", max(start - 1, 1))) != -1:
            after = newline + 1
            if after >= len(text):
                return None
            if not text[newline - 1].isspace() and text[after].isalnum():
                return after
            start = after + 1
        return None

    def decode(self, ids: list[int]) -> str:
        """Decode ids; bytes that are not valid UTF-8 become U+FFFD."""
        return self.token_bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self, ids: list[int]) -> bytes:
        try:
            return self.encoding.decode_bytes(ids)
        except (KeyError, OverflowError):  # an unknown id, or a negative one
            bad = next((i for i in ids if not 0 <= i < self.vocab_size), None)
            where = f"token id {bad} is outside" if bad is not None else "a token id is not in"
            raise MinigptError(
                f"{where} the {self.kind} vocabulary of {self.vocab_size}",
                hint="the ids come from a different tokenizer",
            ) from None

    def stream_decoder(self) -> StreamDecoder:
        return ByteStreamDecoder(self)


class BPETokenizer(TiktokenTokenizer):
    """Byte-level BPE trained on the corpus: 256 byte tokens, the learned merges, then <|endoftext|>.

    `mergeable_ranks[token_bytes] = id`; ids 0..255 are the single bytes, each merge
    adds the next id in the order it was learned, and tiktoken applies merges by rank.
    """

    kind = "bpe"

    def __init__(self, mergeable_ranks: dict[bytes, int], pattern: str = GPT4_SPLIT_PATTERN):
        import tiktoken

        ranks = sorted(mergeable_ranks.values())
        # tiktoken panics (a PanicException, which is no Exception) when it meets a byte
        # that has no token; an empty token could never be produced
        all_bytes = all(bytes([byte]) in mergeable_ranks for byte in range(256))
        if ranks != list(range(len(ranks))) or not all_bytes or b"" in mergeable_ranks:
            raise MinigptError(
                "the BPE merge ranks are not the ids 0..n-1 with all 256 bytes",
                hint="tokenizer.json is damaged; prepare the data again",
            )
        self.mergeable_ranks = dict(mergeable_ranks)
        self.pattern = pattern
        n_ranks = len(ranks)
        encoding = tiktoken.Encoding(
            name=f"minigpt-bpe-{n_ranks + 1}",
            pat_str=pattern,
            mergeable_ranks=self.mergeable_ranks,
            special_tokens={ENDOFTEXT: n_ranks},
        )
        super().__init__(encoding)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        """Learn `vocab_size - 257` merges from `texts` (the 257 are the bytes and <|endoftext|>)."""
        check_bpe_vocab_size(vocab_size)
        sample = CountedTexts(texts)
        # rustbpe's vocabulary is the bytes and the merges; the special token is ours
        ranks, pattern = learn_merges(sample, vocab_size - 1, GPT4_SPLIT_PATTERN)
        if len(ranks) <= 256:
            # a BPE of the bytes alone is a byte tokenizer under another name: the user
            # asked for merges, and silently getting none would go unseen
            raise MinigptError(
                f"bpe learned no merges: its sample of {sample.chars:,} "
                f"character{'' if sample.chars == 1 else 's'} has no pair of bytes to merge",
                hint="learn from more text (a larger bpe_sample_chars or a bigger corpus), "
                "or use the char tokenizer",
                param="bpe_sample_chars",
            )
        return cls(ranks, pattern)

    def to_json(self) -> dict:
        by_rank = sorted(self.mergeable_ranks.items(), key=lambda item: item[1])
        return {
            "kind": self.kind,
            "pattern": self.pattern,
            "special_tokens": {ENDOFTEXT: len(by_rank)},
            # token bytes in rank order (rank = position), base64 because they need not be UTF-8
            "ranks": [base64.b64encode(token).decode("ascii") for token, _ in by_rank],
        }

    @classmethod
    def from_json(cls, data: dict, where: str = TOKENIZER_FILE) -> BPETokenizer:
        """Rebuild from `to_json()`; anything malformed is a TokenizerFileDamaged naming `where`."""
        ranks, pattern = data.get("ranks"), data.get("pattern")
        if not isinstance(ranks, list) or not all(isinstance(token, str) for token in ranks):
            raise _damaged(where, "its bpe 'ranks' is not a list of base64 strings")
        if not isinstance(pattern, str):
            raise _damaged(where, "its bpe 'pattern' is not a string")
        if len(ranks) >= MAX_BPE_VOCAB_SIZE:
            raise _damaged(where, f"its bpe 'ranks' holds {len(ranks):,} tokens, too many")
        try:
            # validate: plain b64decode silently drops characters outside the alphabet
            tokens = [base64.b64decode(token, validate=True) for token in ranks]
        except ValueError:
            raise _damaged(where, "a token in its bpe 'ranks' is not base64") from None
        try:
            return cls({token: rank for rank, token in enumerate(tokens)}, pattern)
        except MinigptError as err:  # duplicates, gaps, a missing byte
            raise _damaged(where, str(err)) from None
        except ValueError as err:  # tiktoken cannot compile the split pattern
            raise _damaged(where, f"its bpe 'pattern' does not compile ({err})") from None


class NamedTokenizer(TiktokenTokenizer):
    """One of tiktoken's published encodings (gpt2, r50k_base, cl100k_base, o200k_base).

    tiktoken downloads the encoding's file on first use and caches it
    (TIKTOKEN_CACHE_DIR, else a folder in the system temp dir).
    """

    def __init__(self, name: str):
        self.kind = name
        super().__init__(load_tiktoken_encoding(name))

    def to_json(self) -> dict:
        return {"kind": self.kind}


def load_tiktoken_encoding(name: str):
    """`tiktoken.get_encoding(name)` with one clear sentence when it cannot be fetched."""
    import tiktoken

    if name not in NAMED_ENCODINGS:
        raise MinigptError(
            f"unknown tokenizer {name!r}", hint=f"choose one of: {', '.join(TOKENIZER_KINDS)}"
        )
    previous_timeout = socket.getdefaulttimeout()
    # tiktoken downloads without a timeout; a dead network must fail, not hang
    socket.setdefaulttimeout(30)
    try:
        return tiktoken.get_encoding(name)
    except (OSError, ValueError) as err:  # requests' errors are OSErrors, a bad file a ValueError
        raise MinigptError(
            f"the {name} encoding is not in tiktoken's cache and could not be downloaded "
            f"({type(err).__name__}); use the char or bpe tokenizer, which need no download",
            hint="or connect to the internet once so tiktoken can cache it (TIKTOKEN_CACHE_DIR)",
        ) from err
    finally:
        socket.setdefaulttimeout(previous_timeout)


def check_bpe_vocab_size(vocab_size: int) -> None:
    """A byte-level BPE needs the 256 bytes, <|endoftext|> and at least one merge, and at
    most MAX_BPE_VOCAB_SIZE ids."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, numbers.Integral):
        raise MinigptError(
            f"vocab size must be a whole number, not {_shown(vocab_size)}",
            hint="use a vocab_size such as 2048",
            param="vocab_size",
        )
    if vocab_size > MAX_BPE_VOCAB_SIZE:
        raise MinigptError(
            f"vocab size {vocab_size:,} is too large for BPE, whose most is "
            f"{MAX_BPE_VOCAB_SIZE:,} (2**20)",
            hint="use a vocab_size from 512 to 65536; a small corpus runs out of merges long before",
            param="vocab_size",
        )
    if vocab_size <= 256 + 1:
        raise MinigptError(
            f"vocab size {vocab_size} is too small for BPE, which needs more than 257 "
            "(256 bytes + <|endoftext|>)",
            hint="use a vocab_size of 512 or more, e.g. 2048",
            param="vocab_size",
        )


def check_tokenizer_settings(kind: str, vocab_size: int | None) -> int | None:
    """Validate a tokenizer choice before any work; returns the vocab size to use (bpe only)."""
    if kind not in TOKENIZER_KINDS:
        raise MinigptError(
            f"unknown tokenizer {kind!r}", hint=f"choose one of: {', '.join(TOKENIZER_KINDS)}"
        )
    if kind != "bpe":
        if vocab_size is not None:
            raise MinigptError(
                f"vocab_size applies only to the bpe tokenizer, not {kind}",
                hint="drop vocab_size, or use the bpe tokenizer",
                param="vocab_size",
            )
        return None
    vocab_size = DEFAULT_BPE_VOCAB_SIZE if vocab_size is None else vocab_size
    check_bpe_vocab_size(vocab_size)
    return vocab_size


def train_tokenizer(kind: str, texts: list[str], vocab_size: int | None = None) -> Tokenizer:
    """Build a tokenizer of `kind` for the corpus `texts` (char vocab, BPE merges, or a named encoding)."""
    vocab_size = check_tokenizer_settings(kind, vocab_size)
    if kind == "char":
        chars: set[str] = set()
        for text in texts:
            chars.update(text)
        return CharTokenizer(sorted(chars))
    if kind == "bpe":
        return BPETokenizer.train(texts, vocab_size)
    return NamedTokenizer(kind)


def tokenizer_from_json(data: dict, where: str = TOKENIZER_FILE) -> Tokenizer:
    """Rebuild a tokenizer from its `to_json()` dict, read from `where` (named in errors).

    The dict may come from anywhere, so its shape is checked: anything malformed is a
    TokenizerFileDamaged, never a traceback or a tokenizer that fails later.
    """
    if not isinstance(data, dict):
        raise _damaged(where, "it is not a JSON object")
    kind = data.get("kind")
    if kind == "char":
        return _char_tokenizer_from_json(data, where)
    if kind == "bpe":
        return BPETokenizer.from_json(data, where)
    if isinstance(kind, str) and kind in NAMED_ENCODINGS:
        return NamedTokenizer(kind)
    raise TokenizerFileDamaged(
        f"unknown tokenizer kind {_shown(kind)} in {where}",
        hint="the run was written by a newer minigpt, or the file is damaged",
    )


def _is_one_character(value: object) -> bool:
    # a lone surrogate is one str character that no text contains and no terminal prints
    return isinstance(value, str) and len(value) == 1 and not "\ud800" <= value <= "\udfff"


def _char_tokenizer_from_json(data: dict, where: str) -> CharTokenizer:
    chars, unknown = data.get("chars"), data.get("unknown")
    if not isinstance(chars, list) or not chars:
        raise _damaged(where, "its char 'chars' is not a non-empty list of characters")
    bad = [ch for ch in chars if not _is_one_character(ch)]
    if bad:
        raise _damaged(
            where, f"its char 'chars' holds {_shown(bad[0])}, which is not one character"
        )
    twice = [ch for ch, count in Counter(chars).items() if count > 1]
    if twice:  # two ids for one character: encode would silently use only the last
        raise _damaged(where, f"its char 'chars' holds {twice[0]!r} twice")
    if unknown is not None and (not _is_one_character(unknown) or unknown not in chars):
        raise _damaged(where, f"its char 'unknown' {_shown(unknown)} is not one of its 'chars'")
    return CharTokenizer(chars, unknown=unknown)


def save_tokenizer(tokenizer: Tokenizer, path: str | Path) -> None:
    """Write tokenizer.json atomically."""
    write_json_atomic(path, tokenizer.to_json())


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Read a saved tokenizer; a missing, unreadable or damaged file is one clear sentence."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError) as err:
        raise MinigptError(
            f"no tokenizer at {path}", hint="is this a minigpt run directory?"
        ) from err
    except OSError as err:  # permission denied, a folder in the file's place
        raise os_error(err, "read", path) from err
    # bad JSON or UTF-8 are ValueErrors; nesting deep enough to overflow the parser is not
    except (ValueError, RecursionError) as err:
        raise TokenizerFileDamaged(
            f"{path} is not valid JSON", hint="the file is damaged; retrain or restore it"
        ) from err
    return tokenizer_from_json(data, where=str(path))
