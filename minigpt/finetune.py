"""Fine-tuning: a run that starts from a source model (`train.init_from`: a run
directory, a Hugging Face GPT-2 folder or a hub name, loaded by `hf.load_pretrained`).

The source decides what its weights mean: the model's shape and the tokenizer. So
the run's config takes them from the source (`fine_tune_config`), the data is
tokenised with the source's tokenizer (`fixed_tokenizer`), and the new model starts
from the source's weights (`load_source_weights`).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from minigpt.config import RunConfig
from minigpt.errors import MinigptError
from minigpt.hf import Pretrained
from minigpt.model import GPT
from minigpt.tokenizer import TOKENIZER_FILE, Tokenizer, load_tokenizer

FREE_MODEL_SETTINGS = ("dropout", "attention", "init_std")
"""[model] settings a fine-tune may choose for itself: they change how the source's
weights are trained or computed, not what the weights are."""


def fine_tune_config(config: RunConfig, source: Pretrained) -> RunConfig:
    """The config of a run that starts from `source`: its model shape and tokenizer.

    A [model] setting given explicitly must agree with the source, except those in
    FREE_MODEL_SETTINGS and a smaller block_size (the positions are cropped, as
    nanoGPT's crop_block_size does). A tokenizer setting is an error: the source's
    token ids are what its embeddings mean.
    """
    given = {key.split(".", 1)[1] for key in config.explicit if key.startswith("model.")}
    model = source.config
    for key in sorted(given):
        ours, theirs = getattr(config.model, key), getattr(source.config, key)
        if key == "vocab_size" and ours == 0:  # 0 means "the tokenizer's": the source's
            continue
        if key in FREE_MODEL_SETTINGS or ours == theirs:
            model = replace(model, **{key: ours})
        elif key == "block_size" and ours < theirs:
            model = replace(model, block_size=ours)
        else:
            raise _disagrees(key, ours, theirs, source.source)
    for key in ("data.tokenizer", "data.vocab_size"):
        if key in config.explicit:
            raise MinigptError(
                f"{key} is set, but a run started from {source.source} uses its tokenizer",
                hint=f"drop {key} from the config",
            )
    data = replace(config.data, tokenizer=source.tokenizer.kind, vocab_size=0)
    return replace(config, model=model, data=data)


def _disagrees(key: str, ours: object, theirs: object, source: str) -> MinigptError:
    """The error for a [model] setting that contradicts the source."""
    theirs_text = (
        f"larger than the {theirs} positions {source} has"
        if key == "block_size"
        else f"but {source} has {key}={theirs!r}"
    )
    return MinigptError(
        f"model.{key}={ours!r} is set, {theirs_text}",
        hint=f"drop model.{key} from the config: --init-from takes the model's "
        "shape from the source (block_size may only be lowered)",
    )


def fixed_tokenizer(
    source: Pretrained | None, config: RunConfig, out_dir: Path
) -> Tokenizer | None:
    """The tokenizer the data must be tokenised with, when the corpus does not choose
    it: a fine-tune's source's; on resume, the one the fine-tune saved."""
    if source is not None:
        return source.tokenizer
    if config.train.init_from:  # a resumed fine-tune
        return load_tokenizer(out_dir / TOKENIZER_FILE)
    return None


def load_source_weights(model: GPT, source: Pretrained) -> None:
    """The source's weights, positions cropped to the model's block_size."""
    state = dict(source.state)
    if "pos_emb.weight" in state:  # rotary models have no position rows to crop
        state["pos_emb.weight"] = state["pos_emb.weight"][: model.config.block_size]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if [k for k in missing if k != "lm_head.weight"] or unexpected:  # the head is tied
        raise MinigptError(
            f"the weights of {source.source} do not fit the model "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})",
            hint="the source is damaged",
        )
