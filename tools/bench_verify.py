"""Time `bn-onnx verify` as users run it: the shipped digits pair and a ResNet-18-sized CNN.

Each case is one `bn-onnx verify` process (start-up included), timed wall and CPU (children's
rusage), over REPEATS interleaved rounds (A B C A B C ...). Cases:

  digits+ckpt   models/digits unfolded vs folded, --checkpoint (test split + random probe,
                float64 checkpoint forward, float64 graph reference, torch eval)
  digits        the same pair without the checkpoint (random probe only)
  cnn           a ResNet-18-shaped net (plain torch, random weights and BN statistics,
                exported with BatchNormalization kept, 3x224x224, symbolic batch) vs its fold
  cnn-locate    the CNN with one output channel of a middle Conv scaled by 1.5, --locate
                (exit 1 expected)

`--baseline PYTHONPATH` adds `digits+ckpt (baseline)`: the same command run with another
checkout first on PYTHONPATH (e.g. main before this change), for a ratio measured in the same
run. Prints medians with min-max and the load average; `--json OUT` keeps the raw times.

    python tools/bench_verify.py [--repeats 3] [--baseline /work/main] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def resnet18_onnx(path: Path) -> None:
    """Export a ResNet-18-shaped network with BatchNormalization kept (needs torch)."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.b1 = nn.BatchNorm2d(cout)
            self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.b2 = nn.BatchNorm2d(cout)
            self.down = None
            if stride != 1 or cin != cout:
                self.down = nn.Sequential(
                    nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
                )

        def forward(self, x):  # noqa: ANN001, ANN202
            y = self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))
            return torch.relu(y + (x if self.down is None else self.down(x)))

    class ResNet18(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(
                nn.Conv2d(3, 64, 7, 2, 3, bias=False),
                nn.BatchNorm2d(64),
                nn.ReLU(),
                nn.MaxPool2d(3, 2, 1),
            )
            layers, cin = [], 64
            for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
                layers += [Block(cin, cout, stride), Block(cout, cout, 1)]
                cin = cout
            self.layers = nn.Sequential(*layers)
            self.fc = nn.Linear(512, 1000)

        def forward(self, x):  # noqa: ANN001, ANN202
            x = self.layers(self.stem(x))
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    torch.manual_seed(0)
    model = ResNet18().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):  # BN far from the identity, so that folding matters
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    torch.onnx.export(
        model,
        (torch.randn(1, 3, 224, 224),),
        str(path),
        dynamo=False,
        training=torch.onnx.TrainingMode.PRESERVE,  # eval-mode BN, kept as nodes
        do_constant_folding=False,
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": {0: "N"}, "y": {0: "N"}},
        opset_version=18,
    )


def scale_channel(src: Path, dst: Path, conv_index: int = 9, channel: int = 7) -> str:
    """Copy `src` with one output channel of its `conv_index`-th Conv scaled by 1.5."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(src)
    conv = [n for n in model.graph.node if n.op_type == "Conv"][conv_index]
    for t in model.graph.initializer:
        if t.name == conv.input[1]:
            w = numpy_helper.to_array(t).copy()
            w[channel] *= 1.5
            t.CopyFrom(numpy_helper.from_array(w, t.name))
    onnx.save(model, dst)
    return conv.name


def run(cmd: list[str], pythonpath: str) -> tuple[float, float, int, str]:
    env = {**os.environ, "PYTHONPATH": pythonpath}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, proc.returncode, proc.stdout + proc.stderr


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--baseline", metavar="PYTHONPATH", help="another checkout to time on digits")
    p.add_argument("--json", metavar="OUT")
    args = p.parse_args(argv)
    digits = ROOT / "models" / "digits"
    verify = [sys.executable, "-m", "bn_onnx", "verify"]
    with tempfile.TemporaryDirectory() as tmp:
        tmpd = Path(tmp)
        cnn, folded, bad = tmpd / "r18.onnx", tmpd / "r18.folded.onnx", tmpd / "r18.bad.onnx"
        resnet18_onnx(cnn)
        from bn_onnx.fold import fold_file

        rep = fold_file(cnn, folded)
        node = scale_channel(folded, bad)
        print(
            f"CNN: {cnn.stat().st_size / 1e6:.1f} MB, folded {rep.n_folded} of {rep.n_bn} BN; "
            f"tampered Conv {node}"
        )
        pair = [str(digits / "model.onnx"), str(digits / "model.folded.onnx")]
        cases = {
            "digits+ckpt": (
                [*verify, *pair, "--checkpoint", str(digits / "checkpoint"), "--provider", "cpu"],
                0,
            ),
            "digits": ([*verify, *pair, "--provider", "cpu"], 0),
            "cnn": ([*verify, str(cnn), str(folded), "--provider", "cpu"], 0),
            "cnn-locate": ([*verify, str(cnn), str(bad), "--provider", "cpu", "--locate"], 1),
        }
        paths = {name: str(ROOT) for name in cases}
        if args.baseline:
            cases["digits+ckpt (baseline)"] = cases["digits+ckpt"]
            paths["digits+ckpt (baseline)"] = args.baseline
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in cases}
        outputs: dict[str, str] = {}
        for _ in range(args.repeats):
            for name, (cmd, rc_expected) in cases.items():
                wall, cpu, rc, out = run(cmd, paths[name])
                if rc != rc_expected:
                    print(out)
                    raise SystemExit(f"{name}: exit {rc}, expected {rc_expected}")
                times[name].append((wall, cpu))
                outputs[name] = out
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {args.repeats} rounds")
    print(f"{'case':<24} {'wall median (min-max)':>26} {'CPU median (min-max)':>26}")
    summary = {}
    for name, vals in times.items():
        walls, cpus = [v[0] for v in vals], [v[1] for v in vals]
        summary[name] = {"wall": walls, "cpu": cpus}
        print(
            f"{name:<24} {statistics.median(walls):>8.2f} s ({min(walls):.2f}-{max(walls):.2f})"
            f"   {statistics.median(cpus):>8.2f} s ({min(cpus):.2f}-{max(cpus):.2f})"
        )
    if args.baseline:
        ratio = (
            np.array(times["digits+ckpt"])[:, 0] / np.array(times["digits+ckpt (baseline)"])[:, 0]
        )
        print(
            f"digits+ckpt / baseline wall: median {np.median(ratio):.2f} "
            f"({ratio.min():.2f}-{ratio.max():.2f})"
        )
    for line in outputs["cnn-locate"].splitlines():
        if "first divergence" in line or "reading initializers" in line:
            print("cnn-locate:", line.strip())
    if args.json:
        Path(args.json).write_text(json.dumps({"load": load, "times": summary}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
