"""GPT-2 checkpoints in Hugging Face format: import one into a run directory, export
a run to one, and load one as the start of a fine-tune (finetune.py fits the run to it).

minigpt's GPT is GPT-2's architecture (pre-norm blocks, learned positions, a tied LM
head), so the conversion is a renaming, with two details:

    HF (GPT2LMHeadModel)                    minigpt (GPT)
    transformer.wte / wpe                   tok_emb / pos_emb
    transformer.h.i.ln_1 / ln_2             blocks.i.ln_attn / ln_mlp
    transformer.h.i.attn.c_attn  (C, 3C)    blocks.i.attn.qkv       (3C, C)  transposed
    transformer.h.i.attn.c_proj  (C, C)     blocks.i.attn.out_proj  (C, C)   transposed
    transformer.h.i.mlp.c_fc     (C, 4C)    blocks.i.mlp.fc         (4C, C)  transposed
    transformer.h.i.mlp.c_proj   (4C, C)    blocks.i.mlp.proj       (C, 4C)  transposed
    transformer.ln_f                        ln_f
    lm_head (tied to wte)                   lm_head (tied to tok_emb)

- GPT-2's `Conv1D` stores a weight as (in, out), `nn.Linear` as (out, in).
- Both split c_attn's output as [Q | K | V], and each of those into heads by a view,
  so the fused QKV rows line up with no reordering.

What GPT-2 has and a default minigpt model lacks is a model option, not a special
case here: `activation="gelu_tanh"` (HF's gelu_new), `layer_norm_eps`, `bias=True`,
an unpadded vocab. A checkpoint that needs anything else is refused by name.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from minigpt import checkpoint
from minigpt.atomic import atomic_path, staged_folder, write_json_atomic
from minigpt.checkpoint import (
    CONFIG_FILE,
    REPLACED_FILES,
    RunLock,
    is_torch_archive,
    load_run,
    read_config,
)
from minigpt.errors import MinigptError, first_line, os_error
from minigpt.hf_tokenizer import tokenizer_from_hf, write_hf_tokenizer
from minigpt.model import GPT, GPTConfig
from minigpt.outputs import HF_CHECKPOINT, RUN, check_output, folder_kind
from minigpt.signals import check, interruptible
from minigpt.tokenizer import BPETokenizer, NamedTokenizer, Tokenizer

HF_CONFIG = "config.json"
HF_SAFETENSORS = "model.safetensors"
HF_PICKLE = "pytorch_model.bin"
HF_GENERATION_CONFIG = "generation_config.json"
SHARD_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json")
EXPORT_REPLACES = (
    HF_CONFIG, HF_SAFETENSORS, HF_GENERATION_CONFIG, *TOKENIZER_FILES, HF_PICKLE,
    "special_tokens_map.json", "added_tokens.json",
)  # fmt: skip
"""What `export --force` replaces of the model in --out: the files an export writes, and
those an earlier model's would pair with the new ones (a tokenizer the new model lacks,
older weights, extra tokens)."""
HUB_TIMEOUT_S = 20
"""Seconds the hub may take to answer one request: offline, `import gpt2` must fail, not hang."""

# HF's activation_function -> GPTConfig.activation (gelu_new and gelu_pytorch_tanh are
# the same tanh approximation, computed two ways)
ACTIVATIONS_FROM_HF = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
ACTIVATIONS_TO_HF = {"gelu_tanh": "gelu_new", "gelu": "gelu"}
ARCHITECTURES = ("GPT2LMHeadModel", "GPT2Model")
# GPT-2 options minigpt's GPT does not have: each must keep the value that means "off"
UNSUPPORTED_OPTIONS = {
    "scale_attn_by_inverse_layer_idx": False,
    "reorder_and_upcast_attn": False,
    "add_cross_attention": False,
    "scale_attn_weights": True,
    "tie_word_embeddings": True,
}
# minigpt name -> HF name (without "transformer."), per block and for the rest
_BLOCK_NAMES = {
    "ln_attn": "ln_1",
    "attn.qkv": "attn.c_attn",
    "attn.out_proj": "attn.c_proj",
    "ln_mlp": "ln_2",
    "mlp.fc": "mlp.c_fc",
    "mlp.proj": "mlp.c_proj",
}
_TOP_NAMES = {"tok_emb": "wte", "pos_emb": "wpe", "ln_f": "ln_f"}
_CONV1D = ("attn.qkv", "attn.out_proj", "mlp.fc", "mlp.proj")  # stored transposed by GPT-2
# the causal-mask buffers older GPT-2 checkpoints saved along with the weights
_HF_BUFFERS = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")


@dataclass
class Pretrained:
    """A trained model to start from or to import (a GPT-2 checkpoint, converted; or a
    minigpt run): minigpt's model config, its tokenizer and its weights."""

    source: str
    """What the user named: a folder, a hub name, or a minigpt run directory."""
    config: GPTConfig
    tokenizer: Tokenizer
    state: dict[str, Tensor]
    """minigpt parameter names -> float32 tensors (the tied lm_head left out)."""


# --------------------------------------------------------------------------- configs


def gpt_config_from_hf(hf: dict, where: str) -> GPTConfig:
    """minigpt's GPTConfig for a GPT-2 config.json, or a MinigptError naming what
    minigpt cannot express."""
    model_type = hf.get("model_type")
    if model_type is None:
        raise MinigptError(
            f"{where} has no model_type, so it does not say which architecture it holds",
            hint="pass the folder transformers' save_pretrained wrote (its config.json "
            'names the model_type, "gpt2" for GPT-2)',
        )
    if model_type != "gpt2":
        raise MinigptError(
            f"{where} is a {model_type!r} checkpoint; minigpt imports the GPT-2 architecture only",
            hint="pass a GPT-2 checkpoint (gpt2, gpt2-medium, distilgpt2, or a GPT2LMHeadModel folder)",
        )
    architectures = hf.get("architectures") or ["GPT2LMHeadModel"]
    other = [a for a in architectures if a not in ARCHITECTURES]
    if other:
        raise MinigptError(
            f"{where} is a {other[0]}, which minigpt cannot import",
            hint="minigpt imports GPT2LMHeadModel (and GPT2Model) checkpoints",
        )
    for name, off in UNSUPPORTED_OPTIONS.items():
        if name in hf and hf[name] != off:
            raise MinigptError(
                f"{where} sets {name}={json.dumps(hf[name])}, which minigpt's GPT does not support",
                hint=f"only GPT-2 checkpoints with {name}={json.dumps(off)} can be imported",
            )
    activation = hf.get("activation_function", "gelu_new")
    if activation not in ACTIVATIONS_FROM_HF:
        raise MinigptError(
            f"{where} uses activation_function={activation!r}, which minigpt's GPT does not support",
            hint=f"minigpt supports {', '.join(ACTIVATIONS_FROM_HF)}",
        )
    n_embd = _hf_int(hf, "n_embd", where)
    n_inner = hf.get("n_inner")
    if n_inner is not None and n_inner != 4 * n_embd:
        raise MinigptError(
            f"{where} sets n_inner={n_inner}; minigpt's MLP is 4 * n_embd = {4 * n_embd} wide",
            hint="only GPT-2 checkpoints with the standard MLP width can be imported",
        )
    dropouts = {hf.get(k, 0.1) for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop")}
    values = dict(
        vocab_size=_hf_int(hf, "vocab_size", where),
        block_size=_hf_int(hf, "n_positions", where),
        n_layer=_hf_int(hf, "n_layer", where),
        n_head=_hf_int(hf, "n_head", where),
        n_embd=n_embd,
        # one dropout in minigpt: GPT-2's three when they agree (they do in every
        # published checkpoint), else the residual one
        dropout=dropouts.pop() if len(dropouts) == 1 else hf.get("resid_pdrop", 0.1),
        bias=True,
        init_std=hf.get("initializer_range", 0.02),
        activation=ACTIVATIONS_FROM_HF[activation],
        layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
    )
    try:
        return GPTConfig(**values)
    except MinigptError as err:
        raise MinigptError(f"{where}: {err}", hint="the config.json is damaged") from None


def _hf_int(hf: dict, key: str, where: str) -> int:
    value = hf.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MinigptError(
            f"{where} has no valid {key} (got {value!r})",
            hint="the config.json is damaged or is not a GPT-2 config",
        )
    return value


def hf_config_from_gpt(config: GPTConfig, eot_id: int | None) -> dict:
    """The config.json of a GPT2LMHeadModel with the same shape and weights."""
    if config.activation not in ACTIVATIONS_TO_HF:  # every option GPT-2 cannot express
        raise MinigptError(
            f"the run's model.activation={config.activation!r} has no GPT-2 equivalent",
            hint=f"only {', '.join(ACTIVATIONS_TO_HF)} models can be exported",
        )
    gpt2 = {"position": "learned", "norm": "layernorm", "mlp": "gelu", "qk_norm": False}
    modern = [
        f"{key}={getattr(config, key)!r}" for key in gpt2 if getattr(config, key) != gpt2[key]
    ]
    if config.kv_heads != config.n_head:
        modern.append(f"n_kv_head={config.n_kv_head}")
    if modern:
        raise MinigptError(
            f"the run's model has {', '.join(modern)}, which GPT-2 has no place for",
            hint="only GPT-2-shaped models (learned positions, LayerNorm, GELU MLP, one K/V"
            " per head, no QK-norm) export to a GPT2LMHeadModel",
        )
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": ACTIVATIONS_TO_HF[config.activation],
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": config.layer_norm_eps,
        "initializer_range": config.init_std,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "use_cache": True,
        "dtype": "float32",
    }


# --------------------------------------------------------------------------- weights


def _hf_name(name: str) -> str:
    """minigpt parameter name -> GPT-2's (without the 'transformer.' prefix)."""
    top, _, rest = name.partition(".")
    if top == "blocks":
        layer, _, rest = rest.partition(".")
        module, _, param = rest.rpartition(".")
        return f"h.{layer}.{_BLOCK_NAMES[module]}.{param}"
    return f"{_TOP_NAMES[top]}.{rest}"


def _is_conv1d(name: str) -> bool:
    module = name.rpartition(".")[0]
    return name.endswith(".weight") and module.split(".", 2)[-1] in _CONV1D


def state_from_hf(hf_state: dict[str, Tensor], config: GPTConfig, where: str) -> dict[str, Tensor]:
    """GPT-2's weights under minigpt's names, checked name by name and shape by shape."""
    hf_state = {name.removeprefix("transformer."): t for name, t in hf_state.items()}
    lm_head = hf_state.pop("lm_head.weight", None)
    if lm_head is not None and not torch.equal(lm_head, hf_state.get("wte.weight", lm_head)):
        raise MinigptError(
            f"{where} has an lm_head that is not tied to its token embedding (wte)",
            hint="minigpt ties them as GPT-2 does; only tied checkpoints can be imported",
        )
    for name in [n for n in hf_state if _HF_BUFFERS.fullmatch(n)]:
        del hf_state[name]
    with torch.device("meta"):  # the names and shapes, without allocating a model
        expected = {k: v.shape for k, v in GPT(config).state_dict().items()}
    expected.pop("lm_head.weight")
    state, missing = {}, []
    for name, shape in expected.items():
        hf_name = _hf_name(name)
        tensor = hf_state.pop(hf_name, None)
        if tensor is None:
            missing.append(hf_name)
            continue
        tensor = tensor.t() if _is_conv1d(name) else tensor
        if tensor.shape != shape:
            raise MinigptError(
                f"{where}: {hf_name} is {tuple(tensor.shape)}, config.json's shape "
                f"needs {tuple(shape)}",
                hint="the weights and config.json come from different models",
            )
        state[name] = tensor.to(torch.float32).contiguous()
    if missing or hf_state:
        raise MinigptError(
            f"{where} does not hold the weights of a GPT-2 "
            f"(missing {missing[:3]}, unexpected {sorted(hf_state)[:3]})",
            hint="pass a GPT2LMHeadModel checkpoint",
        )
    return state


def state_to_hf(state: dict[str, Tensor], config: GPTConfig) -> dict[str, Tensor]:
    """minigpt's weights under GPT-2's names; a model without biases gets zero ones
    (the same function: GPT-2 always has them)."""
    state = {k: v.detach().to(torch.float32).cpu() for k, v in state.items()}
    state.pop("lm_head.weight", None)  # tied: GPT2LMHeadModel re-ties it to wte on load
    if not config.bias:  # every Linear and LayerNorm: its weight's first dim is its output
        for name in [n for n in state if not n.startswith(("tok_emb.", "pos_emb."))]:
            state.setdefault(name.removesuffix(".weight") + ".bias", torch.zeros(len(state[name])))
    return {
        "transformer." + _hf_name(name): (tensor.t() if _is_conv1d(name) else tensor).contiguous()
        for name, tensor in state.items()
    }


def read_hf_weights(folder: Path) -> dict[str, Tensor]:
    """The one weights file of a checkpoint folder: model.safetensors, else
    pytorch_model.bin read with weights_only=True (no code in a pickle runs)."""
    for index in SHARD_INDEXES:
        if (folder / index).exists() and not (folder / HF_SAFETENSORS).exists():
            raise MinigptError(
                f"{folder} holds a sharded checkpoint ({index}), which minigpt does not read",
                hint="save it as one file with transformers: "
                "model.save_pretrained(DIR, max_shard_size='100GB')",
            )
    path = folder / HF_SAFETENSORS
    if path.exists():
        try:
            with open(path, "rb"):  # safetensors reports an unreadable file as a missing one
                pass
            return load_file(str(path))
        except OSError as err:
            raise os_error(err, "read", path) from err
        except (SafetensorError, ValueError) as err:
            raise _damaged_weights(path, err) from err
    path = folder / HF_PICKLE
    if not path.exists():
        raise MinigptError(
            f"{folder} has no {HF_SAFETENSORS} or {HF_PICKLE}",
            hint="pass the folder `save_pretrained` wrote (config.json and the weights)",
        )
    if not is_torch_archive(path):
        raise _damaged_weights(path, ValueError("not a torch.save archive"))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise MinigptError(
            f"{path} holds objects other than tensors; refusing to unpickle it",
            hint="convert it to model.safetensors with transformers, or pass a trusted checkpoint",
        ) from err
    except OSError as err:
        raise os_error(err, "read", path) from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, KeyError) as err:
        raise _damaged_weights(path, err) from err
    _check_state_dict(state, path)
    return state


def _check_state_dict(state: object, path: Path) -> None:
    """A pickle may hold anything: only {parameter name: tensor} is a model's weights."""
    if isinstance(state, dict):
        odd = [(k, v) for k, v in state.items() if not isinstance(k, str) or not torch.is_tensor(v)]
        if not odd:
            return
        key, value = odd[0]
        why = (
            f"its key {key!r} is no parameter name"
            if not isinstance(key, str)
            else f"its {key} is of type {type(value).__name__}, not a tensor"
        )
    else:
        why = f"it holds a {type(state).__name__}"
    raise MinigptError(
        f"{path} does not hold a state dict of tensors ({why})",
        hint="save the model's state_dict() alone (transformers' save_pretrained does), "
        "not a training checkpoint or a list",
    )


def _damaged_weights(path: Path, err: BaseException) -> MinigptError:
    return MinigptError(
        f"{path} is not a readable weights file ({first_line(err)})",
        hint="the download is incomplete or the file is damaged; fetch it again",
    )


# --------------------------------------------------------------------------- sources


def read_hf_config(folder: Path) -> dict:
    path = folder / HF_CONFIG
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MinigptError(
            f"{folder} has no {HF_CONFIG}, so it is not a Hugging Face checkpoint",
            hint="pass the folder `save_pretrained` wrote, or a hub name such as gpt2",
        ) from None
    except OSError as err:
        raise os_error(err, "read", path) from err
    except (ValueError, RecursionError):
        raise MinigptError(f"{path} is not valid JSON", hint="the file is damaged") from None
    if not isinstance(hf, dict):
        raise MinigptError(f"{path} is not a JSON object", hint="the file is damaged")
    return hf


def resolve_source(source: str, cache_dir: Path | None = None) -> Path:
    """A local checkpoint folder, or the folder a hub name was downloaded into."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise MinigptError(
                f"{source} is a file, not a checkpoint folder",
                hint="pass the folder that holds config.json and the weights",
            )
        return path
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", source) or source.startswith((".", "/")):
        raise MinigptError(
            f"{source} is neither a folder nor a Hugging Face hub name",
            hint="pass a local checkpoint folder, or a hub name such as gpt2 or openai-community/gpt2",
        )
    owner = path.parent
    if owner != Path(".") and owner.is_dir():  # runs/nope: a path into a local folder
        names = sorted(p.name for p in owner.iterdir() if not p.name.startswith("."))
        raise MinigptError(
            f"there is no folder {source}: {owner} holds no {path.name}",
            hint=f"{owner} holds: {', '.join(names[:8]) or 'nothing'} (a hub name is "
            f"fetched only where no local folder {owner} exists)",
        )
    return download(source, cache_dir)


def download(repo_id: str, cache_dir: Path | None = None) -> Path:
    """Fetch a GPT-2 checkpoint's config, weights and tokenizer from the hub (cached by
    huggingface_hub): model.safetensors, or pytorch_model.bin where there is none."""
    # read by huggingface_hub when it is imported: no request may wait forever
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", str(HUB_TIMEOUT_S))
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", str(HUB_TIMEOUT_S))
    try:
        import huggingface_hub
    except ImportError:
        raise MinigptError(
            f"{repo_id!r} is not a local folder, and fetching it from the hub needs "
            "huggingface_hub, which is not installed",
            hint="pip install 'minigpt[hf]', or pass a local checkpoint folder",
        ) from None
    patterns = [HF_CONFIG, HF_GENERATION_CONFIG, HF_SAFETENSORS, *SHARD_INDEXES, *TOKENIZER_FILES]
    try:
        folder = Path(_snapshot(huggingface_hub, repo_id, patterns, cache_dir))
        if not (folder / HF_SAFETENSORS).exists() and not any(
            (folder / i).exists() for i in SHARD_INDEXES
        ):
            folder = Path(_snapshot(huggingface_hub, repo_id, [*patterns, HF_PICKLE], cache_dir))
    except Exception as err:  # noqa: BLE001 (the hub's errors differ by version and transport)
        raise _hub_error(repo_id, err) from err
    return folder


def _snapshot(hub, repo_id: str, patterns: list[str], cache_dir: Path | None) -> str:
    with interruptible():  # waiting on the network: a signal stops it at once
        return hub.snapshot_download(
            repo_id, allow_patterns=patterns, cache_dir=cache_dir, etag_timeout=HUB_TIMEOUT_S
        )


def _hub_error(repo_id: str, err: Exception) -> MinigptError:
    kind = type(err).__name__
    if "RepositoryNotFound" in kind or "GatedRepo" in kind:
        return MinigptError(
            f"there is no folder {repo_id}, and the hub has no public model {repo_id!r} "
            f"either ({kind})",
            hint="check the path or the name (e.g. gpt2, openai-community/gpt2-medium); "
            "a gated model needs `huggingface-cli login`",
        )
    return MinigptError(
        f"there is no folder {repo_id}, and could not fetch {repo_id!r} from the Hugging "
        f"Face hub, nor find it in the local cache ({kind})",
        hint="check the path; for a hub name, connect to the internet once, or pass a "
        "local checkpoint folder (one that transformers' save_pretrained wrote)",
    )


def load_hf_checkpoint(source: str, cache_dir: Path | None = None) -> Pretrained:
    """A GPT-2 checkpoint (folder or hub name) converted to minigpt's config, tokenizer
    and weights; anything minigpt cannot express is refused by name."""
    folder = resolve_source(source, cache_dir)
    local = Path(source).expanduser().exists()
    where = str(folder / HF_CONFIG) if local else f"the hub's {source} ({HF_CONFIG})"
    config = gpt_config_from_hf(read_hf_config(folder), where)
    tokenizer = tokenizer_from_hf(folder)
    if tokenizer.vocab_size > config.vocab_size:
        raise MinigptError(
            f"{source}'s tokenizer has {tokenizer.vocab_size:,} tokens, its model only "
            f"{config.vocab_size:,}",
            hint="the tokenizer files and config.json come from different models",
        )
    state = state_from_hf(read_hf_weights(folder), config, str(source))
    _check_finite(state, source)
    return Pretrained(source=source, config=config, tokenizer=tokenizer, state=state)


def _check_finite(state: dict[str, Tensor], source: str) -> None:
    bad = next((k for k, v in state.items() if not torch.isfinite(v).all()), None)
    if bad is not None:
        raise MinigptError(
            f"{source} holds NaN or infinite weights ({_hf_name(bad)})",
            hint="the checkpoint is damaged; fetch it again",
        )


def load_pretrained(source: str, cache_dir: Path | None = None) -> Pretrained:
    """What `train --init-from` starts from: a minigpt run directory (its best
    weights), a Hugging Face checkpoint folder, or a hub name."""
    path = Path(source).expanduser()
    if path.is_dir() and folder_kind(path) == RUN:
        run = load_run(path)
        state = {k: v for k, v in run.model.state_dict().items() if k != "lm_head.weight"}
        return Pretrained(str(source), run.model.config, run.tokenizer, state)
    return load_hf_checkpoint(source, cache_dir)


# --------------------------------------------------------------------------- import / export


def import_checkpoint(source: str, out_dir: Path, force: bool = False) -> Pretrained:
    """`minigpt import`: write a run directory (config.json, tokenizer.json,
    model.safetensors) that generate, inspect-heads, eval and train --init-from read."""
    out_dir = Path(out_dir)
    local = Path(source).expanduser()
    check_output(
        out_dir, command="import", writes=RUN, replaces=checkpoint.RUN_FILES, force=force,
        source=local if local.exists() else None,
    )  # fmt: skip
    loaded = load_hf_checkpoint(source)
    imported = {"imported_from": {"source": source, "architecture": "GPT2LMHeadModel"}}
    check()  # a signal stops the import before anything is written
    # a run being trained in out_dir is not replaced under its trainer
    lock = RunLock(out_dir) if out_dir.is_dir() else contextlib.nullcontext()
    with lock, staged_folder(out_dir, replaces=REPLACED_FILES, last=CONFIG_FILE) as staging:
        checkpoint.write_run(staging, loaded.config, loaded.state, loaded.tokenizer, imported)
        check()  # a signal while it wrote: the staging folder is discarded, not moved in
    return loaded


@dataclass
class Export:
    """What `export_run` wrote."""

    out_dir: Path
    files: list[str]
    tokenizer_note: str | None
    """Why no tokenizer files were written, or None when they were."""


def export_run(run_dir: Path, out_dir: Path, force: bool = False) -> Export:
    """`minigpt export`: a folder that transformers' AutoModelForCausalLM and
    AutoTokenizer load, with the run's best weights."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    read_config(run_dir)  # a clear error for a folder that is not a run
    check_output(
        out_dir, command="export", writes=HF_CHECKPOINT, replaces=EXPORT_REPLACES, force=force,
        source=run_dir,
    )  # fmt: skip
    run = load_run(run_dir)
    config, tokenizer = run.model.config, run.tokenizer
    byte_level = _byte_level(tokenizer)
    eot = byte_level.eot_id if byte_level is not None else None
    hf_config = hf_config_from_gpt(config, eot)
    hf_state = state_to_hf(run.model.state_dict(), config)
    generation = {"bos_token_id": eot, "eos_token_id": eot} if eot is not None else {}
    check()  # a signal stops the export before anything is written
    with staged_folder(out_dir, replaces=EXPORT_REPLACES, last=HF_CONFIG) as staging:
        with atomic_path(staging / HF_SAFETENSORS) as tmp:
            save_file(hf_state, str(tmp), metadata={"format": "pt"})
        write_json_atomic(staging / HF_GENERATION_CONFIG, generation)
        files = [HF_CONFIG, HF_SAFETENSORS, HF_GENERATION_CONFIG]
        if byte_level is not None:
            files += write_hf_tokenizer(byte_level, staging, model_max_length=config.block_size)
        write_json_atomic(staging / HF_CONFIG, hf_config)
        check()  # a signal while it wrote: the staging folder is discarded, not moved in
    if byte_level is None:
        note = (
            f"the run's {tokenizer.kind} tokenizer has no Hugging Face equivalent, so only "
            "the weights were exported"
        )
        return Export(out_dir, files, note)
    return Export(out_dir, files, None)


def _byte_level(tokenizer: Tokenizer) -> BPETokenizer | None:
    """The run's tokenizer as a byte-level BPE with <|endoftext|> after its merges, if
    it is one: minigpt's bpe, the gpt2 (r50k) encoding, an imported GPT-2's."""
    if isinstance(tokenizer, BPETokenizer):
        return tokenizer
    if isinstance(tokenizer, NamedTokenizer) and tokenizer.kind in ("gpt2", "r50k_base"):
        # tiktoken keeps an encoding's ranks and split private; they are GPT-2's own
        ranks = getattr(tokenizer.encoding, "_mergeable_ranks", None)
        pattern = getattr(tokenizer.encoding, "_pat_str", None)
        return BPETokenizer(ranks, pattern) if ranks and pattern else None
    return None  # char, or cl100k/o200k, whose special tokens GPT-2's layout cannot hold
