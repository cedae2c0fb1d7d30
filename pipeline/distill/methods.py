"""The distillation methods: one record each, in one table (`TABLE`). A record says which loss the method
trains with (a `pipeline.distill.losses.LOSSES` key), the loss's keyword arguments at an epoch (the schedules
evaluated there, explicitly), which shared settings it reads (T, alpha, standardize), its own settings
table (`[distill.<table>]`), its phases, and the checks across its settings. Run names, the settings that
identify a run, the sweep's loss-only axes and the configuration checks all derive from it.

Adding a method: its loss in pipeline/distill/losses.py (a function and its LOSSES line), its record here, its
test. No torch here: the CLI and the configuration read the names before any heavy import.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.distill import schedules
from pipeline.errors import KDError

if TYPE_CHECKING:
    from pipeline.config import DistillConfig, OptimConfig

Settings = Callable[["DistillConfig", int], dict[str, Any]]


@dataclass(frozen=True)
class PhasePlan:
    """One training phase: its name, the method record whose loss and settings it trains with, its optimizer
    settings (a fresh optimizer and LR schedule each phase)."""

    name: str
    method: str
    optim: OptimConfig


@dataclass(frozen=True)
class Method:
    name: str
    paper: str  # one line: who, where
    settings: Settings  # the loss's keyword arguments at a 0-based epoch
    loss: str = ""  # a LOSSES key; "" = the method's name
    uses_temperature: bool = False  # reads distill.temperature (and its schedule)
    uses_alpha: bool = False  # reads distill.alpha (or distill.ce_weight / kd_weight) and its schedule
    standardize: bool = False  # accepts distill.standardize (logit standardization)
    table: str | None = None  # its own settings, [distill.<table>]
    needs_cache: bool = True  # False: trains from the labels alone (no teacher, no cache)
    sequences: bool = False  # also trains language models (token sequences)
    phases: Callable[[DistillConfig], list[PhasePlan]] | None = None  # None: one phase, all epochs
    annealed: Callable[[DistillConfig, int], int] | None = None  # the integer T behind phi(T) at an epoch
    check: Callable[[DistillConfig], None] | None = None  # checks across settings, once resolved

    @property
    def loss_name(self) -> str:
        return self.loss or self.name


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise KDError(message)


def _smoothing(cfg: DistillConfig) -> dict[str, Any]:
    return {"label_smoothing": cfg.label_smoothing}


def _ce(cfg: DistillConfig, epoch: int) -> dict[str, Any]:
    return _smoothing(cfg)


def _weights(cfg: DistillConfig, epoch: int) -> dict[str, Any]:
    """alpha at this epoch, or the explicit CE/KD weights that replace it."""
    if cfg.ce_weight is None:
        return {"alpha": schedules.alpha_at(epoch, cfg)}
    return {"ce_weight": cfg.ce_weight, "kd_weight": cfg.kd_weight}


def _kd(cfg: DistillConfig, epoch: int) -> dict[str, Any]:
    return {
        "temperature": schedules.temperature_at(epoch, cfg),
        **_weights(cfg, epoch),
        **_smoothing(cfg),
        "standardize": cfg.standardize,
        "target": cfg.sparse_target,  # how a language model's sparse cache is read (pipeline.distill.losses)
    }


def _dkd(cfg: DistillConfig, epoch: int) -> dict[str, Any]:
    d = cfg.dkd
    return {
        "temperature": schedules.temperature_at(epoch, cfg),
        "alpha": d.alpha,
        "beta": d.beta,
        "ce_weight": d.ce_weight,
        "warmup": schedules.dkd_warmup(epoch, d.warmup_epochs),
        **_smoothing(cfg),
        "standardize": cfg.standardize,
    }


def _dist(cfg: DistillConfig, epoch: int) -> dict[str, Any]:
    d = cfg.dist
    return {
        "temperature": schedules.temperature_at(epoch, cfg),
        "beta": d.beta,
        "gamma": d.gamma,
        "weight": d.weight,
        "ce_weight": d.ce_weight,
        **_smoothing(cfg),
    }


def _annealing_t(cfg: DistillConfig, epoch: int) -> int:
    return schedules.step_temperature(epoch, cfg.annealing.phase1_epochs, cfg.annealing.tau_max)


def _annealing(cfg: DistillConfig, epoch: int) -> dict[str, Any]:
    a = cfg.annealing
    return {"phi": schedules.phi(_annealing_t(cfg, epoch), a.tau_max), "mse": a.mse}


def _annealing_phases(cfg: DistillConfig) -> list[PhasePlan]:
    """Phase 1 matches phi(T) * z_t; phase 2 is CE from its best checkpoint, with a fresh optimizer."""
    a = cfg.annealing
    phase1 = dataclasses.replace(cfg.train, epochs=a.phase1_epochs)
    phase2 = dataclasses.replace(
        cfg.train, epochs=cfg.train.epochs - a.phase1_epochs, lr=a.phase2_lr or cfg.train.lr
    )
    return [PhasePlan("annealing", "annealing", phase1), PhasePlan("annealing-ce", "ce", phase2)]


def _annealing_check(cfg: DistillConfig) -> None:
    a = cfg.annealing
    _require(
        a.phase1_epochs < cfg.train.epochs,
        f"annealing.phase1_epochs ({a.phase1_epochs}) must be smaller than the total epochs "
        f"({cfg.train.epochs}): phase 2 gets the rest",
    )
    _require(
        a.phase1_epochs >= a.tau_max,
        f"annealing.phase1_epochs ({a.phase1_epochs}) must be at least annealing.tau_max "
        f"({a.tau_max}): T would not reach 1; raise the epochs or lower tau_max",
    )


def _continuation_t(cfg: DistillConfig, epoch: int) -> int:
    c = cfg.continuation
    return schedules.step_temperature(epoch, c.anneal_epochs or cfg.train.epochs, c.t_max)


def _continuation(cfg: DistillConfig, epoch: int) -> dict[str, Any]:
    c = cfg.continuation
    return {
        "phi": schedules.phi(_continuation_t(cfg, epoch), c.t_max),
        "psi": schedules.psi_at(epoch, c),
        "margin": c.margin,
        "mse": c.mse,
        **_smoothing(cfg),
    }


def _continuation_check(cfg: DistillConfig) -> None:
    c = cfg.continuation
    n = c.anneal_epochs or cfg.train.epochs
    _require(
        n >= c.t_max,
        f"continuation annealing epochs ({n}) must be at least continuation.t_max ({c.t_max}): "
        "T would not reach 1; raise the epochs (or continuation.anneal_epochs) or lower t_max",
    )
    _require(
        n <= cfg.train.epochs,
        f"continuation.anneal_epochs ({n}) must be at most the epochs ({cfg.train.epochs}): "
        "T would not reach 1 within the run",
    )
    _require(
        c.psi_epochs < cfg.train.epochs,
        f"continuation.psi_epochs ({c.psi_epochs}) must be smaller than the epochs "
        f"({cfg.train.epochs}): psi would never reach 1 (the CE term never takes over)",
    )
    _require(
        c.psi_ramp_epochs == 0 or c.psi_ramp_epochs >= c.psi_epochs,
        f"continuation.psi_ramp_epochs ({c.psi_ramp_epochs}) must be 0 or at least psi_epochs "
        f"({c.psi_epochs}): psi would reach 1 before its cut-off",
    )


def _dkd_check(cfg: DistillConfig) -> None:
    _require(
        cfg.dkd.warmup_epochs <= cfg.train.epochs,
        f"dkd.warmup_epochs ({cfg.dkd.warmup_epochs}) must be at most the epochs "
        f"({cfg.train.epochs}): the warm-up would never finish",
    )


def _skew(cfg: DistillConfig, epoch: int) -> dict[str, Any]:
    return {
        "temperature": schedules.temperature_at(epoch, cfg),
        **_weights(cfg, epoch),
        **_smoothing(cfg),
        "skew": cfg.skew.skew,
    }


TABLE: dict[str, Method] = {
    m.name: m
    for m in (
        Method("ce", "cross-entropy on the labels (the baseline)", _ce, needs_cache=False, sequences=True),
        Method(
            "kd",
            "Hinton, Vinyals, Dean 2015",
            _kd,
            uses_temperature=True,
            uses_alpha=True,
            standardize=True,
            sequences=True,
        ),
        Method(
            "annealing",
            "Annealing-KD, Jafari et al., EACL 2021",
            _annealing,
            table="annealing",
            phases=_annealing_phases,
            annealed=_annealing_t,
            check=_annealing_check,
        ),
        Method(
            "continuation",
            "Continuation-KD, Jafari et al., EMNLP Findings 2022",
            _continuation,
            table="continuation",
            annealed=_continuation_t,
            check=_continuation_check,
        ),
        Method(
            "dkd",
            "Decoupled KD, Zhao et al., CVPR 2022",
            _dkd,
            uses_temperature=True,
            standardize=True,
            table="dkd",
            check=_dkd_check,
        ),
        Method("dist", "DIST, Huang et al., NeurIPS 2022", _dist, uses_temperature=True, table="dist"),
        Method(
            "skew-kl",
            "DistiLLM's skew KL, Ko et al., ICML 2024",
            _skew,
            uses_temperature=True,
            uses_alpha=True,
            table="skew",
        ),
        Method(
            "skew-rkl",
            "DistiLLM's skew reverse KL, Ko et al., ICML 2024",
            _skew,
            uses_temperature=True,
            uses_alpha=True,
            table="skew",
        ),
    )
}
METHODS = tuple(TABLE)
LABEL_ONLY = frozenset(name for name, m in TABLE.items() if not m.needs_cache)  # run without a cache
TABLES = tuple(dict.fromkeys(m.table for m in TABLE.values() if m.table))  # the methods' own settings


def method(name: str) -> Method:
    if name not in TABLE:
        raise KDError(f"unknown method '{name}': choose one of {', '.join(METHODS)}")
    return TABLE[name]


def phases(cfg: DistillConfig) -> list[PhasePlan]:
    """The method's training phases: one for all but Annealing-KD (MSE phase, then CE phase)."""
    m = method(cfg.method)
    return m.phases(cfg) if m.phases else [PhasePlan(cfg.method, cfg.method, cfg.train)]


def settings_at(cfg: DistillConfig, name: str, epoch: int) -> dict[str, Any]:
    """Keyword arguments of the loss of method `name` at this epoch (a phase may train another method's
    loss: Annealing-KD's phase 2 is CE)."""
    return method(name).settings(cfg, epoch)


def annealed_temperature(cfg: DistillConfig, name: str, epoch: int) -> int | None:
    """The integer T behind phi(T) (Annealing-KD's phase 1, Continuation-KD); None for other methods."""
    m = method(name)
    return m.annealed(cfg, epoch) if m.annealed else None


def soft_settings(cfg: DistillConfig) -> dict[str, float]:
    """The shared soft-target settings the method uses: T when it reads it; alpha (or the explicit CE/KD
    weights) when it reads it. Names, summaries and tables show only these."""
    m, out = method(cfg.method), {}
    if m.uses_temperature:
        out["temperature"] = cfg.temperature
    if m.uses_alpha:
        if cfg.ce_weight is None or cfg.kd_weight is None:
            out["alpha"] = cfg.alpha
        else:
            out["ce_weight"], out["kd_weight"] = cfg.ce_weight, cfg.kd_weight
    return out


def method_settings(cfg: DistillConfig) -> dict[str, Any]:
    """The method's own settings, for the summary (the full config is in config.json): its table, or for
    kd the explicit weights or the schedules when they are set."""
    m = method(cfg.method)
    if m.table:
        return dataclasses.asdict(getattr(cfg, m.table))
    if m.uses_alpha and cfg.ce_weight is not None:
        return {"ce_weight": cfg.ce_weight, "kd_weight": cfg.kd_weight}
    if m.uses_temperature and (cfg.temperature_schedule != "constant" or cfg.alpha_schedule != "constant"):
        names = ("temperature_schedule", "temperature_end", "temperature_steps")
        return {k: getattr(cfg, k) for k in (*names, "alpha_schedule", "alpha_end")}
    return {}


def method_label(cfg: DistillConfig) -> str:
    """The method as reports name it: Continuation-KD without its margin is the paper's ablation."""
    if cfg.method == "continuation" and cfg.continuation.margin == 0:
        return "continuation (no-margin ablation, m=0)"
    return cfg.method + (" + logit standardization" if cfg.standardize else "")


def ignored_settings(name: str) -> list[str]:
    """Prefixes of the distill settings method `name` never reads (the other methods' tables, T, alpha)."""
    m = method(name)
    ignored = [f"distill.{table}." for table in TABLES if table != m.table]
    if not m.uses_temperature:  # temperature_schedule, temperature_end, ... start so
        ignored += ["distill.temperature", "distill.standardize"]
    if not m.uses_alpha:
        ignored += ["distill.alpha", "distill.ce_weight", "distill.kd_weight"]  # alpha_schedule, alpha_end
    return ignored


# the distill settings that only change the loss: students differing in these alone can share one pass
# of batches (kd sweep --mode one-pass)
LOSS_ONLY = (
    "method",
    "temperature",
    "temperature_schedule",
    "temperature_end",
    "temperature_steps",
    "alpha",
    "alpha_schedule",
    "alpha_end",
    "label_smoothing",
    "standardize",
    *(m.table for m in TABLE.values() if m.table and not m.phases),  # a method of phases runs alone
)


def check(cfg: DistillConfig) -> None:
    """The checks across settings that the method makes (after every override)."""
    m = method(cfg.method)
    _require(
        not cfg.standardize or m.standardize,
        f"standardize applies to {' and '.join(n for n, r in TABLE.items() if r.standardize)}, "
        f"not '{cfg.method}'",
    )
    if m.check:
        m.check(cfg)
