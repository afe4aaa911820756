"""Peak memory and time of `bn-onnx run` on a Parquet file of named rows, against reading it whole.

Writes a ROWS-row Parquet file (row groups of 100,000) with the columns of a tabular model's
schema (metadata `bn_onnx.columns`: numbers around each column's fill, categories from the
vocabulary, one unseen in ten, one missing cell in ten, plus an id column the model does not
read) into a temporary folder, then, interleaved REPEATS times, measures in child processes
(peak RSS from wait4):

- `bn-onnx run MODEL --input rows.parquet -o Y.npy` (pyarrow `iter_batches` of --batch-size
  rows, only the model's columns, output written chunk by chunk);
- the baseline: `pyarrow.parquet.read_table` of the model's columns, every column to numpy,
  `bn_onnx.columns.feeds_from_columns` on all rows, the same chunks through a bare onnxruntime
  session, `np.save`.

Prints medians and spread and checks that both outputs agree. This process imports nothing
heavy and does all the work in children (a forked child starts with its parent's peak RSS).

    python tools/bench_run_parquet.py TABULAR.onnx [--rows 3000000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_run_memory import measure, print_results  # tools/ is this script's sys.path[0]

PREPARE = """
import json, sys, numpy as np, onnx, pyarrow as pa, pyarrow.parquet as pq
model, path, rows = sys.argv[1], sys.argv[2], int(sys.argv[3])
meta = {p.key: p.value for p in onnx.load(model, load_external_data=False).metadata_props}
schema = json.loads(meta["bn_onnx.columns"])
rng = np.random.default_rng(0)
writer = None
for start in range(0, rows, 100_000):
    n = min(100_000, rows - start)
    cols = {"id": pa.array(np.arange(start, start + n))}
    for c in schema:
        missing = rng.random(n) < 0.1
        if c["kind"] == "continuous":
            values = rng.normal(c.get("fill") or 0.0, 10.0, n)
            cols[c["name"]] = pa.array(values, mask=missing)
        else:
            vocab = np.array(list(c["vocabulary"]) + ["never seen"], dtype=object)
            p = np.full(len(vocab), 0.9 / (len(vocab) - 1))
            p[-1] = 0.1
            cols[c["name"]] = pa.array(rng.choice(vocab, n, p=p), mask=missing)
    table = pa.table(cols)
    if writer is None:
        writer = pq.ParquetWriter(path, table.schema)
    writer.write_table(table)
writer.close()
"""

BASELINE = """
import sys, numpy as np, onnxruntime as ort, pyarrow.parquet as pq
from bn_onnx.columns import feeds_from_columns, read_columns
s = ort.InferenceSession(sys.argv[2], providers=["CPUExecutionProvider"])
columns = read_columns(s.get_modelmeta().custom_metadata_map)
table = pq.read_table(sys.argv[1], columns=[c.name for c in columns])
data = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
feeds = feeds_from_columns(columns, data)
n, rows = int(sys.argv[4]), len(table)
out = [s.run(None, {k: v[i:i + n] for k, v in feeds.items()})[0] for i in range(0, rows, n)]
np.save(sys.argv[3], np.concatenate(out))
"""

SAME = """
import sys, numpy as np
a, b = np.load(sys.argv[1]), np.load(sys.argv[2])
sys.exit(0 if a.shape == b.shape and np.allclose(a, b, rtol=1e-6, atol=1e-6) else 1)
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a tabular model (metadata bn_onnx.columns)")
    parser.add_argument("--rows", type=int, default=3_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8192)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bn_onnx_run_parquet_") as tmp:
        d = Path(tmp)
        rows_path = d / "rows.parquet"
        cmd = [sys.executable, "-c", PREPARE, args.model, str(rows_path), str(args.rows)]
        subprocess.run(cmd, check=True)
        size_mb = rows_path.stat().st_size / 2**20
        ours = [sys.executable, "-m", "bn_onnx", "run", args.model, "--input", str(rows_path)]
        ours += ["-o", str(d / "y.npy"), "--provider", "cpu", "--quiet"]
        ours += ["--batch-size", str(args.batch_size)]
        base = [sys.executable, "-c", BASELINE, str(rows_path), args.model, str(d / "b.npy")]
        base += [str(args.batch_size)]
        results: dict[str, list[tuple[float, float]]] = {"bn-onnx run": [], "read whole": []}
        for _ in range(args.repeats):
            results["bn-onnx run"].append(measure(ours))
            results["read whole"].append(measure(base))
        cmd = [sys.executable, "-c", SAME, str(d / "y.npy"), str(d / "b.npy")]
        same = subprocess.run(cmd).returncode == 0
    print(
        f"input {args.rows:,} rows, Parquet {size_mb:,.0f} MB on disk; batches of "
        f"{args.batch_size}; {args.repeats} interleaved repeats; outputs agree: {same}"
    )
    print_results(results)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
