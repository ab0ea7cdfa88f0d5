"""One command that checks the GPU path and measures it: `python benchmarks/gpu_check.py OUTPUT_DIR`.

Parts, in this order, each in its own process group with its own time limit (a hang or a slow compile cannot eat
the budget; the limits share `--budget` out, and time a part leaves unused goes to the later ones):

  env    GPU, memory, driver, CUDA, torch/triton/transformers versions, measured device-to-device copy bandwidth
         (always runs first)
  build  the CUDA extension `dcnv3_cuda/` for this GPU's architecture, timed, into build/gpu-check/lib (a failed
         build is reported and the rest still runs; later runs reuse the last build)
  tests  `pytest -m gpu`: every GPU test, with the extension importable
  ops    benchmarks/bench_dcnv3.py: DCNv3 forward and forward+backward on the T, B, L and H stage shapes at batch 64,
         fp32/fp16/bf16, per backend: ms, GB/s, share of the copy bandwidth, peak memory, error against PyTorch
  model  InternImage-T per backend: fp16 batch-1 latency (eager and replayed as a CUDA graph), images/s at batch
         128 in fp16 and bf16, and one training step (bf16 autocast, AdamW, batch 64, benchmarks/bench_train.py)
         with its peak memory
  train  a few steps of train_classification.py on the embedded digits (needs `datasets` and `evaluate`)

Results stream into OUTPUT_DIR/records.jsonl; OUTPUT_DIR/results.json and results.md (tables ready for
benchmarks/RESULTS.md) are rewritten after every part and the tables are printed at the end, the targets next to
the figures. Exit status 1 when a test, a parity check or the build failed, or a part crashed, overran its limit or
found no time left; 0 otherwise (the targets do not change it). docs/gpu-check.md says how to read the output.

    python benchmarks/gpu_check.py "$OUT/gpu-check"              # the whole plan in --budget 240 s
    python benchmarks/gpu_check.py out --only tests,ops          # rerun parts (env always runs)
    python benchmarks/gpu_check.py out --dry-run                 # the same plan on CPU with tiny shapes
"""

from __future__ import annotations

import argparse
import copy
import datetime
import functools
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BUILD_DIR = ROOT / "build" / "gpu-check"
RECORDS = "records.jsonl"
PARTS = ("build", "tests", "ops", "model", "train")
# Share of the remaining budget each part gets (relative to the parts still to run), and the least it gets.
PART_WEIGHT = {"env": 1, "build": 6, "tests": 8, "ops": 5, "model": 5, "train": 3}
PART_MINIMUM_S = {"env": 30, "build": 90, "tests": 90, "ops": 20, "model": 20, "train": 30}
SOFT_MARGIN_S = 8.0  # time a part keeps after its soft deadline to write up and exit (at most a quarter of its limit)
TARGETS = {"triton_fwd_speedup": 5.0, "triton_fwd_bwd_speedup": 3.0, "copy_fraction": 0.6, "latency_ms": 6.4}
TRAIN_PACKAGES = ("datasets", "evaluate")
TEST_TIMEOUT_S = 120  # per test, with pytest-timeout
# Reported by the env part: what `datasets` needs (docs/gpu-check.md), test plugins, the extension's build tools.
OPTIONAL_PACKAGES = (
    "datasets", "evaluate", "dill", "multiprocess", "pyarrow", "fsspec", "huggingface-hub", "pandas", "xxhash",
    "parameterized", "pytest", "pytest-xdist", "pytest-timeout", "accelerate", "timm", "setuptools", "ninja",
)


# ------------------------------------------------------------------------------------------------------- records


def _plain(value):
    """JSON-safe value: non-finite floats as strings (JSON has no NaN or infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def append_record(path: Path, record: dict) -> None:
    """Append one JSON line to the records file (each line is complete when written)."""
    with open(path, "a") as stream:
        stream.write(json.dumps({key: _plain(value) for key, value in record.items()}) + "\n")


def read_records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------------ the parent side


def part_limit(part: str, plan: list[str], remaining_s: float) -> float:
    """Seconds for `part` (the first of `plan`, the parts still to run): its weighted share of `remaining_s`,
    at least its minimum, at most what remains."""
    share = remaining_s * PART_WEIGHT[part] / sum(PART_WEIGHT[name] for name in plan)
    return min(remaining_s, max(PART_MINIMUM_S[part], share))


def child_environment(dry_run: bool) -> dict[str, str]:
    """The environment of a part: the built extension importable, output unbuffered, no backend override, the
    package index off (the GPU machine has no network: nothing may wait for one); on CPU for a dry run."""
    env = {key: value for key, value in os.environ.items() if key != "INTERNIMAGE_DCN_BACKEND"}
    paths = [str(HERE)] + ([str(BUILD_DIR / "lib")] if (BUILD_DIR / "lib").is_dir() else [])
    env["PYTHONPATH"] = os.pathsep.join([*paths, *filter(None, [os.environ.get("PYTHONPATH")])])
    env.update(PYTHONUNBUFFERED="1", PIP_NO_INDEX="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1")
    if dry_run:
        env.update(CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1")
    return env


def run_part(part: str, args: argparse.Namespace, limit_s: float) -> dict:
    """Run one part in its own process group; kill the group at `limit_s`. Returns the run's record."""
    soft_deadline = time.time() + limit_s - min(SOFT_MARGIN_S, limit_s / 4)
    command = [sys.executable, str(Path(__file__).resolve()), str(args.output), "--part", part,
               "--deadline", f"{soft_deadline:.1f}", "--test-workers", str(args.test_workers)]
    command += ["--dry-run"] if args.dry_run else []
    print(f"\n== {part} (limit {limit_s:.0f} s)", flush=True)
    start = time.monotonic()
    # A process group of its own, killed as one; in this session, so what ends this session ends it too.
    process = subprocess.Popen(command, cwd=ROOT, env=child_environment(args.dry_run), preexec_fn=os.setpgrp)
    try:
        returncode = process.wait(timeout=limit_s)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        returncode = process.wait()
        timed_out = True
    return {"kind": "part_run", "part": part, "seconds": time.monotonic() - start, "limit_s": limit_s,
            "returncode": returncode, "timed_out": timed_out}


def run_plan(args: argparse.Namespace) -> int:
    args.output.mkdir(parents=True, exist_ok=True)
    records_path = args.output / RECORDS
    records_path.write_text("")
    plan = ["env", *args.only]
    append_record(records_path, {
        "kind": "run", "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python", "benchmarks/gpu_check.py", *sys.argv[1:]]), "plan": plan,
        "budget_s": args.budget, "dry_run": args.dry_run,
    })
    end = time.monotonic() + args.budget
    for index, part in enumerate(plan):
        remaining = end - time.monotonic()
        if remaining < 5:
            append_record(records_path, {"kind": "part_run", "part": part, "not_run": "no time left in --budget"})
        else:
            append_record(records_path, run_part(part, args, part_limit(part, plan[index:], remaining)))
        write_reports(args.output)
        if part == "env" and part_statuses(read_records(records_path))["env"][0] != "passed":
            for later in plan[index + 1:]:
                append_record(records_path, {"kind": "part_run", "part": later, "not_run": "the env part failed"})
            write_reports(args.output)
            break
    records = read_records(records_path)
    print("\n" + render_markdown(records), flush=True)
    return 1 if failures(records) else 0


# ------------------------------------------------------------------------------------------------ summarising


def part_statuses(records: list[dict]) -> dict[str, tuple[str, str]]:
    """Each part's (status, detail): what the part reported, unless its process timed out, crashed or never ran."""
    reported = {r["part"]: (r["status"], r.get("detail", "")) for r in records if r["kind"] == "part"}
    statuses = {}
    for run in (r for r in records if r["kind"] == "part_run"):
        part = run["part"]
        if "not_run" in run:
            statuses[part] = ("not run", run["not_run"])
        elif run["timed_out"]:
            statuses[part] = ("timed out", f"killed after {run['limit_s']:.0f} s; " + reported.get(part, ("", ""))[1])
        elif part not in reported:
            statuses[part] = ("crashed", f"exit status {run['returncode']} (see the output above)")
        else:
            statuses[part] = reported[part]
    return statuses


def failures(records: list[dict]) -> list[str]:
    """Everything that makes the check fail: parts that failed or did not finish, failed tests and parity checks."""
    found = [f"part {part}: {status} ({detail})" for part, (status, detail) in part_statuses(records).items()
             if status not in ("passed", "skipped")]
    found += [f"test {r['test']}: {r['outcome']}" for r in records
              if r["kind"] == "test" and r["outcome"] in ("failed", "error")]
    for r in records:
        what = " ".join(str(r[key]).upper() if key == "variant" else str(r[key]) for key in
                        ("kind", "variant", "model", "shape", "dtype", "backend", "batch", "mode") if key in r)
        if r["kind"] in ("op", "inference") and r.get("parity_ok") is False:
            found.append(f"{what}: " + (r.get("error") or f"error {r['parity_error']} above the tolerance"))
        elif r["kind"] in ("train_step", "train_run") and not r.get("ok", True):
            found.append(f"{what}: " + (r.get("error") or f"loss {r.get('loss')}"))
    return found


def _speedups(records: list[dict], pass_name: str) -> dict[str, tuple[float, int]]:
    """Per dtype, the smallest PyTorch/Triton time ratio over the T stages, with its stage."""
    ops = {(r["stage"], r["dtype"], r["backend"]): r for r in records
           if r["kind"] == "op" and r["variant"] == "t" and "error" not in r}
    worst = {}
    for (stage, dtype, backend), row in ops.items():
        reference = ops.get((stage, dtype, "pytorch"))
        if backend == "triton" and reference is not None:
            ratio = reference[f"{pass_name}_ms"] / row[f"{pass_name}_ms"]
            if dtype not in worst or ratio < worst[dtype][0]:
                worst[dtype] = (ratio, stage)
    return worst


def targets(records: list[dict]) -> list[dict]:
    """The issue's targets, each with the measured value and whether it is met (only those measured)."""
    rows = []
    for pass_name, label, goal in (("fwd", "forward", TARGETS["triton_fwd_speedup"]),
                                   ("fwd_bwd", "forward+backward", TARGETS["triton_fwd_bwd_speedup"])):
        for dtype, (ratio, stage) in sorted(_speedups(records, pass_name).items()):
            rows.append({"target": f"Triton {label} vs PyTorch backend, T stages, {dtype} (worst stage)",
                         "measured": f"{ratio:.1f}× (stage {stage})", "goal": f"≥ {goal:g}×", "met": ratio >= goal})
    for r in records:
        if (r["kind"] == "op" and r["variant"] == "t" and r["stage"] == 0 and r["dtype"] == "float16"
                and r["backend"] != "pytorch" and "error" not in r):
            fraction = r["fwd_copy_fraction"]
            rows.append({"target": f"{r['backend']} fp16 forward, T stage 0 ({r['shape']}), share of copy bandwidth",
                         "measured": f"{100 * fraction:.0f}%", "goal": f"≥ {100 * TARGETS['copy_fraction']:.0f}%",
                         "met": fraction >= TARGETS["copy_fraction"]})
    latencies = [r for r in records if r["kind"] == "inference" and r["batch"] == 1 and r["dtype"] == "float16"
                 and "error" not in r]
    if latencies:
        best = min(latencies, key=lambda r: r["ms"])
        rows.append({"target": f"{best['model']} fp16 batch-1 latency (best: {best['backend']}, {best['mode']})",
                     "measured": f"{best['ms']:.2f} ms", "goal": f"≤ {TARGETS['latency_ms']} ms",
                     "met": best["ms"] <= TARGETS["latency_ms"]})
    bf16 = [r for r in records if r["kind"] in ("op", "inference", "train_step") and r["dtype"] == "bfloat16"]
    if bf16:
        broken = sorted({r["backend"] for r in bf16 if "error" in r or not r.get("parity_ok", r.get("ok", True))})
        backends = sorted({r["backend"] for r in bf16})
        rows.append({"target": "bf16 works on every backend (op, inference, training step)",
                     "measured": ", ".join(f"{b}: {'fails' if b in broken else 'works'}" for b in backends),
                     "goal": "all work", "met": not broken})
    return rows


def _tests_summary(records: list[dict]) -> list[str]:
    tests = [r for r in records if r["kind"] == "test"]
    if not tests:
        return ["No test results."]
    counts = Counter(r["outcome"] for r in tests)
    lines = [", ".join(f"{count} {outcome}" for outcome, count in sorted(counts.items())) + "."]
    lines += [f"- {r['outcome'].upper()} `{r['test']}`: {r.get('message', '')}" for r in tests
              if r["outcome"] in ("failed", "error")]
    reasons = Counter(r.get("message", "") for r in tests if r["outcome"] == "skipped")
    lines += [f"- skipped ×{count}: {reason}" for reason, count in reasons.most_common()]
    return lines


def render_markdown(records: list[dict]) -> str:
    """The report: environment, tables, tests, targets and the verdict last (the end of the output is what a
    remote run shows)."""
    from bench_tables import environment_line, inference_table, op_table, train_step_table

    run = next((r for r in records if r["kind"] == "run"), {})
    env = next((r for r in records if r["kind"] == "env"), None)
    lines = [f"## GPU check, {run.get('date', '')}" + (" (dry run on CPU, tiny shapes)" if run.get("dry_run") else ""),
             "", f"Command: `{run.get('command', '')}`", ""]
    lines += [f"Environment: {environment_line(env)}" if env else "Environment: not measured", ""]
    if env and env.get("packages"):
        lines += ["Packages: " + ", ".join(f"{name} {version or '-'}" for name, version in env["packages"].items()), ""]
    sections = (("DCNv3 op", "op", op_table), ("Inference", "inference", inference_table),
                ("Training step (forward + backward + AdamW)", "train_step", train_step_table))
    for title, kind, table in sections:
        rows = [r for r in records if r["kind"] == kind]
        if rows:
            lines += [f"### {title}", "", table(rows), ""]
    for r in (r for r in records if r["kind"] in ("build", "train_run")):
        lines += [f"{r['kind']}: " + ", ".join(f"{k} {v}" for k, v in r.items() if k not in ("kind", "part")), ""]
    skipped = [r for r in records if r["kind"] == "skipped"]
    if skipped:
        lines += ["### Not measured", ""] + [f"- {r['what']}: {r['reason']}" for r in skipped] + [""]
    lines += ["### Tests (`pytest -m gpu`)", "", *_tests_summary(records), ""]
    goal_rows = targets(records)
    if goal_rows:
        lines += ["### Targets (reported; they do not change the exit status)", "",
                  "| target | measured | goal | met |", "|---|---|---|---|"]
        lines += [f"| {t['target']} | {t['measured']} | {t['goal']} | {'yes' if t['met'] else 'NO'} |"
                  for t in goal_rows]
        lines.append("")
    runs = {r["part"]: r for r in records if r["kind"] == "part_run"}
    lines += ["### Parts", "", "| part | status | seconds (limit) | detail |", "|---|---|---|---|"]
    for part, (status, detail) in part_statuses(records).items():
        run = runs[part]
        seconds = "-" if "not_run" in run else f"{run['seconds']:.0f} ({run['limit_s']:.0f})"
        lines.append(f"| {part} | {status} | {seconds} | {detail} |")
    found = failures(records)
    lines += ["", f"**GPU check {'FAILED' if found else 'PASSED'}**" + (f": {len(found)} failure(s)" if found else "")]
    lines += [f"- {failure}" for failure in found]
    return "\n".join(lines)


def write_reports(output: Path) -> None:
    """results.json and results.md from the records so far (each written to a temporary file, then renamed)."""
    records = read_records(output / RECORDS)
    summary = {"passed": not failures(records), "failures": failures(records), "targets": targets(records),
               "parts": {part: {"status": s, "detail": d} for part, (s, d) in part_statuses(records).items()},
               "records": records}
    for name, text in (("results.json", json.dumps(summary, indent=1)), ("results.md", render_markdown(records))):
        temporary = output / f".{name}.tmp"
        temporary.write_text(text + "\n")
        temporary.replace(output / name)


# ---------------------------------------------------------------------------------------------------- the parts


class Part:
    """What a part's process has: the options, where records go, its soft deadline and device."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.name = args.part
        self.records_path = args.output / RECORDS
        self.deadline = args.deadline
        self.dry_run = args.dry_run

    @property
    def device(self):
        import torch

        return torch.device("cpu" if self.dry_run else "cuda")

    def add(self, record: dict) -> None:
        append_record(self.records_path, {**record, "part": self.name})

    def remaining_s(self) -> float:
        return self.deadline - time.time()

    def finish(self, status: str, detail: str = "") -> int:
        self.add({"kind": "part", "status": status, "detail": detail})
        print(f"-- {self.name}: {status}" + (f" ({detail})" if detail else ""), flush=True)
        return 0


def part_env(part: Part) -> int:
    import torch
    from bench_dcnv3 import environment
    from bench_tables import environment_line

    if part.device.type == "cuda" and not torch.cuda.is_available():
        return part.finish("failed", "no CUDA device is visible; on a machine without one use --dry-run")
    info = environment(part.device, 16 if part.dry_run else 2048)
    part.add({"kind": "env", **info, "packages": package_versions()})
    print(environment_line(info), flush=True)
    return part.finish("passed")


def package_versions() -> dict[str, str | None]:
    """Versions of the packages the optional parts and the tests depend on (`None`: not installed)."""
    from importlib import metadata

    versions = {}
    for name in OPTIONAL_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def part_build(part: Part) -> int:
    if part.dry_run:
        return part.finish("skipped", "dry run: no CUDA device; CI builds it with .ci/build_cuda_extension.sh")
    import torch

    sys.path.insert(0, str(ROOT / "dcnv3_cuda"))
    from build_utils import BuildEnvironmentError, prepare_build_environment

    major, minor = torch.cuda.get_device_capability(part.device)
    env = {**os.environ, "TORCH_CUDA_ARCH_LIST": f"{major}.{minor}", "MAX_JOBS": str(os.cpu_count() or 4)}
    try:
        settings = prepare_build_environment(env)
    except BuildEnvironmentError as error:
        return part.finish("failed", str(error))
    source, staging, lib = BUILD_DIR / "source", BUILD_DIR / "lib.partial", BUILD_DIR / "lib"
    for folder in (source, staging, lib):  # a failed build leaves no earlier extension for the later parts
        shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(ROOT / "dcnv3_cuda", source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    command = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index",
               "--no-cache-dir", "--target", str(staging), str(source)]
    log_path = part.args.output / "build.log"
    start = time.monotonic()
    with open(log_path, "w") as log:
        completed = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=BUILD_DIR)
    seconds = time.monotonic() - start
    record = {"kind": "build", "seconds": round(seconds, 1), "arch": f"{major}.{minor}",
              "toolkit": settings.toolkit_version, "ok": completed.returncode == 0}
    part.add(record)
    if completed.returncode != 0:
        print(log_path.read_text()[-3000:], flush=True)
        return part.finish("failed", f"pip install exited with {completed.returncode} after {seconds:.0f} s "
                                     "(see build.log)")
    staging.rename(lib)
    check = subprocess.run(
        [sys.executable, "-c", "import torch, dcnv3_cuda; torch.ops.dcnv3_cuda.forward.default"],
        env={**os.environ, "PYTHONPATH": str(lib)}, capture_output=True, text=True, cwd=BUILD_DIR,
    )
    if check.returncode != 0:
        return part.finish("failed", "built, but the import failed: " + check.stderr.strip()[-500:])
    return part.finish("passed", f"built for sm_{major}{minor} in {seconds:.0f} s")


def part_tests(part: Part) -> int:
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-p", "gpu_check", "-p", "no:cacheprovider", "-q",
               "-rfE", "tests"]
    if part.args.test_workers > 1 and importlib.util.find_spec("xdist") is not None:
        command += ["-n", str(part.args.test_workers)]
    if importlib.util.find_spec("pytest_timeout") is not None:  # a hung test fails alone, the others still run
        command += ["--timeout", str(TEST_TIMEOUT_S)]
    env = {**os.environ, "GPU_CHECK_RECORDS": str(part.records_path)}
    log_path = part.args.output / "tests.log"
    with open(log_path, "w") as log:
        try:
            returncode = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                        timeout=max(part.remaining_s(), 1)).returncode
        except subprocess.TimeoutExpired:
            returncode = None
    tail = log_path.read_text().strip().splitlines()
    print("\n".join(tail[-15:]), flush=True)
    outcomes = Counter(r["outcome"] for r in read_records(part.records_path) if r["kind"] == "test")
    counts = ", ".join(f"{count} {outcome}" for outcome, count in sorted(outcomes.items())) or "no test results"
    if returncode is None:
        return part.finish("timed out", f"pytest stopped at the part's time limit after {counts}; see tests.log")
    if returncode != 0 or outcomes["failed"] or outcomes["error"]:
        return part.finish("failed", f"pytest exit status {returncode}: {counts}; see tests.log")
    return part.finish("passed", counts)


def _copy_bandwidth(part: Part) -> float:
    env = next(r for r in read_records(part.records_path) if r["kind"] == "env")
    return env["copy_gbps"] * 1e9


def usable_backends(part: Part) -> list[str]:
    """The backends that run on the part's device; each one that does not is recorded with its reason."""
    from bench_dcnv3 import backend_availability

    backends = []
    for name, reason in backend_availability(part.device).items():
        if reason is None:
            backends.append(name)
        else:
            part.add({"kind": "skipped", "what": f"backend {name}", "reason": reason})
    return backends


def part_ops(part: Part) -> int:
    import bench_dcnv3
    from bench_tables import op_table

    backends = usable_backends(part)
    timing = bench_dcnv3.SMOKE_TIMING if part.dry_run else bench_dcnv3.Timing()
    batch = 1 if part.dry_run else 64
    rows = []
    # A dry run measures T's first and last stage only: the tiny shapes of all stages are alike, the interpreter slow.
    variants, stages = (["t"], (0, 3)) if part.dry_run else (list(bench_dcnv3.VARIANTS), range(4))
    for row in bench_dcnv3.bench_ops(variants, list(bench_dcnv3.DTYPES), backends, part.device, batch,
                                     _copy_bandwidth(part), small=part.dry_run, timing=timing, deadline=part.deadline,
                                     stages=stages):
        part.add(row)
        rows += [row] if row["kind"] == "op" else []
        print(op_table([row]).splitlines()[-1] if row["kind"] == "op" else f"not measured: {row}",
              flush=True)
    broken = [r for r in rows if r["parity_ok"] is False]
    return part.finish("failed" if broken else "passed", f"{len(rows)} rows, {len(broken)} failed")


def part_model(part: Part) -> int:
    import bench_dcnv3
    import bench_train
    import torch
    from bench_tables import inference_table, train_step_table

    # In a dry run the model runs on the PyTorch backend only: the Triton interpreter takes seconds per layer.
    backends = ["pytorch"] if part.dry_run else usable_backends(part)
    timing = bench_dcnv3.SMOKE_TIMING if part.dry_run else bench_dcnv3.Timing(budget_s=0.5)
    batch, train_batch = (2, 2) if part.dry_run else (128, 64)
    model = bench_dcnv3.build_classifier(bench_dcnv3.model_config("t", small=part.dry_run), part.device)
    name = f"InternImage-T {model.config.image_size}" + (" (tiny)" if part.dry_run else "")

    references = {}

    def reference(pixels: torch.Tensor) -> torch.Tensor:
        """float32 logits of the PyTorch backend (the inputs are the same for the same batch size)."""
        if pixels.shape not in references:
            bench_dcnv3.use_backend(model, "pytorch")
            with torch.no_grad():
                references[pixels.shape] = model(pixels).logits.float()
        return references[pixels.shape]

    half = {dtype: copy.deepcopy(model).to(getattr(torch, dtype)) for dtype in ("float16", "bfloat16")}

    def inference(backend: str, dtype: str, size: int, mode: str) -> list[dict]:
        return list(bench_dcnv3.bench_inference(half[dtype], name, backend, size, part.device, timing, reference,
                                                modes=(mode,)))

    def training(backend: str) -> list[dict]:
        return [bench_train.bench_train_step(copy.deepcopy(model), name, backend, train_batch, part.device,
                                             torch.bfloat16, warmup=1 if part.dry_run else 2,
                                             iterations=1 if part.dry_run else 5)]

    # The latency target first, then throughput and training; CUDA graphs last (a failed capture can leave the
    # device in an error state).
    plan: list[tuple[str, Callable[[], list[dict]]]] = []
    plan += [(f"fp16 batch-1 latency, {b}", functools.partial(inference, b, "float16", 1, "eager")) for b in backends]
    plan += [(f"{d} batch-{batch} throughput, {b}", functools.partial(inference, b, d, batch, "eager"))
             for d in half for b in backends]
    plan += [(f"training step, {b}", functools.partial(training, b)) for b in backends]
    if part.device.type == "cuda":
        plan += [(f"fp16 batch-1 latency as a CUDA graph, {b}",
                  functools.partial(inference, b, "float16", 1, "cuda graph")) for b in backends]
    rows, last_s = [], 0.0
    for index, (_, measure) in enumerate(plan):
        if time.time() + 2 * last_s > part.deadline:
            part.add({"kind": "skipped", "what": ", ".join(w for w, _ in plan[index:]),
                      "reason": "time limit of the part"})
            break
        start = time.time()
        for row in measure():
            part.add(row)
            rows.append(row)
            table = inference_table if row["kind"] == "inference" else train_step_table
            print(table([row]).splitlines()[-1], flush=True)
        last_s = time.time() - start
        if part.device.type == "cuda":
            torch.cuda.empty_cache()
    broken = [r for r in rows if r.get("parity_ok", r.get("ok")) is False]
    return part.finish("failed" if broken else "passed", f"{len(rows)} rows, {len(broken)} failed")


def part_train(part: Part) -> int:
    missing = [name for name in TRAIN_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        return part.finish("skipped", f"{' and '.join(missing)} not installed (docs/gpu-check.md lists the wheels)")
    steps, batch = (2, 8) if part.dry_run else (30, 64)
    log_path = part.args.output / "train.log"
    with tempfile.TemporaryDirectory() as work:
        command = [
            sys.executable, str(ROOT / "train_classification.py"), "--output_dir", work, "--max_steps", str(steps),
            "--per_device_train_batch_size", str(batch), "--max_train_samples", str(steps * batch),
            "--max_eval_samples", str(4 * batch), "--save_strategy", "no", "--report_to", "none",
            "--disable_tqdm", "true", "--logging_steps", "1", "--dataloader_num_workers", "0",
        ] + ([] if part.dry_run else ["--bf16", "true"])
        with open(log_path, "w") as log:
            try:
                returncode = subprocess.run(command, cwd=work, stdout=log, stderr=subprocess.STDOUT,
                                            timeout=max(part.remaining_s(), 1)).returncode
            except subprocess.TimeoutExpired:
                return part.finish("timed out", "train_classification.py stopped at the time limit; see train.log")
        results_path = Path(work) / "all_results.json"
        results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    loss = results.get("train_loss")
    record = {"kind": "train_run", "steps": steps, "batch": batch, "returncode": returncode, "loss": loss,
              "train_samples_per_second": results.get("train_samples_per_second"),
              "eval_accuracy": results.get("eval_accuracy"),
              "ok": returncode == 0 and loss is not None and math.isfinite(loss)}
    part.add(record)
    detail = f"{steps} steps of batch {batch}, loss {loss}, exit status {returncode}; see train.log"
    return part.finish("passed" if record["ok"] else "failed", detail)


PART_FUNCTIONS = {"env": part_env, "build": part_build, "tests": part_tests, "ops": part_ops, "model": part_model,
                  "train": part_train}


# ------------------------------------------------------------------------- pytest plugin (`-p gpu_check`, tests)

_TEST_RECORDS: Path | None = None


def pytest_configure(config) -> None:
    """Record each test's outcome as it comes (in the xdist controller only, not in its workers)."""
    global _TEST_RECORDS
    path = os.environ.get("GPU_CHECK_RECORDS")
    _TEST_RECORDS = Path(path) if path and not hasattr(config, "workerinput") else None


def pytest_runtest_logreport(report) -> None:
    if _TEST_RECORDS is None or (report.when != "call" and report.passed):
        return
    outcome = report.outcome if report.when == "call" or report.skipped else "error"
    if report.skipped and isinstance(report.longrepr, tuple):
        message = report.longrepr[2].removeprefix("Skipped: ")
    else:
        message = getattr(getattr(report.longrepr, "reprcrash", None), "message", "") if report.failed else ""
    append_record(_TEST_RECORDS, {"kind": "test", "part": "tests", "test": report.nodeid, "outcome": outcome,
                                  "seconds": round(report.duration, 2), "message": message.splitlines()[0][:300]
                                  if message else ""})


# ---------------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", type=Path, help="folder for records.jsonl, results.json, results.md and logs")
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts to run (default: all of "
                        f"{','.join(PARTS)}); env always runs first")
    parser.add_argument("--budget", type=float, default=240, help="seconds for the whole plan (default 240)")
    parser.add_argument("--dry-run", action="store_true",
                        help="run the plan on CPU with tiny shapes (Triton interpreted, CUDA parts skipped)")
    parser.add_argument("--test-workers", type=int, default=8,
                        help="pytest-xdist processes for the tests part when pytest-xdist is installed (default 8)")
    parser.add_argument("--part", choices=["env", *PARTS], help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(only) - set(PARTS))
    if unknown:
        parser.error(f"--only: unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    args.only = [name for name in PARTS if name in only]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(HERE))
    if args.part is None:
        return run_plan(args)
    return PART_FUNCTIONS[args.part](Part(args))


if __name__ == "__main__":
    sys.exit(main())
