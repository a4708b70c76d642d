"""benchmarks/results_table.py's speed table for a JSON without BF16/FP8 rows: '-' ratios."""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import results_table  # noqa: E402
from speed_rows import row  # noqa: E402


def test_speed_table_without_bf16_prints_dashes(tmp_path, monkeypatch, capsys):
    rows = [dict(row("dms_fp8", 8, 150.0, 900.0), model="m")]
    (tmp_path / "speed-m-2026-12-04.json").write_text(json.dumps(rows))
    monkeypatch.setattr(results_table, "ROOT", str(tmp_path))
    results_table.speed()
    assert capsys.readouterr().out.splitlines()[-1] == \
        "| m | dms_fp8 | 8 | 150.0 | - | - | - | 1000 | - |"
