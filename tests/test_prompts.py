"""Prompts files (`generate --prompts-file`): one prompt a line or JSON lines, in file
order, and every malformed file one sentence naming the file and the line."""

from __future__ import annotations

import pytest

from minigpt import prompts as prompts_module
from minigpt.errors import MinigptError
from minigpt.prompts import read_prompts_file


def write(tmp_path, name: str, content: str | bytes):
    path = tmp_path / name
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


def test_a_text_file_is_one_prompt_a_line_as_written(tmp_path):
    text = "\ufeffROMEO:\r\n\n  \ndef \n  indented\nlast\n"  # BOM, CRLF, blank lines, spaces
    assert read_prompts_file(write(tmp_path, "p.txt", text)) == [
        "ROMEO:",
        "def ",
        "  indented",
        "last",
    ]
    assert read_prompts_file(write(tmp_path, "q", "no newline at the end")) == [
        "no newline at the end"
    ]


def test_a_jsonl_file_is_a_string_or_an_object_with_a_prompt_per_line(tmp_path):
    lines = ['"plain"', "", '{"prompt": "two\\nlines", "id": 7}', '""', '  "\\u00e9t\\u00e9"  ']
    path = write(tmp_path, "p.jsonl", "\n".join(lines) + "\n\n")
    assert read_prompts_file(path) == ["plain", "two\nlines", "", "été"]


@pytest.mark.parametrize(
    "name, content, words",
    [
        ("missing.txt", None, "does not exist"),
        ("folder", "DIR", "is a folder"),
        ("under/a-file", "UNDER", "cannot be read"),
        ("p.txt", b"fine\n\xff\n", "line 2 is not UTF-8 (byte 0xff)"),
        ("p.txt", "hi there\n".encode("utf-16"), "looks like UTF-16"),
        ("p.txt", b"", "holds no prompts"),
        ("p.jsonl", "\n  \n\n", "holds no prompts"),
        ("p.jsonl", '"a"\n\n{oops\n', "line 3 is not JSON"),
        (
            "p.jsonl",
            '{"text": "a", "id": 1}\n',
            "line 1 has no \"prompt\" string (its keys: 'text', 'id')",
        ),
        ("p.jsonl", '"a"\n{"prompt": 3}\n', 'line 2 has no "prompt" string'),
        ("p.jsonl", "[1, 2]\n", "line 1 is JSON but neither a string nor an object"),
        ("p.jsonl", '"\\ud800"\n', "line 1 holds an unpaired UTF-16 surrogate"),
    ],
)
def test_a_bad_prompts_file_is_one_sentence_naming_it(tmp_path, name, content, words):
    if content == "DIR":
        (tmp_path / name).mkdir()
    elif content == "UNDER":
        write(tmp_path, "under", "a file, not a folder")
    elif content is not None:
        write(tmp_path, name, content)
    with pytest.raises(MinigptError) as caught:
        read_prompts_file(tmp_path / name)
    err = caught.value
    assert words in str(err) and str(tmp_path / name) in str(err), str(err)
    assert err.param == "prompts_file" and err.hint and "\n" not in str(err)


def test_more_prompts_or_bytes_than_a_batch_takes_are_refused(tmp_path, monkeypatch):
    path = write(tmp_path, "p.txt", "a\nb\nc\n")
    monkeypatch.setattr(prompts_module, "MAX_PROMPTS", 2)
    with pytest.raises(MinigptError, match="holds more than 2 prompts"):
        read_prompts_file(path)
    monkeypatch.setattr(prompts_module, "MAX_PROMPTS", 3)
    assert read_prompts_file(path) == ["a", "b", "c"]
    monkeypatch.setattr(prompts_module, "MAX_PROMPTS_BYTES", 5)
    with pytest.raises(MinigptError, match="is larger than"):
        read_prompts_file(path)
