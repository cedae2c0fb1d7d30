"""Teacher and student builders, and checkpoints as safetensors + a JSON config (never pickle)."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline import strict_json
from pipeline.config import ModelConfig, Paths, Preset
from pipeline.data.split import Split
from pipeline.errors import KDError

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def cnn1d(
    num_classes: int, input_shape: Sequence[int], channels: int = 32, dropout: float = 0.0
) -> nn.Module:
    """The MNIST-1D paper's 1D CNN: three strided convs (kernel 5, 3, 3) and a linear head."""
    (length,) = input_shape
    out_len = length
    for kernel in (5, 3, 3):
        out_len = (out_len + 2 - kernel) // 2 + 1
    return nn.Sequential(
        nn.Unflatten(1, (1, length)),  # (B, L) -> (B, 1, L)
        nn.Conv1d(1, channels, 5, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv1d(channels, channels, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv1d(channels, channels, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Dropout(dropout),
        nn.Linear(channels * out_len, num_classes),
    )


def mlp(
    num_classes: int, input_shape: Sequence[int], hidden: Sequence[int] = (256, 256), dropout: float = 0.0
) -> nn.Module:
    """A plain ReLU MLP over flattened inputs."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = 1
    for size in input_shape:
        width *= size
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(dropout)]
        width = size
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:  # projection shortcut (option B)
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


def cifar_resnet(num_classes: int, input_shape: Sequence[int], depth: int = 20, width: int = 16) -> nn.Module:
    """The CIFAR ResNets of He et al. 2016 used by the KD papers: depth 6n+2, three stages of n basic
    blocks with width, 2*width, 4*width channels (16/32/64 by default), global pooling, linear head."""
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2 (8, 20, 56, 110, ...), got {depth}")
    n = (depth - 2) // 6
    channels = input_shape[0]
    layers: list[nn.Module] = [
        nn.Conv2d(channels, width, 3, 1, 1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
    ]
    c_in = width
    for stage, c_out in enumerate((width, 2 * width, 4 * width)):
        for block in range(n):
            layers.append(_BasicBlock(c_in, c_out, 2 if stage > 0 and block == 0 else 1))
            c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes)]
    return nn.Sequential(*layers)


class CausalLM(nn.Module):
    """A Hugging Face causal language model taking (B, L) int64 token ids -> next-token logits (B, L, V).
    `vocab`: the tokenizer's size when the checkpoint's output has padding rows past it (Qwen-style
    checkpoints pad 151,646 tokens to 151,936 or 152,064 rows): those ids are never tokens, so their
    logits are dropped and every model sees V = the tokenizer's vocabulary."""

    def __init__(self, model: nn.Module, vocab: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.vocab = vocab

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids=input_ids).logits
        return logits if self.vocab is None else logits[..., : self.vocab]


def gpt(
    num_classes: int, input_shape: Sequence[int], layers: int = 2, width: int = 128, heads: int = 4
) -> nn.Module:
    """A small GPT-2 (transformers' GPT2 built from a config, random init, no dropout): vocabulary =
    num_classes, context = input_shape[0]. Untied embeddings, so safetensors holds every weight once."""
    from transformers import AutoModelForCausalLM, GPT2Config

    config = GPT2Config(
        vocab_size=num_classes,
        n_positions=int(input_shape[0]),
        n_embd=width,
        n_layer=layers,
        n_head=heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=False,
        bos_token_id=0,  # the data's <|endoftext|> (lm_data: the first special token)
        eos_token_id=0,
    )
    return CausalLM(AutoModelForCausalLM.from_config(config))


def _hf_causal_lm(name_or_path: str, num_classes: int, input_shape: Sequence[int]) -> nn.Module:
    """AutoModelForCausalLM from a hub id or a local save_pretrained folder."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path)
    except Exception as err:  # offline hub ids, missing folders
        raise KDError(
            f"cannot load causal language model '{name_or_path}' ({type(err).__name__}): offline, pass "
            "the path of a local save_pretrained folder"
        ) from None
    rows = model.get_output_embeddings().weight.shape[0]
    return CausalLM(model, vocab=num_classes if rows > num_classes else None)  # padding rows: dropped


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "cnn1d": cnn1d,
    "mlp": mlp,
    "cifar_resnet": cifar_resnet,
    "resnet8": functools.partial(cifar_resnet, depth=8),
    "resnet20": functools.partial(cifar_resnet, depth=20),
    "resnet56": functools.partial(cifar_resnet, depth=56),
    "resnet110": functools.partial(cifar_resnet, depth=110),
    "gpt": gpt,  # language models (dataset lm-text)
}


def teacher_precision(device: torch.device, precision: str) -> str:
    """The precision a teacher runs in: `cache.precision` (bf16, fp16 or fp32) on a GPU, fp32 elsewhere."""
    return precision if device.type == "cuda" else "fp32"


def teacher_autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast for a teacher's forward pass in `teacher_precision(device, precision)`: stage 1 and the
    online teacher both run under it, so online and cached targets are the same numbers."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(teacher_precision(device, precision))
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def prefers_channels_last(model: nn.Module) -> bool:
    """Conv nets over images run faster in channels_last (measured ~1.5x on CPU here)."""
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def build_model(cfg: ModelConfig, num_classes: int, input_shape: Sequence[int]) -> nn.Module:
    """A model by architecture name: one of ARCHITECTURES, `torchvision:<name>` (torchvision.models,
    random init unless options.weights names torchvision weights), or `package.module:factory`, a
    function called as factory(num_classes=..., input_shape=..., **options) for anything else."""
    builder = _builder(cfg.arch)
    try:
        model = builder(num_classes, tuple(input_shape), **dict(cfg.options))
    except (TypeError, ValueError) as err:
        unknown = re.search(r"unexpected keyword argument '(\w+)'", str(err))
        why = (
            f"it takes no option '{unknown.group(1)}' (options written for another architecture? clear them "
            "with --set student.options={} or --set teacher.model.options={})"
            if unknown
            else str(err)
        )
        raise KDError(f"cannot build '{cfg.arch}' with options {dict(cfg.options)}: {why}") from None
    if not isinstance(model, nn.Module):
        raise KDError(f"'{cfg.arch}' returned a {type(model).__name__}, not a torch.nn.Module")
    return model


@torch.no_grad()
def check_outputs(
    model: nn.Module, inputs: torch.Tensor, num_classes: int, role: str, arch: str, per_row: tuple = ()
) -> None:
    """One forward pass on two samples (CPU, eval mode) before any training: the model must give one
    logit per class. A student with the wrong head would train on a mismatched target or fail mid-epoch."""
    was_training = model.training
    model.eval()
    try:
        out = model(inputs[:2])
    except Exception as err:  # a user's factory: any error, in one line
        raise KDError(
            f"the {role} '{arch}' fails on the data's inputs {tuple(inputs.shape[1:])}: "
            f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        ) from None
    finally:
        model.train(was_training)
    want = (min(2, len(inputs)), *per_row, num_classes)  # per_row: (L,) for token sequences
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != want:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        what = "tokens in its vocabulary" if per_row else "classes"
        raise KDError(
            f"the {role} '{arch}' returns {shape} for 2 samples, but the data has {num_classes} {what}: it "
            f"must return logits of shape ({', '.join(map(str, ('batch', *per_row, num_classes)))})"
        )


def _builder(arch: str) -> Callable[..., nn.Module]:
    if arch in ARCHITECTURES:
        return ARCHITECTURES[arch]
    if arch.startswith("hf-lm:"):
        return functools.partial(_hf_causal_lm, arch.split(":", 1)[1])
    if arch.startswith("hf:"):
        return functools.partial(_hf_model, arch.split(":", 1)[1])
    if arch.startswith("torchvision:"):
        return functools.partial(_torchvision_model, arch.split(":", 1)[1])
    if ":" in arch:
        module_name, _, attr = arch.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise KDError(f"cannot load model factory '{arch}': {err}") from None
        return lambda num_classes, input_shape, **options: factory(
            num_classes=num_classes, input_shape=input_shape, **options
        )
    raise KDError(
        f"unknown architecture '{arch}': choose one of {', '.join(sorted(ARCHITECTURES))}, "
        "torchvision:<name> or package.module:factory"
    )


class HFClassifier(nn.Module):
    """A Hugging Face sequence classifier taking (B, 2, L) int64 [input_ids; attention_mask] -> (B, C)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=inputs[:, 0], attention_mask=inputs[:, 1]).logits


def check_fits_data(model: nn.Module, split: Any, role: str, arch: str) -> None:
    """Before any training: the model reads the split's inputs (text: the same vocabulary) and returns one
    logit per class. `split`: a pipeline.data.datasets.Split."""
    if isinstance(model, CausalLM):
        check_lm_vocabulary(model, split, role, arch)
    else:
        check_vocabulary(model, split.inputs, split.preprocessing.get("tokenizer"), role)
    check_outputs(model, split.inputs, split.num_classes, role, arch, tuple(split.labels.shape[1:]))


def check_teacher_tokenizer(folder: Path, split: Any) -> None:
    """A language-model teacher reads the token ids of the tokenizer it was trained with (its folder's
    tokenizer.json): data tokenized otherwise would be scored as garbage, without an error. The built-in
    text changes with the Python version, and a BPE trained on other text has other ids."""
    theirs = split.preprocessing.get("tokenizer_fingerprint")
    own = folder / "tokenizer.json"
    if not theirs or not own.is_file():
        return
    from pipeline.data.lm_data import tokenizer_file_fingerprint

    mine = tokenizer_file_fingerprint(own)
    if mine != theirs:
        raise KDError(
            f"the teacher at {folder} was trained with tokenizer {mine[:12]} but the data is tokenized with "
            f"{theirs[:12]} ({split.preprocessing.get('tokenizer')}, on {split.preprocessing.get('text')}): "
            f"set dataset.options.tokenizer={own} to read the data as the teacher does, or retrain it "
            "(kd train-teacher --force)"
        )


def check_lm_vocabulary(model: CausalLM, split: Any, role: str, arch: str) -> None:
    """A student language model shares the teacher's tokenizer (the data's: same vocabulary, same ids):
    its embedding table must have the tokenizer's size, and a tokenizer.json saved beside it must be the
    very same tokenizer. A table larger than the tokenizer is accepted when that tokenizer.json is the
    data's: the rows past its vocabulary are padding (Qwen-style checkpoints), their logits dropped."""
    from pipeline.data.lm_data import tokenizer_file_fingerprint

    data_tokenizer = split.preprocessing.get("tokenizer") or "the data's tokenizer"
    size = model.model.get_input_embeddings().num_embeddings
    fix = f"{role}s share the teacher's tokenizer: build the {role} with the data's vocabulary"
    folder = Path(str(getattr(model.model.config, "_name_or_path", "") or "-"))
    own = folder / "tokenizer.json"
    theirs = split.preprocessing.get("tokenizer_fingerprint")
    mine = tokenizer_file_fingerprint(own) if theirs and own.is_file() else None
    if mine is not None and mine != theirs:
        raise KDError(
            f"the {role} '{arch}' comes with tokenizer {own} ({mine[:12]}), not the data's tokenizer "
            f"({data_tokenizer}, {theirs[:12]}): {fix}"
        )
    padded = mine is not None and model.vocab == split.num_classes < size  # the same tokenizer, padded
    if size != split.num_classes and not padded:
        raise KDError(
            f"the {role} '{arch}' has a vocabulary of {size} tokens but the data's tokenizer "
            f"({data_tokenizer}) has {split.num_classes}: {fix}"
            + (
                " (rows past the tokenizer's are taken as padding only beside its tokenizer.json)"
                if size > split.num_classes
                else ""
            )
        )


def check_vocabulary(model: nn.Module, inputs: Any, tokenizer: str | None, role: str) -> None:
    """A Hugging Face model must read the data's token ids: its embedding table covers every id and,
    when its own tokenizer can be loaded, that tokenizer has the same vocabulary as the data's. A student
    shares the teacher's tokenizer (same vocabulary and ids). inputs (N, 2, L) [input_ids; mask]."""
    if not isinstance(model, HFClassifier) or tokenizer is None:
        return
    name = str(getattr(model.model.config, "_name_or_path", "") or "the model")
    size = model.model.get_input_embeddings().num_embeddings
    held = inputs if isinstance(inputs, torch.Tensor) else inputs[: min(len(inputs), 4096)]  # a sample
    top = int(held[:, 0].max())
    fix = f"use a {role} built with tokenizer '{tokenizer}' (students share the teacher's tokenizer)"
    if top >= size:
        raise KDError(
            f"the {role} '{name}' has a vocabulary of {size} tokens but the data, tokenized with "
            f"'{tokenizer}', has token ids up to {top}: {fix}"
        )
    from transformers import AutoTokenizer

    try:
        own, data = AutoTokenizer.from_pretrained(name), AutoTokenizer.from_pretrained(tokenizer)
    except Exception:  # no tokenizer files beside the model (or offline): the size check is what we have
        return
    if own.get_vocab() != data.get_vocab():
        raise KDError(
            f"the {role} '{name}' uses another vocabulary ({len(own)} tokens) than the data's tokenizer "
            f"'{tokenizer}' ({len(data)} tokens): {fix}"
        )


def _hf_model(name_or_path: str, num_classes: int, input_shape: Sequence[int]) -> nn.Module:
    """AutoModelForSequenceClassification from a hub id or a local save_pretrained folder."""
    from transformers import AutoModelForSequenceClassification

    try:
        model = AutoModelForSequenceClassification.from_pretrained(name_or_path, num_labels=num_classes)
    except Exception as err:  # offline hub ids, missing folders
        raise KDError(
            f"cannot load Hugging Face model '{name_or_path}' ({type(err).__name__}): offline, pass the path "
            "of a local save_pretrained folder"
        ) from None
    return HFClassifier(model)


def _torchvision_model(
    name: str, num_classes: int, input_shape: Sequence[int], weights: str | None = None
) -> nn.Module:
    import torchvision

    if name not in torchvision.models.list_models():
        raise KDError(f"unknown torchvision model '{name}': see torchvision.models.list_models()")
    if weights is None:
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    try:  # pretrained weights keep their own head size: the classes must match
        model = torchvision.models.get_model(name, weights=weights)
    except Exception as err:  # offline: the download fails
        raise KDError(
            f"cannot load torchvision weights '{weights}' for {name} ({type(err).__name__}): they "
            "download on first use; offline, put them in the torch hub cache or leave weights unset"
        ) from None
    return model


def architecture_record(cfg: ModelConfig, num_classes: int, input_shape: Sequence[int]) -> dict[str, Any]:
    """Everything needed to rebuild the module (saved beside the weights, hashed into the fingerprint)."""
    return {**cfg.to_dict(), "num_classes": num_classes, "input_shape": list(input_shape)}


def fingerprint(model: nn.Module, architecture: dict[str, Any]) -> str:
    """sha256 of the architecture record and every weight, in name order."""
    digest = hashlib.sha256(json.dumps(architecture, sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_checkpoint(
    folder: Path, model: nn.Module, architecture: dict[str, Any], info: dict[str, Any]
) -> None:
    """Write model.safetensors and config.json (architecture + `info`) into `folder`, atomically each."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {
        k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()
    }  # no shared storage
    tmp = folder / (WEIGHTS_FILE + ".tmp")
    save_file(state, str(tmp))
    os.chmod(tmp, 0o666 & ~_umask())  # safetensors writes 0600: teammates must read a shared teacher
    tmp.replace(folder / WEIGHTS_FILE)
    record = {"architecture": architecture, **info}
    tmp = folder / (CONFIG_FILE + ".tmp")
    tmp.write_text(strict_json.dumps(record, indent=2) + "\n")
    tmp.replace(folder / CONFIG_FILE)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def checkpoint_architecture(folder: Path) -> dict[str, Any]:
    """The architecture record a checkpoint's config.json holds (without building the model)."""
    return json.loads((folder / CONFIG_FILE).read_text())["architecture"]


def check_same_teacher(architecture: dict[str, Any], preset: Preset, what: str) -> None:
    """Refuse a teacher (checkpoint or cache) under the preset's teacher.name that was built as another
    architecture than the preset's teacher.model: changing the model's settings must not silently reuse
    the old teacher and its logits."""
    built = {"arch": architecture.get("arch"), "options": dict(architecture.get("options") or {})}
    wanted = preset.teacher.model.to_dict()
    if built != wanted:
        raise KDError(
            f"{what} is teacher '{preset.teacher.name}' built as {built['arch']} {built['options']}, but "
            f"the preset's teacher.model is {wanted['arch']} {wanted['options']}: retrain it with `kd "
            f"train-teacher --preset {preset.command_name} --force` (then `kd teacher-logits`), or "
            "give the new teacher its own teacher.name"
        )


def load_checkpoint(folder: Path, *, trusted_arch: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the module from config.json and load its safetensors weights. A checkpoint naming a
    `package.module:factory` runs that code, so it is built only when `trusted_arch` (the user's own
    preset) names the same factory: reading someone else's checkpoint never imports their code."""
    weights, config = folder / WEIGHTS_FILE, folder / CONFIG_FILE
    if not (weights.is_file() and config.is_file()):
        raise KDError(f"no checkpoint at {folder} (expected {WEIGHTS_FILE} and {CONFIG_FILE})")
    record = json.loads(config.read_text())
    arch = record["architecture"]
    factory = ":" in arch["arch"] and not arch["arch"].startswith("torchvision:")
    if factory and arch["arch"] != trusted_arch:
        raise KDError(
            f"checkpoint {folder} is built by code ('{arch['arch']}'): name that architecture in your "
            "preset's teacher.model.arch to trust it"
        )
    with torch.random.fork_rng(devices=[]):  # its random init is overwritten: draws nothing a student would
        model = build_model(
            ModelConfig(arch=arch["arch"], options=arch["options"]), arch["num_classes"], arch["input_shape"]
        )
    try:
        model.load_state_dict(load_file(str(weights)))
    except RuntimeError as err:
        raise KDError(
            f"checkpoint {weights} does not fit its config.json: {str(err).splitlines()[0]}"
        ) from None
    return model, record


def online_teacher(
    preset: Preset, paths: Paths, train: Split, device: torch.device
) -> tuple[torch.nn.Module, str]:
    """The preset's teacher checkpoint, for online KD (the teacher runs on every augmented batch)."""
    folder = paths.teachers / preset.teacher.name
    if not (folder / WEIGHTS_FILE).is_file():
        raise KDError(
            f"online KD needs the teacher checkpoint, and there is none at {folder}: run "
            f"`kd train-teacher --preset {preset.command_name}` first"
        )
    check_same_teacher(checkpoint_architecture(folder), preset, str(folder))
    teacher, _ = load_checkpoint(folder, trusted_arch=preset.teacher.model.arch)
    check_teacher_tokenizer(folder, train)
    check_fits_data(teacher, train, "teacher", preset.teacher.model.arch)
    return teacher.to(device).eval(), preset.teacher.name
