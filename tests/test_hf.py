"""GPT-2 in and out, checked against `transformers` itself.

No test downloads anything: conftest.py's small GPT-2 with random weights
(`gpt2_dir`, saved with `save_pretrained`) is imported, sampled, evaluated,
fine-tuned and exported by minigpt's commands.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from minigpt import hf  # noqa: E402
from minigpt.batches import Batcher  # noqa: E402
from minigpt.checkpoint import load_run, read_metrics  # noqa: E402
from minigpt.generate import generate  # noqa: E402
from minigpt.train import EVAL_SEED_OFFSET  # noqa: E402

PROMPTS = ["First Citizen:\nBefore we", "All:\nSpeak, speak 🎭 — 12345   \n\n"]


@pytest.fixture(scope="module")
def hf_tokenizer(gpt2_dir):
    return transformers.GPT2TokenizerFast.from_pretrained(gpt2_dir)


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def hf_greedy(model, ids: list[int], max_new_tokens: int, pad_token_id: int, **options):
    """The new token ids of transformers' greedy `generate` after ids."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad_token_id,
            **options,
        )
    return out[0, len(ids) :].tolist()


def our_logits(run, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return run.model(torch.tensor([ids]))[0][0]


# --------------------------------------------------------------------------- import


def test_import_writes_a_run_directory(minigpt_cli, gpt2_dir, tmp_path):
    code, out, err = minigpt_cli("import", gpt2_dir, "--out", tmp_path / "run")
    assert code == 0, err
    assert "imported" in out
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model"]["activation"] == "gelu_tanh"
    assert config["model"]["layer_norm_eps"] == 1e-4
    assert config["model"]["bias"] is True
    assert config["imported_from"]["source"] == str(gpt2_dir)
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if not p.name.startswith(".")) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    ]


def test_imported_logits_equal_transformers(imported, hf_model, hf_tokenizer):
    n_positions = hf_model.config.n_positions
    run = load_run(imported)
    rng = np.random.default_rng(0)
    vocab = run.tokenizer.vocab_size
    cases = [hf_tokenizer(p)["input_ids"] for p in PROMPTS]
    cases += [[int(i) for i in rng.integers(0, vocab, n)] for n in (1, 17, n_positions)]
    for ids in cases:
        diff = (our_logits(run, ids) - hf_logits(hf_model, ids)).abs().max().item()
        assert diff < 1e-4, (len(ids), diff)


def test_imported_tokenizer_matches_transformers(imported, hf_tokenizer, gpt2_files):
    run = load_run(imported)
    for text in gpt2_files.hard_texts:
        assert run.tokenizer.encode_prompt(text) == hf_tokenizer(text)["input_ids"], text


def test_exact_gelu_would_not_match(gpt2_dir, hf_model):
    # the tanh GELU option is what makes the logits match, not a loose tolerance
    loaded = hf.load_hf_checkpoint(str(gpt2_dir))
    from dataclasses import replace

    from minigpt.model import GPT

    model = GPT(replace(loaded.config, activation="gelu")).eval()
    model.load_state_dict(loaded.state, strict=False)
    ids = list(range(40))
    with torch.no_grad():
        diff = (model(torch.tensor([ids]))[0][0] - hf_logits(hf_model, ids)).abs().max().item()
    assert diff > 1e-4


def test_pytorch_model_bin_imports_the_same(gpt2_dir, tmp_path, hf_model):
    folder = tmp_path / "bin"
    shutil.copytree(gpt2_dir, folder)
    (folder / "model.safetensors").unlink()
    torch.save(hf_model.state_dict(), folder / "pytorch_model.bin")
    loaded = hf.load_hf_checkpoint(str(folder))
    reference = hf.load_hf_checkpoint(str(gpt2_dir))
    assert loaded.state.keys() == reference.state.keys()
    assert all(torch.equal(loaded.state[k], reference.state[k]) for k in loaded.state)


def test_untransformed_old_layout_imports(gpt2_dir, tmp_path, hf_model):
    # the hub's gpt2 weights carry no "transformer." prefix and keep the mask buffers
    from safetensors.torch import load_file, save_file

    n_positions = hf_model.config.n_positions

    folder = tmp_path / "old"
    shutil.copytree(gpt2_dir, folder)
    state = load_file(str(folder / "model.safetensors"))
    old = {k.removeprefix("transformer."): v for k, v in state.items()}
    for layer in range(3):
        old[f"h.{layer}.attn.bias"] = torch.tril(torch.ones(1, 1, n_positions, n_positions))
    save_file(old, str(folder / "model.safetensors"))
    reference = hf.load_hf_checkpoint(str(gpt2_dir))
    loaded = hf.load_hf_checkpoint(str(folder))
    assert all(torch.equal(loaded.state[k], reference.state[k]) for k in reference.state)


# --------------------------------------------------------------------------- generate, inspect


def test_greedy_generation_equals_transformers(imported, hf_model, hf_tokenizer, minigpt_cli):
    run = load_run(imported)
    prompt = PROMPTS[0]
    ids = hf_tokenizer(prompt)["input_ids"]
    expected = hf_greedy(hf_model, ids, 40, run.tokenizer.eot_id, eos_token_id=None)
    ours = [int(t[0]) for t in generate(run.model, ids, 40, temperature=0.0)]
    assert ours == expected
    assert run.tokenizer.eot_id not in expected[:30]  # 30+ tokens before any end of text
    # and through the command line, as text
    stop = expected.index(run.tokenizer.eot_id) if run.tokenizer.eot_id in expected else 40
    code, out, err = minigpt_cli(
        "generate", imported, "--prompt", prompt, "--temperature", "0", "-n", "40", "--json"
    )
    assert code == 0, err
    assert json.loads(out)["samples"][0]["text"] == hf_tokenizer.decode(expected[:stop])


def test_an_imported_gpt2_served_with_others_writes_what_transformers_writes(
    imported, hf_model, hf_tokenizer
):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from minigpt.serve.api import create_app
    from minigpt.serve.scheduler import Scheduler

    run = load_run(imported)
    scheduler = Scheduler(run.model, run.tokenizer, max_batch=2)
    scheduler.start()
    body = {"prompt": PROMPTS, "max_tokens": 20, "temperature": 0, "return_token_ids": True}
    try:
        with TestClient(create_app(run.model, run.tokenizer, "gpt2", scheduler)) as client:
            answer = client.post("/v1/completions", json=body).json()
    finally:
        scheduler.close(0)
    for prompt, choice in zip(PROMPTS, answer["choices"], strict=True):
        ids = hf_tokenizer(prompt)["input_ids"]
        expected = hf_greedy(hf_model, ids, 20, run.tokenizer.eot_id)
        assert choice["prompt_token_ids"] == ids  # the byte-level BPE is transformers'
        assert choice["token_ids"] == expected
        assert choice["text"] == hf_tokenizer.decode(expected)


def test_inspect_heads_and_generate_on_an_imported_model(imported, minigpt_cli, tmp_path):
    code, out, err = minigpt_cli(
        "inspect-heads", imported, "--repeated", "12", "--json", tmp_path / "heads.json"
    )
    assert code == 0, err
    heads = json.loads((tmp_path / "heads.json").read_text())
    assert len(heads["heads"]) == 3 * 4
    code, out, err = minigpt_cli(
        "generate", imported, "--prompt", "All:", "-n", "10", "--seed", "1"
    )
    assert code == 0, err
    assert out.startswith("All:")


# --------------------------------------------------------------------------- eval


def test_eval_of_short_text_equals_transformers_loss(
    imported, hf_model, hf_tokenizer, tmp_path, minigpt_cli
):
    n_positions = hf_model.config.n_positions
    text = "Before we proceed any further, hear me speak."
    (tmp_path / "short.txt").write_text(text)
    ids = hf_tokenizer(text)["input_ids"]
    assert len(ids) < n_positions
    with torch.no_grad():
        expected = hf_model(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    code, out, err = minigpt_cli("eval", imported, "--data", tmp_path / "short.txt", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["tokens"] == len(ids) - 1
    assert abs(result["loss"] - expected) < 1e-4
    assert abs(result["perplexity"] - math.exp(expected)) < 1e-3


def guide_loss(model, ids: list[int], max_length: int, stride: int) -> tuple[float, int]:
    """The Hugging Face perplexity guide's strided loop, run on transformers' model,
    each window weighted by the labels it scores (the guide's code subtracts one label
    per window; its loss per window is the same)."""
    seq = torch.tensor([ids])
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        trg_len = end - prev_end
        input_ids = seq[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss.item()
        scored = int((target_ids[:, 1:] != -100).sum())
        nll_sum += loss * scored
        n_tokens += scored
        prev_end = end
        if end == len(ids):
            break
    return nll_sum / n_tokens, n_tokens


@pytest.mark.parametrize("stride", [16, 32, 64])
def test_strided_eval_equals_the_guide(
    imported, hf_model, hf_tokenizer, tmp_path, minigpt_cli, stride, gpt2_text
):
    n_positions = hf_model.config.n_positions
    (tmp_path / "long.txt").write_text(gpt2_text * 3)
    ids = hf_tokenizer(gpt2_text * 3)["input_ids"]
    assert len(ids) > 3 * n_positions
    expected, n_tokens = guide_loss(hf_model, ids, n_positions, stride)
    code, out, err = minigpt_cli(
        "eval", imported, "--data", tmp_path / "long.txt", "--stride", stride, "--json"
    )
    assert code == 0, err
    result = json.loads(out)
    assert result["tokens"] == n_tokens
    assert abs(result["loss"] - expected) < 1e-4


def test_eval_of_an_imported_run_needs_data(imported, minigpt_cli):
    code, out, err = minigpt_cli("eval", imported)
    assert code == 2
    assert "no validation split" in err and "hint: pass --data" in err


# --------------------------------------------------------------------------- export


def test_export_of_an_import_loads_in_transformers(
    imported, hf_model, tmp_path, minigpt_cli, gpt2_files
):
    n_positions = hf_model.config.n_positions
    code, out, err = minigpt_cli("export", imported, "--out", tmp_path / "hf")
    assert code == 0, err
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = list(range(0, 3 * n_positions, 3))[:n_positions]
    diff = (hf_logits(model, ids) - hf_logits(hf_model, ids)).abs().max().item()
    assert diff < 1e-4
    run = load_run(imported)
    for text in gpt2_files.hard_texts:
        assert tokenizer(text)["input_ids"] == run.tokenizer.encode_prompt(text), text


def train_tiny(tmp_path, minigpt_cli, text: str, tokenizer: str, *extra: str):
    (tmp_path / "corpus.txt").write_text(text * 20)
    out = tmp_path / f"run-{tokenizer}"
    code, _, err = minigpt_cli(
        "train", "--data", tmp_path / "corpus.txt", "--out", out, "--max-iters", "4",
        "--set", f"data.tokenizer={tokenizer}", "--set", f"data.data_dir={tmp_path / 'data'}",
        "--set", "model.n_layer=2", "--set", "model.n_embd=32", "--set", "model.n_head=2",
        "--set", "model.block_size=32", "--set", "train.batch_size=4",
        "--set", "train.eval_interval=4", "--set", "train.eval_iters=2", "--set", "train.device=cpu",
        *extra,
    )  # fmt: skip
    assert code == 0, err
    return out


def test_export_of_a_trained_bpe_run(tmp_path, minigpt_cli, gpt2_files, gpt2_text):
    run_dir = train_tiny(tmp_path, minigpt_cli, gpt2_text, "bpe", "--set", "data.vocab_size=300")
    code, out, err = minigpt_cli("export", run_dir, "--out", tmp_path / "hf")
    assert code == 0, err
    run = load_run(run_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in [gpt2_text[:80], *gpt2_files.hard_texts]:
        ids = run.tokenizer.encode_prompt(text)[:32]
        assert tokenizer(text)["input_ids"][:32] == ids, text
        if not ids:
            continue
        diff = (hf_logits(model, ids) - our_logits(run, ids)).abs().max().item()
        assert diff < 1e-4


def test_export_of_a_char_run_says_the_tokenizer_was_not(tmp_path, minigpt_cli, gpt2_text):
    run_dir = train_tiny(tmp_path, minigpt_cli, gpt2_text, "char")
    code, out, err = minigpt_cli("export", run_dir, "--out", tmp_path / "hf")
    assert code == 0, err
    assert "char tokenizer has no Hugging Face equivalent" in err
    assert not (tmp_path / "hf" / "tokenizer.json").exists()
    run = load_run(run_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = run.tokenizer.encode(gpt2_text[:32])
    assert (hf_logits(model, ids) - our_logits(run, ids)).abs().max().item() < 1e-4


# --------------------------------------------------------------------------- fine-tuning


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_init_from_starts_at_the_source_loss_and_lowers_it(
    imported, tmp_path, minigpt_cli, gpt2_text, optimizer
):
    (tmp_path / "corpus.txt").write_text(gpt2_text * 30)
    out = tmp_path / "ft"
    code, stdout, err = minigpt_cli(
        "train", "--init-from", imported, "--data", tmp_path / "corpus.txt", "--out", out,
        "--max-iters", "6", "--set", f"data.data_dir={tmp_path / 'data'}",
        "--set", "model.block_size=32", "--set", "train.batch_size=4", "--set", "train.eval_iters=3",
        "--set", "train.eval_interval=6", "--set", "train.lr=3e-3", "--set", "train.warmup_iters=0",
        "--set", "train.device=cpu", "--set", "train.dtype=float32",
        "--set", f"train.optimizer={optimizer}",
    )  # fmt: skip
    assert code == 0, err
    evals = [r for r in read_metrics(out / "metrics.jsonl") if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 6]
    # the first evaluation is the source model's loss on the trainer's own eval batches
    source = load_run(imported)
    finetuned = load_run(out)
    assert finetuned.model.config.block_size == 32
    assert finetuned.tokenizer.to_json() == source.tokenizer.to_json()
    config = json.loads((out / "config.json").read_text())
    val_tokens = np.fromfile(
        f"{config['prepared_data']['dir']}/val.bin", dtype=config["prepared_data"]["dtype"]
    )
    batcher = Batcher(val_tokens, 32, 4, 1337 + EVAL_SEED_OFFSET)
    with torch.no_grad():
        expected = np.mean([source.model(*batcher.next())[1].item() for _ in range(3)])
    assert abs(evals[0]["val_loss"] - expected) < 1e-4
    assert evals[1]["train_loss"] < evals[0]["train_loss"]
    assert evals[1]["val_loss"] < evals[0]["val_loss"]


@pytest.mark.parametrize(
    "setting, words",
    [
        ("model.n_layer=2", "model.n_layer=2 is set, but"),
        ("model.block_size=128", "model.block_size=128 is set, larger than the 64 positions"),
        ("data.tokenizer=char", "data.tokenizer is set"),
    ],
)
def test_init_from_refuses_a_contradicting_setting(
    imported, tmp_path, minigpt_cli, setting, words, gpt2_text
):
    (tmp_path / "corpus.txt").write_text(gpt2_text * 30)
    code, out, err = minigpt_cli(
        "train", "--init-from", imported, "--data", tmp_path / "corpus.txt",
        "--out", tmp_path / "ft", "--set", setting,
    )  # fmt: skip
    assert code == 2
    assert words in err and "hint:" in err
    assert not (tmp_path / "ft").exists()


def test_init_from_a_hugging_face_folder(gpt2_dir, tmp_path, minigpt_cli, gpt2_text):
    (tmp_path / "corpus.txt").write_text(gpt2_text * 30)
    out = tmp_path / "ft"
    code, _, err = minigpt_cli(
        "train", "--init-from", gpt2_dir, "--data", tmp_path / "corpus.txt", "--out", out,
        "--max-iters", "2", "--set", f"data.data_dir={tmp_path / 'data'}",
        "--set", "model.block_size=32", "--set", "train.batch_size=2", "--set", "train.eval_iters=1",
        "--set", "train.device=cpu",
    )  # fmt: skip
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["train"]["init_from"] == str(gpt2_dir)
    code, _, err = minigpt_cli("train", "--resume", out, "--max-iters", "3")
    assert code == 0, err


# --------------------------------------------------------------------------- refusals


def edited_copy(gpt2_dir, tmp_path, **config_changes):
    folder = tmp_path / "edited"
    shutil.copytree(gpt2_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(config_changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"model_type": "llama"}, "is a 'llama' checkpoint"),
        ({"architectures": ["GPT2ForSequenceClassification"]}, "GPT2ForSequenceClassification"),
        ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
        ({"reorder_and_upcast_attn": True}, "reorder_and_upcast_attn"),
        ({"add_cross_attention": True}, "add_cross_attention"),
        ({"tie_word_embeddings": False}, "tie_word_embeddings"),
        ({"activation_function": "relu"}, "activation_function='relu'"),
        ({"n_inner": 100}, "n_inner=100"),
        ({"n_layer": 4}, "missing"),
    ],
)
def test_import_refuses_what_minigpt_cannot_express(
    gpt2_dir, tmp_path, minigpt_cli, changes, words
):
    folder = edited_copy(gpt2_dir, tmp_path, **changes)
    code, out, err = minigpt_cli("import", folder, "--out", tmp_path / "run")
    assert code == 2
    lines = err.strip().splitlines()
    assert lines[0].startswith("error: ") and words in lines[0]
    assert len(lines) == 2 and lines[1].startswith("hint: ")
    assert not (tmp_path / "run").exists()


def test_import_refuses_a_sharded_checkpoint(gpt2_dir, tmp_path, minigpt_cli):
    folder = edited_copy(gpt2_dir, tmp_path)
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    (folder / "model.safetensors.index.json").write_text("{}")
    code, _, err = minigpt_cli("import", folder, "--out", tmp_path / "run")
    assert code == 2 and "sharded" in err and "hint:" in err


def test_import_refuses_a_pickle_with_code(gpt2_dir, tmp_path, minigpt_cli):
    folder = edited_copy(gpt2_dir, tmp_path)
    (folder / "model.safetensors").unlink()
    torch.save({"weights": argparse_namespace()}, folder / "pytorch_model.bin")
    code, _, err = minigpt_cli("import", folder, "--out", tmp_path / "run")
    assert code == 2 and "refusing to unpickle" in err


def argparse_namespace():
    import argparse

    return argparse.Namespace(a=1)


def test_import_of_a_hub_name_offline_fails_fast_with_a_hint(tmp_path, monkeypatch, minigpt_cli):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    pytest.importorskip("huggingface_hub")
    code, _, err = minigpt_cli("import", "gpt2", "--out", tmp_path / "run")
    assert code == 2
    assert "could not fetch 'gpt2'" in err and "pass a local checkpoint folder" in err


def test_import_of_a_hub_name_without_huggingface_hub(tmp_path, monkeypatch, minigpt_cli):
    import sys

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    code, _, err = minigpt_cli("import", "distilgpt2", "--out", tmp_path / "run")
    assert code == 2
    assert "needs huggingface_hub" in err and "pip install" in err


def test_import_refuses_a_path_that_is_no_name(tmp_path, minigpt_cli):
    code, _, err = minigpt_cli("import", tmp_path / "missing" / "gpt2", "--out", tmp_path / "run")
    assert code == 2 and "neither a folder nor a Hugging Face hub name" in err


def test_import_keeps_an_existing_run_without_force(imported, gpt2_dir, minigpt_cli):
    code, _, err = minigpt_cli("import", gpt2_dir, "--out", imported)
    assert code == 2 and "already holds a run" in err
    load_run(imported)


def test_export_refuses_an_existing_model_without_force(imported, tmp_path, minigpt_cli):
    assert minigpt_cli("export", imported, "--out", tmp_path / "hf")[0] == 0
    code, _, err = minigpt_cli("export", imported, "--out", tmp_path / "hf")
    assert code == 2 and "already holds a model" in err
    assert minigpt_cli("export", imported, "--out", tmp_path / "hf", "--force")[0] == 0


def test_resume_of_an_imported_run_points_to_init_from(imported, minigpt_cli):
    code, _, err = minigpt_cli("train", "--resume", imported)
    assert code == 2
    assert "was imported, not trained" in err and "--init-from" in err


def test_init_from_with_resume_is_refused(imported, minigpt_cli):
    code, _, err = minigpt_cli("train", "--resume", imported, "--init-from", imported)
    assert code == 2 and "--init-from starts a new run" in err


def test_the_finetune_recipe_runs(gpt2_dir, tmp_path, minigpt_cli, gpt2_text):
    # configs/finetune-gpt2.toml as shipped, with the random GPT-2 in place of the hub's
    (tmp_path / "corpus.txt").write_text(gpt2_text * 30)
    code, out, err = minigpt_cli(
        "train", "configs/finetune-gpt2.toml", "--init-from", gpt2_dir,
        "--data", tmp_path / "corpus.txt", "--out", tmp_path / "ft", "--max-iters", "1",
        "--set", "model.block_size=32", "--set", f"data.data_dir={tmp_path / 'data'}",
        "--set", "train.batch_size=2", "--set", "train.grad_accum=1", "--set", "train.eval_iters=1",
        "--set", "train.device=cpu",
    )  # fmt: skip
    assert code == 0, err
    config = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert config["train"]["weight_decay"] == 0.0
    assert config["model"]["dropout"] == 0.1 and config["model"]["n_layer"] == 3


def test_a_failed_import_or_export_leaves_nothing_half_written(
    gpt2_dir, imported, tmp_path, monkeypatch, minigpt_cli
):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hf.checkpoint, "save_weights", full_disk)
    code, _, err = minigpt_cli("import", gpt2_dir, "--out", tmp_path / "run")
    assert code == 2 and "No space left" in err
    assert not (tmp_path / "run").exists()
    monkeypatch.setattr(hf, "write_hf_tokenizer", full_disk)
    code, _, err = minigpt_cli("export", imported, "--out", tmp_path / "hf")
    assert code == 2 and "No space left" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no folder, no staging leftovers


def test_eval_names_its_own_stride_option(imported, minigpt_cli):
    code, _, err = minigpt_cli("eval", imported, "--stride", "0")
    assert code == 2
    assert err.startswith("error: --stride must be a whole number from 1 to block_size=64")


# --------------------------------------------------------------------------- odd sources


def pickled_copy(gpt2_dir, tmp_path, reshape):
    """gpt2_dir with its weights as a pytorch_model.bin holding reshape(state dict)."""
    from safetensors.torch import load_file

    folder = edited_copy(gpt2_dir, tmp_path)
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save(reshape(state), folder / "pytorch_model.bin")
    return folder


ODD_PICKLES = {
    "a list": lambda state: list(state.values()),
    "an int value": lambda state: {**state, "transformer.wte.weight": 5},
    "integer keys": lambda state: dict(enumerate(state.values())),
    "a nested dict": lambda state: {"state_dict": state},
}


@pytest.mark.parametrize("contents", list(ODD_PICKLES))
def test_a_pickle_that_is_no_state_dict_is_refused(
    gpt2_dir, tmp_path, minigpt_cli, contents, gpt2_text
):
    folder = pickled_copy(gpt2_dir, tmp_path, ODD_PICKLES[contents])
    code, _, err = minigpt_cli("import", folder, "--out", tmp_path / "run")
    assert code == 2 and "Traceback" not in err
    assert err.startswith(
        f"error: {folder / 'pytorch_model.bin'} does not hold a state dict of tensors"
    )
    assert not (tmp_path / "run").exists()
    (tmp_path / "corpus.txt").write_text(gpt2_text * 10)
    code, _, err = minigpt_cli(
        "train", "--init-from", folder, "--data", tmp_path / "corpus.txt", "--out", tmp_path / "ft",
        "--set", f"data.data_dir={tmp_path / 'data'}", "--set", "train.device=cpu",
    )  # fmt: skip
    assert code == 2 and "does not hold a state dict of tensors" in err
    assert not (tmp_path / "ft").exists()


def test_a_pickle_that_is_no_pickle_is_a_damaged_file(gpt2_dir, tmp_path, minigpt_cli):
    folder = pickled_copy(gpt2_dir, tmp_path, lambda state: state)
    (folder / "pytorch_model.bin").write_bytes(b"hello, not a pickle\n")
    code, _, err = minigpt_cli("import", folder, "--out", tmp_path / "run")
    assert code == 2 and "is not a readable weights file" in err
    assert "objects other than tensors" not in err


@pytest.mark.parametrize(
    "command",
    [
        ("generate", "HF", "-n", "2", "--device", "cpu"),
        ("eval", "HF", "--device", "cpu"),
        ("inspect-heads", "HF", "--device", "cpu"),
        ("export", "HF", "--out", "OUT"),
        ("train", "--resume", "HF"),
    ],
)
def test_a_hugging_face_folder_where_a_run_belongs_says_import_it(
    gpt2_dir, tmp_path, minigpt_cli, command
):
    args = [{"HF": gpt2_dir, "OUT": tmp_path / "out"}.get(arg, arg) for arg in command]
    code, _, err = minigpt_cli(*args)
    assert code == 2
    assert err.splitlines() == [
        f"error: {gpt2_dir} is a Hugging Face checkpoint, not a minigpt run",
        f"hint: import it first: minigpt import {gpt2_dir} --out runs/NAME",
    ]
    assert not (tmp_path / "out").exists()


def test_a_config_without_model_type_says_what_is_missing(gpt2_dir, tmp_path, minigpt_cli):
    folder = edited_copy(gpt2_dir, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    del config["model_type"]
    (folder / "config.json").write_text(json.dumps(config))
    code, _, err = minigpt_cli("import", folder, "--out", tmp_path / "run")
    assert code == 2 and "None" not in err
    assert f"{folder / 'config.json'} has no model_type" in err
    code, _, err = minigpt_cli("generate", folder, "-n", "2")  # neither a run nor a checkpoint
    assert code == 2 and "None" not in err
    assert (
        f"{folder / 'config.json'} has no format_version, so {folder} is not a minigpt run" in err
    )


def test_a_mistyped_local_path_is_named_as_one(
    imported, tmp_path, minigpt_cli, monkeypatch, gpt2_text
):
    monkeypatch.chdir(imported.parent.parent)  # runs/gpt2 is here: runs/gtp2 is a typo
    (tmp_path / "corpus.txt").write_text(gpt2_text * 10)
    code, _, err = minigpt_cli(
        "train", "--init-from", f"{imported.parent.name}/gtp2", "--data", tmp_path / "corpus.txt",
        "--out", tmp_path / "ft",
    )  # fmt: skip
    assert code == 2
    assert f"error: there is no folder {imported.parent.name}/gtp2: " in err
    assert "gpt2" in err.splitlines()[1]  # the hint lists what the folder holds
    assert not (tmp_path / "ft").exists()


def test_a_name_that_is_no_folder_here_says_so_and_that_the_hub_lacks_it(
    tmp_path, monkeypatch, minigpt_cli
):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub path fails at once, as without a network
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.chdir(tmp_path)
    code, _, err = minigpt_cli("import", "nope/model", "--out", tmp_path / "run")
    assert code == 2
    assert "there is no folder nope/model, and could not fetch 'nope/model'" in err


# --------------------------------------------------------------------------- outputs


def test_import_refuses_to_overwrite_its_source_or_another_checkpoint(
    gpt2_dir, tmp_path, minigpt_cli
):
    source = edited_copy(gpt2_dir, tmp_path)
    other = shutil.copytree(gpt2_dir, tmp_path / "other")
    before = {p.name: p.read_bytes() for p in source.iterdir()}
    code, _, err = minigpt_cli("import", source, "--out", source, "--force")
    assert code == 2 and "the source of this import" in err and "--resume" not in err
    code, _, err = minigpt_cli("import", source, "--out", other, "--force")
    assert code == 2 and f"{other} is a Hugging Face checkpoint; import writes" in err
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before
    transformers.GPT2LMHeadModel.from_pretrained(other)  # still a checkpoint transformers loads


def test_export_force_replaces_an_earlier_export_whole(imported, tmp_path, minigpt_cli, gpt2_text):
    out = tmp_path / "hf"
    assert minigpt_cli("export", imported, "--out", out)[0] == 0
    (out / "added_tokens.json").write_text('{"<extra>": 999}')  # an earlier model's extra
    run_dir = train_tiny(tmp_path, minigpt_cli, gpt2_text, "char")
    code, _, err = minigpt_cli("export", run_dir, "--out", out, "--force")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    config = transformers.AutoConfig.from_pretrained(out)
    assert config.vocab_size == load_run(run_dir).model.config.vocab_size
