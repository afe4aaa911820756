"""A real table at the edges, end to end (issue 20's done-when table): accuracy of bn-onnx and
scikit-learn baselines on one split, then the cases that used to go silently wrong.

Splits CSV (stratified, seeded, 80/20) into train.csv and test.csv in a temporary folder, then:

- `bn-onnx train --dataset train.csv --target T --test-fraction 0` (everything but the
  validation split), `export --fold`, and `run` on test.csv as it is;
- baselines on the same rows: HistGradientBoosting (categories ordinal-coded, native NaN) and
  logistic regression with a median fill, standardization and one-hot categories;
- every feature column emptied in every test row (bn-onnx and the median-fill baseline);
- test.csv with its header (and columns) reversed; numeric-looking category cells rewritten
  `1` -> `1.0`; missing cells written `NA` instead of empty;
- `bn-onnx verify MODEL --checkpoint CKPT` and `bn-onnx bench MODEL`.

    python tools/real_tables.py penguins.csv --target species [--categorical year]
    python tools/real_tables.py titanic.csv --target survived --drop rownames

Needs scikit-learn (the train extra). Prints one table row per case.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "bn_onnx", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)


def _read(path: Path) -> tuple[list[str], list[list[str]]]:
    with path.open(newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.reader(fh))
    return rows[0], rows[1:]


def _write(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as fh:
        csv.writer(fh).writerows([header, *rows])
    return path


def _missing(cell: str) -> bool:
    return cell.strip().lower() in ("", "na", "n/a", "nan", "null")


def _number(cell: str) -> float | None:
    try:
        return float(cell)
    except ValueError:
        return None


def _bn_accuracy(model: Path, test: Path, labels: list[str], work: Path) -> float:
    out = work / "labels.csv"
    r = _cli("run", str(model), "--input", str(test), "-o", str(out), "--labels", "--quiet")
    if r.returncode:
        raise SystemExit(f"bn-onnx run failed: {r.stderr.strip()}")
    _, rows = _read(out)
    out.unlink()
    return float(np.mean([row[0] == want for row, want in zip(rows, labels, strict=True)]))


class _Baselines:
    """HGB and median-fill logistic regression, fitted on the training rows."""

    def __init__(self, header: list[str], train: list[list[str]], target: str, cats: set[str]):
        self.features = [h for h in header if h != target]
        self.t = header.index(target)
        self.target = target
        cols = {h: [r[header.index(h)] for r in train] for h in self.features}
        self.numeric = [
            h
            for h in self.features
            if h not in cats and all(_missing(c) or _number(c) is not None for c in cols[h])
        ]
        self.categorical = [h for h in self.features if h not in self.numeric]
        x_num, x_cat = self._arrays(header, train)
        y = [r[self.t] for r in train]
        from sklearn.ensemble import HistGradientBoostingClassifier
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import OneHotEncoder, OrdinalEncoder, StandardScaler

        self.ordinal = OrdinalEncoder(handle_unknown="use_encoded_value", unknown_value=-1)
        self.ordinal.fit(x_cat)
        self.median = np.nanmedian(x_num, axis=0) if x_num.shape[1] else np.zeros(0)
        self.scaler = StandardScaler().fit(self._filled(x_num))
        self.onehot = OneHotEncoder(handle_unknown="ignore").fit(x_cat)
        n_cat = len(self.categorical)
        self.hgb = HistGradientBoostingClassifier(
            random_state=0, categorical_features=list(range(n_cat)) or None
        ).fit(self._hgb_x(x_num, x_cat), y)
        self.lr = LogisticRegression(max_iter=5000).fit(self._lr_x(x_num, x_cat), y)

    def _arrays(self, header: list[str], rows: list[list[str]]) -> tuple[np.ndarray, np.ndarray]:
        def num(c: str) -> float:
            v = None if _missing(c) else _number(c)
            return np.nan if v is None else v

        idx = {h: header.index(h) for h in self.features}
        x_num = np.array([[num(r[idx[h]]) for h in self.numeric] for r in rows], float)
        cells = [
            [("" if _missing(r[idx[h]]) else r[idx[h]].strip()) for h in self.categorical]
            for r in rows
        ]
        x_cat = np.array(cells, dtype=object).reshape(len(rows), len(self.categorical))
        return x_num.reshape(len(rows), len(self.numeric)), x_cat

    def _filled(self, x_num: np.ndarray) -> np.ndarray:
        return np.where(np.isnan(x_num), self.median, x_num)

    def _hgb_x(self, x_num: np.ndarray, x_cat: np.ndarray) -> np.ndarray:
        codes = self.ordinal.transform(x_cat) if x_cat.shape[1] else np.zeros((len(x_num), 0))
        return np.hstack([codes, x_num])

    def _lr_x(self, x_num: np.ndarray, x_cat: np.ndarray) -> np.ndarray:
        onehot = (
            self.onehot.transform(x_cat).toarray() if x_cat.shape[1] else np.zeros((len(x_num), 0))
        )
        return np.hstack([self.scaler.transform(self._filled(x_num)), onehot])

    def accuracy(self, header: list[str], rows: list[list[str]]) -> tuple[float, float]:
        x_num, x_cat = self._arrays(header, rows)
        y = np.array([r[header.index(self.target)] for r in rows])
        hgb = float(np.mean(self.hgb.predict(self._hgb_x(x_num, x_cat)) == y))
        lr = float(np.mean(self.lr.predict(self._lr_x(x_num, x_cat)) == y))
        return hgb, lr


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", type=Path)
    parser.add_argument("--target", required=True)
    parser.add_argument("--categorical", default="")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--drop", default="", help="columns to remove first (an id, a name)")
    args = parser.parse_args(argv)
    from sklearn.model_selection import train_test_split

    header, rows = _read(args.csv)
    keep = [j for j, h in enumerate(header) if h not in args.drop.split(",")]
    header, rows = [header[j] for j in keep], [[r[j] for j in keep] for r in rows]
    t = header.index(args.target)
    train_rows, test_rows = train_test_split(
        rows, test_size=0.2, random_state=args.seed, stratify=[r[t] for r in rows]
    )
    cats = {c for c in args.categorical.split(",") if c}
    labels = [r[t] for r in test_rows]
    majority = max(labels.count(v) for v in set(labels)) / len(labels)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        train_csv = _write(work / "train.csv", header, train_rows)
        test_csv = _write(work / "test.csv", header, test_rows)
        ckpt, model = work / "ckpt", work / "model.folded.onnx"
        extra = ["--categorical", args.categorical] if cats else []
        train_args = ["--dataset", str(train_csv), "--target", args.target, "--test-fraction"]
        train_args += ["0", "--seed", str(args.seed), "--out", str(ckpt), *extra]
        r = _cli("train", *train_args)
        if r.returncode:
            raise SystemExit(f"bn-onnx train failed: {r.stderr.strip()}")
        summary = r.stdout.strip().splitlines()[-1]
        warnings = [ln for ln in r.stderr.splitlines() if "warning" in ln]
        r = _cli("export", str(ckpt), "-o", str(model), "--fold")
        if r.returncode:
            raise SystemExit(f"bn-onnx export failed: {r.stderr.strip()}")
        base = _Baselines(header, train_rows, args.target, cats)
        sizes = f"{len(train_rows)} train rows, {len(test_rows)} test rows"
        print(f"{args.csv.name}: {sizes}; majority rate {majority:.3f}")
        print(f"  {summary}")
        for w in warnings:
            print(f"  {w}")
        print(f"  {'case':34s} {'bn-onnx':>8s} {'HGB':>8s} {'LR+median':>9s}")

        def row(case: str, test: Path, hdr: list[str], rws: list[list[str]]) -> None:
            ours = _bn_accuracy(model, test, labels, work)
            hgb, lr = base.accuracy(hdr, rws)
            print(f"  {case:34s} {ours:8.3f} {hgb:8.3f} {lr:9.3f}")

        row("test rows as they are", test_csv, header, test_rows)
        for j, name in enumerate(header):
            if j == t:
                continue
            emptied = [[("" if k == j else c) for k, c in enumerate(r)] for r in test_rows]
            row(f"{name} emptied", _write(work / "e.csv", header, emptied), header, emptied)
        rev = [list(reversed(r)) for r in test_rows]
        rev_csv = _write(work / "rev.csv", header[::-1], rev)
        row("header and columns reversed", rev_csv, header[::-1], rev)
        spelled = [
            [(c + ".0" if c.strip().isdigit() and k != t else c) for k, c in enumerate(r)]
            for r in test_rows
        ]
        row("integers written 1.0", _write(work / "f.csv", header, spelled), header, spelled)
        na = [
            [("NA" if (k != t and not c.strip()) else c) for k, c in enumerate(r)]
            for r in test_rows
        ]
        row("empty cells written NA", _write(work / "na.csv", header, na), header, na)
        r = _cli("verify", str(model), "--checkpoint", str(ckpt), "--provider", "cpu")
        verdict = (r.stdout.strip().splitlines() or ["?"])[-1]
        raised = [ln.strip() for ln in r.stdout.splitlines() if "raised to" in ln][:1]
        print(f"  verify (folded, with its checkpoint): rc {r.returncode}, {verdict}")
        for ln in raised:
            print(f"    {ln}")
        r = _cli("bench", str(model), "--batch-sizes", "1,256", "--repeats", "5", "--quiet")
        lines = r.stdout.strip().splitlines()
        print(f"  bench: rc {r.returncode}" + ("" if not r.returncode else f", {r.stderr.strip()}"))
        for ln in lines[2:] if not r.returncode else []:
            print(f"    {ln}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
