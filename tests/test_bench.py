"""`kd bench --quick` writes every figure; values are checked for sense, timings never against goals."""

from __future__ import annotations

import json

import pytest

from pipeline.config import Paths
from pipeline.store import CODECS
from tests.test_cli import kd


@pytest.mark.slow
def test_bench_quick_writes_all_figures(tmp_path) -> None:
    paths = Paths(data=tmp_path)
    result = kd(paths, "bench", "--quick", "--reps", "1")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert set(report["workloads"]) == {"tiny", "cifar-synthetic"}
    for w in report["workloads"].values():
        for ratio in (
            w["dump"]["ratio"],
            w["distill"]["cached_kd_overhead"],
            w["distill"]["online_over_cached"],
        ):
            assert ratio["median"] > 0  # measured, not judged: bench reports numbers, tests never time
        sizes = w["storage"]["bytes_per_logit"]
        assert set(sizes) == {f"{d}+{c}" for d in ("float32", "float16", "bfloat16") for c in CODECS}
        assert all(0 < v < 4.5 for v in sizes.values())
        errors = w["storage"]["max_abs_prob_error"]
        assert all(v == 0 for v in errors["float32"].values())
        assert (
            0 < errors["float16"]["T=1"] < errors["bfloat16"]["T=1"] < 1e-2
        )  # bf16 keeps fewer mantissa bits
        assert w["read"]["rows_per_s"]["streamed"] > 0 and w["read"]["rows"] >= 20_000
    text = (tmp_path / "bench" / "bench.md").read_text()
    assert "1. dump overhead" in text and "cifar-synthetic" in text


@pytest.mark.slow
def test_bench_scale_quick_reads_the_cache_three_ways(tmp_path) -> None:
    """`kd bench --workload scale --quick`: local streamed, remote (loopback S3) and memmap each read every
    row once, in a process of their own; the figures are written, never judged here."""
    from tests.test_bad_inputs import run_kd

    # in a process of its own: its S3 server must not replace the session's in fsspec's cache
    result = run_kd(tmp_path, "bench", "--workload", "scale", "--quick")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "bench" / "scale.json").read_text())
    assert (report["rows"], report["classes"]) == (20_000, 100)
    for kind in ("local", "remote", "memmap"):
        figures = report[kind]
        assert figures["rows"] == 20_000 and figures["rows_per_s"] > 0 and figures["peak_rss_mb"] > 0
    assert report["local"]["bytes_fetched"] == report["logits_bytes"]  # every shard read once
    assert report["remote"]["bytes_fetched"] == report["logits_bytes"]
    assert report["remote_again"]["rows"] > 0 and report["remote_again"]["first_batch_s"] > 0
    assert (tmp_path / "bench" / "scale.md").read_text().startswith("# kd bench-scale")


def test_bench_scale_without_moto_is_one_line(tmp_path, monkeypatch) -> None:
    """moto is a dev dependency: a plain install asking for the scale benchmark gets one line, no work."""
    import importlib.util

    from pipeline.config import Paths
    from tests.test_cli import assert_one_line_error, kd

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "moto" else find_spec(name, *a)
    )
    result = kd(Paths(data=tmp_path), "bench", "--workload", "scale", "--quick")
    assert_one_line_error(result, "pip install 'kd-cache[dev]'")
    assert not (tmp_path / "bench").exists()
