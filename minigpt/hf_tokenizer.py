"""Byte-level BPE tokenizers to and from the Hugging Face format.

A GPT-2 checkpoint carries its tokenizer as `vocab.json` + `merges.txt` (the slow format)
or `tokenizer.json` (the `tokenizers` format), or both; `tokenizer_from_hf` reads the one
transformers' AutoTokenizer reads (tokenizer.json where there is one) into a
minigpt `BPETokenizer` run by tiktoken; `write_hf_tokenizer` writes a minigpt BPE
tokenizer back out so that `transformers.AutoTokenizer.from_pretrained` gives the same ids.

The two libraries run BPE differently: Hugging Face applies the merge *pair* of lowest
rank in merges.txt, tiktoken merges the adjacent pair whose *concatenation* has the lowest
rank (= id). They agree exactly when merges are listed in id order and each token of id r
is its own merge of what tiktoken's BPE with only ids < r makes of its bytes: BPE training
makes vocabularies so, and tiktoken runs GPT-2's this way. Anything else is refused rather
than run with ids that would silently differ.

Files (GPT-2 layout):
- vocab.json: {token: id}, each token its bytes written in `bytes_to_unicode` characters.
- merges.txt: "#version: 0.2", then one "a b" line per merge, in order.
- tokenizer.json: {"model": {"type": "BPE", "vocab": ..., "merges": [...]},
  "pre_tokenizer": ..., "added_tokens": [...], "decoder": ..., ...}.
"""

from __future__ import annotations

import json
import numbers
from pathlib import Path

from minigpt.atomic import write_json_atomic, write_text_atomic
from minigpt.errors import MinigptError, os_error
from minigpt.tokenizer import (
    ENDOFTEXT,
    GPT2_SPLIT_PATTERN,
    HF_GPT2_SPLIT_PATTERN,
    BPETokenizer,
)

VOCAB_FILE, MERGES_FILE, TOKENIZER_JSON = "vocab.json", "merges.txt", "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
_FOLDER_HINT = "a GPT-2 checkpoint folder has vocab.json and merges.txt, or tokenizer.json"
_BPE_HINT = "minigpt reads byte-level BPE tokenizers laid out as GPT-2's is"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte (0..255) to a printable character, so that vocab.json and
    merges.txt hold text: printable Latin-1 bytes stand for themselves, the other 68
    (controls, whitespace) become chr(256 + k). Space is 'Ġ', newline 'Ċ'."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {byte: chr(char) for byte, char in zip(printable, chars, strict=True)}


def _bpe_parts(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """What tiktoken's BPE makes of `token` using only the tokens of rank < max_rank:
    repeatedly join the adjacent pair whose concatenation has the lowest rank (leftmost on a tie)."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best_rank, best = max_rank, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1], max_rank)
            if rank < best_rank:
                best_rank, best = rank, i
        if best < 0:
            break
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    return parts


# ------------------------------------------------------------------------------------ import


def tokenizer_from_hf(folder: Path) -> BPETokenizer:
    """Read a Hugging Face byte-level BPE tokenizer from a checkpoint folder: tokenizer.json
    if it is there, else vocab.json + merges.txt. The result encodes to the same ids as
    transformers does (rank = vocab id, <|endoftext|> = id n); a tokenizer that tiktoken
    cannot run that way is a MinigptError saying why.

    Why tokenizer.json first: `AutoTokenizer.from_pretrained` loads it whenever it is
    there and never looks at vocab.json and merges.txt, so a folder whose files disagree
    must give its ids, which are the ones the model was used with.
    """
    folder = Path(folder)
    slow = not (folder / TOKENIZER_JSON).is_file()
    if slow and not ((folder / VOCAB_FILE).is_file() and (folder / MERGES_FILE).is_file()):
        raise _missing_files(folder)
    try:
        if slow:
            vocab = _read_json(folder / VOCAB_FILE)
            merges = _merges_from_text(_read_text(folder / MERGES_FILE))
            pattern, added, names = GPT2_SPLIT_PATTERN, [], (VOCAB_FILE, MERGES_FILE)
        else:
            vocab, merges, pattern, added = _read_tokenizer_json(folder / TOKENIZER_JSON)
            names = (TOKENIZER_JSON, TOKENIZER_JSON)
        _check_config(folder / CONFIG_FILE)
        ranks = _ranks_from_vocab(vocab, merges, added, names)
    except MinigptError:
        raise
    except (KeyError, TypeError, AttributeError, ValueError):  # a file of the wrong shape
        where = f"{VOCAB_FILE} or {MERGES_FILE}" if slow else TOKENIZER_JSON
        raise MinigptError(
            f"{folder}'s {where} is not laid out as Hugging Face writes it",
            hint="the file is damaged, or was written by something else",
        ) from None
    try:
        return BPETokenizer(ranks, pattern)
    except MinigptError:
        raise
    except ValueError as err:  # tiktoken cannot compile the split regex
        raise MinigptError(
            f"{TOKENIZER_JSON}'s split regex does not compile in tiktoken ({err})",
            hint="tiktoken's regex engine (fancy-regex) reads most, not all, Oniguruma syntax",
        ) from None


def _missing_files(folder: Path) -> MinigptError:
    if not folder.is_dir():
        return MinigptError(f"no folder at {folder}", hint=_FOLDER_HINT)
    present = [name for name in (VOCAB_FILE, MERGES_FILE) if (folder / name).is_file()]
    if present:
        (other,) = {VOCAB_FILE, MERGES_FILE} - set(present)
        what = f"{folder} has {present[0]} but neither {other} nor {TOKENIZER_JSON}"
    else:
        what = f"{folder} has no {VOCAB_FILE} + {MERGES_FILE} and no {TOKENIZER_JSON}"
    return MinigptError(what, hint=_FOLDER_HINT)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise MinigptError(f"{path} is not UTF-8 text", hint="the file is damaged") from None
    except OSError as err:
        raise os_error(err, "read", path) from None


def _read_json(path: Path) -> object:
    text = _read_text(path)
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise MinigptError(f"{path} is not valid JSON", hint="the file is damaged") from None


def _merges_from_text(text: str) -> list:
    """merges.txt: an optional "#version" line, then one "a b" per line (blank lines skipped)."""
    lines = [line.rstrip("\r") for line in text.split("\n")]
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    return [line.split(" ") for line in lines if line]


def _read_tokenizer_json(path: Path) -> tuple[object, list, str, list]:
    """(vocab, merges, split pattern, added tokens) of tokenizer.json, once its pipeline is
    known to be one tiktoken runs: no normalizer, byte-level BPE, nothing added to the ids."""
    data = _read_json(path)
    model = data["model"]
    if model.get("type") != "BPE":
        raise _unsupported(f"its model is {model.get('type')!r}, not byte-level BPE")
    _check_bpe_options(model)
    if data.get("normalizer") is not None:
        kind = data["normalizer"].get("type")
        raise _unsupported(f"its normalizer {kind!r} changes the text before BPE")
    pattern = _pattern_of(data.get("pre_tokenizer"))
    _check_pipeline_end(data.get("post_processor"), data.get("decoder"))
    merges = [_merge_pair(merge) for merge in model["merges"]]
    return model["vocab"], merges, pattern, list(data.get("added_tokens") or [])


def _unsupported(what: str, hint: str = _BPE_HINT) -> MinigptError:
    return MinigptError(f"{TOKENIZER_JSON} cannot be run by tiktoken: {what}", hint=hint)


def _check_bpe_options(model: dict) -> None:
    """The BPE options that would change the ids must be off."""
    for option in ("continuing_subword_prefix", "end_of_word_suffix", "dropout", "byte_fallback"):
        if model.get(option):
            raise _unsupported(f"its BPE model sets {option} to {model[option]!r}")


def _merge_pair(merge: object) -> list:
    # "a b" (tokenizers < 0.20) or ["a", "b"]; byte-level tokens hold no spaces
    return merge.split(" ") if isinstance(merge, str) else list(merge)


def _pattern_of(pre_tokenizer: dict | None) -> str:
    """The split regex of a ByteLevel pre-tokenizer (GPT-2's), or of Split(Regex) + ByteLevel."""
    kind = pre_tokenizer.get("type") if pre_tokenizer else None
    steps = pre_tokenizer.get("pretokenizers") if kind == "Sequence" else [pre_tokenizer]
    if steps and len(steps) == 1 and steps[0] and steps[0].get("type") == "ByteLevel":
        _check_byte_level(steps[0], use_regex=True)
        return GPT2_SPLIT_PATTERN
    if steps and len(steps) == 2 and [step.get("type") for step in steps] == ["Split", "ByteLevel"]:
        split = steps[0]
        pattern = split["pattern"].get("Regex")
        if pattern is None or split.get("behavior") != "Isolated" or split.get("invert"):
            raise _unsupported("its Split pre-tokenizer is not an Isolated, non-inverted regex")
        _check_byte_level(steps[1], use_regex=False)
        return pattern
    shown = [step.get("type") for step in steps] if kind == "Sequence" and steps else kind
    raise _unsupported(
        f"its pre-tokenizer {shown!r} is neither ByteLevel nor Split(Regex) then ByteLevel"
    )


def _check_byte_level(step: dict, use_regex: bool) -> None:
    if step.get("add_prefix_space"):
        raise _unsupported(
            "its ByteLevel pre-tokenizer adds a space before the text (add_prefix_space)",
            hint="save the tokenizer with add_prefix_space=False; GPT-2 was trained without it",
        )
    if step.get("use_regex", True) != use_regex:
        raise _unsupported(f"its ByteLevel pre-tokenizer has use_regex {not use_regex}")


def _check_pipeline_end(post_processor: dict | None, decoder: dict | None) -> None:
    if post_processor is not None and not _adds_nothing(post_processor):
        raise _unsupported(f"its post-processor {post_processor.get('type')!r} adds tokens")
    if decoder is not None and decoder.get("type") != "ByteLevel":
        raise _unsupported(f"its decoder {decoder.get('type')!r} is not ByteLevel")


def _adds_nothing(post_processor: dict) -> bool:
    """Whether a post-processor leaves a single text's ids alone: GPT-2's ByteLevel only
    trims offsets, and transformers writes a TemplateProcessing of just the text ("$A")."""
    kind = post_processor.get("type")
    if kind == "Sequence":
        return all(_adds_nothing(step) for step in post_processor["processors"])
    if kind == "TemplateProcessing":
        return all(list(piece) == ["Sequence"] for piece in post_processor["single"])
    return kind == "ByteLevel"


def _check_config(path: Path) -> None:
    """tokenizer_config.json, where there is one, must not add tokens to what is encoded."""
    if not path.is_file():
        return
    config = _read_json(path)
    if not isinstance(config, dict):
        raise MinigptError(f"{path} is not a JSON object", hint="the file is damaged")
    for option in ("add_bos_token", "add_eos_token", "add_prefix_space"):
        if config.get(option) is True:
            raise MinigptError(
                f"{CONFIG_FILE} sets {option}, which changes the ids minigpt would give",
                hint=f"set {option} to false; GPT-2 was trained without it",
            )
    _check_added(list((config.get("added_tokens_decoder") or {}).values()))


def _check_added(added: list) -> None:
    """Only <|endoftext|> may be added: it is minigpt's one special token."""
    extra = next((token for token in added if token.get("content") != ENDOFTEXT), None)
    if extra is not None:
        raise MinigptError(
            f"the tokenizer adds the token {extra.get('content')!r}, but minigpt's only "
            f"special token is {ENDOFTEXT}",
            hint="remove the extra special tokens, or run this model with transformers",
        )


def _ranks_from_vocab(
    vocab: object, merges: list, added: list, names: tuple[str, str]
) -> dict[bytes, int]:
    """tiktoken's mergeable ranks (token bytes -> id) from a vocab and its merges, checked to
    give the same ids as Hugging Face's BPE (see the module docstring).

    The checks run from the most specific cause to the least, so that one fault is named
    as what it is: an extra special token, a missing byte, then where <|endoftext|> sits.
    """
    vocab_name, merges_name = names
    if not isinstance(vocab, dict) or not all(_is_id(i) for i in vocab.values()):
        raise MinigptError(f"{vocab_name}'s vocab is not a map from tokens to ids", hint=_BPE_HINT)
    vocab = dict(vocab)
    _check_added(added)
    eot_ids = {token.get("id") for token in added}
    if ENDOFTEXT in vocab:
        eot_ids.add(vocab.pop(ENDOFTEXT))
    if not eot_ids:
        raise MinigptError(f"{vocab_name} has no {ENDOFTEXT} token", hint=_BPE_HINT)
    _check_nothing_after_endoftext(vocab, eot_ids, vocab_name)
    ranks = {_token_bytes(token, vocab_name): token_id for token, token_id in vocab.items()}
    missing = next((b for b in range(256) if bytes([b]) not in ranks), None)
    if missing is not None:
        raise MinigptError(
            f"{vocab_name} has no token for the byte 0x{missing:02x}", hint=_BPE_HINT
        )
    n = len(vocab)
    if eot_ids != {n}:
        shown = ", ".join(map(str, sorted(eot_ids, key=str)))
        raise MinigptError(
            f"{ENDOFTEXT} has id {shown}, but minigpt needs it right after the {n} BPE "
            f"tokens, as id {n}",
            hint=_BPE_HINT,
        )
    if sorted(vocab.values()) != list(range(n)):
        raise MinigptError(
            f"{vocab_name}'s ids are not 0..{n - 1}, each once, with {ENDOFTEXT} last",
            hint=_BPE_HINT,
        )
    _check_merges(ranks, [_pair_bytes(pair, merges_name) for pair in merges], names)
    return ranks


def _check_nothing_after_endoftext(vocab: dict, eot_ids: set, vocab_name: str) -> None:
    """Tokens whose ids follow an <|endoftext|> that itself follows a whole vocabulary
    (ids 0..m-1 below it) are special tokens added after it, not BPE tokens: they are
    named as such, where counting them as BPE tokens would blame <|endoftext|>'s id."""
    if len(eot_ids) != 1:
        return
    (eot_id,) = eot_ids
    below = sorted(i for i in vocab.values() if i < eot_id)
    after = sorted((i, token) for token, i in vocab.items() if i > eot_id)
    if after and below == list(range(eot_id)) and eot_id >= 256:
        token_id, token = after[0]
        more = f" and {len(after) - 1} more" if len(after) > 1 else ""
        raise MinigptError(
            f"{vocab_name} has the token {token!r} (id {token_id}){more} after {ENDOFTEXT} "
            f"(id {eot_id}): an extra special token, but minigpt's only special token is "
            f"{ENDOFTEXT}",
            hint="remove the extra special tokens, or run this model with transformers",
        )


def _is_id(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


_CHAR_BYTE = {char: byte for byte, char in bytes_to_unicode().items()}


def _token_bytes(token: object, where: str) -> bytes:
    if token == "":  # no text is made of it; tiktoken refuses it
        raise MinigptError(f"{where} holds an empty token", hint=_BPE_HINT)
    try:
        return bytes(_CHAR_BYTE[char] for char in token)
    except (KeyError, TypeError):
        raise MinigptError(
            f"{where} holds the token {token!r}, which is not written in GPT-2's byte alphabet",
            hint=_BPE_HINT,
        ) from None


def _pair_bytes(pair: object, where: str) -> tuple[bytes, bytes]:
    if not isinstance(pair, list) or len(pair) != 2 or not all(pair):
        raise MinigptError(
            f"{where} holds the merge {pair!r}, which is not two tokens", hint=_BPE_HINT
        )
    return _token_bytes(pair[0], where), _token_bytes(pair[1], where)


def _check_merges(
    ranks: dict[bytes, int], merges: list[tuple[bytes, bytes]], names: tuple[str, str]
) -> None:
    """Every token longer than a byte is made by one merge, merges come in id order, and
    each merge is the one tiktoken's BPE would make of that token (so both run alike)."""
    vocab_name, merges_name = names
    last_id = -1
    for number, (a, b) in enumerate(merges, start=1):
        shown = f"{merges_name}'s merge {number} ({a!r} + {b!r})"
        if a not in ranks or b not in ranks or a + b not in ranks:
            raise MinigptError(
                f"{shown} joins or makes a token that is not in {vocab_name}", hint=_BPE_HINT
            )
        if ranks[a + b] <= last_id:
            raise MinigptError(
                f"{vocab_name}'s ids do not follow the order of {merges_name}, which tiktoken needs",
                hint="tiktoken merges by id and Hugging Face by merge order; they must agree",
            )
        last_id = ranks[a + b]
        if _bpe_parts(ranks, a + b, last_id) != [a, b]:
            raise MinigptError(
                f"{shown} is not how tiktoken's BPE builds that token, so the ids would differ",
                hint="the merges were not made by BPE training; minigpt cannot run them with tiktoken",
            )
    longer = len(ranks) - 256
    if len(merges) != longer:
        made = {a + b for a, b in merges}
        orphan = next(token for token in ranks if len(token) > 1 and token not in made)
        raise MinigptError(
            f"{vocab_name}'s token {orphan!r} (id {ranks[orphan]}) is made by no merge in {merges_name}",
            hint=_BPE_HINT,
        )


# ------------------------------------------------------------------------------------ export


def recover_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merges, in rank order, that make Hugging Face's BPE agree with tiktoken's: for
    the token of rank r, the two parts that BPE with only the ranks < r makes of its bytes."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        parts = _bpe_parts(ranks, token, rank)
        if len(parts) != 2:
            raise MinigptError(
                f"token {rank} ({token!r}) is not one merge of two tokens of lower rank, "
                "which the Hugging Face format needs",
                hint="this tokenizer was not made by BPE training; retrain it with minigpt",
            )
        merges.append((parts[0], parts[1]))
    return merges


def write_hf_tokenizer(tokenizer: BPETokenizer, out_dir: Path, model_max_length: int) -> list[str]:
    """Write `tokenizer` to `out_dir` as `transformers.AutoTokenizer.from_pretrained` loads
    it, encoding to the same ids: tokenizer.json, tokenizer_config.json and, when the split
    is GPT-2's, vocab.json + merges.txt for GPT-2's slow tokenizer. Returns the file names."""
    if not isinstance(tokenizer, BPETokenizer):
        raise MinigptError(
            f"only a bpe tokenizer can be written in the Hugging Face format, not {tokenizer.kind}",
            hint="train the model with the bpe tokenizer",
        )
    if not _is_id(model_max_length) or model_max_length < 1:
        raise MinigptError(
            f"model_max_length must be a whole number of at least 1, not {model_max_length!r}",
            hint="use the model's block size",
            param="model_max_length",
        )
    out_dir = Path(out_dir)
    vocab, merges = _hf_vocab_and_merges(tokenizer.mergeable_ranks)
    gpt2_split = tokenizer.pattern in (GPT2_SPLIT_PATTERN, HF_GPT2_SPLIT_PATTERN)
    eot_id = len(vocab) - 1
    write_json_atomic(
        out_dir / TOKENIZER_JSON, _tokenizer_json(vocab, merges, tokenizer.pattern, gpt2_split)
    )
    write_json_atomic(
        out_dir / CONFIG_FILE, _tokenizer_config(eot_id, model_max_length, gpt2_split)
    )
    written = [TOKENIZER_JSON, CONFIG_FILE]
    if gpt2_split:
        write_json_atomic(out_dir / VOCAB_FILE, vocab)
        write_text_atomic(out_dir / MERGES_FILE, "\n".join(["#version: 0.2", *merges]) + "\n")
        written += [VOCAB_FILE, MERGES_FILE]
    return written


def _hf_vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[str]]:
    """({token text: id} with <|endoftext|> last, ["a b" per merge in rank order]) in
    GPT-2's byte alphabet."""
    byte_char = bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(byte_char[byte] for byte in token)

    vocab = {text(token): rank for token, rank in sorted(ranks.items(), key=lambda item: item[1])}
    vocab[ENDOFTEXT] = len(ranks)
    merges = [f"{text(a)} {text(b)}" for a, b in recover_merges(ranks)]
    return vocab, merges


def _endoftext_entry() -> dict:
    # not normalized, no stripping: found in text exactly as written, as tiktoken does
    return {
        "content": ENDOFTEXT,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": True,
    }


def _tokenizer_json(
    vocab: dict[str, int], merges: list[str], pattern: str, gpt2_split: bool
) -> dict:
    """tokenizer.json in the `tokenizers` format: byte-level BPE, <|endoftext|> special, no
    normalizer, no post-processor (nothing is added to the ids)."""
    if gpt2_split:  # ByteLevel's built-in regex is GPT-2's
        pre_tokenizer = {
            "type": "ByteLevel",
            "add_prefix_space": False,
            "trim_offsets": True,
            "use_regex": True,
        }
    else:
        split = {
            "type": "Split",
            "pattern": {"Regex": pattern},
            "behavior": "Isolated",
            "invert": False,
        }
        byte_level = {
            "type": "ByteLevel",
            "add_prefix_space": False,
            "trim_offsets": True,
            "use_regex": False,
        }
        pre_tokenizer = {"type": "Sequence", "pretokenizers": [split, byte_level]}
    model = {
        "type": "BPE",
        "dropout": None,
        "unk_token": None,
        "continuing_subword_prefix": None,
        "end_of_word_suffix": None,
        "fuse_unk": False,
        "byte_fallback": False,
        "ignore_merges": False,
        "vocab": vocab,
        "merges": merges,
    }
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": vocab[ENDOFTEXT], **_endoftext_entry()}],
        "normalizer": None,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": None,
        "decoder": {
            "type": "ByteLevel",
            "add_prefix_space": False,
            "trim_offsets": True,
            "use_regex": True,
        },
        "model": model,
    }


def _tokenizer_config(eot_id: int, model_max_length: int, gpt2_split: bool) -> dict:
    # GPT2TokenizerFast rebuilds GPT-2's pre-tokenizer in transformers 5, so another split
    # needs the class that loads tokenizer.json as it is
    return {
        "tokenizer_class": "GPT2TokenizerFast" if gpt2_split else "PreTrainedTokenizerFast",
        "bos_token": ENDOFTEXT,
        "eos_token": ENDOFTEXT,
        "unk_token": ENDOFTEXT,
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "model_max_length": model_max_length,
        "added_tokens_decoder": {str(eot_id): _endoftext_entry()},
    }
