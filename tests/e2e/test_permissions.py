"""Files and folders the user cannot read or write: one sentence, exit 2. The commands
run as a non-root user (root ignores file modes); where that is impossible the tests
are skipped and say why."""

from __future__ import annotations

import os

CASES: dict = {}
NOBODY_UID = 65534


def case(name: str):
    return lambda fn: CASES.setdefault(name, fn)


def as_nobody(c, lock, *command):
    """The base run, owned by the non-root user, locked by `lock`, then `command` as that user."""
    c.use("base")
    c.write("p.txt", "the dog")
    c.give_to_nobody()
    lock(c)
    return c.mg(*command, nobody=True)


UNREADABLE = {
    "unreadable config.json: --resume": ("R/config.json", ("train", "--resume", "R")),
    "unreadable corpus: train": ("corpus.txt", ("train", "--data", "corpus.txt", "--out", "R2")),
    "unreadable inspect-heads --prompt-file": (
        "p.txt",
        ("inspect-heads", "R", "--device", "cpu", "--prompt-file", "p.txt"),
    ),
}
for _label, (_target, _command) in UNREADABLE.items():

    @case(_label)
    def _(c, target=_target, command=_command):
        if command[0] == "train" and "--data" in command:
            command = (*command, *c.TINY, "--max-iters", "5")
        return c.refused(as_nobody(c, lambda c: os.chmod(c.p(target), 0), *command))


@case("unreadable pytorch_model.bin: import says so, not that it is damaged")
def _(c):
    def lock(c):
        import torch
        from safetensors.torch import load_file

        bpe = ("--set", "data.tokenizer=bpe", "--set", "data.vocab_size=300")
        trained = c.mg("train", "--data", "corpus.txt", *c.TINY, *bpe, "--max-iters", "2", "--out", "B")
        assert c.ok(trained) + c.ok(c.mg("export", "B", "--out", "hf")) == []
        weights = c.p("hf/model.safetensors")
        torch.save(load_file(weights), c.p("hf/pytorch_model.bin"))
        weights.unlink()
        os.chmod(c.p("hf/pytorch_model.bin"), 0)

    r = as_nobody(c, lock, "import", "hf", "--out", "I")
    problems = c.refused(r)
    if "Permission denied" not in r.err or "damaged" in r.err:
        problems.append(f"not named as unreadable: {r.err.strip()}")
    return problems


@case("inspect-heads --html into a read-only folder")
def _(c):
    def lock(c):
        c.p("ro").mkdir()
        os.chown(c.p("ro"), NOBODY_UID, NOBODY_UID)
        os.chmod(c.p("ro"), 0o555)

    return c.refused(as_nobody(c, lock, *c.HEADS, "--html", "ro/v.html"))


def test_what_the_user_cannot_read_or_write_is_one_sentence(nobody_ok, problems, name):
    assert problems[name] == []
