"""Bad input on the command line: non-finite and absurd numbers, bad flags, paths that
cannot hold what is asked, files that are not UTF-8 text. Each is refused in one
sentence (exit 2, one `error:` line, no traceback) before anything is written; what is
accepted prints strict JSON and files with ordinary modes."""

from __future__ import annotations

import re

CASES: dict = {}


def case(name: str):
    return lambda fn: CASES.setdefault(name, fn)


# --------------------------------------------------------------------------- non-finite numbers

CONFIG_TIME = [
    "train.min_lr=nan",
    "train.weight_decay=nan",
    "train.grad_clip=nan",
    "train.max_time=nan",
    "train.lr=inf",
    "train.max_time=inf",
    "model.dropout=nan",
    "model.init_std=nan",
    "train.lr=nan",
    "train.beta2=nan",
    "train.weight_decay=inf",
    "model.init_std=inf",
    "model.init_std=-1",
]
for _setting in CONFIG_TIME:

    @case(f"--set {_setting} refused at config time")
    def _(c, setting=_setting):
        c.corpus()
        r = c.mg(*c.train_args("--max-iters", "20", *c.QUICK, "--set", setting))
        return c.refused(r) + c.absent("R", "data")


@case("--max-time nan refused at config time")
def _(c):
    c.corpus()
    r = c.mg(*c.train_args("--max-iters", "20", *c.QUICK, "--max-time", "nan"))
    return c.refused(r) + c.absent("R", "data")


@case("lr = nan in a TOML config refused")
def _(c):
    c.corpus()
    c.write("bad.toml", "[train]\nlr = nan\n")
    r = c.mg(
        "train", "bad.toml", "--data", "corpus.txt", "--out", "R", *c.TINY, "--max-iters", "20"
    )
    return c.refused(r) + c.absent("R", "data")


@case("lr=1e6 diverges: exit 2, finite checkpoint, resume with lr=1e-3 runs")
def _(c):
    c.corpus()
    hot = ["--set", "train.lr=1e6", "--set", "train.warmup_iters=0", "--set", "train.grad_clip=0"]
    hot += ["--set", "train.eval_interval=1", "--set", "train.eval_iters=2"]
    r = c.mg(*c.train_args("--max-iters", "50", *hot))
    problems = c.refused(r) + c.finite_weights(c.p("R"))
    bad = []
    for line in c.p("R", "metrics.jsonl").read_text().splitlines():
        try:
            c.strict_json(line)
        except ValueError:
            bad.append(line[:80])
    problems += [f"metrics.jsonl lines that are not strict JSON: {bad[:2]}"] if bad else []
    resume = c.mg("train", "--resume", "R", "--set", "train.lr=1e-3")
    return problems + [f"resume with lr=1e-3: {p}" for p in c.ok(resume)]


# --------------------------------------------------------------------------- absurd numbers

FRESH_TRAIN = {
    "train --seed 99999999999999999999999": ["--seed", "99999999999999999999999"],
    "train --max-time inf": ["--max-time", "inf"],
}
for _label, _extra in FRESH_TRAIN.items():

    @case(_label)
    def _(c, extra=_extra):
        c.corpus()
        r = c.mg(*c.train_args(*c.QUICK, "--max-iters", "20", *extra), timeout=60)
        return c.refused(r) + c.absent("R")


ABSURD = {  # setting: the numbers an error naming it may show
    "model.n_embd=1000000000": (1e9,),
    "model.vocab_size=10000000000": (1e10,),
    "train.batch_size=1000000000": (1e9,),
    "model.n_layer=1e23": (1e23,),
    "model.block_size=100000000": (1e8, 1e8 + 1),  # "block_size + 1 = 100000001" names it too
}


def number_named(r, numbers: tuple[float, ...]) -> list[str]:
    text = " ".join(r.error_lines).replace(",", "").replace("_", "")
    forms = set()
    for number in numbers:
        forms |= {str(int(number)), f"{number:g}", f"{number:g}".replace("e+", "e")}
        if number >= 1e9 and int(number) % 10**9 == 0:
            forms.add(f"{int(number) // 10**9} billion")
    return [] if any(f in text for f in forms) else [f"the error does not name {numbers[0]:g}"]


for _setting, _numbers in ABSURD.items():

    @case(f"absurd size --set {_setting}")
    def _(c, setting=_setting, numbers=_numbers):
        c.corpus()
        r = c.mg(*c.train_args(*c.QUICK, "--max-iters", "5", "--set", setting), timeout=60)
        named = number_named(r, numbers) if r.rc == 2 else []
        return c.refused(r) + named + c.absent("R")


for _setting in ("model.n_embd=200000", "train.batch_size=100000000"):

    @case(f"--set {_setting} refused before the data: the vocab not named as 1")
    def _(c, setting=_setting):
        c.corpus()
        r = c.mg(*c.train_args(*c.QUICK, "--max-iters", "5", "--set", setting), timeout=60)
        said = c.mentions(r, "vocab not yet known")
        return c.refused(r) + said + c.avoids(r, "vocab 1 ") + c.absent("R", "data")


GENERATE_ARGS = {
    "generate --max-new-tokens -1": ["--max-new-tokens", "-1"],
    "generate --top-p 2": ["--top-p", "2"],
    "generate --top-k 0": ["--top-k", "0"],
    "generate --temperature -1": ["--temperature", "-1"],
    "generate --temperature nan": ["--temperature", "nan"],
    "generate --num-samples 1000000000": ["--num-samples", "1000000000"],
    "generate --overflow-stride -1": ["--overflow-stride", "-1"],
    "generate --seed 99999999999999999999999": ["--seed", "99999999999999999999999"],
    "generate --prompt-file a folder": ["--prompt-file", "R"],
}
for _label, _extra in GENERATE_ARGS.items():

    @case(_label)
    def _(c, extra=_extra):
        c.use("base")
        return c.refused(c.mg("generate", "R", "-n", "20", *extra, timeout=60))


@case("generate --temperature 1e-40 (exit 0 with the greedy text, or 2)")
def _(c):
    c.use("base")
    r = c.mg(*c.GEN, "--temperature", "1e-40")
    problems = c.clean(r)
    # a tiny temperature is greedy decoding; the greedy text of an undertrained model
    # may be only newlines or spaces, so compare with --temperature 0, not with ""
    if r.rc == 0 and r.out != c.mg(*c.GEN, "--temperature", "0").out:
        problems.append("exit 0 but not the greedy text")
    return problems


@case("generate -p with characters the model never saw")
def _(c):
    c.use("base")
    return c.clean(c.mg(*c.GEN, "-p", "ζ€"))


@case("inspect-heads --layer 99")
def _(c):
    c.use("base")
    return c.refused(c.mg(*c.HEADS, "--layer", "99"))


for _flag in ("--html", "--png", "--json"):

    @case(f"inspect-heads {_flag} ''")
    def _(c, flag=_flag):
        c.use("base")
        return c.refused(c.mg(*c.HEADS, flag, ""))


# --------------------------------------------------------------------------- paths


@case("prepare --data-dir that is a file")
def _(c):
    c.corpus()
    c.write("afile", "x")
    return c.refused(c.mg("prepare", "corpus.txt", "--data-dir", "afile"))


@case("prepare --data-dir under a file")
def _(c):
    c.corpus()
    c.write("afile", "x")
    return c.refused(c.mg("prepare", "corpus.txt", "--data-dir", "afile/sub"))


@case("train with data.data_dir a file")
def _(c):
    c.corpus()
    c.write("afile", "x")
    r = c.mg(*c.train_args("--max-iters", "5", "--set", "data.data_dir=afile"))
    return c.refused(r) + c.absent("R")


@case("train --out afile/run")
def _(c):
    c.use("base")
    c.write("afile", "x")
    r = c.mg(*c.train_args("--max-iters", "5", *c.QUICK, out="afile/run"))
    return c.refused(r) + ([] if c.p("afile").read_text() == "x" else ["afile changed"])


@case("train --force --out afile")
def _(c):
    c.use("base")
    c.write("afile", "x")
    r = c.mg(*c.train_args("--force", "--max-iters", "5", *c.QUICK, out="afile"))
    return c.refused(r) + ([] if c.p("afile").read_text() == "x" else ["afile changed"])


@case("a directory named model.safetensors in --out, train --force")
def _(c):
    c.use("base")
    c.dir_instead(c.p("R"), "model.safetensors")
    return c.refused(c.mg(*c.train_args("--force", "--max-iters", "5", *c.QUICK)))


@case("inspect-heads --json to a folder")
def _(c):
    c.use("base")
    c.p("outdir").mkdir()
    return c.refused(c.mg(*c.HEADS, "--json", "outdir"))


@case("--out equal to the data file")
def _(c):
    c.corpus()
    before = c.sha(c.p("corpus.txt"))
    r = c.mg(*c.train_args("--max-iters", "5", *c.QUICK, out="corpus.txt"))
    same = [] if c.sha(c.p("corpus.txt")) == before else ["corpus.txt changed"]
    return c.refused(r) + same


@case("a file as the run dir: not 'does not exist'")
def _(c):
    c.use("base")
    c.write("afile", "x")
    r = c.mg("generate", "afile", "-n", "5")
    return c.refused(r) + c.avoids(r, "does not exist")


for _glob in ("../*.txt", "/etc/*", "**/../../*.txt", "../**/*.txt", ""):

    @case(f"prepare FOLDER --glob {_glob!r}")
    def _(c, glob=_glob):
        c.write("secret.txt", c.words_text(5_000, 2))
        c.write("folder/a.txt", c.words_text(5_000, 3))
        r = c.mg("prepare", "folder", "--glob", glob, "--data-dir", "D")
        return c.refused(r) + c.absent("D")


@case("symlink loop as source folder")
def _(c):
    c.write("loop/a.txt", c.words_text(5_000, 3))
    c.p("loop", "self").symlink_to(".")
    return c.clean(c.mg("prepare", "loop", "--data-dir", "D", timeout=60))


# --------------------------------------------------------------------------- not UTF-8 text


@case("NUL bytes in a file: message names the offset")
def _(c):
    c.write("bin.txt", b"hello world\n" * 50 + b"\x00abc")
    r = c.mg("prepare", "bin.txt", "--data-dir", "D")
    return c.refused(r) + c.mentions(r, "offset") + c.absent("D")


@case("UTF-16 file: message names the offset or UTF-16")
def _(c):
    c.write("u16.txt", ("hello world\n" * 50).encode("utf-16"))
    r = c.mg("prepare", "u16.txt", "--data-dir", "D")
    return c.refused(r) + c.mentions(r, "offset", "UTF-16") + c.absent("D")


@case("Latin-1 file: message names the offset")
def _(c):
    c.write("l1.txt", ("caf\u00e9 au lait\n" * 50).encode("latin-1"))
    r = c.mg("prepare", "l1.txt", "--data-dir", "D")
    return c.refused(r) + c.mentions(r, "offset") + c.absent("D")


@case("NUL bytes in one file of a folder: message names the file")
def _(c):
    c.write("docs/a.txt", c.words_text(5_000))
    c.write("docs/b.txt", b"abc\x00def")
    r = c.mg("prepare", "docs", "--data-dir", "D")
    return c.refused(r) + c.mentions(r, "b.txt") + c.absent("D")


# --------------------------------------------------------------------------- fewer BPE tokens than asked


def nothing_in(c, name: str) -> list[str]:
    folder = c.p(name)
    left = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    return [f"{name} holds {left}"] if left else []


@case("prepare -t bpe --bpe-sample-chars 1: no merge to learn, refused")
def _(c):
    c.corpus()
    r = c.mg("prepare", "corpus.txt", "-t", "bpe", "--vocab-size", "300",
             "--bpe-sample-chars", "1", "--data-dir", "D")  # fmt: skip
    said = c.mentions(r, "learned no merges: its sample of 1 character has no pair")
    hinted = (
        [] if "hint: learn from more text (a larger --bpe-sample-chars" in r.err else ["no hint"]
    )
    return c.refused(r) + said + hinted + nothing_in(c, "D")


@case("train on one-byte words with a bpe tokenizer: no merge to learn, refused")
def _(c):
    c.write("letters.txt", "a\nb\n7\n" * 200)
    bpe = ["--set", "data.tokenizer=bpe", "--set", "data.vocab_size=300"]
    r = c.mg(*c.train_args("--max-iters", "5", *c.QUICK, *bpe, data="letters.txt"))
    return c.refused(r) + c.mentions(r, "learned no merges") + c.absent("R")


def shortfall(c, r, asked: str) -> list[str]:
    """The one warning, naming the tokens learned (the vocab size printed) and asked."""
    vocab = re.search(r"vocab size +(\d+)", r.out)
    if vocab is None:
        return [f"no vocab size printed: {r.out[:120]}"]
    wanted = f"warning: bpe learned {vocab.group(1)} of the {asked} tokens asked"
    n = r.err.count("warning: bpe learned")
    return [] if n == 1 and wanted in r.err else [f"not one {wanted!r}: {r.err[:200]}"]


@case("prepare -t bpe --vocab-size 100000 on a tiny corpus: a warning naming both counts")
def _(c):
    c.corpus(3_000)
    args = ("prepare", "corpus.txt", "-t", "bpe", "--vocab-size", "100000", "--data-dir", "D")
    first, again = c.mg(*args), c.mg(*args)
    _, folder = c.prepared_numbers(first)
    same = [] if c.prepared_numbers(again)[1] == folder else ["the reuse found another folder"]
    return (
        c.ok(first)
        + shortfall(c, first, "100,000")
        + c.ok(again)
        + shortfall(c, again, "100,000")
        + same
    )


@case("train with data.vocab_size beyond the corpus's pairs: a warning, then trains")
def _(c):
    c.corpus(3_000)
    bpe = ["--set", "data.tokenizer=bpe", "--set", "data.vocab_size=4000"]
    r = c.mg(*c.train_args("--max-iters", "2", *c.QUICK, *bpe))
    warned = re.search(r"warning: bpe learned \d+ of the 4,000 tokens asked", r.out)
    problems = c.ok(r) + ([] if warned else [f"no warning: {r.out[:200]}"])
    # the prepared folder keeps the size asked in its name: resume finds it again
    resumed = c.mg("train", "--resume", "R", "--max-iters", "4")
    again = ["the resume warned again"] if "warning: bpe" in resumed.out + resumed.err else []
    return problems + c.ok(resumed) + again


# --------------------------------------------------------------------------- Parquet columns


def write_parquet(c, name: str, texts: list, dictionary: bool = False) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    column = pa.array(texts, type=pa.string())
    column = column.dictionary_encode() if dictionary else column
    c.p(name).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": column}), c.p(name), row_group_size=50)


for _dictionary in (False, True):

    @case(f"prepare a Parquet row whose text is null (dictionary={_dictionary}): the row named")
    def _(c, dictionary=_dictionary):
        texts = [c.words_text(200, i) for i in range(120)]
        texts[77] = None
        write_parquet(c, "shard.parquet", texts, dictionary)
        r = c.mg("prepare", "shard.parquet", "--data-dir", "D")
        said = c.mentions(r, "shard.parquet row 77 (counting from 0): its 'text' column is null")
        return c.refused(r) + said + nothing_in(c, "D")


@case("train on a folder of dictionary-encoded Parquet text: read as text")
def _(c):
    for shard in range(2):
        texts = [c.words_text(300, 10 * shard + i) for i in range(40)]
        write_parquet(c, f"pq/train-{shard:05d}.parquet", texts, dictionary=True)
    r = c.mg(*c.train_args("--max-iters", "2", *c.QUICK, data="pq"))
    return c.ok(r)


# --------------------------------------------------------------------------- a context of one token


def context_of(c, block_size: int) -> list[str]:
    """R: a tiny run with model.block_size = block_size."""
    c.corpus(5_000)
    r = c.mg(*c.train_args("--max-iters", "5", *c.QUICK, "--set", f"model.block_size={block_size}"))
    return [f"training failed: {r.tail}"] if r.rc != 0 else []


@case("eval --json of a block_size=1 model: a real loss, the bigram's")
def _(c):
    problems = context_of(c, 1)
    if problems:
        return problems
    r = c.mg("eval", "R", "--json", "--device", "cpu")
    try:
        result = c.strict_json(r.out)
    except ValueError:
        return c.ok(r) + [f"stdout is not JSON: {r.out[:120]}"]
    if not (isinstance(result.get("loss"), float) and result["tokens"] > 0):
        problems.append(f"no loss: {r.out[:160]}")
    return c.ok(r) + problems + c.avoids(r, "RuntimeWarning")


@case("eval --data of a block_size=1 model: every token but the first predicted once")
def _(c):
    problems = context_of(c, 1)
    if problems:
        return problems
    c.write("other.txt", "the lazy dog\n" * 20)
    r = c.mg("eval", "R", "--data", "other.txt", "--device", "cpu")
    tokens = re.search(r"tokens +([\d,]+) predicted", r.out)
    if tokens is None or int(tokens.group(1).replace(",", "")) != 13 * 20 - 1:
        problems.append(f"not {13 * 20 - 1} tokens predicted: {r.out[:200]}")
    return c.ok(r) + problems + c.avoids(r, "nan", "RuntimeWarning")


for _extra in ([], ["--prompt", "the dog"]):

    @case(f"inspect-heads {' '.join(_extra)} on a block_size=1 model: the shape refused")
    def _(c, extra=_extra):
        problems = context_of(c, 1)
        if problems:
            return problems
        r = c.mg(*c.HEADS, *extra)
        said = c.mentions(r, "needs a model with a context of at least 2 tokens; this one has 1")
        return problems + c.refused(r) + said + c.avoids(r, "--repeated")


@case("inspect-heads on a block_size=2 model: the probe refused, --prompt suggested")
def _(c):
    problems = context_of(c, 2)
    if problems:
        return problems
    r = c.mg(*c.HEADS)
    said = c.mentions(
        r, "the repeated probe needs a context of at least 4 tokens; this model's is 2"
    )
    hint = [] if "hint: inspect it on text of your own with --prompt" in r.err else ["no hint"]
    return c.refused(r) + said + hint + c.avoids(r, "--repeated")


# --------------------------------------------------------------------------- what comes out


def json_lines(c, r) -> list[str]:
    bad = []
    for line in c.lines_of(r.out):
        try:
            c.strict_json(line)
        except ValueError:
            bad.append(line[:60])
    return [f"stdout lines that are not JSON: {bad[:2]}"] if bad else []


@case("generate --json --interactive: every stdout line is JSON")
def _(c):
    c.use("base")
    r = c.mg(*c.GEN, "--json", "--interactive", stdin="hello\n\n")
    return c.ok(r) + json_lines(c, r)


@case("generate --json --interactive with an unseen character, then a prompt")
def _(c):
    c.use("base")
    r = c.mg(*c.GEN, "--json", "--interactive", stdin="\u03b6\nhello\n\n")
    return c.ok(r) + json_lines(c, r)


@case("generate --interactive with no input")
def _(c):
    c.use("base")
    return c.ok(c.mg(*c.GEN, "--interactive", stdin=""))


@case("generate --json --num-samples 2: stdout is strict JSON")
def _(c):
    c.use("base")
    r = c.mg(*c.GEN, "--json", "--num-samples", "2")
    try:
        c.strict_json(r.out)
        return c.ok(r)
    except ValueError as err:
        return c.ok(r) + [f"stdout is not strict JSON ({err})"]


@case("inspect-heads --json: strict JSON (no NaN/Infinity)")
def _(c):
    c.use("base")
    r = c.mg(*c.HEADS, "--json", "out.json")
    try:
        c.strict_json(c.p("out.json").read_text(encoding="utf-8"))
        return c.ok(r)
    except (ValueError, OSError) as err:
        return c.ok(r) + [f"out.json is not strict JSON ({str(err)[:80]})"]


@case("every run file is 0644, the run dir 0755, under umask 022")
def _(c):
    c.use("base")  # trained under umask 022; the copy keeps the modes
    names = [f"R/{n}" for n in (*c.RUN_FILES, "metrics.jsonl", "loss.png")]
    return c.modes(names, 0o644) + c.modes(["R"], 0o755)


@case("prepared data folder is 0755, its files 0644")
def _(c):
    c.corpus()
    r = c.mg("prepare", "corpus.txt", "--data-dir", "D")
    _, folder = c.prepared_numbers(r)
    if folder is None:
        return c.ok(r) + ["no folder reported"]
    files = [str(folder / n) for n in ("train.bin", "val.bin", "meta.json", "tokenizer.json")]
    return c.ok(r) + c.modes([str(folder)], 0o755) + c.modes(files, 0o644)


def html_injection(c, *tokenizer: str) -> list[str]:
    """Train on a corpus full of `<!--` and `<script>`, then view a prompt made of them."""
    tags = ["<!--", "<script>", "</script>", "-->"] * 6  # frequent enough for BPE merges
    c.write("corpus.txt", c.words_text(15_000, 6, [*c.WORDS, *tags]))
    first = c.mg(*c.train_args("--max-iters", "10", *c.QUICK, *tokenizer))
    if first.rc != 0:
        return [f"training failed: {first.tail}"]
    control = c.mg(*c.HEADS, "--prompt", "the dog", "--html", "control.html")
    r = c.mg(*c.HEADS, "--prompt", "<!--<script>", "--html", "v.html")
    problems = c.ok(control) + c.ok(r)
    if problems:
        return problems
    page = c.p("v.html").read_text(encoding="utf-8").lower()
    template = c.p("control.html").read_text(encoding="utf-8").lower()
    for needle in ("<script", "</script", "<!--"):
        if page.count(needle) != template.count(needle):
            problems.append(
                f"{needle!r} appears {page.count(needle)} times, template {template.count(needle)}"
            )
    return problems


@case("HTML injection through a char vocabulary and the prompt")
def _(c):
    return html_injection(c)


@case("HTML injection through BPE tokens (<!-- as one token)")
def _(c):
    return html_injection(c, "--set", "data.tokenizer=bpe", "--set", "data.vocab_size=400")


# --------------------------------------------------------------------------- the tests


def test_bad_input_is_one_sentence_and_what_is_accepted_is_well_formed(problems, name):
    assert problems[name] == []
