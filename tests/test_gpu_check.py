"""benchmarks/gpu_check.py: the whole plan as a dry run on CPU (what a GPU machine will run, with tiny shapes, the
Triton interpreter and the CUDA parts skipped), a part killed at its time limit, and the verdict and targets."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time

import pytest
from conftest import ROOT, run_python

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402

GPU_MARK = re.compile(r"^(@pytest\.mark\.gpu|pytestmark = pytest\.mark\.gpu)$", re.MULTILINE)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory, session_hf_home) -> tuple[dict, str, object]:
    out = tmp_path_factory.mktemp("gpu_check")
    completed = run_python(["benchmarks/gpu_check.py", out, "--dry-run"], session_hf_home, timeout=600)
    return json.loads((out / "results.json").read_text()), (out / "results.md").read_text(), completed


def test_dry_run_passes_every_part(dry_run):
    results, markdown, completed = dry_run
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-3000:]
    statuses = {part: entry["status"] for part, entry in results["parts"].items()}
    train = "passed" if gpu_check.importlib.util.find_spec("datasets") else "skipped"
    assert statuses == {"env": "passed", "build": "skipped", "tests": "passed", "ops": "passed", "model": "passed",
                        "train": train}
    assert results["passed"] and not results["failures"]
    assert markdown.strip().endswith("**GPU check PASSED**")
    assert completed.stdout.strip().endswith("**GPU check PASSED**")  # the report is printed last


def test_dry_run_runs_every_gpu_test_and_only_those(dry_run):
    tests = [r for r in dry_run[0]["records"] if r["kind"] == "test"]
    assert len(tests) > 100 and {r["outcome"] for r in tests} == {"skipped"}
    files = {r["test"].split("::")[0] for r in tests}
    marked = {f"tests/{test.name}" for test in (ROOT / "tests").glob("test_*.py") if GPU_MARK.search(test.read_text())}
    assert files == marked and "tests/test_gpu_model.py" in files
    reasons = {r["message"] for r in tests}
    assert reasons <= {"needs a CUDA device", "needs triton, compiled (not under TRITON_INTERPRET=1)",
                       "dcnv3_cuda is not built (pip install ./dcnv3_cuda --no-build-isolation)"}, reasons


def test_dry_run_op_rows_match_the_pytorch_backend(dry_run):
    rows = [r for r in dry_run[0]["records"] if r["kind"] == "op"]
    cases = {(r["stage"], r["dtype"], r["backend"]) for r in rows}
    assert cases == {(s, d, b) for s in (0, 3) for d in ("float32", "float16", "bfloat16")
                     for b in ("pytorch", "triton")}
    for row in rows:
        assert row["shape"] == "2×2, C=16, G=1" and row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0
        limit = {"float32": 1e-6, "float16": 2e-3, "bfloat16": 2e-2}[row["dtype"]]
        assert row["parity_ok"] and row["parity_error"] < limit, row


def test_dry_run_model_rows_and_report(dry_run):
    results, markdown, _ = dry_run
    kinds = [(r["kind"], r.get("dtype"), r.get("batch")) for r in results["records"]
             if r["kind"] in ("inference", "train_step")]
    assert kinds == [("inference", "float16", 1), ("inference", "float16", 2), ("inference", "bfloat16", 2),
                     ("train_step", "bfloat16", 2)]
    assert all(r["parity_ok"] for r in results["records"] if r["kind"] == "inference")
    targets = {t["target"].split(",")[0]: t for t in results["targets"]}
    assert targets["bf16 works on every backend (op"]["met"]
    for heading in ("### DCNv3 op", "### Inference", "### Training step", "### Tests (`pytest -m gpu`)",
                    "### Targets", "### Parts"):
        assert heading in markdown


def test_a_part_over_its_limit_is_killed_and_fails(tmp_path, monkeypatch):
    """A part still running at its limit (here its soft deadline lies beyond it) is killed with its process group."""
    monkeypatch.setattr(gpu_check, "SOFT_MARGIN_S", -100.0)
    args = argparse.Namespace(output=tmp_path, dry_run=True, test_workers=1)
    (tmp_path / gpu_check.RECORDS).write_text("")
    start = time.monotonic()
    run = gpu_check.run_part("tests", args, limit_s=3)  # collecting the test suite alone takes longer
    assert run["timed_out"] and time.monotonic() - start < 10
    records = gpu_check.read_records(tmp_path / gpu_check.RECORDS) + [run]
    assert gpu_check.part_statuses(records)["tests"][0] == "timed out"
    assert gpu_check.failures(records) == ["part tests: timed out (killed after 3 s; )"]


def op_row(stage: int, backend: str, fwd_ms: float, fwd_bwd_ms: float, **extra) -> dict:
    return {"kind": "op", "variant": "t", "stage": stage, "shape": "56×56, C=64, G=4", "batch": 64,
            "dtype": "float16", "backend": backend, "fwd_ms": fwd_ms, "fwd_bwd_ms": fwd_bwd_ms,
            "fwd_copy_fraction": 0.7, "parity_error": 1e-3, "parity_ok": True, **extra}


def test_targets_and_failures_from_records():
    records = [
        op_row(0, "pytorch", 10.0, 30.0), op_row(0, "triton", 1.0, 5.0),
        op_row(1, "pytorch", 8.0, 20.0), op_row(1, "triton", 2.0, 10.0, parity_ok=False, parity_error=0.5),
        {"kind": "inference", "model": "InternImage-T 224", "backend": "triton", "dtype": "float16", "batch": 1,
         "mode": "cuda graph", "ms": 3.0, "parity_ok": True},
        {"kind": "test", "test": "tests/test_x.py::test_y", "outcome": "failed", "message": "boom"},
        {"kind": "part_run", "part": "ops", "seconds": 1.0, "limit_s": 9.0, "returncode": 0, "timed_out": False},
        {"kind": "part", "part": "ops", "status": "passed", "detail": ""},
    ]
    targets = {t["target"]: t for t in gpu_check.targets(records)}
    forward = targets["Triton forward vs PyTorch backend, T stages, float16 (worst stage)"]
    assert (forward["measured"], forward["met"]) == ("4.0× (stage 1)", False)
    both = targets["Triton forward+backward vs PyTorch backend, T stages, float16 (worst stage)"]
    assert (both["measured"], both["met"]) == ("2.0× (stage 1)", False)
    latency = targets["InternImage-T 224 fp16 batch-1 latency (best: triton, cuda graph)"]
    assert (latency["measured"], latency["met"]) == ("3.00 ms", True)
    assert targets["triton fp16 forward, T stage 0 (56×56, C=64, G=4), share of copy bandwidth"]["met"]
    assert gpu_check.failures(records) == [
        "test tests/test_x.py::test_y: failed", "op T 56×56, C=64, G=4 float16 triton 64: error 0.5 above the tolerance"
    ]


def test_part_limits_share_the_budget():
    plan = ["env", "build", "tests", "ops", "model"]
    assert gpu_check.part_limit("env", plan, 240) == 30  # its minimum
    assert gpu_check.part_limit("ops", ["ops", "model"], 100) == 50
    assert gpu_check.part_limit("build", plan[1:], 60) == 60  # never more than what remains
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["out", "--only", "tests,benchmarks"])
