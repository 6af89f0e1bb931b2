"""Run configs: TOML loading, --set overrides, unknown keys, validation, shipped configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from minigpt.config import (
    DataConfig,
    RunConfig,
    TrainConfig,
    config_from_dict,
    field_docs,
    load_config,
    micro_steps,
    parse_overrides,
    split_accumulation,
)
from minigpt.errors import MinigptError
from minigpt.model import GPTConfig

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.toml"))


def test_default_toml_mirrors_the_builtin_defaults():
    # `minigpt train` with no config uses the dataclass defaults; configs/default.toml shows them
    assert load_config(REPO / "configs" / "default.toml") == RunConfig()
    assert RunConfig().data.source == "pystdlib"
    assert RunConfig().train.out_dir == "checkpoints/default"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    config = load_config(path)
    assert config.model.n_embd % config.model.n_head == 0


def test_named_configs_have_the_promised_shapes():
    baby = load_config(REPO / "configs" / "shakespeare-char.toml").model
    shape = (baby.n_layer, baby.n_head, baby.n_embd, baby.block_size, baby.dropout)
    assert shape == (6, 6, 384, 256, 0.2)
    gpt2 = load_config(REPO / "configs" / "gpt2-124m.toml")
    assert (gpt2.model.n_layer, gpt2.model.n_head, gpt2.model.n_embd) == (12, 12, 768)
    assert gpt2.model.block_size == 1024 and gpt2.data.tokenizer == "gpt2"


def test_every_field_has_a_doc():
    for cls in (GPTConfig, DataConfig, TrainConfig):
        docs = field_docs(cls)
        missing = [f for f in cls.__dataclass_fields__ if not docs.get(f)]
        assert not missing, f"{cls.__name__} fields without a doc: {missing}"


def test_toml_then_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[model]\nn_layer = 3\n[train]\nlr = 1e-3\nmin_lr = 1e-4\nout_dir = "x"\n')
    config = load_config(path, ["train.lr=5e-4", "model.dropout=0.1", "train.compile=true"])
    assert config.model.n_layer == 3 and config.model.dropout == 0.1
    assert config.train.lr == 5e-4 and config.train.compile is True
    assert config.train.out_dir == "x"
    # untouched keys keep the defaults
    assert config.model.n_embd == RunConfig().model.n_embd


def test_overrides_are_typed_by_the_field():
    values = parse_overrides(
        ["train.max_iters=5e3", "train.lr=3", "data.source=my file.txt", "train.compile=no"]
    )
    assert values["train"] == {"max_iters": 5000, "lr": 3.0, "compile": False}
    assert values["data"]["source"] == "my file.txt"
    config = load_config(None, values)
    assert isinstance(config.train.lr, float) and config.train.max_iters == 5000


def test_invalid_toml_names_the_line(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[train]\nlr = 1e-3\nbatch_size = = 4\n")
    with pytest.raises(MinigptError, match="line 3"):
        load_config(path)


@pytest.mark.parametrize(
    ("overrides", "suggestion"),
    [
        (["train.lrr=1"], "train.lr"),
        (["train.n_layer=2"], "model.n_layer"),
        (["trian.lr=1"], "[train]"),
        (["data.tokenzier=char"], "data.tokenizer"),
    ],
)
def test_unknown_keys_suggest_the_nearest(overrides, suggestion):
    with pytest.raises(MinigptError) as info:
        load_config(None, overrides)
    assert suggestion in info.value.hint


def test_unknown_key_in_a_file(tmp_path):
    path = tmp_path / "typo.toml"
    path.write_text("[train]\neval_intervall = 10\n")
    with pytest.raises(MinigptError, match="train.eval_intervall") as info:
        load_config(path)
    assert "train.eval_interval" in info.value.hint


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.n_embd=100", "model.n_head=3"],  # impossible shape
        ["model.n_layer=0"],
        ["model.n_layer=two"],
        ["train.lr=0"],
        ["train.min_lr=1", "train.lr=0.1"],
        ["train.beta2=1.5"],
        ["train.device=tpu"],
        ["train.dtype=float16"],
        ["train.batch_size=2.5"],
        ["train.decay_by_time=true"],  # needs max_time
        ["data.source="],
        ["train.compile=maybe"],
        ["train.loss_chunk=-1"],
        ["nonsense"],
    ],
)
def test_bad_values_are_refused(overrides):
    with pytest.raises(MinigptError):
        load_config(None, overrides)


def test_wrong_types_in_toml(tmp_path):
    path = tmp_path / "types.toml"
    path.write_text('[model]\nn_layer = "four"\n')
    with pytest.raises(MinigptError, match="model.n_layer must be an integer"):
        load_config(path)
    path.write_text("train = 3\n")
    with pytest.raises(MinigptError, match="table"):
        load_config(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(MinigptError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_micro_steps_from_tokens_per_step():
    config = load_config(None, ["train.batch_size=4", "model.block_size=16"])
    assert micro_steps(config) == 1
    config = load_config(None, ["train.batch_size=4", "model.block_size=16", "train.grad_accum=4"])
    assert micro_steps(config, world_size=2) == 2
    config = load_config(
        None, ["train.batch_size=4", "model.block_size=16", "train.tokens_per_step=512"]
    )
    assert micro_steps(config) == 8 and micro_steps(config, world_size=4) == 2
    with pytest.raises(MinigptError, match="multiple"):
        micro_steps(config, world_size=3)


def test_by_default_each_process_runs_one_micro_batch_a_step():
    config = load_config(None, [])
    for world_size in (1, 2, 3, 8):
        assert micro_steps(config, world_size) == 1
        # the run records the total, so a resume on other processes sees the same batches
        recorded, per_process = split_accumulation(config, world_size)
        assert (recorded.train.grad_accum, per_process) == (world_size, 1)
        assert micro_steps(recorded, 1) == world_size
    # one process: the same step as one micro-batch asked for by name
    one = load_config(None, ["train.grad_accum=1"])
    assert split_accumulation(config, 1)[0].train == one.train
    # a total given by name, or by tokens_per_step, is kept as it is
    for sets in (["train.grad_accum=4"], ["train.tokens_per_step=8192"]):  # 4 x 16 x 128
        given = load_config(None, sets)
        assert split_accumulation(given, 2) == (given, 2)


@pytest.mark.parametrize(("accum", "world_size"), [(1, 2), (3, 2), (4, 3)])
def test_a_total_the_processes_cannot_split_is_refused(accum, world_size):
    config = load_config(None, [f"train.grad_accum={accum}"])
    micro = "micro-batch" if accum == 1 else "micro-batches"
    sentence = f"{accum} {micro} per optimizer step cannot be split evenly over {world_size}"
    with pytest.raises(MinigptError, match=sentence) as err:
        micro_steps(config, world_size)
    assert err.value.hint == (
        f"make train.grad_accum a multiple of {world_size}, or 0 for one on each process"
    )


def test_a_negative_accumulation_is_refused():
    with pytest.raises(MinigptError, match="train.grad_accum must not be negative, got -1"):
        load_config(None, ["train.grad_accum=-1"])


def test_round_trip_through_a_run_dict():
    config = load_config(None, ["model.n_layer=2", "train.seed=7"])
    assert config_from_dict(config.to_dict()) == config


def test_model_vocab_size_zero_means_the_tokenizers():
    assert RunConfig().model.vocab_size == 0
    assert GPTConfig().with_vocab(65).vocab_size == 65
    padded = load_config(None, ["model.vocab_size=128"]).model
    assert padded.with_vocab(65).vocab_size == 128  # a larger size pads the embedding
    with pytest.raises(MinigptError, match="smaller than the tokenizer's 65"):
        load_config(None, ["model.vocab_size=64"]).model.with_vocab(65)
    with pytest.raises(MinigptError, match="vocab_size must be 0 or a positive integer"):
        load_config(None, ["model.vocab_size=-1"])
