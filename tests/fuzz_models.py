"""A seeded mutator of model files and a campaign through inspect, fold, verify and run.

`python tests/fuzz_models.py N SEED WORKDIR OUT.json [START]` mutates the test models N times (bit
flips, truncation, protobuf field edits: dims, data_type, op_type, attributes, input names,
opset, outputs; external-data entries and files), runs every command on each mutant through
`bn_onnx.cli.main(argv, contain=True)` (each command in a forked child watched for native
crashes, as on the command line) and writes what it found as JSON: counts of exit codes per
command and a list of failures (a traceback, an exit code outside 0/1/2, a multi-line error, a
changed input, an output left by a failed command, a fold output that fails the full checker,
does not load in onnxruntime or computes something else than its input).

It runs as its own process so that the test process never starts onnxruntime: onnxruntime is
imported here before any fork, but sessions are only made in forked children.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits" / "model.onnx"
SAMPLE = ROOT / "models" / "digits" / "sample_input.npy"
COMMANDS = ("inspect", "fold", "verify", "run")
BAD_ENTRIES = ["", "1e3", "0x10", "-8", "99999999999", "missing.bin", "../w.bin", "w\x00.bin"]


def conv_bn_model() -> onnx.ModelProto:
    """X[N, 3, 8, 8] -> Conv(4, 3x3, bias) -> BatchNormalization -> Relu -> Y."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "W"),
        numpy_helper.from_array(rng.normal(size=4).astype(np.float32), "B"),
        numpy_helper.from_array(rng.uniform(0.5, 2, 4).astype(np.float32), "scale"),
        numpy_helper.from_array(rng.normal(size=4).astype(np.float32), "bias"),
        numpy_helper.from_array(rng.normal(size=4).astype(np.float32), "mean"),
        numpy_helper.from_array(rng.uniform(0.5, 2, 4).astype(np.float32), "var"),
    ]
    nodes = [
        helper.make_node("Conv", ["X", "W", "B"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node(
            "BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["b"], name="bn"
        ),
        helper.make_node("Relu", ["b"], ["Y"], name="relu"),
    ]
    graph = helper.make_graph(
        nodes,
        "conv_bn",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 4, 8, 8])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return model


def externalize(model: onnx.ModelProto, name: str, location: str) -> bytes:
    """Move initializer `name`'s data to an external entry; return the data file's bytes."""
    t = next(t for t in model.graph.initializer if t.name == name)
    raw = numpy_helper.to_array(t).tobytes()
    t.ClearField("raw_data")
    del t.float_data[:]
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(len(raw)))):
        e = t.external_data.add()
        e.key, e.value = key, value
    return raw


def bases() -> list[tuple[str, onnx.ModelProto, dict[str, bytes]]]:
    """(name, model, external data files) of the models mutated."""
    digits = onnx.load(str(DIGITS))
    ext = onnx.load(str(DIGITS))
    data = externalize(ext, "blocks.0.linear.weight", "w.bin")
    return [
        ("digits", digits, {}),
        ("conv_bn", conv_bn_model(), {}),
        ("external", ext, {"w.bin": data}),
    ]


# --- mutations ---------------------------------------------------------------------------
# Each takes (rng, model, files) and changes the model or the files; the byte-level ones
# return the new bytes of the model file.


def _dims(rng: random.Random, m: onnx.ModelProto, files: dict) -> None:
    choices = [0, 1, 3, 127, 2**40, -1, -8]
    if rng.random() < 0.5 and m.graph.initializer:
        t = rng.choice(m.graph.initializer)
        if t.dims:
            i = rng.randrange(len(t.dims))
            t.dims[i] = rng.choice([*choices, t.dims[i] + 1, t.dims[i] - 1])
        else:
            t.dims.append(rng.choice(choices))
    else:
        vi = rng.choice([*m.graph.input, *m.graph.output])
        dims = vi.type.tensor_type.shape.dim
        if rng.random() < 0.2:
            dims.add().dim_value = rng.choice([1, 5])  # another rank
        elif dims:
            rng.choice(dims).dim_value = rng.choice(choices)


def _data_type(rng: random.Random, m: onnx.ModelProto, files: dict) -> None:
    types = [0, 1, 2, 3, 5, 6, 7, 9, 10, 11, 16, 99]
    if rng.random() < 0.7 and m.graph.initializer:
        rng.choice(m.graph.initializer).data_type = rng.choice(types)
    else:
        rng.choice(m.graph.input).type.tensor_type.elem_type = rng.choice(types)


def _op_type(rng: random.Random, m: onnx.ModelProto, files: dict) -> None:
    ops = ["Relu", "Gemm", "MatMul", "Add", "Conv", "BatchNormalization", "Identity", "Foo"]
    rng.choice(m.graph.node).op_type = rng.choice(ops + ["Transpose", "Reshape", "Dropout"])


def _attribute(rng: random.Random, m: onnx.ModelProto, files: dict) -> None:
    node = rng.choice(m.graph.node)
    roll = rng.random()
    if node.attribute and roll < 0.3:
        node.attribute.remove(rng.choice(node.attribute))
    elif node.attribute and roll < 0.7:
        a = rng.choice(node.attribute)
        if a.type == onnx.AttributeProto.INT:
            a.i = rng.choice([-1, 0, 2, 99])
        elif a.type == onnx.AttributeProto.FLOAT:
            a.f = rng.choice([float("nan"), -1.0, 0.0, 1e30])
        elif a.type == onnx.AttributeProto.INTS and a.ints:
            a.ints[rng.randrange(len(a.ints))] = rng.choice([-1, 0, 7])
        else:
            a.type = rng.choice([1, 2, 3, 7])
    else:
        name, value = rng.choice(
            [
                ("epsilon", -1.0),
                ("training_mode", 1),
                ("transB", 1),
                ("alpha", 2.0),
                ("axis", 5),
                ("group", 3),
                ("momentum", float("nan")),
            ]
        )
        node.attribute.append(helper.make_attribute(name, value))


def _input_name(rng: random.Random, m: onnx.ModelProto, files: dict) -> None:
    node = rng.choice([n for n in m.graph.node if n.input])
    names = [o for n in m.graph.node for o in n.output] + [t.name for t in m.graph.initializer]
    i = rng.randrange(len(node.input))
    node.input[i] = rng.choice([*names, "nope", ""])


def _opset(rng: random.Random, m: onnx.ModelProto, files: dict) -> None:
    m.opset_import[0].version = rng.choice([1, 6, 7, 9, 11, 13, 14, 15, 17, 19, 21, 23, 30])


def _outputs(rng: random.Random, m: onnx.ModelProto, files: dict) -> None:
    bns = [n for n in m.graph.node if n.op_type == "BatchNormalization"]
    roll = rng.random()
    if roll < 0.3:
        del m.graph.output[:]
    elif roll < 0.6 and bns:  # optional outputs listed with empty names (onnxruntime's tests)
        bn = rng.choice(bns)
        bn.output.extend([""] * 4)
        if rng.random() < 0.5:
            m.opset_import[0].version = 9
    else:
        m.graph.output[0].name = rng.choice(["nope", "", m.graph.node[0].output[0]])


def _external(rng: random.Random, m: onnx.ModelProto, files: dict) -> None:
    tensors = [t for t in m.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    if not tensors:
        t = rng.choice(m.graph.initializer)
        t.data_location = TensorProto.EXTERNAL  # external, without entries
        return
    t = tensors[0]
    roll = rng.random()
    if roll < 0.6:
        e = rng.choice(t.external_data)
        e.value = rng.choice(BAD_ENTRIES)
    elif roll < 0.8 and files:
        name = next(iter(files))
        files[name] = files[name][: rng.randrange(len(files[name]))]
    else:
        e = t.external_data.add()
        e.key, e.value = rng.choice(["offset", "length", "checksum"]), rng.choice(BAD_ENTRIES)


def _bit_flips(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(len(out))
        out[i] ^= 1 << rng.randrange(8)
    return bytes(out)


def _truncate(rng: random.Random, data: bytes) -> bytes:
    return data[: rng.randrange(1, len(data))]


FIELD_EDITS: dict[str, Callable] = {
    "dims": _dims,
    "data_type": _data_type,
    "op_type": _op_type,
    "attribute": _attribute,
    "input_name": _input_name,
    "opset": _opset,
    "outputs": _outputs,
    "external": _external,
}
BYTE_EDITS: dict[str, Callable] = {"bit_flips": _bit_flips, "truncate": _truncate}
KINDS = [*FIELD_EDITS, *BYTE_EDITS]


def mutant(seed: int, index: int, folder: Path) -> tuple[str, str]:
    """Write mutant `index` of campaign `seed` into `folder`; return (base, kinds)."""
    rng = random.Random(seed * 1_000_003 + index)
    name, model, files = rng.choice(bases())
    files = dict(files)
    kinds = rng.sample(KINDS, rng.choice([1, 1, 2]))
    data = None
    for kind in kinds:
        if kind in FIELD_EDITS:
            if data is not None:  # a byte edit came first: edit what still parses
                try:
                    model = onnx.load_from_string(data)
                except Exception:
                    continue
            FIELD_EDITS[kind](rng, model, files)
            data = None
        else:
            data = BYTE_EDITS[kind](rng, model.SerializeToString() if data is None else data)
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(model.SerializeToString() if data is None else data)
    for fname, content in files.items():
        (folder / fname).write_bytes(content)
    return name, "+".join(kinds)


# --- the campaign ------------------------------------------------------------------------


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _call(argv: list[str], err_path: Path) -> tuple[int, str]:
    """`main(argv, contain=True)` with stdout discarded and stderr captured (fd level, so
    the forked child's writes are caught too)."""
    from bn_onnx.cli import main

    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(os.devnull, "wb") as null, open(err_path, "wb") as err:
        os.dup2(null.fileno(), 1)
        os.dup2(err.fileno(), 2)
        try:
            try:
                code = main(argv, contain=True)
            except SystemExit as exc:  # argparse
                code = exc.code if isinstance(exc.code, int) else 2
            except BaseException as exc:  # a traceback in the parent itself
                code = -1000
                err.write(f"Traceback: {type(exc).__name__}: {exc}".encode())
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
    return code, err_path.read_text(errors="replace")


def _feeds(model: onnx.ModelProto, rng: np.random.Generator) -> dict[str, np.ndarray] | None:
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        if tt.elem_type != TensorProto.FLOAT or not tt.HasField("shape"):
            return None
        shape = [d.dim_value if d.HasField("dim_value") else 2 for d in tt.shape.dim]
        if np.prod(shape) > 1 << 16:
            return None
        feeds[vi.name] = rng.normal(size=shape).astype(np.float32)
    return feeds


def _in_child(work: Callable[[], str | None]) -> str | None:
    """`work()` in a forked child (onnxruntime sessions die with it); its message, or what
    killed it."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        os.close(r)
        try:
            msg = work() or ""
        except BaseException as exc:
            msg = f"raised {type(exc).__name__}: {exc}"
        os.write(w, msg.encode()[:4000])
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        msg = f.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return f"died of signal {os.WTERMSIG(status)}"
    return msg or None


def _session(path: Path) -> object:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _reference(source: Path, saved: Path) -> str | None:
    """The mutant's own outputs in onnxruntime on a seeded feed, saved to `saved`."""
    try:
        sess = _session(source)
    except Exception:
        return "no load"
    feeds = _feeds(onnx.load(str(source), load_external_data=False), np.random.default_rng(0))
    if feeds is None:
        return "no feed"
    try:
        outputs = sess.run(None, feeds)
    except Exception:
        return "no run"
    np.savez(saved, *[np.asarray(o) for o in outputs], **{f"feed_{k}": v for k, v in feeds.items()})
    return None


def _check_folded(folded: Path, saved: Path, source_loads: bool) -> str | None:
    """The folded file passes the full checker and, where its input loads in onnxruntime,
    loads too and computes the same outputs (where its input runs)."""
    try:
        onnx.checker.check_model(str(folded), full_check=True)
    except Exception as exc:
        return f"folded model fails the full checker: {str(exc).splitlines()[0]}"
    if not source_loads:
        return None
    try:
        sess = _session(folded)
    except Exception as exc:
        return f"folded model does not load in onnxruntime: {str(exc).splitlines()[0]}"
    if not saved.exists():
        return None
    with np.load(saved) as data:
        expected = [data[f"arr_{i}"] for i in range(sum(k.startswith("arr_") for k in data))]
        feeds = {k[5:]: data[k] for k in data.files if k.startswith("feed_")}
    try:
        got = sess.run(None, feeds)
    except Exception as exc:
        return f"folded model fails to run where its input runs: {str(exc).splitlines()[0]}"
    for e, g in zip(expected, got, strict=True):
        e, g = np.asarray(e, np.float64), np.asarray(g, np.float64)
        if e.shape != g.shape:
            return f"folded output shape {g.shape}, input's {e.shape}"
        finite = np.isfinite(e)
        if not np.array_equal(finite, np.isfinite(g)):
            return "folded output is non-finite elsewhere than its input's"
        scale = max(1.0, float(np.abs(e[finite]).max(initial=0.0)))
        if not np.allclose(g[finite], e[finite], rtol=1e-3, atol=1e-4 * scale):
            return f"folded output differs: max abs {np.abs(g - e)[finite].max():.3g}"
    return None


def _same_computation(source: Path, folded: Path, stats: dict) -> str | None:
    """None when the fold of `source` is a valid model computing the same; else what is not."""
    saved = folded.parent.parent / "reference.npz"
    status = _in_child(lambda: _reference(source, saved))
    stats["folds"][f"input: {status or 'runs'}"] += 1
    source_loads = status in (None, "no feed", "no run")
    problem = _in_child(lambda: _check_folded(folded, saved, source_loads))
    saved.unlink(missing_ok=True)
    return problem


def _check_one(folder: Path, out: Path, label: str, stats: dict, failures: list) -> None:
    model = folder / "model.onnx"
    before = _hashes(folder)
    argvs = {
        "inspect": ["inspect", str(model)],
        "fold": ["fold", str(model), "-o", str(out / "fold" / "o.onnx")],
        "verify": ["verify", str(model), "--rows", "8", "--provider", "cpu"],
        "run": ["run", str(model), "-i", str(SAMPLE), "-o", str(out / "run" / "y.npy"), "-q"],
    }
    for cmd, argv in argvs.items():
        (out / cmd).mkdir(parents=True, exist_ok=True)
        code, err = _call(argv, out / f"{cmd}.err")
        stats[cmd][str(code)] += 1
        lines = [line for line in err.splitlines() if line.strip()]
        what = f"{label} {cmd}"
        if "Traceback" in err or code not in (0, 1, 2):
            failures.append(f"{what}: exit {code}: {err.strip()[-300:]}")
        elif code == 2 and (len(lines) != 1 or not lines[0].startswith(f"bn-onnx {cmd}: error:")):
            failures.append(f"{what}: exit 2 with {len(lines)} lines: {err.strip()[:300]}")
        left = [p.name for p in (out / cmd).iterdir()]
        if code != 0 and left:
            failures.append(f"{what}: exit {code} left {left}")
        if cmd == "fold" and code == 0:
            stats["folds"]["ok"] += 1
            problem = _same_computation(model, out / "fold" / "o.onnx", stats)
            if problem:
                failures.append(f"{what}: {problem}")
    if _hashes(folder) != before:
        failures.append(f"{label}: an input file changed")


def campaign(
    n: int, seed: int, workdir: Path, *, start: int = 0, report: Path | None = None
) -> dict:
    """Run mutants `start`..`start + n - 1` of campaign `seed` under `workdir`; return counts
    and failures (also written to `report` every 25 mutants, for long runs)."""
    # Imported before any fork, so that each child does not import them again; onnxruntime
    # sessions are only made in children.
    import onnxruntime  # noqa: F401

    import bn_onnx.fold
    import bn_onnx.runtime
    import bn_onnx.verify  # noqa: F401

    stats: dict[str, Counter] = {c: Counter() for c in [*COMMANDS, "folds"]}
    kinds: Counter = Counter()
    failures: list[str] = []

    def result(done: int) -> dict:
        return {
            "mutants": done,
            "seed": seed,
            "start": start,
            "exit_codes": {k: dict(v) for k, v in stats.items()},
            "kinds": dict(kinds),
            "failures": failures,
        }

    for i in range(start, start + n):
        folder = workdir / f"m{i}"
        base, kind = mutant(seed, i, folder)
        kinds[kind] += 1
        _check_one(folder, workdir / f"out{i}", f"mutant {i} ({base}, {kind})", stats, failures)
        shutil.rmtree(folder)
        shutil.rmtree(workdir / f"out{i}")
        if report is not None and (i - start + 1) % 25 == 0:
            report.write_text(json.dumps(result(i - start + 1), indent=1))
    return result(n)


if __name__ == "__main__":
    count, seed_arg, work, out = sys.argv[1:5]
    first = int(sys.argv[5]) if len(sys.argv) > 5 else 0
    found = campaign(int(count), int(seed_arg), Path(work), start=first, report=Path(out))
    Path(out).write_text(json.dumps(found, indent=1))
