"""Time `minigpt prepare`, and check that it streams: memory, formats, throughput.

    python bench/prepare.py                         # every section (minutes)
    python bench/prepare.py --quick                 # a smoke run: two small cases and the batcher
    python bench/prepare.py --sections scale        # one section, or several: scale,throughput
    python bench/prepare.py --corpus-dir /tmp/corp  # keep the generated corpora, reuse them later
    python bench/prepare.py --mb 10 20              # smaller corpora, to try the script out

Sections (--sections, default all of them):

cases: small corpora prepared in this process (shakespeare char, shakespeare bpe
  2048, stdlib bpe 8192, ...), each in a fresh temporary data dir so the cache never
  hides the work (BPE training included), then a cached re-prepare; and the
  batcher's speed. Tiny shakespeare is read from ../shared/data/tinyshakespeare/input.txt
  (placed where the built-in dataset looks for it, so nothing is downloaded).

scale: memory does not grow with the corpus. Folders of about 100 and 200 MB (--mb)
  are made from the standard library's .py files (those that are UTF-8), copied
  again and again into copy00/, copy01/, ... as .txt files (one document each) until
  the size is reached. `minigpt prepare FOLDER` runs in a child process for char and
  for bpe --vocab-size 4096 on each, with --workers; its peak RSS is read exactly
  from os.wait4's rusage (ru_maxrss). The targets: every peak under RSS_TARGET_MB,
  and the larger run's peak at most GROWTH_TARGET times the smaller's. The repeated sources do
  not grow BPE's distinct words (what its training counts) as real text would, so bpe
  4096 runs a second time on "zipf" folders of the same sizes: words drawn by Zipf's
  law from 5M random strings, whose vocabulary keeps growing with the text
  (write_zipf). Its training memory grows with the sample it learns from, up to
  --bpe-sample-chars (100M), and not with the corpus beyond that.

formats: the 100 MB corpus's documents (in the folder's order: sorted by relative
  path, empty ones included) written as .jsonl shards ({"text": doc} per line) and
  as one .parquet file (a text column, row groups of 1000), each in its own folder;
  all three prepared with char in child processes (wall time, peak RSS).
  train.bin, val.bin and tokenizer.json must be byte-identical (sha256) across them.

throughput: the tokenizer is the limit. With the bpe 4096 tokenizer learned on the
  100 MB corpus (by the scale section, or learned here), at 1 and --workers workers,
  each timed --throughput-repeats times, interleaved, the best kept:
  - tiktoken's own `encode_ordinary_batch(docs, num_threads=N)` on the documents
    held in memory (threads sharing one encoding);
  - `prepare(folder, tokenizer, workers=N)` with that ready tokenizer (nothing
    learned: reading twice, hashing, tokenising, writing), MB/s = meta bytes over its
    seconds; the target is at least THROUGHPUT_TARGET of tiktoken's;
  - processes or threads? a ProcessPoolExecutor(N) whose workers each build the
    encoding once and map encode_to_numpy over the documents (the map alone is
    timed, the pool already started); and a thread pool whose threads each build
    their own encoding. Threads sharing one encoding scale poorly here (how fast
    tiktoken runs in a thread depends on which thread used that encoding first), which
    is why prepare gives each worker thread its own copy (`Tokenizer.for_thread`);
    every run is given a freshly loaded encoding, as a real prepare has.
  Token counts must agree across all four (prepare's less its <|endoftext|>s).

A child's ru_maxrss on Linux starts at its parent's RSS (exec keeps the high-water
mark of the memory it replaces; after vfork, that is the parent's peak so far), so
the children are started by a small launcher process, never by this one, which
holds torch and a 100 MB corpus.

MB is 10^6 bytes throughout, RSS included (ru_maxrss KiB * 1024 / 10^6). Prints
markdown tables and writes bench/results/prepare.json: a dict keyed by section
(sections not run this time are kept from the file), with the machine and date.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from minigpt.data import token_dtype
from minigpt.datasets import shakespeare_path, stdlib_files
from minigpt.prepare import prepare
from minigpt.tokenizer import Tokenizer, load_tokenizer, tokenizer_from_json

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
RESULTS = REPO / "bench" / "results" / "prepare.json"
RESULTS_FORMAT = 2  # 1: {"cases": [...], "batcher": {...}}; 2: keyed by section
SECTIONS = ("cases", "scale", "formats", "throughput")
MB = 1e6

# name, source, tokenizer, vocab size, target seconds (None: no target)
CASES = [
    ("shakespeare char", "shakespeare", "char", None, 10.0),
    ("shakespeare bpe 2048", "shakespeare", "bpe", 2048, 10.0),
    ("pystdlib char", "pystdlib", "char", None, None),
    ("pystdlib bpe 8192", "pystdlib", "bpe", 8192, 60.0),
    ("induction char", "induction", "char", None, None),
]
QUICK_CASES = ("shakespeare char", "induction char")

BPE_VOCAB = 4096
RSS_TARGET_MB = 600.0  # every scale run's peak
GROWTH_TARGET = 1.25  # the larger corpus's peak over the smaller's
THROUGHPUT_TARGET = 0.80  # minigpt prepare's MB/s over tiktoken's
JSONL_SHARD_DOCS = 2000  # part-0000.jsonl, part-0001.jsonl, ...: sorted, they keep the order
PARQUET_ROW_GROUP = 1000
ZIPF_WORDS, ZIPF_EXPONENT = 5_000_000, 1.15  # the growing-vocabulary corpus: see write_zipf


def markdown_table(headers: list[str], rows: list[list]) -> str:
    """A markdown table padded to line up in a terminal: first column left, others right."""
    cells = [[str(cell) for cell in row] for row in rows]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]

    def line(row: list[str]) -> str:
        rest = zip(row[1:], widths[1:], strict=True)
        padded = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in rest]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join([":" + "-" * (widths[0] + 1)] + ["-" * (w + 1) + ":" for w in widths[1:]])
    return "\n".join([line(headers), rule + "|", *(line(row) for row in cells)])


def yes_no(ok: bool) -> str:
    return "yes" if ok else "NO"


def fresh_dir(prefix: str = "minigpt-bench-") -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))


# ---------------------------------------------------------------------------- cases


def time_case(source: str, tokenizer: str, vocab_size: int | None, repeats: int) -> dict:
    """Best-of-`repeats` seconds for a cold prepare, then one warm (cached) prepare."""
    cold = []
    for _ in range(repeats):
        data_dir = fresh_dir()
        try:
            if source == "shakespeare":  # where the built-in dataset looks; no download
                shakespeare_path(data_dir).parent.mkdir(parents=True)
                shutil.copyfile(SHAKESPEARE, shakespeare_path(data_dir))
            start = time.perf_counter()
            prepared = prepare(source, tokenizer, vocab_size, data_dir, progress=False)
            cold.append(time.perf_counter() - start)
            start = time.perf_counter()
            again = prepare(source, tokenizer, vocab_size, data_dir, progress=False)
            warm = time.perf_counter() - start
            assert again.reused
        finally:
            shutil.rmtree(data_dir, ignore_errors=True)
    meta = prepared.meta
    return {
        "seconds": min(cold),
        "cached_seconds": warm,
        "characters": meta["characters"],
        "documents": meta["documents"],
        "tokens": meta["train_tokens"] + meta["val_tokens"],
        "vocab_size": meta["vocab_size"],
        "bytes_per_token": meta["bytes_per_token"],
    }


def time_batcher(batch_size: int = 64, block_size: int = 256, n_batches: int = 200) -> dict:
    """Batches per second from a memory-mapped token file."""
    from minigpt.batches import Batcher  # imports torch: only this section needs it

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.bin"
        np.random.default_rng(0).integers(0, 8192, 5_000_000).astype(np.uint16).tofile(path)
        tokens = np.memmap(path, dtype=np.uint16, mode="r")
        batcher = Batcher(tokens, block_size, batch_size, seed=0)
        batcher.next()
        start = time.perf_counter()
        for _ in range(n_batches):
            batcher.next()
        seconds = time.perf_counter() - start
    return {
        "batch_size": batch_size,
        "block_size": block_size,
        "ms_per_batch": seconds / n_batches * 1e3,
        "tokens_per_second": n_batches * batch_size * block_size / seconds,
    }


def run_cases(quick: bool, repeats: int) -> dict:
    """The small in-process cases and the batcher: the quick smoke run's section."""
    if not SHAKESPEARE.exists():
        raise SystemExit(f"the cases section needs tiny shakespeare at {SHAKESPEARE}")
    rows = []
    for name, source, tokenizer, vocab_size, target in CASES:
        if quick and name not in QUICK_CASES:
            continue
        result = time_case(source, tokenizer, vocab_size, repeats)
        result |= {"case": name, "target_seconds": target}
        result["meets_target"] = None if target is None else result["seconds"] < target
        rows.append(result)
    batcher = time_batcher(n_batches=50 if quick else 200)
    print("\n## cases: small corpora, in this process\n")
    table = [
        [
            r["case"],
            f"{r['seconds']:.2f}",
            "-" if r["target_seconds"] is None else f"<{r['target_seconds']:.0f}",
            f"{r['cached_seconds']:.3f}",
            f"{r['characters']:,}",
            f"{r['tokens']:,}",
            f"{r['bytes_per_token']:.2f}",
        ]
        for r in rows
    ]
    headers = ["case", "seconds", "target", "cached s", "chars", "tokens", "B/tok"]
    print(markdown_table(headers, table))
    print(
        f"\nbatcher: {batcher['ms_per_batch']:.3f} ms per batch of {batcher['batch_size']}x"
        f"{batcher['block_size']} ({batcher['tokens_per_second'] / 1e6:.1f}M tokens/s)"
    )
    return {"quick": quick, "rows": rows, "batcher": batcher}


# ---------------------------------------------------------------------------- child processes

LAUNCHER = """
import json, os, subprocess, sys, time
for line in sys.stdin:
    job = json.loads(line)
    with open(job["log"], "wb") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(
            job["cmd"], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            cwd=job["cwd"],
        )
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    reply = {"rc": proc.returncode, "maxrss_kib": usage.ru_maxrss, "seconds": seconds}
    print(json.dumps(reply), flush=True)
"""


class Launcher:
    """A small process that starts each command, waits for it with os.wait4 and reports
    its exit code, peak RSS and wall time. A child's ru_maxrss counts the RSS of whoever
    forked it, so this process, holding torch and corpora, must not be that parent."""

    def __init__(self):
        self.proc: subprocess.Popen | None = None

    def run(self, cmd: list[str], log: Path) -> dict:
        if self.proc is None:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", LAUNCHER],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
        job = {"cmd": cmd, "log": str(log), "cwd": str(REPO)}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline()
        if not reply:
            raise SystemExit("the launcher process died")
        return json.loads(reply)

    def close(self) -> None:
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait()
            self.proc = None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def prepare_child(
    launcher: Launcher,
    source: Path,
    tokenizer: str,
    workers: int,
    vocab_size: int | None = None,
    hash_files: bool = False,
    keep_tokenizer: Path | None = None,
) -> dict:
    """`minigpt prepare SOURCE` in a fresh data dir, in a child process: wall seconds, the
    seconds prepare itself reports, peak RSS, meta.json and (hash_files) the token files'
    sha256. keep_tokenizer: where to copy its tokenizer.json before the dir is removed."""
    data_dir = fresh_dir()
    cmd = [sys.executable, "-m", "minigpt", "prepare", str(source), "--data-dir", str(data_dir)]
    cmd += ["--tokenizer", tokenizer, "--workers", str(workers)]
    if vocab_size is not None:
        cmd += ["--vocab-size", str(vocab_size)]
    try:
        log = data_dir / "prepare.log"
        reply = launcher.run(cmd, log)
        output = log.read_text(errors="replace")
        if reply["rc"] != 0:
            raise SystemExit(f"{' '.join(cmd)} failed (exit {reply['rc']}):\n{output[-3000:]}")
        took = re.search(r"took\s+([\d.]+) s", output)
        (folder,) = [meta.parent for meta in data_dir.glob("*/meta.json")]
        meta = json.loads((folder / "meta.json").read_text())
        meta.pop("tokenizer")  # its vocabulary or merges: long, and hashed below where it matters
        result = {
            "command": " ".join(cmd[1:]),
            "wall_seconds": reply["seconds"],
            "prepare_seconds": float(took.group(1)) if took else None,
            "peak_rss_mb": reply["maxrss_kib"] * 1024 / MB,
            "meta": meta,
        }
        if hash_files:
            names = ("train.bin", "val.bin", "tokenizer.json")
            result["sha256"] = {name: sha256_file(folder / name) for name in names}
        if keep_tokenizer is not None:
            shutil.copyfile(folder / "tokenizer.json", keep_tokenizer)
        return result
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def import_floor(launcher: Launcher) -> float:
    """Peak RSS MB of `minigpt prepare --help`: what the interpreter and the CLI cost."""
    log = Path(tempfile.mkstemp(prefix="minigpt-bench-", suffix=".log")[1])
    try:
        reply = launcher.run([sys.executable, "-m", "minigpt", "prepare", "--help"], log)
    finally:
        log.unlink()
    return reply["maxrss_kib"] * 1024 / MB


# ---------------------------------------------------------------------------- corpora


def cached_folder(folder: Path, key: dict, build: Callable[[Path], dict]) -> dict:
    """Build `folder` with `build` (which returns what to remember), unless the marker
    beside it says it was built with the same `key` (a kept --corpus-dir)."""
    marker = folder.with_name(folder.name + ".json")
    if marker.exists() and folder.is_dir():
        saved = json.loads(marker.read_text())
        if saved.get("key") == key:
            return saved["info"]
    marker.unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    started = time.perf_counter()
    info = build(folder)
    print(f"made {folder} ({info['bytes'] / MB:.0f} MB) in {time.perf_counter() - started:.1f} s")
    marker.write_text(json.dumps({"key": key, "info": info}, indent=2) + "\n")
    return info


def stdlib_sources() -> list[tuple[str, bytes]]:
    """(relative path, bytes) of the standard library's .py files that are UTF-8."""
    root = Path(sysconfig.get_paths()["stdlib"])
    sources = []
    for path in stdlib_files(root):
        raw = path.read_bytes()
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        sources.append((path.relative_to(root).as_posix(), raw))
    return sources


def write_copies(folder: Path, target_bytes: int) -> dict:
    """copy00/, copy01/, ... of the standard library as .txt files, until target_bytes."""
    sources = stdlib_sources()
    total, files, copy = 0, 0, 0
    while total < target_bytes:
        for relative, raw in sources:
            if total >= target_bytes:
                break
            path = folder / f"copy{copy:02d}" / f"{relative}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(raw)
            total, files = total + len(raw), files + 1
        copy += 1
    return {"bytes": total, "files": files, "copies": copy, "distinct_files": len(sources)}


def write_zipf(folder: Path, target_bytes: int) -> dict:
    """Text whose vocabulary keeps growing with its size, as real text's does (Heaps'
    law), unlike the repeated sources: words drawn by Zipf's law (exponent 1.15) from
    5M random letter strings, 12 to a line, a million words to a file. Seeded, so the
    smaller corpus is the start of the larger one."""
    rng = np.random.default_rng(0)
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    lengths = rng.integers(2, 11, ZIPF_WORDS)
    flat = letters[rng.integers(0, 26, int(lengths.sum()))]
    words = ["".join(word) for word in np.split(flat, np.cumsum(lengths)[:-1])]
    total, files, seen = 0, 0, np.zeros(ZIPF_WORDS, dtype=bool)
    while total < target_bytes:
        ranks = np.minimum(rng.zipf(ZIPF_EXPONENT, 1_000_000), ZIPF_WORDS) - 1
        seen[ranks] = True
        drawn = [words[rank] for rank in ranks]
        lines = (" ".join(drawn[i : i + 12]) for i in range(0, len(drawn), 12))
        text = "\n".join(lines) + "\n"
        (folder / f"{files:04d}.txt").write_text(text, encoding="utf-8")
        total, files = total + len(text), files + 1
    return {"bytes": total, "files": files, "distinct_words": int(seen.sum())}


def read_documents(folder: Path) -> list[str]:
    """The .txt folder's documents as minigpt orders them: sorted by relative path.
    (Bytes decoded, not read_text: that would turn \\r\\n into \\n.)"""
    paths = sorted(folder.rglob("*.txt"), key=lambda p: p.relative_to(folder).as_posix())
    return [path.read_bytes().decode("utf-8") for path in paths]


def write_jsonl(folder: Path, docs: list[str]) -> dict:
    """{"text": doc} per line, JSONL_SHARD_DOCS documents to a shard."""
    for first in range(0, len(docs), JSONL_SHARD_DOCS):
        shard = docs[first : first + JSONL_SHARD_DOCS]
        lines = (json.dumps({"text": doc}, ensure_ascii=False) + "\n" for doc in shard)
        path = folder / f"part-{first // JSONL_SHARD_DOCS:04d}.jsonl"
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            f.writelines(lines)
    return {"bytes": sum(p.stat().st_size for p in folder.iterdir()), "documents": len(docs)}


def write_parquet(folder: Path, docs: list[str]) -> dict:
    """One .parquet file: a `text` column, a row per document."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = folder / "docs.parquet"
    pq.write_table(pa.table({"text": docs}), path, row_group_size=PARQUET_ROW_GROUP)
    return {"bytes": path.stat().st_size, "documents": len(docs)}


@dataclass
class Corpora:
    """The generated corpora under `root`, each made on first use (or reused, when root
    is a kept --corpus-dir), and the smaller one's documents, read once."""

    root: Path
    sizes_mb: tuple[int, int]
    docs: list[str] | None = field(default=None, repr=False)

    def key(self, mb: int) -> dict:
        return {"kind": "txt", "bytes": int(mb * MB), "python": sys.version}

    def text(self, mb: int) -> tuple[Path, dict]:
        folder = self.root / f"txt-{mb}mb"
        return folder, cached_folder(folder, self.key(mb), lambda f: write_copies(f, int(mb * MB)))

    def zipf(self, mb: int) -> tuple[Path, dict]:
        folder = self.root / f"zipf-{mb}mb"
        key = {"kind": "zipf", "bytes": int(mb * MB), "words": ZIPF_WORDS}
        return folder, cached_folder(folder, key, lambda f: write_zipf(f, int(mb * MB)))

    def documents(self) -> list[str]:
        if self.docs is None:
            self.docs = read_documents(self.text(self.sizes_mb[0])[0])
        return self.docs

    def derived(self, kind: str, write: Callable[[Path, list[str]], dict]) -> tuple[Path, dict]:
        """The smaller corpus's documents in another format."""
        folder = self.root / f"{kind}-{self.sizes_mb[0]}mb"
        key = {"kind": kind, "from": self.key(self.sizes_mb[0])}
        return folder, cached_folder(folder, key, lambda f: write(f, self.documents()))


# ---------------------------------------------------------------------------- scale


SCALE_SERIES = [  # (tokenizer, vocab size, corpus): the repeated sources, and Zipf text
    ("char", None, "text"),
    ("bpe", BPE_VOCAB, "text"),
    ("bpe", BPE_VOCAB, "zipf"),
]


def run_scale(launcher: Launcher, corpora: Corpora, workers: int, keep_tokenizer: Path) -> dict:
    """Each series on both sizes, each in a child process: does the peak grow?"""
    floor = import_floor(launcher)
    rows = []
    for tokenizer, vocab_size, kind in SCALE_SERIES:
        for mb in corpora.sizes_mb:
            folder, info = corpora.text(mb) if kind == "text" else corpora.zipf(mb)
            first = tokenizer == "bpe" and kind == "text" and mb == corpora.sizes_mb[0]
            keep = keep_tokenizer if first else None
            result = prepare_child(launcher, folder, tokenizer, workers, vocab_size, False, keep)
            name = tokenizer if vocab_size is None else f"{tokenizer} {vocab_size}"
            name += ", zipf text" if kind == "zipf" else ""
            result |= {"case": f"{name} {mb} MB", "tokenizer": name, "corpus_bytes": info["bytes"]}
            result["mb_per_s"] = info["bytes"] / MB / result["wall_seconds"]
            result["rss_over_corpus"] = result["peak_rss_mb"] * MB / info["bytes"]
            result["under_rss_target"] = result["peak_rss_mb"] < RSS_TARGET_MB
            rows.append(result)
    checks = []
    for name in dict.fromkeys(row["tokenizer"] for row in rows):
        small, large = [row for row in rows if row["tokenizer"] == name]
        growth = large["peak_rss_mb"] / small["peak_rss_mb"]
        checks.append(
            {
                "tokenizer": name,
                "growth": growth,
                "growth_ok": growth <= GROWTH_TARGET,
                "peaks_under_target": small["under_rss_target"] and large["under_rss_target"],
            }
        )
    print_scale(rows, checks, floor, workers)
    return {
        "workers": workers,
        "import_floor_rss_mb": floor,
        "rss_target_mb": RSS_TARGET_MB,
        "growth_target": GROWTH_TARGET,
        "rows": rows,
        "checks": checks,
        "note": "text corpora are the standard library's .py files repeated: BPE's "
        "distinct words do not grow with them; the zipf corpora's do (see write_zipf)",
    }


def print_scale(rows: list[dict], checks: list[dict], floor: float, workers: int) -> None:
    print(f"\n## scale: peak RSS of `minigpt prepare FOLDER --workers {workers}`\n")
    table = [
        [
            row["case"],
            f"{row['corpus_bytes'] / MB:.1f}",
            f"{row['wall_seconds']:.1f}",
            "-" if row["prepare_seconds"] is None else f"{row['prepare_seconds']:.1f}",
            f"{row['mb_per_s']:.1f}",
            f"{row['peak_rss_mb']:.0f}",
            f"{row['rss_over_corpus']:.2f}",
        ]
        for row in rows
    ]
    headers = ["case", "corpus MB", "wall s", "prepare s", "MB/s", "peak RSS MB", "RSS/corpus"]
    print(markdown_table(headers, table))
    print(
        f"\nwall s: the child process, start to exit (MB/s is corpus MB over it); prepare s: "
        f"what prepare reports.\n`minigpt prepare --help` alone peaks at {floor:.0f} MB. "
        f"The text corpora repeat the standard library's sources, so BPE's distinct words "
        f"do not grow with them; the zipf text's vocabulary grows as real text's does.\n"
    )
    table = [
        [
            c["tokenizer"],
            f"{c['growth']:.3f}",
            yes_no(c["growth_ok"]),
            yes_no(c["peaks_under_target"]),
        ]
        for c in checks
    ]
    headers = ["tokenizer", "peak large/small", f"<= {GROWTH_TARGET}", f"< {RSS_TARGET_MB:.0f} MB"]
    print(markdown_table(headers, table))


# ---------------------------------------------------------------------------- formats


def run_formats(launcher: Launcher, corpora: Corpora, workers: int) -> dict:
    """The same documents as .txt files, .jsonl shards and .parquet: same token files?"""
    sources = [("txt", *corpora.text(corpora.sizes_mb[0]))]
    sources.append(("jsonl", *corpora.derived("jsonl", write_jsonl)))
    sources.append(("parquet", *corpora.derived("parquet", write_parquet)))
    rows = []
    for kind, folder, info in sources:
        result = prepare_child(launcher, folder, "char", workers, hash_files=True)
        result |= {"format": kind, "source_bytes": info["bytes"]}
        result["files"] = sum(1 for p in folder.rglob("*") if p.is_file())
        result["mb_per_s"] = result["meta"]["bytes"] / MB / result["wall_seconds"]
        rows.append(result)
    reference = rows[0]["sha256"]
    for row in rows:
        row["same_as_txt"] = {name: row["sha256"][name] == reference[name] for name in reference}
    identical = all(row["sha256"] == reference for row in rows)
    print(f"\n## formats: char on the {corpora.sizes_mb[0]} MB corpus as .txt, .jsonl, .parquet\n")
    table = [
        [
            row["format"],
            f"{row['files']:,}",
            f"{row['source_bytes'] / MB:.1f}",
            f"{row['meta']['documents']:,}",
            f"{row['wall_seconds']:.1f}",
            f"{row['mb_per_s']:.1f}",
            f"{row['peak_rss_mb']:.0f}",
            row["sha256"]["train.bin"][:12],
            row["sha256"]["val.bin"][:12],
            yes_no(all(row["same_as_txt"].values())),
        ]
        for row in rows
    ]
    headers = ["format", "files", "on disk MB", "docs", "wall s", "MB/s", "peak RSS MB"]
    headers += ["train.bin sha256", "val.bin sha256", "same as txt"]
    print(markdown_table(headers, table))
    print(f"\ntrain.bin, val.bin and tokenizer.json identical across formats: {yes_no(identical)}")
    return {"workers": workers, "identical": identical, "rows": rows}


# ---------------------------------------------------------------------------- throughput

_WORKER: tuple[Tokenizer, np.dtype] | None = None
_THREAD = threading.local()


def _start_worker(tokenizer_json: dict, dtype: str) -> None:
    """A process pool worker's initializer: build the encoding once per process."""
    global _WORKER
    _WORKER = (tokenizer_from_json(tokenizer_json), np.dtype(dtype))


def _worker_ready(_: int) -> bool:
    return _WORKER is not None


def _encode_in_worker(text: str) -> np.ndarray:
    tok, dtype = _WORKER
    return tok.encode_array(text).astype(dtype)  # the token file's dtype: less to send back


def _start_thread(tokenizer_json: dict) -> None:
    """A thread pool thread's initializer: an encoding of its own, not one shared."""
    _THREAD.tok = tokenizer_from_json(tokenizer_json)


def _encode_in_thread(text: str) -> np.ndarray:
    return _THREAD.tok.encode_array(text)


def time_processes(docs: list[str], tok: Tokenizer, workers: int) -> dict:
    """The documents on a process pool, each worker with its own encoding. Only the map is
    timed (the pool started and ready); its start-up is kept apart."""
    chunksize = max(1, len(docs) // (workers * 16))
    start = time.perf_counter()
    init = (tok.to_json(), token_dtype(tok.vocab_size).name)
    with ProcessPoolExecutor(workers, initializer=_start_worker, initargs=init) as pool:
        assert all(pool.map(_worker_ready, range(workers * 4)))
        started = time.perf_counter()
        ids = list(pool.map(_encode_in_worker, docs, chunksize=chunksize))
        done = time.perf_counter()
    tokens = sum(len(part) for part in ids)
    return {"seconds": done - started, "tokens": tokens, "startup_seconds": started - start}


def time_own_threads(docs: list[str], tok: Tokenizer, workers: int) -> dict:
    """The documents on a thread pool whose threads each build their own encoding: tiktoken
    runs faster in the thread that used an encoding first, so a shared one slows the rest."""
    with ThreadPoolExecutor(workers, initializer=_start_thread, initargs=(tok.to_json(),)) as pool:
        start = time.perf_counter()
        ids = list(pool.map(_encode_in_thread, docs))
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": sum(len(part) for part in ids)}


def time_tiktoken(docs: list[str], tok: Tokenizer, workers: int) -> dict:
    """tiktoken's own batch encode (threads sharing one encoding) of documents in memory."""
    start = time.perf_counter()
    ids = tok.encoding.encode_ordinary_batch(docs, num_threads=workers)
    seconds = time.perf_counter() - start  # before the lists of ints are freed
    return {"seconds": seconds, "tokens": sum(map(len, ids))}


def time_minigpt(folder: Path, tok: Tokenizer, workers: int) -> dict:
    """`prepare` with the ready tokenizer (nothing learned), in this process. Its files hold
    an <|endoftext|> between documents of a split: `separators` of them."""
    data_dir = fresh_dir()
    try:
        prepared = prepare(folder, tok, data_dir=data_dir, workers=workers, progress=False)
        assert not prepared.reused
        meta = prepared.meta
        return {
            "seconds": prepared.seconds,
            "bytes": meta["bytes"],
            "tokens": meta["train_tokens"] + meta["val_tokens"],
            "separators": meta["train_documents"] + meta["val_documents"] - 2,
        }
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def best_of(repeats: int, variants: dict[str, Callable[[], dict]]) -> dict[str, dict]:
    """Each variant timed `repeats` times, interleaved (so all see the same machine load);
    the fastest run of each is kept, with every run's seconds."""
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, measure in variants.items():
            runs[name].append(measure())
    best = {}
    for name, results in runs.items():
        best[name] = min(results, key=lambda r: r["seconds"])
        best[name]["all_seconds"] = [r["seconds"] for r in results]
    return best


def run_throughput(corpora: Corpora, tokenizer_path: Path, workers: int, repeats: int) -> dict:
    """tiktoken's batch encode, minigpt prepare, a process pool and threads with an encoding
    each, at 1 and N workers: how close does prepare come to the tokenizer's own speed?"""
    tok = load_tokenizer(tokenizer_path)
    folder, info = corpora.text(corpora.sizes_mb[0])
    docs = corpora.documents()
    n_bytes = sum(len(doc.encode("utf-8")) for doc in docs)
    rows = []
    for n in sorted({1, workers}):
        # each run gets a fresh encoding: tiktoken is fastest in the first thread to use one,
        # so a run after another on the same encoding would be slowed by the one before
        best = best_of(
            repeats,
            {
                "tiktoken": lambda n=n: time_tiktoken(docs, load_tokenizer(tokenizer_path), n),
                "minigpt": lambda n=n: time_minigpt(folder, load_tokenizer(tokenizer_path), n),
                "processes": lambda n=n: time_processes(docs, tok, n),
                "own_threads": lambda n=n: time_own_threads(docs, tok, n),
            },
        )
        row = {"workers": n, "bytes": n_bytes} | best
        for name, result in best.items():
            row[f"{name}_mb_per_s"] = result.get("bytes", n_bytes) / MB / result["seconds"]
        ours, tokens = best["minigpt"], best["tiktoken"]["tokens"]
        row["tokens_agree"] = ours["tokens"] - ours["separators"] == tokens and all(
            best[name]["tokens"] == tokens for name in ("processes", "own_threads")
        )
        row["ratio"] = row["minigpt_mb_per_s"] / row["tiktoken_mb_per_s"]
        row["meets_target"] = row["ratio"] >= THROUGHPUT_TARGET
        rows.append(row)
    print_throughput(rows, corpora.sizes_mb[0], len(docs), repeats)
    return {"corpus_bytes": info["bytes"], "documents": len(docs), "repeats": repeats, "rows": rows}


def print_throughput(rows: list[dict], mb: int, n_docs: int, repeats: int) -> None:
    print(f"\n## throughput: bpe {BPE_VOCAB} on the {mb} MB corpus ({n_docs:,} documents)\n")
    table = [
        [
            f"{row['workers']}",
            f"{row['tiktoken_mb_per_s']:.2f}",
            f"{row['minigpt_mb_per_s']:.2f}",
            f"{row['ratio']:.2f}",
            yes_no(row["meets_target"]),
            f"{row['processes_mb_per_s']:.2f}",
            f"{row['own_threads_mb_per_s']:.2f}",
            yes_no(row["tokens_agree"]),
        ]
        for row in rows
    ]
    headers = ["workers", "tiktoken batch MB/s", "minigpt prepare MB/s", "minigpt/tiktoken"]
    headers += [f">= {THROUGHPUT_TARGET}", "processes MB/s", "threads, own enc. MB/s"]
    headers += ["tokens agree"]
    print(markdown_table(headers, table))
    print(
        f"\nBest of {repeats}, interleaved. tiktoken: encode_ordinary_batch on the documents in "
        "memory (threads sharing one encoding; lists of ints). minigpt: prepare with the ready "
        "tokenizer (reads the corpus twice, hashes, tokenises, writes). processes: a "
        "ProcessPoolExecutor mapping encode_to_numpy, each worker with its own encoding (pool "
        "start-up not timed). threads, own enc.: a thread pool whose threads each build their "
        "own encoding, mapping encode_to_numpy."
    )


# ---------------------------------------------------------------------------- main


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "load_average": os.getloadavg(),  # other work on a shared machine
    }


def write_report(path: Path, results: dict, args: argparse.Namespace, seconds: float) -> None:
    """Sections run now replace theirs; the file's other sections are kept."""
    report = {}
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = {}
        if isinstance(old, dict) and old.get("format") == RESULTS_FORMAT:
            report = old
    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    for section in results.values():
        section["date"] = now
    report |= results
    report |= {"format": RESULTS_FORMAT, "machine": machine(), "date": now}
    report["last_run"] = {"argv": sys.argv[1:], "sections": list(results), "seconds": seconds}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {path} ({seconds:.0f} s)")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true",
                        help="the smoke run: two small cases and the batcher (section cases)")  # fmt: skip
    parser.add_argument("--sections", default=None,
                        help=f"comma-separated, of {','.join(SECTIONS)} (default: all; "
                        "with --quick, cases)")  # fmt: skip
    parser.add_argument("--workers", type=int, default=os.cpu_count(),
                        help="threads for prepare, and the N of the throughput section")  # fmt: skip
    parser.add_argument("--mb", type=int, nargs=2, default=(100, 200), metavar=("SMALL", "LARGE"),
                        help="the generated corpora's sizes in MB (default 100 200)")  # fmt: skip
    parser.add_argument("--corpus-dir", type=Path, default=None,
                        help="keep the generated corpora here and reuse them next time "
                        "(default: a temporary dir, removed)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=1,
                        help="cold runs per case (best is kept)")  # fmt: skip
    parser.add_argument("--throughput-repeats", type=int, default=2,
                        help="runs of each throughput measurement, interleaved (best is kept)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    chosen = args.sections or ("cases" if args.quick else ",".join(SECTIONS))
    args.sections = [s.strip() for s in chosen.split(",") if s.strip()]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section {unknown[0]!r}: choose from {', '.join(SECTIONS)}")
    if (
        min(args.workers, args.repeats, args.throughput_repeats) < 1
        or not 0 < args.mb[0] < args.mb[1]
    ):
        parser.error("--workers and the repeats must be at least 1, and 0 < SMALL < LARGE MB")
    return args


def main() -> None:
    args = parse_args()
    began = time.perf_counter()
    scratch = fresh_dir("minigpt-bench-prepare-")
    corpora = Corpora(args.corpus_dir or scratch / "corpora", tuple(args.mb))
    corpora.root.mkdir(parents=True, exist_ok=True)
    tokenizer_path = scratch / f"bpe{BPE_VOCAB}-tokenizer.json"
    launcher = Launcher()
    results: dict = {}
    try:
        if "cases" in args.sections:
            results["cases"] = run_cases(args.quick, args.repeats)
        if "scale" in args.sections:
            results["scale"] = run_scale(launcher, corpora, args.workers, tokenizer_path)
        if "formats" in args.sections:
            results["formats"] = run_formats(launcher, corpora, args.workers)
        if "throughput" in args.sections:
            if not tokenizer_path.exists():  # learned as in the scale section
                folder, _ = corpora.text(corpora.sizes_mb[0])
                prepare_child(launcher, folder, "bpe", args.workers, BPE_VOCAB,
                              keep_tokenizer=tokenizer_path)  # fmt: skip
            results["throughput"] = run_throughput(
                corpora, tokenizer_path, args.workers, args.throughput_repeats
            )
    finally:
        launcher.close()
        shutil.rmtree(scratch, ignore_errors=True)
    write_report(args.out, results, args, time.perf_counter() - began)


if __name__ == "__main__":
    main()
