"""Damaged files: a prepared folder with a cut, missing or edited file is prepared again
(or found out by train) and whole again; a run directory with an edited config, a damaged
tokenizer, weights or trainer state is refused in one sentence, and a resume refused
that way leaves the run as it was."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

CASES: dict = {}


def case(name: str):
    return lambda fn: CASES.setdefault(name, fn)


# --------------------------------------------------------------------------- the prepared folder


def meta_edit(c, change):
    return lambda folder: c.edit_json(folder / "meta.json", change)


DAMAGES = {
    "train.bin truncated to half": lambda c: lambda f: c.truncate_half(f, "train.bin"),
    "train.bin of odd size": lambda c: (
        lambda f: (f / "train.bin").write_bytes((f / "train.bin").read_bytes() + b"\0")
    ),
    "val.bin deleted": lambda c: lambda f: (f / "val.bin").unlink(),
    "train.bin deleted": lambda c: lambda f: (f / "train.bin").unlink(),
    "val.bin emptied": lambda c: lambda f: (f / "val.bin").write_bytes(b""),
    '"dtype" removed from meta.json': lambda c: meta_edit(c, lambda m: m.pop("dtype")),
    'meta.json "dtype" = "float64"': lambda c: meta_edit(c, lambda m: m.update(dtype="float64")),
    "meta.json train_tokens wrong": lambda c: meta_edit(c, lambda m: m.update(train_tokens=5)),
    "meta.json not JSON": lambda c: lambda f: (f / "meta.json").write_text("{not json"),
    "meta.json a JSON list": lambda c: lambda f: (f / "meta.json").write_text("[]"),
    "tokenizer.json not JSON": lambda c: lambda f: (f / "tokenizer.json").write_text("{"),
    "train.bin a directory": lambda c: lambda f: c.dir_instead(f, "train.bin"),
}


def whole_again(folder: Path | None, tokens: int) -> list[str]:
    """The prepared folder's files agree with the token counts again."""
    if folder is None:
        return ["prepare did not say which folder"]
    try:
        meta = json.loads((folder / "meta.json").read_text())
        size = {"uint16": 2, "uint32": 4}[meta["dtype"]]
        train_ok = (folder / "train.bin").stat().st_size == tokens * size
        val_ok = (folder / "val.bin").stat().st_size == meta["val_tokens"] * size
    except (OSError, ValueError, KeyError, TypeError):
        return [f"{folder.name} is still damaged"]
    return [] if train_ok and val_ok else [f"{folder.name}: token files do not match meta.json"]


def damaged_cache(c, damage_name: str, then_train_only: bool) -> list[str]:
    c.use("prepared")  # corpus.txt prepared into D/ once: one folder
    (folder,) = [p.relative_to(c.dir) for p in c.p("D").iterdir()]
    tokens = json.loads((c.dir / folder / "meta.json").read_text())["train_tokens"]
    DAMAGES[damage_name](c)(c.dir / folder)
    problems = []
    if not then_train_only:
        r = c.mg("prepare", "corpus.txt", "--data-dir", "D")
        again, folder_again = c.prepared_numbers(r)
        problems += c.ok(r)
        if r.rc == 0:
            if again != tokens:
                problems.append(f"reports {again} train tokens, not {tokens}")
            problems += whole_again(c.dir / folder_again if folder_again else None, tokens)
    train = c.mg(*c.train_args("--max-iters", "5", *c.QUICK, "--set", "data.data_dir=D"))
    problems += [f"train after: {p}" for p in c.ok(train)]
    if then_train_only:
        problems += whole_again(c.dir / folder, tokens)
    return problems


for _label in DAMAGES:

    @case(f"{_label}, prepare again")
    def _(c, label=_label):
        return damaged_cache(c, label, then_train_only=False)


for _label in ("train.bin truncated to half", "val.bin deleted"):

    @case(f"{_label}, then train directly")
    def _(c, label=_label):
        return damaged_cache(c, label, then_train_only=True)


# --------------------------------------------------------------------------- the run directory


def config(change):
    return lambda c: c.edit_json(c.p("R", "config.json"), change)


def tokenizer(change):
    return lambda c: c.edit_json(c.p("R", "tokenizer.json"), change)


def duplicate_chars(d: dict) -> None:
    d["chars"] = d["chars"][:-1] + [d["chars"][0]]


def nan_weights(c) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    weights = load_file(str(c.p("R", "model.safetensors")))
    save_file(
        {k: torch.full_like(v, float("nan")) for k, v in weights.items()},
        str(c.p("R", "model.safetensors")),
    )


RESUME = ("train", "--resume", "R", "--max-iters", "30")
GEN = ("generate", "R", "-n", "20", "--seed", "0", "--device", "cpu")
HEADS = ("inspect-heads", "R", "--device", "cpu")
RUN_EDITS = {
    "config.json n_embd=64 (weights do not match): generate": (
        config(lambda d: d["model"].update(n_embd=64)),
        GEN,
    ),
    "config.json n_embd=64: inspect-heads": (config(lambda d: d["model"].update(n_embd=64)), HEADS),
    "config.json block_size=64: generate": (
        config(lambda d: d["model"].update(block_size=64)),
        GEN,
    ),
    "config.json block_size=64: inspect-heads": (
        config(lambda d: d["model"].update(block_size=64)),
        HEADS,
    ),
    'config.json without "model": generate': (config(lambda d: d.pop("model")), GEN),
    'config.json without "model": inspect-heads': (config(lambda d: d.pop("model")), HEADS),
    'config.json "model": 5': (config(lambda d: d.update(model=5)), GEN),
    'config.json model.dropout "x"': (config(lambda d: d["model"].update(dropout="x")), GEN),
    "config.json model.vocab_size=-1": (config(lambda d: d["model"].update(vocab_size=-1)), GEN),
    "config.json a JSON list": (config(lambda d: [1, 2]), GEN),
    "config.json empty": (lambda c: c.write("R/config.json", ""), GEN),
    "tokenizer.json without chars": (tokenizer(lambda d: d.pop("chars")), GEN),
    'tokenizer.json "chars": 5': (tokenizer(lambda d: d.update(chars=5)), GEN),
    "tokenizer.json duplicate chars": (tokenizer(duplicate_chars), GEN),
    "tokenizer.json not JSON": (lambda c: c.write("R/tokenizer.json", "{"), GEN),
    "model.safetensors empty": (lambda c: c.write("R/model.safetensors", b""), GEN),
    "model.safetensors truncated": (lambda c: c.truncate_half(c.p("R"), "model.safetensors"), GEN),
    "NaN weights in model.safetensors: generate": (nan_weights, GEN),
    "run dir is an empty folder": (lambda c: [shutil.rmtree(c.p("R")), c.p("R").mkdir()], GEN),
    "config.json train: [] on --resume": (config(lambda d: d.update(train=[])), RESUME),
    "config.json without data on --resume": (config(lambda d: d.pop("data")), RESUME),
}
for _label, (_edit, _command) in RUN_EDITS.items():

    @case(_label)
    def _(c, edit=_edit, command=_command):
        c.use("base")
        edit(c)
        return c.refused(c.mg(*command))


def nan_trainer_state(c) -> None:
    import torch

    state = torch.load(c.p("R", "trainer.pt"), map_location="cpu", weights_only=True)
    for tensor in state["model"].values():
        tensor.fill_(float("nan"))
    torch.save(state, c.p("R", "trainer.pt"))


@case("config.json train.lr = NaN, then --resume")
def _(c):
    c.use("base")
    c.edit_json(c.p("R", "config.json"), lambda d: d["train"].update(lr=float("nan")))
    before = c.snapshot()
    r = c.mg(*RESUME)
    return c.refused(r) + c.unchanged(before) + c.loads()


@case("NaN weights in trainer.pt, then --resume")
def _(c):
    c.use("base")
    nan_trainer_state(c)
    before = c.snapshot()
    return c.refused(c.mg(*RESUME)) + c.unchanged(before) + c.loads()


TRAINER_DAMAGE = {
    "trainer.pt empty": lambda c: c.write("R/trainer.pt", b""),
    "trainer.pt truncated to half": lambda c: c.truncate_half(c.p("R"), "trainer.pt"),
    "trainer.pt a directory": lambda c: c.dir_instead(c.p("R"), "trainer.pt"),
    "trainer.pt holds a list": lambda c: __import__("torch").save([1, 2], c.p("R", "trainer.pt")),
}
for _label, _damage in TRAINER_DAMAGE.items():

    @case(f"{_label}, then --resume")
    def _(c, damage=_damage):
        c.use("base")
        damage(c)
        return c.refused(c.mg(*RESUME)) + c.loads()


NOT_AN_ARCHIVE = {"text": b"hello, not a pickle\n", "random bytes": bytes(range(256)) * 12}
for _label, _bytes in NOT_AN_ARCHIVE.items():

    @case(f"trainer.pt that is no pickle at all ({_label}), then --resume")
    def _(c, raw=_bytes):
        c.use("base")
        c.write("R/trainer.pt", raw)
        r = c.mg(*RESUME)
        problems = c.refused(r) + c.mentions(r, "is not a trainer state file")
        return problems + c.avoids(r, "objects other than") + c.loads()


METRICS = {
    "[1,2]": b"[1,2]\n",
    '{"step":"x"}': b'{"step":"x"}\n',
    "non-UTF-8 bytes": b"\xff\xfe{\n",
}
for _label, _bytes in METRICS.items():

    @case(f"metrics.jsonl with {_label}, then --resume")
    def _(c, raw=_bytes):
        c.use("base")
        path = c.p("R", "metrics.jsonl")
        path.write_bytes(path.read_bytes() + raw)
        return c.clean(c.mg(*RESUME)) + c.loads()


# --------------------------------------------------------------------------- the tests


def test_a_damaged_file_is_mended_or_refused_in_one_sentence(problems, name):
    assert problems[name] == []
