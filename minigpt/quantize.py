"""Weight-only int8 for sampling and evaluation on a CPU, through torchao.

At batch 1 a GPT-2-sized model's decode step is bound by memory: every token reads
every weight once and does two FLOPs per weight it reads. Int8 weights, each row with its own scale, are a quarter of the
bytes. torchao's `Int8WeightOnlyConfig` quantizes the linear layers; the matmul
that reads int8 weights is inductor's: it recognises torchao's int8 linear in the
compiled decode step (`minigpt.fast_decode`) and calls the CPU's int8 kernel. That
kernel takes bfloat16 activations, so each int8 linear rounds its input to bfloat16
(`Int8Linear`); its output, the residual stream, the norms, attention and the KV
cache stay float32. Eager torchao dequantizes each weight whole at every call,
which is slower than float32: an int8 model samples through the compiled step.

The token embedding is the LM head's matrix (weight tying), so it is quantized
once, with the head: `Int8Embedding` reads a token's row and its scale.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minigpt.errors import MinigptError
from minigpt.model import GPT

QUANTIZE_CHOICES = ("int8",)
INSTALL_HINT = "pip install 'minigpt[int8]' (torchao)"


class Int8Linear(nn.Module):
    """A linear layer whose weight is torchao's int8: x (..., in) -> (..., out). Its
    input is rounded to bfloat16, the activations the CPU's int8 kernel takes; its
    output and the bias stay in x's dtype, as does everything around it."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x.to(torch.bfloat16), self.weight).to(x.dtype)
        return y if self.bias is None else y + self.bias


class Int8Embedding(nn.Module):
    """Token ids (B, T) -> their rows of an int8 matrix (B, T, n_embd), each row times
    its scale: the LM head's int8 weight read as the token embedding."""

    def __init__(self, weight: Tensor):
        super().__init__()
        self.weight = weight  # torchao's Int8Tensor (vocab_size, n_embd), per-row scales

    def forward(self, idx: Tensor) -> Tensor:
        dtype = self.weight.dtype  # what the int8 matrix stands for: the model's dtype
        rows = F.embedding(idx, self.weight.qdata)  # (B, T, n_embd) int8
        scales = F.embedding(idx, self.weight.scale.reshape(-1, 1))  # (B, T, 1)
        return rows.to(dtype) * scales.to(dtype)


def check_quantize(quantize: str | None, device: torch.device, dtype: str = "auto") -> None:
    """Refuse what int8 weights cannot do here, before any model is loaded."""
    if quantize is None:
        return
    if quantize not in QUANTIZE_CHOICES:
        raise MinigptError(
            f"unknown quantization {quantize!r}",
            hint="the one choice is int8 (weight-only, for a CPU)",
            param="quantize",
        )
    if device.type != "cpu":
        raise MinigptError(
            f"int8 weights are for sampling on a CPU; the device is {device.type}",
            hint="pass --device cpu (on a GPU, generate --dtype bfloat16 halves the bytes)",
            param="quantize",
        )
    if dtype != "auto":
        raise MinigptError(
            f"--quantize int8 and --dtype {dtype} both set the weights' type",
            hint="leave out --dtype: around its int8 weights the model stays float32",
            param="quantize",
        )
    _torchao()


def quantize_int8(model: GPT) -> GPT:
    """Make the model's linear weights int8 in place (torchao, weight-only, one scale
    per row), the rest as it is; the model is for inference from then on."""
    if model.device.type != "cpu":
        raise MinigptError(
            f"int8 weights are for sampling on a CPU; the model is on {model.device.type}",
            hint="move the model to the CPU first, or use bfloat16 on a GPU",
            param="quantize",
        )
    if is_int8(model):
        raise MinigptError("the model's weights are int8 already", hint="quantize it once")
    quantize_, config = _torchao()
    model.eval().requires_grad_(False)
    tied = model.lm_head.weight is model.tok_emb.weight
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    quantize_(model, config, filter_fn=lambda module, name: isinstance(module, nn.Linear))
    for name in linears:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, child, Int8Linear(getattr(owner, child)))
    if tied:  # quantize_ gave the head a new weight: the embedding reads the same one
        model.tok_emb = Int8Embedding(model.lm_head.weight)
    return model


def is_int8(model: nn.Module) -> bool:
    """Whether any of the model's weights is int8 (a torchao tensor)."""
    return any(type(p).__name__ == "Int8Tensor" for p in model.parameters())


def weight_bytes(model: nn.Module) -> int:
    """The bytes the model's weights and buffers hold in memory, each storage once (a
    tied matrix counts once; an int8 tensor counts its int8 data and its scales)."""
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        inner = (
            [getattr(tensor, name) for name in tensor.__tensor_flatten__()[0]]
            if hasattr(tensor, "__tensor_flatten__")
            else [tensor]
        )
        for t in inner:
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def _torchao():
    """torchao's quantize_ and Int8WeightOnlyConfig, or one sentence on installing it."""
    # torchao reports optional kernels it cannot load (CUDA-only ones) at import, and
    # torch warns about one of its registrations: neither concerns a CPU user.
    quiet = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [log.level for log in quiet]
    for log in quiet:
        log.setLevel(logging.ERROR)
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError:
        raise MinigptError(
            "--quantize int8 needs torchao, which is not installed", hint=INSTALL_HINT
        ) from None
    finally:
        for log, level in zip(quiet, levels, strict=True):
            log.setLevel(level)
    return quantize_, Int8WeightOnlyConfig()
