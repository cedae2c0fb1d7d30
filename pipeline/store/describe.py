"""A logit cache described for people: the rows and table of `kd cache ls`, the lines of `kd cache
info` (layout, views, sparse entry, completeness, sizes), and interrupted uploads with the commands that
finish or remove them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from pipeline.store import LogitStore, Manifest

if TYPE_CHECKING:
    from pipeline.remote import Remains  # copies sit above the store: named for the type only


def listing(entry: str) -> dict[str, Any]:
    store = LogitStore.open(entry)
    m = store.manifest
    return {
        "name": entry.rstrip("/").rsplit("/", 1)[-1],
        "rows": m.dataset.length,
        "bytes": store.nbytes_stored(),
        "teacher_accuracy": m.teacher_accuracy,
        "created": m.created,
        "complete": store.is_intact,
        "teacher": m.teacher.name,
        "dataset": m.dataset.name,
        "split": m.dataset.split,
        "classes": m.dataset.num_classes,
        "dtype": m.storage.dtype,
        "views": m.num_views,
        "augment": m.views.get("augment", {}).get("kind", "none"),
    }


def print_uploads(uploads: list[Remains], root: str, console: Console) -> None:
    """Interrupted uploads under a URL, each with the commands that finish or remove it."""
    for r in uploads:
        source = (r.record or {}).get("source") or "CACHE"
        console.print(f"{r.url}: {r.describe()}", highlight=False)
        console.print(f"  finish it: kd cache push {source} {r.url}", highlight=False)
        console.print(
            f"  remove it: kd cache gc --root {root} --older-than 0 --yes (once no push is running)",
            highlight=False,
        )


def listing_table(rows: list[dict[str, Any]], root: str | Path, long: bool, console: Console) -> None:
    """The table of `kd cache ls` (one block per cache with --long or when it is too wide)."""
    # a name not made by kd (team.zip) does not say whose logits these are: then the teacher is shown too
    unnamed = any(not r["name"].startswith(f"{r['teacher']}.{r['dataset']}.{r['split']}.") for r in rows)
    extra = ["teacher", "split"] if unnamed else []
    columns = ["name", "rows", "size", "acc", "created", "ok", *extra]
    cells = [row_cells(r, extra) for r in rows]
    width = sum(
        max(len(c), *(len(Text.from_markup(row[i]).plain) for row in cells)) for i, c in enumerate(columns)
    )
    if long or width + len(columns) - 1 > console.width:  # one block per cache: readable at any width
        console.print(f"logit caches in {root}", highlight=False)
        for r in rows:
            console.print(r["name"], highlight=False, soft_wrap=True)
            state = "complete" if r["complete"] else "[red]not complete[/red]"
            console.print(
                f"  teacher {r['teacher']}, data {r['dataset']}/{r['split']}, {r['rows']:,} rows x "
                + (f"{r['views']} {r['augment']} views x " if r["augment"] != "none" else "")
                + f"{r['classes']} classes {r['dtype']}",
                highlight=False,
            )
            console.print(
                f"  {size_text(r['bytes'])}, teacher accuracy {pct(r['teacher_accuracy'])}, "
                f"created {r['created'][:16].replace('T', ' ')} UTC, {state}",
                highlight=False,
            )
        return
    table = Table(
        title=f"logit caches in {root}", box=None, title_justify="left", pad_edge=False, padding=(0, 1, 0, 0)
    )
    table.add_column("name", no_wrap=True, min_width=max(len(r["name"]) for r in rows))
    for column in columns[1:]:
        right = column in ("rows", "size", "acc")
        table.add_column(column, justify="right" if right else "left", no_wrap=column != "teacher")
    for row in cells:
        table.add_row(*row)
    console.print(table)
    Console().print(  # the legend may wrap between words
        "acc: the teacher's accuracy on the split; created: UTC; -l: every field, one cache a block"
        + ("; rows xK: K augmented views a row" if any(r["augment"] != "none" for r in rows) else "")
    )


def row_cells(r: dict[str, Any], extra: list[str]) -> list[str]:
    """One table row of `kd cache ls`: short cells, so kd's own names fit 80 columns."""
    return [
        r["name"],
        f"{r['rows']:,}" + (f"x{r['views']}" if r["augment"] != "none" else ""),
        size_text(r["bytes"]).replace(" ", "").replace("iB", ""),  # 83.5K
        "-" if r["teacher_accuracy"] is None else f"{100 * r['teacher_accuracy']:.1f}%",
        r["created"][5:16].replace("T", " ") or "-",  # MM-DD HH:MM (UTC); --json has the full time
        "yes" if r["complete"] else "[red]no[/red]",
        *(str(r[column]) for column in extra),
    ]


def teacher_accuracy(m: Manifest) -> str:
    """On this split, and on the rows it was trained on when known; of tokens for a language model."""
    what = "of the next tokens" if m.task == "sequence" else ""
    text = f"{pct(m.teacher_accuracy)}{' ' + what if what else ''} on this {m.dataset.split} split"
    if m.teacher.train_accuracy is not None:
        text += f"; {pct(m.teacher.train_accuracy)} on the rows it was trained on"
    return text


def count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def sparse_short(sparse: dict[str, Any]) -> str:
    """'64 tokens x top 32 of ' (language models), 'top 5 of ' (classification), '' (dense)."""
    if not sparse:
        return ""
    return f"{sparse['seq_len']} tokens x " * bool(sparse["seq_len"]) + f"top {sparse['k']} of "


def sparse_text(sparse: dict[str, Any], store: LogitStore) -> str:
    """The sparse layout in words, with its bytes per token on disk."""
    tokens = max(int(store.manifest.logit_stats.get("tokens", 0)), 1)  # tokens, views or rows in all
    unit, where = (
        ("token", f"per token of {sparse['seq_len']}: ")
        if sparse["seq_len"]
        else ("view", "per view of a row: ")
        if store.manifest.views
        else ("row", "per row: ")
    )
    temps = ", ".join(f"{t:g}" for t in sparse["lse_temperatures"])
    s, seed = sparse["samples"], sparse["sample_seed"]
    samples = f", {s} sampled tokens (seed {seed})" if s else ""
    return (
        f"{where}top {sparse['k']} of {sparse['vocab']} logits "
        f"({sparse['id_dtype']} ids), logsumexp at T = {temps}{samples}; "
        f"{store.nbytes_stored() / tokens:.1f} bytes a {unit} on disk"
    )


def views_text(views: dict[str, Any]) -> str:
    if not views:
        return "none: the fixed, un-augmented view of each row"
    a = views["augment"]
    which = "every view" if views.get("all") else f"drawn with view seed {views['seed']}"
    how = (  # random-resized-crop has no padding: its area and aspect ranges instead
        f"scale {a['scale']}, ratio {[round(r, 3) for r in a['ratio']]}"
        if "scale" in a
        else f"pad {a['pad']}"
    )
    return (
        f"{views['count']} {a['kind']} views a row ({how}, {which}); parameters "
        f"({', '.join(a['params'])}), replay version {views['version']}"
    )


def completeness(store: LogitStore) -> str:
    done = int(store.shards_done().sum())
    damaged = store.damaged_records()
    state = f"{store.is_intact} ({done}/{store.num_shards} shards done"
    if damaged:
        state += "; unreadable records: " + ", ".join(f"{k} of shards {v}" for k, v in damaged.items())
    return state + ")"


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def size_text(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} TiB"
