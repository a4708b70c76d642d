"""benchmarks/plot_speed.py on synthetic speed JSON rows: data selection, table, chart, for any
subset of engines (a dms_fp8-only JSON used to end in an IndexError)."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import plot_speed  # noqa: E402
from speed_rows import row  # noqa: E402

META = dict(model="m", device="H200", vllm_version="0.26.0", commit="abc", date="2026-12-04")


def full():
    rows = [row("dms_fp8", 8, 150.0, 900.0, decode_tok_s_spread=[140.0, 160.0],
                prefill_tok_s_spread=[850.0, 950.0], runs=3, decode_x_bf16=1.5,
                prefill_x_bf16=0.9, decode_x_fp8=1.25),
            row("vllm-bf16", 8, 100.0, 1000.0, runs=3, decode_x_bf16=1.0, prefill_x_bf16=1.0),
            dict(engine="vllm-tq4", error="boom", failed_runs=3)]
    return [dict(r, **META) for r in rows]


def only_dms():
    return [dict(row("dms_fp8", c, 10.0 * c, 100.0 * c, runs=3), **META) for c in (1, 8)]


def test_selection_skips_error_rows_and_puts_bf16_first():
    rows = full()
    assert [r["engine"] for r in plot_speed.measured(rows)] == ["dms_fp8", "vllm-bf16"]
    assert plot_speed.engines(rows) == ["vllm-bf16", "dms_fp8"]


def test_series_carry_the_spread_or_none():
    s = plot_speed.series(full(), "decode_tok_s")
    assert s["dms_fp8"][8] == (150.0, 140.0, 160.0)
    assert s["vllm-bf16"][8] == (100.0, 100.0, 100.0), "a row without spread: min = max"


def test_labels_are_ratios_with_bf16_and_tok_s_without():
    assert plot_speed.bar_labels(full(), "decode_tok_s", "decode_x_bf16")[("dms_fp8", 8)] == \
        "1.50x"
    labels = plot_speed.bar_labels(only_dms(), "decode_tok_s", "decode_x_bf16")
    assert labels == {("dms_fp8", 1): "10", ("dms_fp8", 8): "80"}


def test_table_has_medians_spreads_ratios_and_failures():
    lines = plot_speed.table(full()).splitlines()
    assert lines[0] == "# Speed, m (H200, vLLM 0.26.0, commit abc, 2026-12-04)"
    cells = lambda ln: [c.strip() for c in ln.strip("|").split("|")]  # noqa: E731
    header = cells(lines[2])
    dms = dict(zip(header, cells(lines[4])))
    assert dms["decode tok/s (min-max)"] == "150.0 (140.0-160.0)"
    assert dms["prefill tok/s (min-max)"] == "900 (850-950)"
    assert (dms["runs"], dms["decode x BF16"], dms["decode x FP8"]) == ("3", "1.50", "1.25")
    bf16 = dict(zip(header, cells(lines[5])))
    assert bf16["decode x FP8"] == "-" and bf16["decode tok/s (min-max)"] == "100.0 (100.0-100.0)"
    failed = cells(lines[6])
    assert failed[:3] == ["vllm-tq4", "-", "3 failed"] and len(failed) == len(header)


def test_table_without_bf16_or_fp8_omits_the_ratios():
    lines = plot_speed.table(only_dms()).splitlines()
    assert len(lines) == 6
    for ln in lines[4:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        assert cells[5:8] == ["-", "-", "-"], ln


def test_write_makes_the_table_for_a_dms_only_json(tmp_path):
    path = tmp_path / "speed-m-2026-12-04.json"
    path.write_text(json.dumps(only_dms()))
    written = plot_speed.write(str(path))
    assert written[0] == str(tmp_path / "speed-m-2026-12-04.md")
    assert "| dms_fp8 | 8 | 3 | 800 (800-800) | 80.0 (80.0-80.0) | - | - | - |" in \
        open(written[0]).read()


def test_no_measured_row_gives_no_chart(tmp_path):
    path = tmp_path / "speed-x.json"
    path.write_text(json.dumps([dict(engine="dms_fp8", error="boom")]))
    assert plot_speed.plot(str(path)) is None


@pytest.mark.parametrize("rows", [full, only_dms])
def test_png_for_any_subset_of_engines(tmp_path, rows):
    # Only this test needs matplotlib (not a dependency of the package): skipped without it.
    pytest.importorskip("matplotlib")
    path = tmp_path / "speed.json"
    path.write_text(json.dumps(rows()))
    out = plot_speed.plot(str(path))
    assert out == str(tmp_path / "speed.png") and os.path.getsize(out) > 1000
