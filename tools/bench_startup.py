"""CPU time of `bn-onnx train` through its first epoch, over a bare `python -c "import torch"`.

Writes a small table (a CSV of numbers with a text column and empty cells: the tabular path,
400 rows), then, interleaved REPEATS times, measures in child processes (CPU time from
wait4, user + system):

- `python -c "import torch"`: the floor, torch's own import cost;
- `bn-onnx train --dataset T.csv --target y --epochs 1 --quiet --out DIR`: start-up, data
  loading, one epoch, the test evaluation and the checkpoint.

Prints each one's median CPU seconds with the range and the median of the per-round ratios
(target: at most 1.5; issue 20 measured 10.2 s of CPU for a 1-epoch run, 2.8x torch's import,
before `torch._dynamo` and scikit-learn were kept out of the start-up).

    python tools/bench_startup.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bn_onnx.bench import measure_process  # noqa: E402  (numpy only; torch stays out)


def _table(path: Path) -> None:
    lines = ["a,b,city,y"]
    for i in range(400):
        a = "" if i % 17 == 0 else f"{(i * 37) % 101 / 10:.1f}"
        lines.append(f"{a},{(i * 13) % 7},{['Seoul', 'Busan', 'Daegu'][i % 3]},{i % 2}")
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch_cmd = [sys.executable, "-c", "import torch"]
    with tempfile.TemporaryDirectory() as tmp:
        table = Path(tmp) / "t.csv"
        _table(table)
        train_cmd = [sys.executable, "-m", "bn_onnx", "train", "--dataset", str(table)]
        train_cmd += ["--target", "y", "--epochs", "1", "--quiet", "--threads", "1"]
        cpu: dict[str, list[float]] = {"import torch": [], "bn-onnx train, 1 epoch": []}
        ratios = []
        for k in range(args.repeats):
            base = measure_process(torch_cmd, cwd=ROOT)
            run = measure_process([*train_cmd, "--out", str(Path(tmp) / f"r{k}")], cwd=ROOT)
            if base.returncode or run.returncode:
                print(run.stderr or base.stderr, file=sys.stderr)
                return 1
            cpu["import torch"].append(base.cpu_s)
            cpu["bn-onnx train, 1 epoch"].append(run.cpu_s)
            ratios.append(run.cpu_s / base.cpu_s)
    for name, values in cpu.items():
        print(
            f"{name:24s} CPU {statistics.median(values):.2f} s "
            f"(range {min(values):.2f}-{max(values):.2f}, {len(values)} runs)"
        )
    print(
        f"ratio train / import torch: median {statistics.median(ratios):.2f} "
        f"(range {min(ratios):.2f}-{max(ratios):.2f}; target <= 1.5)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
