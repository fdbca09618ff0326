"""The GPU benchmark suite's dry run: every row runs on the CPU at tiny sizes, so the script cannot rot."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_gpu_suite_dry_run_reports_every_row(tmp_path):
    """`benchmarks/gpu_suite.py --dry-run` in a fresh process: a JSON row per measurement with positive
    throughput, MFU and memory, and none of the modules the GPU machine lacks (prefect, duckdb) imported."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from gpu_suite import ROWS
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    out = tmp_path / "suite.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "",
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_suite.py"), "--dry-run", "--json-out",
                           str(out)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [r["row"] for r in report["results"]] == list(ROWS) and not report["skipped"]
    for row in report["results"]:
        assert row["per_s"] > 0 and row["flops_per_unit"] > 0 and 0 < row["mfu"], row
        assert row["peak_mem_mib"] > 0 and len(row["step_seconds"]) == 2, row
    assert report["heavy_modules"] == []
    assert "| train_compile |" in done.stdout
