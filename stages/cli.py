"""The `kd` command line: one command per stage, named like the Make targets."""

from __future__ import annotations

import functools
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import click
import typer
import typer._click._textwrap
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from pipeline.config import Paths, Preset, preset_names, resolve
from pipeline.distill.methods import METHODS
from pipeline.errors import KDError

GLOBAL_OPTIONS = ("--data-dir", "--cache-dir")


class _NoHyphenBreaks(typer._click._textwrap.TextWrapper):
    """Help text never wraps a name at its hyphen: `mnist1d-views` stays one word to copy."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{**kwargs, "break_on_hyphens": False})


# typer's click imports it each time it wraps help text
typer._click._textwrap.TextWrapper = _NoHyphenBreaks  # type: ignore[misc]
# help text is plain ("[compare]" and "[default: ...]" are words, not markup), -h as well as --help
PLAIN_HELP: dict[str, Any] = {
    "rich_markup_mode": None,
    "context_settings": {"help_option_names": ["-h", "--help"]},
}


class _GlobalOptionsAnywhere(TyperGroup):
    """`kd distill --data-dir D` as well as `kd --data-dir D distill`: the global options are moved in
    front of the subcommand before parsing."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        front: list[str] = []
        rest: list[str] = []
        i = 0
        while i < len(args):
            arg = args[i]
            if arg in GLOBAL_OPTIONS and i + 1 < len(args):
                front += args[i : i + 2]
                i += 2
                continue
            if arg.split("=", 1)[0] in GLOBAL_OPTIONS and "=" in arg:
                front.append(arg)
            else:
                rest.append(arg)
            i += 1
        return super().parse_args(ctx, front + rest)


app = typer.Typer(
    cls=_GlobalOptionsAnywhere,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    **PLAIN_HELP,
    help="Knowledge distillation from cached teacher logits.",
)
cache_app = typer.Typer(
    no_args_is_help=True, **PLAIN_HELP, help="List, check, share, export/import and remove logit caches."
)
app.add_typer(cache_app, name="cache")
config_app = typer.Typer(
    no_args_is_help=True, **PLAIN_HELP, help="Show the configuration a command would use."
)
app.add_typer(config_app, name="config")

F = TypeVar("F", bound=Callable[..., Any])
_state: dict[str, Any] = {}

PresetOpt = Annotated[
    str, typer.Option("--preset", "-p", help=f"Preset name ({', '.join(preset_names())}) or .toml path.")
]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="Override any preset field: --set distill.train.lr=0.003")
]
MethodOpt = Annotated[
    str | None, typer.Option("--method", "-m", help=f"One of {', '.join(METHODS)} [default: the preset's].")
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (cuda, mps, cpu), or a torch device name.")]


def friendly(fn: F) -> F:
    """Bad input ends in one line on stderr and exit code 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KDError as err:
            _error(str(err))
        except zipfile.BadZipFile as err:  # a damaged member met outside the checks that name the cache
            _error(f"a zip file is damaged ({err}): check it with `kd cache verify`, or pull a sound copy")
        except OSError as err:  # permissions, a full disk, a read-only or vanished folder
            where = f": {err.filename}" if err.filename else ""
            _error(
                f"{err.strerror or type(err).__name__}{where} (check permissions and free space; "
                "whatever was already written is kept)"
            )

    return wrapper  # type: ignore[return-value]


def _error(message: str) -> None:
    """One line on stderr, exit code 2."""
    Console(stderr=True, soft_wrap=True).print(
        f"[bold red]error:[/bold red] {escape(message)}", highlight=False, soft_wrap=True
    )
    raise typer.Exit(2)


@app.callback()
def main(
    data_dir: Annotated[
        Path, typer.Option(envvar="KD_DATA_DIR", help="Root of teachers/, logits/, runs/.")
    ] = Path("data"),
    cache_dir: Annotated[
        str | None,
        typer.Option(
            envvar="KD_CACHE_DIR", help="Logit cache root, a folder or URL [default: DATA_DIR/logits]."
        ),
    ] = None,
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            is_eager=True,
            callback=_print_version,
            help="Print the version.",
        ),
    ] = False,
) -> None:
    """Knowledge distillation from cached teacher logits: dump a teacher once, train many students."""
    _state["paths"] = Paths(data=data_dir, cache=cache_dir)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        print(f"kd {version('kd-cache')}")
        raise typer.Exit()


def _pairs(sets: list[str] | None) -> dict[str, str]:
    pairs = {}
    for item in sets or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise KDError(f"--set expects KEY=VALUE, got '{item}'")
        pairs[key.strip()] = value.strip()
    return pairs


def _preset(name: str, overrides: dict[str, Any], sets: list[str] | None) -> Preset:
    pairs = _pairs(sets)
    pairs.update({k: v for k, v in overrides.items() if v is not None})
    return resolve(name, pairs)


@app.command("train-teacher")
@friendly
def train_teacher(
    preset: PresetOpt = "mnist1d",
    force: Annotated[bool, typer.Option(help="Retrain even if the checkpoint exists.")] = False,
    set_: SetOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Train the preset's teacher with cross-entropy (skipped when its checkpoint exists)."""
    cfg = _preset(preset, {}, set_)  # settings checked before torch is imported: errors come at once
    from stages import train_teacher as stage

    stage.run(cfg, _state["paths"], force=force, device_name=device)


@app.command("teacher-logits")
@friendly
def teacher_logits(
    preset: PresetOpt = "mnist1d",
    split: Annotated[
        list[str] | None, typer.Option(help="Split(s) to dump [default: train and test].")
    ] = None,
    dtype: Annotated[
        str | None,
        typer.Option(help="Storage dtype: float16, bfloat16 or float32 [default: the preset's cache.dtype]."),
    ] = None,
    force: Annotated[bool, typer.Option(help="Recompute even when a complete cache exists.")] = False,
    teacher: Annotated[
        Path | None,
        typer.Option(help="Checkpoint folder to use as teacher, e.g. a run's checkpoint/ (TAKD chaining)."),
    ] = None,
    set_: SetOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Stage 1: run the teacher once and store its raw logits (Zarr v3, sharded, zstd)."""
    cfg = _preset(preset, {"cache.dtype": dtype}, set_)
    from stages import teacher_logits as stage

    stage.run(
        cfg,
        _state["paths"],
        splits=tuple(split or ("train", "test")),
        force=force,
        teacher_dir=teacher,
        device_name=device,
    )


@app.command()
@friendly
def distill(
    preset: PresetOpt = "mnist1d",
    method: MethodOpt = None,
    temperature: Annotated[
        float | None,
        typer.Option(
            "--temperature", "-T", help="Softmax temperature on the cached logits [default: the preset's]."
        ),
    ] = None,
    alpha: Annotated[
        float | None,
        typer.Option("--alpha", "-a", help="Weight of the teacher term, in [0, 1] [default: the preset's]."),
    ] = None,
    label_smoothing: Annotated[
        float | None, typer.Option(help="Label smoothing on the hard-label term [default: the preset's].")
    ] = None,
    epochs: Annotated[
        int | None, typer.Option(help="Training epochs [default: the preset's, or its method default].")
    ] = None,
    lr: Annotated[
        float | None, typer.Option(help="Learning rate [default: the preset's, or its method default].")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Batch size [default: the preset's, or its method default].")
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Seed of init and data order [default: the preset's].")
    ] = None,
    cache: Annotated[
        str | None,
        typer.Option(
            help="Train-split cache: folder, .zip or URL [default: newest match under the cache dir]."
        ),
    ] = None,
    run_name: Annotated[str | None, typer.Option(help="Run folder name under DATA_DIR/runs.")] = None,
    online: Annotated[
        bool,
        typer.Option(
            "--online",
            help="Online KD: run the teacher checkpoint on every (augmented) batch instead of reading a "
            "cache (= --set distill.teacher_online=true); the reference a view cache is measured against.",
        ),
    ] = False,
    set_: SetOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Stage 2: train the student against cached logits (the teacher is never loaded, unless --online)."""
    overrides = {
        "distill.teacher_online": True if online else None,
        "distill.method": method,
        "distill.temperature": temperature,
        "distill.alpha": alpha,
        "distill.label_smoothing": label_smoothing,
        "distill.train.epochs": epochs,
        "distill.train.lr": lr,
        "distill.train.batch_size": batch_size,
        "distill.seed": seed,
    }
    cfg = _preset(preset, overrides, set_)
    from stages import distill as stage

    stage.run(
        cfg,
        _state["paths"],
        cache=cache,
        run_name=run_name,
        device_name=device,
        source=preset,
    )


@app.command()
@friendly
def compare(
    preset: PresetOpt = "mnist1d",
    seeds: Annotated[int, typer.Option(help="Seeds per configuration (0, 1, ...).")] = 3,
    name: Annotated[
        str | None,
        typer.Option(
            help="Report name under DATA_DIR/reports [default: the preset's name, plus a short hash of "
            "the labels, seeds and --set when they are not the preset's all, 3 and none]."
        ),
    ] = None,
    only: Annotated[
        list[str] | None, typer.Option(help="Run only these labels of the preset's [compare].")
    ] = None,
    force: Annotated[bool, typer.Option(help="Rerun configurations that already have results.")] = False,
    set_: SetOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Train every configuration of the preset's [compare] table over several seeds; write a report."""
    from stages import compare as stage

    stage.run(
        preset,
        _state["paths"],
        seeds=seeds,
        name=name,
        only=only,
        force=force,
        overrides=_pairs(set_),
        device_name=device,
    )


@app.command()
@friendly
def sweep(
    preset: PresetOpt = "mnist1d",
    grid: Annotated[
        list[str] | None,
        typer.Option(
            help="KEY=V1,V2 (repeat): temperature, alpha, method, label_smoothing, lr, ... or dotted."
        ),
    ] = None,
    seeds: Annotated[int, typer.Option(help="Seeds per combination (0, 1, ...).")] = 1,
    name: Annotated[
        str | None, typer.Option(help="Sweep name under DATA_DIR/sweeps [default: preset].")
    ] = None,
    mode: Annotated[
        str, typer.Option(help="sequential, one-pass (students of a seed trained together) or parallel.")
    ] = "sequential",
    devices: Annotated[
        str | None,
        typer.Option(help="Parallel mode: comma-separated devices [default: every GPU, else cpu]."),
    ] = None,
    force: Annotated[bool, typer.Option(help="Rerun finished runs.")] = False,
    set_: SetOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Train every combination of a grid (x seeds) from one cache; resumable; writes a report."""
    from stages import sweep as stage

    stage.run(
        preset,
        _state["paths"],
        grid=grid or [],
        seeds=seeds,
        name=name,
        mode=mode,
        devices=[d.strip() for d in devices.split(",")] if devices else [],
        force=force,
        overrides=_pairs(set_),
        device_name=device,
    )


@app.command()
@friendly
def bench(
    quick: Annotated[bool, typer.Option(help="Small sizes, 2 repetitions: a smoke run.")] = False,
    reps: Annotated[int | None, typer.Option(help="Repetitions per figure [default: 5, quick: 2].")] = None,
    only: Annotated[
        list[str] | None,
        typer.Option(
            "--only",
            "--workload",
            help="Workload(s) to run: mnist1d, cifar-synthetic, scale (a 1M x 1,000 cache read from "
            "disk, loopback S3 and a memmap) or data (JPEG folders of N and 8N images read by DataLoader "
            "workers, and a token file); scale and data are not run by default.",
        ),
    ] = None,
    device: DeviceOpt = "auto",
    docs: Annotated[
        bool,
        typer.Option(
            "--docs",
            help="Also write the docs' table: docs/bench.json and docs/performance.md; with --workload data, "
            "docs/bench-data.json and docs/data.md.",
        ),
    ] = False,
) -> None:
    """Measure dump overhead, cached-KD overhead, online-KD speed-up, storage and read throughput."""
    if only and "scale" in only:
        from stages import bench_scale

        bench_scale.run(_state["paths"], quick=quick)
    if only and "data" in only:
        from stages import bench_data

        bench_data.run(_state["paths"], quick=quick, reps=reps, docs=Path("docs") if docs else None)
    if only and not (only := [w for w in only if w not in ("scale", "data")]):
        return
    from stages import bench as stage

    stage.run(
        _state["paths"],
        quick=quick,
        reps=reps,
        device_name=device,
        only=only,
        docs=Path("docs") if docs else None,
    )


@cache_app.command("info")
@friendly
def cache_info(
    path: Annotated[str, typer.Argument(help="A cache: folder (.zarr), .zip or URL (s3://...).")],
    json_: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
) -> None:
    """Print a cache's manifest."""
    from stages import cache as stage

    stage.info(path, as_json=json_)


@cache_app.command("verify")
@friendly
def cache_verify(
    path: Annotated[str, typer.Argument(help="A cache: folder (.zarr), .zip or URL (s3://...).")],
) -> None:
    """Re-read a cache: checksums, shapes, dtype, NaN/Inf, labels, completeness; exit 1 on any problem."""
    from stages import cache as stage

    if not stage.verify(path):
        raise typer.Exit(1)


def _transfer(src: str, dst: str, force: bool) -> None:
    from stages import cache as stage

    if not stage.transfer(src, dst, force=force):
        raise typer.Exit(1)


@cache_app.command("push")
@friendly
def cache_push(
    src: Annotated[str, typer.Argument(help="A cache: folder (.zarr) or .zip.")],
    dst: Annotated[
        str,
        typer.Argument(
            help="A folder, prefix or bucket (receives DST/<name>.zarr), or the cache itself: "
            "a path or URL ending in .zarr or .zip."
        ),
    ],
    force: Annotated[
        bool, typer.Option(help="Replace a previous copy of a cache at the destination (nothing else).")
    ] = False,
) -> None:
    """Verify a cache, copy it to shared or remote storage, then verify the copy (exit 1 on a problem)."""
    _transfer(src, dst, force)


@cache_app.command("pull")
@friendly
def cache_pull(
    src: Annotated[str, typer.Argument(help="A cache: URL, .zip or folder.")],
    dst: Annotated[
        str,
        typer.Argument(
            help="A folder (receives DST/<name>.zarr, e.g. data/logits/) or the cache itself (.zarr, .zip)."
        ),
    ],
    force: Annotated[
        bool, typer.Option(help="Replace a previous copy of a cache at the destination (nothing else).")
    ] = False,
) -> None:
    """Verify a cache, copy it from shared or remote storage, then verify the copy (exit 1 on a problem)."""
    _transfer(src, dst, force)


@cache_app.command("rm")
@friendly
def cache_rm(
    names: Annotated[list[str], typer.Argument(help="Cache folder names (see `kd cache ls`).")],
    root: Annotated[Path | None, typer.Option(help="Cache root [default: the cache dir].")] = None,
    yes: Annotated[bool, typer.Option("--yes", help="Really remove (default: say what would go).")] = False,
) -> None:
    """Remove caches by name from the cache root."""
    from stages import cache as stage

    stage.rm(root or _state["paths"].logits, names, yes=yes)


@cache_app.command("gc")
@friendly
def cache_gc(
    older_than: Annotated[float, typer.Option(help="Only entries untouched for this many hours.")] = 24.0,
    root: Annotated[
        str | None, typer.Option(help="Cache root, a folder or URL prefix [default: the cache dir].")
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", help="Really remove (default: dry run).")] = False,
) -> None:
    """Remove incomplete caches, interrupted copies and uploads, dead writers' locks: untouched N hours."""
    from stages import cache as stage

    stage.gc(root or _state["paths"].logits, older_than_hours=older_than, yes=yes)


@cache_app.command("export")
@friendly
def cache_export(
    path: Annotated[Path, typer.Argument(help="A cache folder (.zarr).")],
    out: Annotated[Path, typer.Option(help="The file to write (.h5 or .npz).")],
    format_: Annotated[
        str | None, typer.Option("--format", help="hdf5 or npz [default: from --out's extension, else hdf5].")
    ] = None,
) -> None:
    """Write a cache's logits, labels, ids and manifest to an HDF5 or npz file."""
    from stages import cache_interop as stage

    stage.export(path, out, stage.export_format(out, format_))


@cache_app.command("import")
@friendly
def cache_import(
    source: Annotated[Path, typer.Argument(help="An HDF5 (.h5/.hdf5) or .npz file with a 'logits' array.")],
    preset: PresetOpt = "mnist1d",
    split: Annotated[str, typer.Option(help="The dataset split the logits were computed on.")] = "train",
    teacher_name: Annotated[str | None, typer.Option(help="Teacher name [default: from the file].")] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing cache with the same key.")] = False,
    set_: SetOpt = None,
) -> None:
    """Make a cache from logits computed elsewhere, checked against the preset's dataset split."""
    from stages import cache_interop as stage

    stage.import_(
        source,
        _preset(preset, {}, set_),
        _state["paths"].logits,
        split=split,
        teacher_name=teacher_name,
        force=force,
    )


@cache_app.command("ls")
@friendly
def cache_ls(
    root: Annotated[
        str | None, typer.Argument(help="Cache root, a folder or URL [default: the cache dir].")
    ] = None,
    long: Annotated[
        bool, typer.Option("--long", "-l", help="Add teacher, dataset, split, classes, dtype.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the list as JSON, for scripts.")] = False,
) -> None:
    """List the caches under a directory or URL prefix: full names (what `kd cache rm` takes), rows, size,
    teacher accuracy on the split, created, complete."""
    from stages import cache as stage

    stage.ls(root or _state["paths"].logits, long=long, as_json=as_json)


if __name__ == "__main__":  # torchrun -m stages.cli ...
    app()


@config_app.command("show")
@friendly
def config_show(
    preset: PresetOpt = "mnist1d",
    method: MethodOpt = None,
    set_: SetOpt = None,
) -> None:
    """Print the resolved preset as TOML: every field, where its value came from (preset file, the
    method's defaults, command line, built-in default) and the default where it differs. Saved to a file,
    it is a preset that resolves to the same settings."""
    from pipeline.preset_toml import origins, to_toml

    overrides = {**_pairs(set_), **({"distill.method": method} if method else {})}
    print(to_toml(resolve(preset, overrides), origins(preset, overrides)), end="")
