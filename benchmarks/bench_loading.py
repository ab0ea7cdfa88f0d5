"""Peak-memory growth while loading a sharded InternImage-T checkpoint with `device_map="auto"`.

    python benchmarks/bench_loading.py [--variant internimage_t_1k_224] [--max-shard-size 20MB]

Saves a randomly initialised model in shards to a temporary folder, then loads it in a fresh process and reports
how much the process's peak RSS (VmHWM, reset after the imports) grew during `from_pretrained` over the RSS at
that point, relative to the size of the weights. Linux only. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys, torch
sys.path.insert(0, sys.argv[2])
from modeling_internimage import InternImageForImageClassification

def status_kib(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))

with open("/proc/self/clear_refs", "w") as clear_refs:  # reset the peak (VmHWM) to the current RSS
    clear_refs.write("5")
baseline_kib = status_kib("VmRSS")
model = InternImageForImageClassification.from_pretrained(sys.argv[1], device_map="auto")
peak_kib = status_kib("VmHWM")
weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
print(json.dumps({"weights_mb": weights / 2**20, "peak_growth_mb": (peak_kib - baseline_kib) / 1024,
                  "device": str(next(model.parameters()).device)}))
"""


def measure(folder: str | Path) -> dict:
    """Load `folder` in a fresh process; the weights' size, the peak RSS growth and their ratio (MiB)."""
    completed = subprocess.run(
        [sys.executable, "-c", CHILD, str(folder), str(ROOT)], capture_output=True, text=True, check=True
    )
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    result["ratio"] = result["peak_growth_mb"] / result["weights_mb"]
    return result


def save_sharded(folder: str | Path, variant: str, max_shard_size: str) -> int:
    """Save a randomly initialised `variant` classifier in shards; returns the number of shard files."""
    sys.path.insert(0, str(ROOT))
    from configuration_internimage import InternImageConfig
    from modeling_internimage import InternImageForImageClassification

    model = InternImageForImageClassification(InternImageConfig.from_variant(variant))
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    return len(list(Path(folder).glob("*.safetensors")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="internimage_t_1k_224")
    parser.add_argument("--max-shard-size", default="20MB")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        shards = save_sharded(folder, args.variant, args.max_shard_size)
        result = measure(folder)
    print(json.dumps({"variant": args.variant, "shards": shards, **result}))


if __name__ == "__main__":
    main()
