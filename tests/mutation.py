"""`make mutation`: do the tests catch a broken product? Two checks, each in a scratch copy of the tree,
reported in data/mutation/report.md and report.json (not part of `make test`: tens of minutes on 2 cores).

1. Seeded mutations: the bugs a reviewer planted by hand (kd at T = 1, the teacher ignored, halved
   logits in the cache, ...), each applied alone; the relevant tests must fail (the mutant is "killed").
2. mutmut over the core modules (losses, schedules, targets, the store's integrity and completeness
   code, batches) with the tests configured under [tool.mutmut] in pyproject.toml.

    .venv/bin/python tests/mutation.py [--seeded-only | --mutmut-only]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAST = ["-p", "no:xdist", "-x", "-q"]
CLAIMS = ["tests/test_claims.py", "-m", "not slow"]

# (name, file, code as it is, code as mutated, tests that must fail)
SEEDED = [
    (
        "kd always uses T = 1",
        "pipeline/distill/methods.py",
        '        "temperature": schedules.temperature_at(epoch, cfg),\n        **_weights(cfg, epoch),',
        '        "temperature": 1.0,\n        **_weights(cfg, epoch),',
        CLAIMS,
    ),
    (
        "kd with alpha = 0 (the teacher ignored)",
        "pipeline/distill/methods.py",
        '{"alpha": schedules.alpha_at(epoch, cfg)}',
        '{"alpha": 0.0}',
        CLAIMS,
    ),
    (
        "the cache stores halved logits",
        "pipeline/store/writer.py",
        "encoded = encode_logits(logits, self.dtype)",
        "encoded = encode_logits(logits / 2, self.dtype)",
        CLAIMS,
    ),
    (
        "DKD warm-up fixed at 1",
        "pipeline/distill/methods.py",
        '"warmup": schedules.dkd_warmup(epoch, d.warmup_epochs),',
        '"warmup": 1.0,',
        CLAIMS,
    ),
    (
        "Annealing phase 2 reuses phase 1's optimizer",
        "pipeline/training/loop.py",
        "    optimizer = make_optimizer(model, cfg)\n",
        "    optimizer = getattr(model, '_kd_opt', None) or make_optimizer(model, cfg)\n"
        "    model._kd_opt = optimizer\n",
        CLAIMS,
    ),
    (
        "checksums skipped on streamed reads",
        "pipeline/store/reader.py",
        "if block == self.shard_rows:",
        "if False:",
        CLAIMS,
    ),
    (
        "require_complete ignores the manifest's complete flag",
        "pipeline/store/dense.py",
        "if not self.manifest.complete or not self.shards_done().all():",
        "if not self.shards_done().all():",
        CLAIMS,
    ),
    (
        "DDP ranks seeded differently",
        "stages/distill.py",
        "generator = seed_everything(cfg.seed)",
        "generator = seed_everything(cfg.seed + ranks.rank)",
        ["tests/test_distributed.py::test_ddp_distill_writes_one_summary"],
    ),
    (
        "verify without its duplicate-id check",
        "pipeline/store/integrity.py",
        "            repeated.append(shard)",
        "            pass",
        CLAIMS,
    ),
    (
        "verify without its accuracy check",
        "pipeline/store/integrity.py",
        "if recorded is not None and not unreadable and abs(accuracy - recorded) > 0.005:",
        "if False:",
        CLAIMS,
    ),
    (
        "no class-count check",
        "pipeline/cache.py",
        "if store.num_classes != split.num_classes:",
        "if False:",
        CLAIMS,
    ),
    (
        "T not clamped at 1 (the Annealing authors' overshoot past Phi = 1)",
        "pipeline/distill/schedules.py",
        "return max(1, t_max - epoch // k)",
        "return t_max - epoch // k",
        ["tests/test_schedules.py"],
    ),
    (
        "psi ignores its cut-off (no ramp-then-step)",
        "pipeline/distill/schedules.py",
        "    if epoch > cfg.psi_epochs:\n        return 1.0\n",
        "",
        ["tests/test_schedules.py", "tests/test_paper_presets.py"],
    ),
    (
        "mean_max_softmax computed as the mean softmax",
        "pipeline/store/integrity.py",
        "logits.softmax(-1).max(-1).values.double()",
        "logits.softmax(-1).mean(-1).double()",
        CLAIMS,
    ),
    (
        "the student's target is view 0 whatever view its input replays",
        "pipeline/distill/batches.py",
        "(rows, self.teacher_logits[rows, pick], views.params",
        "(rows, self.teacher_logits[rows, 0], views.params",
        ["tests/test_views.py", "-m", "not slow"],
    ),
    (
        "view parameters depend on the batch, not the sample id",
        "pipeline/data/augment.py",
        "+ ids.astype(np.uint64))",
        "+ np.arange(len(ids), dtype=np.uint64))",
        ["tests/test_views.py", "-m", "not slow"],
    ),
    (
        "a random-resized-crop box ignores the view index (K copies of one view)",
        "pipeline/data/readers.py",
        "crop_box(seed, sample_id, k, image.shape[1], image.shape[2])",
        "crop_box(seed, sample_id, 0, image.shape[1], image.shape[2])",
        ["tests/test_file_sources.py", "-k", "random_resized_crop_views"],
    ),
    (
        "the workers' batches come back paired with the wrong rows",
        "pipeline/data/readers.py",
        "rows, extra = pending.popleft()",
        "rows, extra = pending.pop()",
        ["tests/test_file_sources.py", "-k", "fixed_view or in_memory_cache_bytes"],
    ),
    (
        "a file-backed split's fingerprint ignores the content of its files",
        "pipeline/data/split.py",
        'digest.update(f"content:{self.content}".encode())',
        "pass",
        ["tests/test_file_sources.py", "-k", "fingerprint or token_file or npy_memmap"],
    ),
    (
        "token windows' labels are the inputs, not the next tokens",
        "pipeline/data/tokens.py",
        'offset = 1 if self.role == "labels" else 0',
        "offset = 0",
        ["tests/test_file_sources.py", "-k", "token_file"],
    ),
    (
        "an unreadable image is decoded as a black one",
        "pipeline/data/readers.py",
        "return i, Unreadable(self.name_of(i), reason)",
        "return i, torch.zeros(self.sample_shape)",
        ["tests/test_file_sources.py", "-k", "damaged"],
    ),
]


def scratch_copy(into: Path) -> Path:
    """The tracked files (and untracked, not ignored ones) of the working tree, without data/ or .venv."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for rel in listed:
        src = ROOT / rel
        if src.is_file():
            (into / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, into / rel)
    return into


def env_for(tree: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}


def seeded() -> list[dict[str, object]]:
    results = []
    for name, file, old, new, tests in SEEDED:
        with tempfile.TemporaryDirectory(prefix="kd-mutant-") as tmp:
            tree = scratch_copy(Path(tmp))
            source = (tree / file).read_text()
            if source.count(old) != 1:
                results.append({"mutation": name, "file": file, "status": "not applied (code changed)"})
                continue
            (tree / file).write_text(source.replace(old, new))
            started = time.perf_counter()
            run = subprocess.run(
                [sys.executable, "-m", "pytest", *FAST, *tests],
                cwd=tree,
                env=env_for(tree),
                capture_output=True,
                text=True,
            )
            failed = re.findall(r"^FAILED (\S+)", run.stdout, re.M)
            status = "killed" if run.returncode == 1 else ("survived" if run.returncode == 0 else "error")
            results.append(
                {
                    "mutation": name,
                    "file": file,
                    "status": status,
                    "killed_by": failed[:1],
                    "seconds": round(time.perf_counter() - started, 1),
                }
            )
            print(f"{status:9} {name}  {failed[:1]}", flush=True)
    return results


def mutmut() -> dict[str, dict[str, int]]:
    """mutmut run in a scratch copy; {module: {status: count}} from `mutmut results --all true`."""
    with tempfile.TemporaryDirectory(prefix="kd-mutmut-") as tmp:
        tree = scratch_copy(Path(tmp))
        env = env_for(tree)
        env.pop("PYTHONPATH")  # mutmut puts its mutants/ first itself
        # mutmut forks a worker per mutant: a forked child can deadlock in the OpenMP pool its parent
        # started (seen as timeouts), so torch runs single-threaded here
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", "2"], cwd=tree, env=env)
        listing = subprocess.run(
            [sys.executable, "-m", "mutmut", "results", "--all", "true"],
            cwd=tree,
            env=env,
            capture_output=True,
            text=True,
        ).stdout
        survivors = re.findall(r"^\s*(\S+__mutmut_\d+): survived$", listing, re.M)
        diffs = [
            subprocess.run(
                [sys.executable, "-m", "mutmut", "show", name],
                cwd=tree,
                env=env,
                capture_output=True,
                text=True,
            ).stdout
            for name in survivors
        ]
        (ROOT / "data" / "mutation" / "survivors.md").write_text(
            "# Surviving mutants\n\n"
            + "".join(f"## {n}\n\n```diff\n{d}\n```\n\n" for n, d in zip(survivors, diffs, strict=True))
        )
    counts: dict[str, dict[str, int]] = {}
    for module, status in re.findall(r"^\s*(pipeline\.[\w.]+?)\.x\w+__mutmut_\d+: (.+)$", listing, re.M):
        counts.setdefault(module, {}).setdefault(status.strip(), 0)
        counts[module][status.strip()] += 1
    return counts


def kill_rate(statuses: dict[str, int]) -> float:
    """Killed (a test failed or timed out) over mutants some test ran (no-test mutants count as
    survivors: code no test reaches is code no test protects)."""
    killed = statuses.get("killed", 0) + statuses.get("timeout", 0)
    total = sum(v for k, v in statuses.items() if k not in ("skipped", "not checked"))
    return killed / total if total else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeded-only", action="store_true")
    parser.add_argument("--mutmut-only", action="store_true")
    args = parser.parse_args()
    out = ROOT / "data" / "mutation"
    out.mkdir(parents=True, exist_ok=True)
    previous = out / "report.json"  # a partial run (--seeded-only, --mutmut-only) keeps the other half
    report: dict[str, object] = json.loads(previous.read_text()) if previous.is_file() else {}
    if not args.mutmut_only:
        report["seeded"] = seeded()
    if not args.seeded_only:
        report["mutmut"] = {m: {"counts": c, "kill_rate": kill_rate(c)} for m, c in mutmut().items()}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# Mutation check", ""]
    if "seeded" in report:
        rows = report["seeded"]
        assert isinstance(rows, list)
        survived = [r for r in rows if r["status"] != "killed"]
        lines += [f"Seeded mutations: {len(rows) - len(survived)} of {len(rows)} killed.", ""]
        lines += ["| mutation | file | status | first failing test |", "|---|---|---|---|"]
        lines += [f"| {r['mutation']} | {r['file']} | {r['status']} | {', '.join(r.get('killed_by', []))} |"
                  for r in rows]  # fmt: skip
        lines.append("")
    if "mutmut" in report:
        lines += ["mutmut (killed + timeout over all mutants, untested ones counted as survivors):", ""]
        lines += [
            "| module | killed | survived | no tests | timeout | kill rate |",
            "|---|---|---|---|---|---|",
        ]  # noqa: E501
        for module, entry in sorted(report["mutmut"].items()):  # type: ignore[union-attr]
            c = entry["counts"]
            lines.append(
                f"| {module} | {c.get('killed', 0)} | {c.get('survived', 0)} | {c.get('no tests', 0)} | "
                f"{c.get('timeout', 0)} | {100 * entry['kill_rate']:.0f}% |"
            )
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print(f"report: {out / 'report.md'}")


if __name__ == "__main__":
    main()
