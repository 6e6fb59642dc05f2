"""bench/gpu_check.py: the speedup projection on hand-computed cases, and the dry run (CPU, tiny models)."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)

VERIFY = {1: 0.010, 2: 0.011, 4: 0.012, 8: 0.014, 16: 0.020, 32: 0.030}  # seconds per pass of n rows
DRAFT = {1: 0.002, 2: 0.002, 4: 0.0025, 8: 0.003, 16: 0.004, 32: 0.006}


def test_cost_is_linear_between_measured_rows_and_past_the_last():
    assert gpu_check.cost_at(VERIFY, 1) == 0.010
    assert gpu_check.cost_at(VERIFY, 3) == pytest.approx(0.0115)
    assert gpu_check.cost_at(VERIFY, 5) == pytest.approx(0.0125)
    assert gpu_check.cost_at(VERIFY, 33) == pytest.approx(0.030 + 0.010 / 16)


def test_projection_by_hand():
    cat = {"tau": 2.4, "acceptance_per_position": [0.9, 0.6, 0.3], "block_size": 4}
    p = gpu_check.project(cat, VERIFY, DRAFT)
    # measured: tau 2.4 at B = 4 costs draft(4) + verify(5) = 0.0025 + 0.0125 -> 2.4 * 0.010 / 0.015
    assert p["measured"]["speedup"] == pytest.approx(1.6)
    # B = 1: tau 1.9 / (0.002 + 0.011) -> 1.46; B = 2: tau 2.5 / (0.002 + 0.0115) -> 1.85;
    # B = 3: tau 2.8 / (0.00225 + 0.012) -> 1.96, the best
    assert p["best"]["block_size"] == 3
    assert p["best"]["tau"] == pytest.approx(2.8)
    assert p["best"]["speedup"] == pytest.approx(2.8 * 0.010 / 0.01425)


def test_acceptance_per_position_is_made_non_increasing_and_its_absence_uses_the_measured_tau():
    assert gpu_check.expected_tau([0.9, 0.3, 0.5], 3) == pytest.approx(1 + 0.9 + 0.3 + 0.3)
    p = gpu_check.project({"tau": 2.0, "acceptance_per_position": [], "block_size": 2}, VERIFY, DRAFT)
    assert p["best"] == p["measured"] == {"block_size": 2, "tau": 2.0, "speedup": pytest.approx(0.02 / 0.0135)}


def bench_json(path: Path, methods: dict, block_size="auto") -> Path:
    path.write_text(json.dumps({"config": {"block_size": block_size}, "methods": methods}))
    return path


def stats(tau, per_pos, blocks):
    return {"mean_acceptance_length": tau, "acceptance_per_position": per_pos, "block_sizes": blocks}


def test_newest_bench_goes_by_date_then_the_parallel_drafter(tmp_path):
    hybrid = {"plain": {}, "hybrid": {"code": stats(1.5, [0.5], {"1": 3})}}
    bench_json(tmp_path / "cpu-2cores-2026-01-02-a.json", hybrid)
    bench_json(tmp_path / "cpu-2cores-avx2-2026-01-01-z.json", hybrid)  # sorts last by name, older by date
    best = bench_json(tmp_path / "cpu-2cores-2026-01-02-parallel-b.json",
                      {**hybrid, "parallel": {"code": stats(2.5, [0.9, 0.6], {"0": 1, "2": 4, "8": 1})}})
    bench_json(tmp_path / "cpu-2cores-2026-01-03-plain.json", {"plain": {}})  # no drafter: not a source
    assert gpu_check.newest_bench(tmp_path) == best
    acc = gpu_check.load_acceptance(best)
    assert acc["method"] == "parallel"
    assert acc["categories"]["code"] == {"tau": 2.5, "acceptance_per_position": [0.9, 0.6], "block_size": 8}


def test_dry_run_writes_the_report_and_projects_from_its_own_costs(tmp_path, capsys):
    source = bench_json(tmp_path / "bench.json", {"parallel": {
        "code": stats(2.4, [0.9, 0.6, 0.3], {"4": 10}), "chat": stats(1.5, [], {"4": 10})}}, block_size=4)
    rc = gpu_check.main(["--dry-run", "--out", str(tmp_path / "out"), "--tests", "tests/test_kernels.py",
                         "--acceptance", str(source)])
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert rc == 0 and report["errors"] == {}
    assert report["meta"]["dry_run"] and report["meta"]["device"] == "cpu"
    assert report["tests"]["ok"] and report["tests"]["counts"].get("skipped", 0) > 0  # GPU tests skip on a CPU
    for op in ("write_kv_all_layers", "gather_kv", "copy_pages"):
        assert report["kernels"]["ops"][op]["copy_gbps"] > 0 and "kernel_gbps" not in report["kernels"]["ops"][op]
    assert "CuPy kernels skipped" in report["kernels"]["note"]
    assert report["engine"]["ok"] and len(report["engine"]["cases"]) == 8
    assert all(c["identical_to_plain"] for c in report["engine"]["cases"])
    rows = [str(n) for n in gpu_check.ROWS]
    for model in ("verifier", "drafter"):
        series = report["costs"][model]["series"]
        assert sorted(series) == ["compile", "graph", "paged", "static"]
        assert list(series["paged"]["seconds"]) == rows and list(series["static"]["seconds"]) == rows
        assert "unavailable" in series["graph"] and "unavailable" in series["compile"]
    verify, draft = (gpu_check.curve(report["costs"][m]["series"]["paged"]) for m in ("verifier", "drafter"))
    projection = report["projection"]
    assert projection["acceptance_source"] == str(source) and "PROJECTION" in projection["note"]
    code = projection["categories"]["code"]["paged"]
    assert code == gpu_check.project({"tau": 2.4, "acceptance_per_position": [0.9, 0.6, 0.3], "block_size": 4},
                                     verify, draft)
    assert code["measured"]["speedup"] == pytest.approx(2.4 * verify[1] / (draft[4] + gpu_check.cost_at(verify, 5)))
    assert set(projection["categories"]["chat"]) == {"paged", "best"}
    assert "PROJECTION, not a measurement" in printed and "code" in printed
