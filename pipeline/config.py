"""Typed, frozen configuration: presets are TOML files read into these dataclasses.

A preset names the dataset, the teacher (architecture + how to train it), the student, the cache's
storage options and the distillation defaults. CLI overrides go through `with_overrides`, which checks
each value against the field's type, and every dataclass validates itself in `__post_init__`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from pipeline.data.augment import AugmentSpec, views_record
from pipeline.distill import methods
from pipeline.distill.methods import METHODS
from pipeline.errors import KDError

PRESET_DIR = Path(__file__).parent / "presets"
STORAGE_DTYPES = ("float16", "bfloat16", "float32")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise KDError(message)


@dataclass(frozen=True)
class DatasetConfig:
    name: str = "mnist1d"
    num_samples: int = 5000  # generated datasets: total rows before their 80/20 split (0: not used)
    seed: int = 42  # generation seed of the data itself, not of training
    val_size: int = 500  # rows carved from train (deterministically) to select checkpoints
    options: Mapping[str, Any] = field(default_factory=dict)  # builder-specific, e.g. synthetic shapes
    # file-backed sources (imagefolder, npy): read whole into memory (once, by the workers) when their
    # float32 inputs fit this many MB, else read by DataLoader workers as each batch asks
    memory_budget_mb: int = 1024
    workers: int = -1  # DataLoader workers decoding file-backed inputs; -1: the CPU count less one (max 8)

    def __post_init__(self) -> None:
        _require(self.num_samples >= 0, f"dataset.num_samples must be >= 0, got {self.num_samples}")
        _require(self.val_size >= 1, f"dataset.val_size must be at least 1, got {self.val_size}")
        _require(
            self.memory_budget_mb >= 0, f"dataset.memory_budget_mb must be >= 0, got {self.memory_budget_mb}"
        )
        _require(self.workers >= -1, f"dataset.workers must be -1 (auto) or >= 0, got {self.workers}")


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "mlp"
    options: Mapping[str, Any] = field(default_factory=dict)  # passed to the architecture builder

    def to_dict(self) -> dict[str, Any]:
        return {"arch": self.arch, "options": dict(self.options)}


@dataclass(frozen=True)
class OptimConfig:
    epochs: int = 30
    lr: float = 1e-2
    weight_decay: float = 0.0
    batch_size: int = 128
    optimizer: str = "adamw"  # adamw | sgd
    momentum: float = 0.9  # sgd only
    nesterov: bool = False  # sgd only; the papers' code uses plain momentum
    schedule: str = "cosine"  # cosine | linear (to 0) | constant | step (x0.1 at 50% and 75%, the papers')
    # fresh augmentation of each batch: none | crop-flip (images) | shift | shift-zero (1-D signals); with
    # a view cache (cache.augment) the student gets the cached views replayed instead
    augment: str = "none"
    augment_pad: int = 4  # crop-flip padding, or the largest shift

    def __post_init__(self) -> None:
        AugmentSpec(self.augment, self.augment_pad)  # checks both
        _require(self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}")
        _require(self.lr > 0, f"lr must be positive, got {self.lr}")
        _require(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        _require(self.batch_size >= 1, f"batch_size must be at least 1, got {self.batch_size}")
        _require(
            self.optimizer in ("adamw", "sgd"), f"unknown optimizer '{self.optimizer}': use adamw or sgd"
        )
        _require(0.0 <= self.momentum < 1.0, f"momentum must be in [0, 1), got {self.momentum}")
        _require(
            self.schedule in ("cosine", "linear", "constant", "step"),
            f"unknown schedule '{self.schedule}': use cosine, linear, constant or step",
        )


@dataclass(frozen=True)
class TeacherConfig:
    name: str = "teacher"  # checkpoint folder under data/teachers/ and the cache's teacher name
    model: ModelConfig = field(default_factory=ModelConfig)
    train: OptimConfig = field(default_factory=OptimConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        _require(
            bool(re.match(r"^[A-Za-z0-9][A-Za-z0-9_.+=,-]*$", self.name)) and ".." not in self.name,
            f"teacher.name '{self.name}' is not allowed: use letters, digits and _ . + = , - (no '/', '..')",
        )


@dataclass(frozen=True)
class CacheConfig:
    dtype: str = "float16"  # storage dtype of the raw logits
    chunk_rows: int = 0  # rows per chunk, the unit of reading; 0: about 1 MiB of logits per chunk
    shard_chunks: int = 16  # chunks per shard: a shard is the unit of writing
    codec: str = "zstd"  # zstd | blosc-zstd (byte shuffle) | blosc-bitshuffle: see `make bench` for sizes
    zstd_level: int = 3
    batch_size: int = 512  # teacher inference batch
    precision: str = (
        "bf16"  # teacher inference on GPU: bf16 | fp16 autocast, or fp32; the CPU always runs fp32
    )
    # Views (README "Augmented views"): K augmented views per sample, each with its parameters, so the
    # student can replay the exact input the teacher saw. none: the one fixed, un-augmented view.
    augment: str = "none"  # none | crop-flip | shift | shift-zero | random-resized-crop (data/augment.py)
    augment_pad: int = 4  # crop-flip padding, or the largest shift
    # K views per sample, or "all": every view of the augmentation (the default: a few views per sample
    # cut the student's input diversity and were measured to lose to the fixed view, README)
    views: int | str = "all"
    view_seed: int = 0  # which K views: a pure function of (view_seed, sample id, view index)
    # dense: every logit. topk: the sparse layout (README "Language models"; store/sparse.py), for many-class
    # teachers; language-model teachers (dataset lm-text) always store it, per token
    layout: str = "dense"
    topk: int = 32  # the k largest raw logits and their token (class) ids
    lse_temperatures: list[float] = field(default_factory=lambda: [1.0])  # full-row logsumexp at each
    samples: int = 0  # S tokens drawn from the teacher's softmax, with their raw logits (0: none)
    sample_seed: int = 0

    def __post_init__(self) -> None:
        AugmentSpec(self.augment, self.augment_pad)  # checks both
        _require(self.topk >= 1, f"cache.topk must be at least 1, got {self.topk}")
        _require(self.layout in ("dense", "topk"), f"cache.layout must be dense or topk, got '{self.layout}'")
        _require(
            bool(self.lse_temperatures) and all(t > 0 for t in self.lse_temperatures),
            f"cache.lse_temperatures must list positive temperatures, got {self.lse_temperatures}",
        )
        _require(self.samples >= 0, f"cache.samples must be >= 0, got {self.samples}")
        _require(
            self.views == "all" or (isinstance(self.views, int) and self.views >= 1),
            f'cache.views must be a positive number or "all", got {self.views!r}',
        )
        _require(
            self.precision in ("bf16", "fp16", "fp32"),
            f"cache.precision must be bf16, fp16 or fp32, got '{self.precision}'",
        )
        _require(
            self.dtype in STORAGE_DTYPES,
            f"unknown cache dtype '{self.dtype}': choose one of {', '.join(STORAGE_DTYPES)}",
        )
        _require(self.chunk_rows >= 0, f"cache.chunk_rows must be >= 0 (0: automatic), got {self.chunk_rows}")
        _require(self.shard_chunks >= 1, f"cache.shard_chunks must be at least 1, got {self.shard_chunks}")
        _require(
            self.codec in ("zstd", "blosc-zstd", "blosc-bitshuffle"),
            f"unknown cache codec '{self.codec}': choose zstd, blosc-zstd or blosc-bitshuffle",
        )
        _require(1 <= self.zstd_level <= 22, f"cache.zstd_level must be in 1..22, got {self.zstd_level}")
        _require(self.batch_size >= 1, f"cache.batch_size must be at least 1, got {self.batch_size}")

    def check(self) -> None:
        """Checks across the view settings, once every override is applied (their order never matters)."""
        spec = self.augment_spec
        _require(
            not (spec.on_files and self.views == "all"),
            f"cache.views = \"all\" but augment '{spec.kind}' has a continuous space of views: set "
            "cache.views to the number of views to draw per sample (e.g. 10)",
        )
        _require(
            spec.kind != "none" or self.views in (1, "all"),
            f'cache.views = {self.views!r} needs an augmentation: set cache.augment (e.g. "crop-flip")',
        )
        _require(
            not isinstance(self.views, int) or self.views <= spec.space,
            f"cache.views = {self.views} but augment '{spec.kind}' (pad {spec.pad}) has only {spec.space} "
            f'distinct views: use views = "all" or fewer',
        )

    @property
    def augment_spec(self) -> AugmentSpec:
        return AugmentSpec(self.augment, self.augment_pad)

    def sparse_for(self, split: Any) -> dict[str, Any]:
        """The manifest's sparse entry of a language-modelling split's cache ({}: not token sequences).
        `split`: a pipeline.data.datasets.Split."""
        if split.task != "sequence" and self.layout != "topk":
            return {}
        from pipeline.store.sparse import sparse_record

        length = int(split.labels.shape[1]) if split.task == "sequence" else 0  # 0: one label a row
        temps = self.lse_temperatures
        return sparse_record(self.topk, temps, self.samples, self.sample_seed, length, split.num_classes)

    def views_for(self, split: str) -> dict[str, Any]:
        """The manifest's views entry of a split's cache ({}: the dense layout). The train split gets the
        augmented views; the test split is evaluated on fixed inputs, so its cache keeps the fixed view."""
        return views_record(self.augment_spec, self.views, self.view_seed) if split == "train" else {}

    def chunk_rows_for(self, num_classes: int) -> int:
        """chunk_rows, or when 0 a power of two near 1 MiB of uncompressed logits (at least 256 rows):
        small chunks cost a call each, measured 5-10x slower to read (`make bench`)."""
        if self.chunk_rows:
            return self.chunk_rows
        itemsize = 4 if self.dtype == "float32" else 2
        return max(256, 1 << ((2**20 // (num_classes * itemsize)).bit_length() - 1))


SCHEDULE_KINDS = ("constant", "linear", "cosine", "step")
MSE_REDUCTIONS = ("sum", "mean")


@dataclass(frozen=True)
class AnnealingConfig:
    """Annealing-KD (Jafari et al., EACL 2021): phase 1 MSE to phi(T)*z_t with T from tau_max down to 1,
    phase 2 CE from the best phase-1 checkpoint with a fresh optimizer and LR schedule."""

    tau_max: int = 10
    phase1_epochs: int = 30  # >= tau_max; phase 2 runs for the rest of distill.train.epochs
    phase2_lr: float = 0.0  # 0: distill.train.lr
    # mean over classes = the authors' F.mse_loss (their SGD learning rates assume it); sum = the papers'
    # squared norm, C times larger: the same under Adam(W), a C-times larger step under SGD
    mse: str = "mean"

    def __post_init__(self) -> None:
        _require(self.tau_max >= 1, f"annealing.tau_max must be >= 1, got {self.tau_max}")
        _require(self.phase1_epochs >= 1, f"annealing.phase1_epochs must be >= 1, got {self.phase1_epochs}")
        _require(self.phase2_lr >= 0, f"annealing.phase2_lr must be >= 0, got {self.phase2_lr}")
        _require(self.mse in MSE_REDUCTIONS, f"annealing.mse must be sum or mean, got '{self.mse}'")


@dataclass(frozen=True)
class ContinuationConfig:
    """Continuation-KD (Jafari et al., EMNLP Findings 2022):
    psi*CE + (1-psi)*max(0, ||z_s - phi(T) z_t||^2 - m*phi(T))."""

    t_max: int = 10
    anneal_epochs: int = 0  # n >= t_max in k = floor(n / t_max), T drops every k epochs; 0: train epochs
    psi: str = "linear"  # linear: min(i / psi_ramp_epochs, 1) up to psi_epochs, then 1; step: 0, then 1
    psi_epochs: int = 30  # where psi reaches (linear) or jumps to (step) 1
    psi_ramp_epochs: int = 0  # slope 1 / psi_ramp_epochs of the linear form; 0: psi_epochs (a plain ramp)
    # m, in units of the squared distance; the paper does not give it: 1 with the class-mean squared error
    # as in a public re-implementation. m = 0 is the no-margin ablation.
    margin: float = 1.0
    mse: str = "mean"  # as annealing.mse

    def __post_init__(self) -> None:
        _require(self.t_max >= 1, f"continuation.t_max must be >= 1, got {self.t_max}")
        _require(
            self.anneal_epochs >= 0, f"continuation.anneal_epochs must be >= 0, got {self.anneal_epochs}"
        )
        _require(self.psi in ("linear", "step"), f"continuation.psi must be linear or step, got '{self.psi}'")
        _require(self.psi_epochs >= 1, f"continuation.psi_epochs must be >= 1, got {self.psi_epochs}")
        _require(
            self.psi_ramp_epochs >= 0,
            f"continuation.psi_ramp_epochs must be >= 0, got {self.psi_ramp_epochs}",
        )
        _require(self.margin >= 0, f"continuation.margin must be >= 0, got {self.margin}")
        _require(self.mse in MSE_REDUCTIONS, f"continuation.mse must be sum or mean, got '{self.mse}'")


@dataclass(frozen=True)
class DKDConfig:
    """Decoupled KD (Zhao et al., CVPR 2022): ce_weight*CE + warmup * (alpha*TCKD + beta*NCKD)."""

    alpha: float = 1.0  # TCKD weight
    beta: float = 8.0  # NCKD weight
    ce_weight: float = 1.0
    warmup_epochs: int = 20  # soft terms scaled by min(epoch / warmup_epochs, 1)

    def __post_init__(self) -> None:
        _require(
            min(self.alpha, self.beta, self.ce_weight) >= 0,
            "dkd.alpha, dkd.beta and dkd.ce_weight must be >= 0",
        )
        _require(self.warmup_epochs >= 0, f"dkd.warmup_epochs must be >= 0, got {self.warmup_epochs}")


@dataclass(frozen=True)
class DISTConfig:
    """DIST (Huang et al., NeurIPS 2022): ce_weight*CE + weight*(beta*inter + gamma*intra)."""

    beta: float = 1.0  # inter-class (per sample) relation
    gamma: float = 1.0  # intra-class (per class, across the batch) relation
    weight: float = 2.0
    ce_weight: float = 1.0

    def __post_init__(self) -> None:
        _require(min(self.beta, self.gamma, self.weight, self.ce_weight) >= 0, "dist weights must be >= 0")


@dataclass(frozen=True)
class SkewConfig:
    """DistiLLM's skewed divergences (Ko et al., ICML 2024): skew-kl = KL(p || s*p + (1-s)*q), skew-rkl =
    KL(q || s*q + (1-s)*p), p the teacher's and q the student's distribution at T."""

    skew: float = 0.1  # s, the share of the first distribution in the mixture (the paper's default)

    def __post_init__(self) -> None:
        _require(0.0 <= self.skew < 1.0, f"skew.skew must be in [0, 1), got {self.skew}")


@dataclass(frozen=True)
class DistillConfig:
    method: str = "kd"
    temperature: float = 4.0  # for kd, dkd, dist: the start value of the temperature schedule
    temperature_schedule: str = "constant"  # constant | linear | cosine | step (towards temperature_end)
    temperature_end: float = 1.0
    temperature_steps: int = 4  # levels of the step schedule
    alpha: float = 0.9  # kd: weight of the soft (teacher) term; 1 - alpha on hard-label CE
    # kd: explicit weights instead of alpha, ce_weight*CE + kd_weight*T^2*KL (set both, e.g. logit
    # standardization's published 0.1 and 9); unset: 1 - alpha and alpha
    ce_weight: float | None = None
    kd_weight: float | None = None
    alpha_schedule: str = "constant"  # constant | linear | cosine | step (towards alpha_end)
    alpha_end: float = 0.9
    label_smoothing: float = 0.0  # on the hard-label term only
    standardize: bool = False  # logit standardization (Sun et al., CVPR 2024) before softmax/T; kd, dkd
    seed: int = 0
    views: str = "random"  # with a view cache: the view each sample gets per epoch, random | cycle
    teacher_online: bool = False  # run the teacher on each augmented batch (online KD) instead of a cache
    # language models, from a sparse cache: topk-tail (top-k + the exact tail bucket) | topk (renormalised
    # over the kept tokens, the common biased baseline) | sampled (importance-sampled tokens, unbiased);
    # teacher_online = true is dense KD
    sparse_target: str = "topk-tail"
    sparse_exact: bool = False  # refuse a temperature the cache has no logsumexp for (else approximate)
    memory_budget_mb: int = 2048  # caches up to this size (as float32) are loaded into RAM, else streamed
    remote_cache_mb: int = 4096  # a remote cache streamed lazily keeps at most this much of its shards
    train: OptimConfig = field(default_factory=OptimConfig)
    annealing: AnnealingConfig = field(default_factory=AnnealingConfig)
    continuation: ContinuationConfig = field(default_factory=ContinuationConfig)
    dkd: DKDConfig = field(default_factory=DKDConfig)
    dist: DISTConfig = field(default_factory=DISTConfig)
    skew: SkewConfig = field(default_factory=SkewConfig)

    def __post_init__(self) -> None:
        _require(
            self.method in METHODS, f"unknown method '{self.method}': choose one of {', '.join(METHODS)}"
        )
        for name, value in (("temperature", self.temperature), ("temperature_end", self.temperature_end)):
            _require(value > 0, f"{name} must be positive, got {value}")
        for name, value in (("alpha", self.alpha), ("alpha_end", self.alpha_end)):
            _require(0.0 <= value <= 1.0, f"{name} must be in [0, 1], got {value}")
        for name, kind in (
            ("temperature_schedule", self.temperature_schedule),
            ("alpha_schedule", self.alpha_schedule),
        ):
            _require(
                kind in SCHEDULE_KINDS, f"unknown {name} '{kind}': choose one of {', '.join(SCHEDULE_KINDS)}"
            )
        _require(self.temperature_steps >= 1, f"temperature_steps must be >= 1, got {self.temperature_steps}")
        _require(
            0.0 <= self.label_smoothing < 1.0,
            f"label_smoothing must be in [0, 1), got {self.label_smoothing}",
        )
        for name, weight in (("ce_weight", self.ce_weight), ("kd_weight", self.kd_weight)):
            _require(weight is None or weight >= 0, f"distill.{name} must be >= 0, got {weight}")
        _require(
            self.views in ("random", "cycle"), f"distill.views must be random or cycle, got '{self.views}'"
        )
        _require(
            self.sparse_target in ("topk-tail", "topk", "sampled"),
            f"distill.sparse_target must be topk-tail, topk or sampled, got '{self.sparse_target}'",
        )
        _require(self.remote_cache_mb >= 0, f"remote_cache_mb must be >= 0, got {self.remote_cache_mb}")
        _require(self.memory_budget_mb >= 0, f"memory_budget_mb must be >= 0, got {self.memory_budget_mb}")

    def check(self) -> None:
        """Checks across settings, run once a configuration is complete (after every override, so the
        order of --set options never matters)."""
        _require(
            (self.ce_weight is None) == (self.kd_weight is None),
            "set both distill.ce_weight and distill.kd_weight (they replace alpha), or neither",
        )
        _require(
            self.ce_weight is None or self.alpha_schedule == "constant",
            "distill.alpha_schedule cannot be used with distill.ce_weight/kd_weight: they replace alpha",
        )
        methods.check(self)  # the method's own checks (pipeline.distill.methods)


@dataclass(frozen=True)
class Preset:
    name: str
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    # per-method defaults tuned on validation, applied under CLI overrides: {method: {"dotted.key": value}}
    method_defaults: Mapping[str, Any] = field(default_factory=dict)
    # `kd compare` runs: {label: {"dotted.key": value}}
    compare: Mapping[str, Any] = field(default_factory=dict)
    # `kd sweep`'s default grid: {"dotted.key" or short name: [values]}
    sweep: Mapping[str, Any] = field(default_factory=dict)
    # how the user named it (a built-in name or a .toml path), for commands we suggest; not a setting
    source: str = field(default="", compare=False)

    def to_dict(self) -> dict[str, Any]:
        out = _jsonable(dataclasses.asdict(self))
        out.pop("source")
        return out

    @property
    def command_name(self) -> str:
        """What to pass as --preset to get this preset again."""
        return self.source or self.name


def flat_settings(preset: Preset | Mapping[str, Any]) -> dict[str, Any]:
    """{dotted key: value} of every setting a run uses (not the compare/sweep/method_defaults tables), of
    a preset or of its `to_dict()` form (as saved in a run's config.json)."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping) and not prefix.endswith(".options"):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = value

    raw = dict(preset.to_dict() if isinstance(preset, Preset) else preset)
    for key in ("name", "method_defaults", "compare", "sweep"):
        raw.pop(key, None)
    walk("", raw)
    return out


def changed_settings(preset: Preset, source: str) -> dict[str, Any]:
    """The settings of `preset` that differ from the preset file `source` with the same method (and that
    method's tuned defaults): what a command line changed."""
    base = flat_settings(resolve(source, {"distill.method": preset.distill.method}))
    return {k: v for k, v in flat_settings(preset).items() if base.get(k) != v}


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def preset_path(name_or_path: str) -> Path:
    """pipeline/presets/<name>.toml for a name, else the given .toml path."""
    path = Path(name_or_path)
    return path if path.suffix == ".toml" else PRESET_DIR / f"{name_or_path}.toml"


def load_preset(name_or_path: str) -> Preset:
    """A preset by name (pipeline/presets/<name>.toml) or by path to a TOML file."""
    path = preset_path(name_or_path)
    if not path.is_file() and Path(name_or_path).suffix == ".toml":
        raise KDError(f"preset file {name_or_path} does not exist (from {Path.cwd()}): check the path")
    if not path.is_file():
        raise KDError(
            f"unknown preset '{name_or_path}': choose one of {', '.join(preset_names())} "
            "or pass the path of a .toml file"
        )
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise KDError(f"preset {path} is not valid TOML: {err}") from None
    except UnicodeDecodeError as err:
        raise KDError(
            f"preset {path} is not UTF-8 text ({err.reason} at byte {err.start}): save it as UTF-8"
        ) from None
    except OSError as err:
        raise KDError(f"preset {path} cannot be read: {err.strerror}") from None
    raw.setdefault("name", path.stem)
    builtin = path.parent == PRESET_DIR
    if not builtin:
        _paths_next_to(raw, path.parent)
    preset = dataclasses.replace(_build(Preset, raw, ""), source=name_or_path)
    preset.distill.check()
    preset.cache.check()
    return preset


PATH_OPTIONS = ("train", "test", "root", "disk")  # dataset.options that name files or folders


def _paths_next_to(raw: dict[str, Any], folder: Path) -> None:
    """Make a user preset's relative paths mean "next to the preset file" wherever kd runs from: dataset
    files and folders, and `hf:` model folders, when they exist there (else they stay as written: relative
    to the working directory, or a hub id). `package.module:factory` modules next to the preset import."""
    options = raw.get("dataset", {}).get("options", {})
    for key in PATH_OPTIONS:
        value = options.get(key)
        if isinstance(value, str) and not Path(value).is_absolute() and (folder / value).exists():
            options[key] = str((folder / value).resolve())
    models = [raw.get("student", {}), raw.get("teacher", {}).get("model", {})]
    for model in models:
        arch = model.get("arch")
        if isinstance(arch, str) and arch.startswith("hf:"):
            local = arch[3:]
            if not Path(local).is_absolute() and (folder / local).exists():
                model["arch"] = "hf:" + str((folder / local).resolve())
        elif isinstance(arch, str) and ":" in arch and not arch.startswith("torchvision:"):
            module = arch.split(":")[0].split(".")[0]
            beside = (folder / f"{module}.py").is_file() or (folder / module).is_dir()
            if beside and str(folder.resolve()) not in sys.path:
                sys.path.append(str(folder.resolve()))


def resolve(name_or_path: str, overrides: Mapping[str, Any] | None = None) -> Preset:
    """A preset with its method's tuned defaults applied, then `overrides` on top (they win)."""
    preset = load_preset(name_or_path)
    overrides = dict(overrides or {})
    method = str(overrides.get("distill.method", preset.distill.method))
    defaults = preset.method_defaults.get(method, {})
    if not isinstance(defaults, Mapping):
        raise KDError(f"method_defaults.{method} must be a table of dotted settings")
    return with_overrides(preset, {**defaults, **overrides})


def with_overrides(preset: Preset, overrides: Mapping[str, Any]) -> Preset:
    """Return a copy with dotted keys replaced, e.g. {"distill.temperature": "2"}; values are coerced."""
    for key, value in overrides.items():
        preset = _replace_path(preset, key.split("."), value, key)
    preset.distill.check()
    preset.cache.check()
    return preset


def _replace_path(obj: Any, parts: list[str], value: Any, key: str) -> Any:
    hints = typing.get_type_hints(type(obj))
    name = parts[0]
    if name not in hints:
        raise KDError(
            f"unknown setting '{key}': {_did_you_mean(name, hints)}'{name}' is not one of {', '.join(hints)}"
        )
    current = getattr(obj, name)
    if len(parts) == 1:
        new = _coerce(value, hints[name], key)
    elif isinstance(current, Mapping):  # e.g. student.options.hidden=[128,128]
        new = {**current, ".".join(parts[1:]): parse_literal(value)}
    else:
        if not dataclasses.is_dataclass(current):
            raise KDError(f"unknown setting '{key}': '{name}' has no sub-settings")
        new = _replace_path(current, parts[1:], value, key)
    return dataclasses.replace(obj, **{name: new})


def parse_literal(value: Any) -> Any:
    """A CLI string as JSON when it parses (numbers, lists, true/false), else the string itself."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def preset_from_dict(raw: Mapping[str, Any]) -> Preset:
    """A Preset from its to_dict() form (a saved config.json's, a sweep worker's), checked field by field."""
    return _build(Preset, raw, "")


def _build(cls: type, raw: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    unknown = set(raw) - set(hints)
    if unknown:
        hint = _did_you_mean(sorted(unknown)[0], hints)
        raise KDError(
            f"unknown setting(s) {', '.join(prefix + u for u in sorted(unknown))} in preset"
            f"{': ' + hint.rstrip() if hint else ''}"
        )
    kwargs = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint) and isinstance(value, Mapping):
            kwargs[name] = _build(hint, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, prefix + name)
    return cls(**kwargs)


def _did_you_mean(name: str, known: Any) -> str:
    """`did you mean 'temperature'? ` for a near miss (a typo), else ''."""
    import difflib

    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.75)
    return f"did you mean '{close[0]}'? " if close else ""


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check (and convert from CLI strings) a value against a field's type."""
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        if value is None and type(None) in typing.get_args(hint):
            return None  # an unset optional setting, as a saved config.json holds it (null)
        choices = [h for h in typing.get_args(hint) if h is not type(None)]
        for choice in choices[:-1]:  # e.g. int | str: a number if it is one, else the text
            try:
                return _coerce(value, choice, key)
            except KDError:
                continue
        hint = choices[-1]
        origin = typing.get_origin(hint)
    if origin is list:  # a TOML array, or on the command line JSON ('[1, 2]') or '1,2'
        parsed = parse_literal(value)
        if isinstance(parsed, str):
            parsed = [parse_literal(part.strip()) for part in parsed.split(",") if part.strip()]
        items = parsed if isinstance(parsed, (list, tuple)) else [parsed]
        (item,) = typing.get_args(hint) or (str,)
        return [_coerce(v, item, key) for v in items]
    if origin is not None and issubclass(origin, Mapping):
        parsed = parse_literal(value)  # a CLI table arrives as JSON: '{"channels": 8}'
        if isinstance(parsed, Mapping):
            return dict(parsed)
        raise KDError(f"setting '{key}' must be a table (JSON object on the command line), got {value!r}")
    try:
        if hint is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if hint is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if hint is float:
            number = float(value)
            if not math.isfinite(number):
                raise KDError(f"setting '{key}' must be a finite number, got {value!r}")
            return number
        if hint is str:
            return str(value)
    except ValueError:
        raise KDError(f"setting '{key}' expects {hint.__name__}, got {value!r}") from None
    raise KDError(f"setting '{key}' cannot be set from {value!r}")


@dataclass(frozen=True)
class Paths:
    """Where things live on disk: data/ by default (KD_DATA_DIR), caches under data/logits (KD_CACHE_DIR)."""

    data: Path = Path("data")
    cache: Path | str | None = None  # a folder, or a URL (s3://bucket/prefix) for a team's shared root

    @property
    def remote(self) -> str | None:
        """The cache root URL when caches are shared through remote storage."""
        from pipeline.backends import is_url

        return str(self.cache) if self.cache is not None and is_url(self.cache) else None

    @property
    def logits(self) -> Path:
        """The local cache root; with a remote root, the local staging and read-through copy of it."""
        if self.remote is not None:
            return (
                self.data / "remote-cache" / re.sub(r"[^A-Za-z0-9._=-]+", "_", self.remote.split("://", 1)[1])
            )
        from pipeline.backends import local_path

        return Path(local_path(self.cache)) if self.cache is not None else self.data / "logits"

    @property
    def teachers(self) -> Path:
        return self.data / "teachers"

    @property
    def runs(self) -> Path:
        return self.data / "runs"
