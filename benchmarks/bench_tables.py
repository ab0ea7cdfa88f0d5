"""Markdown tables of the benchmark rows (`bench_dcnv3`, `bench_train`) and the environment line.

Plain formatting without torch, so that `gpu_check.py`'s parent process renders its report without importing it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable


def environment_line(info: dict) -> str:
    memory = f" ({info['memory_gib']:.0f} GiB)" if info.get("memory_gib") else ""
    return (
        f"{info['device']}{memory}, driver {info.get('driver') or '-'}, CUDA {info.get('cuda') or '-'}, "
        f"torch {info['torch']}, triton {info.get('triton') or '-'}, transformers {info['transformers']}, "
        f"Python {info['python']}; device-to-device copy {info['copy_gbps']:.0f} GB/s"
    )


def error_text(error: BaseException) -> str:
    """The error's type and the first line of its message."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def _cell(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def parity_cell(row: dict) -> str:
    """The row's parity error (a string after JSON when not finite), marked when above the tolerance."""
    if "parity_error" not in row:
        return "-"
    error = row["parity_error"]
    return (error if isinstance(error, str) else f"{error:.1e}") + ("" if row["parity_ok"] else " FAIL")


def markdown_table(header: list[str], key: list[str], rows: Iterable[dict], cells: Callable[[dict], list[str]]) -> str:
    """A markdown table: the `key` columns of each row, then `cells(row)`, or the row's error across the rest."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        values = [str(row[name]) for name in key]
        values += [f"failed: {row['error']}"] + [""] * (len(header) - len(key) - 1) if "error" in row else cells(row)
        lines.append("| " + " | ".join(values) + " |")
    return "\n".join(lines)


def op_table(rows: Iterable[dict]) -> str:
    """Markdown table of `bench_op_case` rows."""
    def cells(row: dict) -> list[str]:
        values = []
        for name in ("fwd", "fwd_bwd"):
            values += [_cell(row[f"{name}_ms"]), _cell(row[f"{name}_gbps"], 0),
                       f"{100 * row[f'{name}_copy_fraction']:.0f}%"]
        return [*values, f"{_cell(row['fwd_peak_mib'], 0)} / {_cell(row['fwd_bwd_peak_mib'], 0)}", parity_cell(row)]

    header = ["variant", "stage", "shape", "batch", "dtype", "backend", "fwd ms", "fwd GB/s", "fwd % copy",
              "fwd+bwd ms", "fwd+bwd GB/s", "fwd+bwd % copy", "peak MiB fwd / fwd+bwd", "fwd error vs PyTorch fp32"]
    rows = [{**row, "variant": row["variant"].upper()} for row in rows]
    return markdown_table(header, ["variant", "stage", "shape", "batch", "dtype", "backend"], rows, cells)


def inference_table(rows: Iterable[dict]) -> str:
    """Markdown table of `bench_inference` rows."""
    def cells(row: dict) -> list[str]:
        return [f"{row['ms']:.2f}", f"{row['images_per_s']:.1f}", _cell(row["peak_mib"], 0), parity_cell(row)]

    header = ["model", "backend", "dtype", "batch", "mode", "ms/batch", "img/s", "peak MiB",
              "logits error vs PyTorch fp32"]
    return markdown_table(header, ["model", "backend", "dtype", "batch", "mode"], rows, cells)


def train_step_table(rows: list[dict]) -> str:
    """Markdown table of `bench_train_step` rows."""
    def cells(row: dict) -> list[str]:
        peak = "-" if row["peak_mib"] is None else f"{row['peak_mib']:.0f}"
        loss = f"{row['loss']:.3f}" + ("" if row["ok"] else " FAIL")
        return [f"{row['images_per_s']:.1f}", f"{row['seconds_per_step'] * 1e3:.1f}", peak, loss]

    header = ["model", "backend", "autocast", "batch", "img/s", "ms/step", "peak MiB", "loss"]
    return markdown_table(header, ["model", "backend", "dtype", "batch"], rows, cells)
