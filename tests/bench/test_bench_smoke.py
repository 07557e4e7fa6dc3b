"""The benchmark command keeps working: a small quick subset, rows checked for shape.

Speed is never asserted here (benchmarks report ratios; tests do not time
things): this only proves that `hack/bench.py` runs end to end against a real
cluster and writes the rows it promises.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_quick_subset_writes_rows(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    r = subprocess.run(
        [sys.executable, str(ROOT / "hack" / "bench.py"), "--quick", "--only", "inline",
         "--comms", "hpush", "--transforms", "md5", "--sizes", "1KiB", "--json", str(out)],
        capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())
    names = [row["name"] for row in rows]
    assert "inline hpush md5 1KiB" in names, names
    assert "| inline hpush md5 1KiB |" in r.stdout
    for row in rows:
        assert set(row) == {"name", "ours", "baseline", "ratio", "unit"}
        if row["ours"] is None:
            assert "n/a" in row["name"]
            continue
        assert row["ours"] > 0 and row["baseline"] > 0
        expected = row["ours"] / row["baseline"]
        if "ratio inverted" in row["unit"]:
            expected = row["baseline"] / row["ours"]
        assert abs(row["ratio"] - expected) <= 0.01 * expected + 0.001, row
