"""Prove that models compute the same thing: every model on every provider, torch, float64.

The reference chain (DESIGN.md): numpy float64 forward -> torch float32 eval -> onnxruntime
unfolded -> onnxruntime folded, per provider. Every run is compared with the float64 reference
when there is one (from the checkpoint, else from the first unfolded ONNX graph), else with the
first model's first run. No torch import here: the torch runner is passed in by the caller.

`locate` finds where two disagreeing models part ways. Folded and unfolded graphs name their
nodes differently and differ in the BN nodes, so values are matched by position in the chain:
the input and the output of each activation, then the model's output. These points exist in
both: a BN before an activation ends up inside the linear layer's values, a BN after one is
moved into the next linear layer, after the activation's output.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from bn_onnx import reference
from bn_onnx.compare import OutputComparison, compare_arrays
from bn_onnx.errors import BnOnnxError, InputDataError, ProviderError, UsageError
from bn_onnx.runtime import CUDA, Predictor, check_input, resolve_providers, short_name

DEFAULT_ROWS = 256
# f(checkpoint_dir, x) -> outputs, or (outputs, [(label, values), ...]) with the matching points
TorchRunner = Callable[[str, np.ndarray], Any]

# Nodes that start or continue an affine stage (linear layer, its bias, a batch norm).
_LINEAR_START = {"Gemm", "MatMul", "BatchNormalization"}
_LINEAR_CONT = {"Add", "Sub", "Identity", "Dropout", "Cast", "Reshape", "Flatten"}


@dataclass
class Tap:
    """A matching point of a graph: its label, the tensor holding it, the nodes leading to it."""

    label: str
    tensor: str
    nodes: list[str]


def find_taps(model: onnx.ModelProto) -> list[Tap]:
    """The matching points of an MLP-shaped graph, in chain order.

    For each activation (a run of nodes that are not Gemm/MatMul/bias/BN), its input
    ("block k pre-activation") and output ("block k activation"); finally the first graph
    output ("output"). Nodes that read no value derived from the input (constants, weight
    transposes) are ignored.
    """
    graph = model.graph
    init = {t.name for t in graph.initializer}
    dynamic = {i.name for i in graph.input if i.name not in init}
    taps: list[Tap] = []
    state = "linear"
    stage: list[str] = []
    last_act = ""
    k = 0
    for node in graph.node:
        dyn_in = [n for n in node.input if n in dynamic]
        if not dyn_in:
            continue
        dynamic.update(n for n in node.output if n)
        name = node.name or f"{node.op_type}#{len(stage)}"
        op = node.op_type
        if op in _LINEAR_START or (op in _LINEAR_CONT and state == "linear"):
            if state == "act":
                taps.append(Tap(f"block {k} activation", last_act, stage))
                stage, k = [], k + 1
            state = "linear"
        elif state == "linear":
            taps.append(Tap(f"block {k} pre-activation", dyn_in[0], stage))
            stage, state = [], "act"
        stage.append(name)
        if state == "act":
            last_act = node.output[0]
    out = graph.output[0].name
    if state == "act" and last_act != out:
        taps.append(Tap(f"block {k} activation", last_act, stage))
        stage = []
    taps.append(Tap("output", out, stage))
    return taps


def with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of `model` that also outputs the tensors `names` (for intermediate values)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    have = {o.name for o in out.graph.output}
    types: dict[str, int] = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
        for vi in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]:
            types[vi.name] = vi.type.tensor_type.elem_type
    except Exception:  # shape inference is a nicety here; float is the usual answer
        pass
    default = model.graph.input[0].type.tensor_type.elem_type or onnx.TensorProto.FLOAT
    for name in names:
        if name not in have:
            elem = types.get(name) or default
            out.graph.output.append(onnx.helper.make_tensor_value_info(name, elem, None))
            have.add(name)
    return out


@dataclass
class Run:
    """One way of computing the outputs: an ONNX model on a provider, torch, or float64."""

    label: str
    kind: str  # "onnx" | "torch" | "reference"
    output: np.ndarray
    detail: str = ""
    model: str | None = None
    provider: str | None = None
    folded: bool | None = None
    tf32: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (no arrays)."""
        return {
            "label": self.label,
            "kind": self.kind,
            "detail": self.detail,
            "model": self.model,
            "provider": self.provider,
            "folded": self.folded,
            "tf32": self.tf32,
            "output_shape": list(self.output.shape),
            "output_dtype": str(self.output.dtype),
        }


@dataclass
class Pair:
    """One run compared with another (`expected` is the reference side)."""

    actual: str
    expected: str
    comparison: OutputComparison
    counted: bool = True

    @property
    def passed(self) -> bool:
        """Within tolerance."""
        return self.comparison.passed

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {
            "actual": self.actual,
            "expected": self.expected,
            "counted": self.counted,
            **self.comparison.to_dict(),
        }


@dataclass
class FoldingRow:
    """Folded vs unfolded error against float64 on one provider: does folding add error?"""

    provider: str
    unfolded: str
    folded: str
    unfolded_max_abs: float
    folded_max_abs: float
    unfolded_median_abs: float
    folded_median_abs: float

    @property
    def adds_error(self) -> bool:
        """The folded model's error is more than twice the unfolded one's (plus 1e-7)."""
        return self.folded_max_abs > 2.0 * self.unfolded_max_abs + 1e-7

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {**self.__dict__, "adds_error": self.adds_error}


@dataclass
class Location:
    """Where two runs part ways: each matching point's error and the first that fails."""

    actual: str
    expected: str
    points: list[dict[str, Any]] = field(default_factory=list)
    first: str | None = None
    nodes_actual: list[str] = field(default_factory=list)
    nodes_expected: list[str] = field(default_factory=list)
    note: str | None = None

    @property
    def layer(self) -> str | None:
        """The diverging layer in words."""
        if self.first is None:
            return None
        if self.first == "output":
            return "the head (last linear layer)"
        block, what = self.first.rsplit(" ", 1)[0], self.first.rsplit(" ", 1)[1]
        if what == "pre-activation":
            return f"{block}: its linear layer (with any batch norm before the activation)"
        return f"{block}: its activation"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {**self.__dict__, "layer": self.layer}


@dataclass
class VerifyReport:
    """Everything `verify` found; `bool(report)` is True when every pair passed."""

    input_source: str
    n_rows: int
    n_features: int
    atol: float | None
    rtol: float | None
    runs: list[Run] = field(default_factory=list)
    pairs: list[Pair] = field(default_factory=list)
    folding: list[FoldingRow] = field(default_factory=list)
    locations: list[Location] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """Every counted pair within tolerance."""
        return all(p.passed for p in self.pairs if p.counted)

    def __bool__(self) -> bool:
        return self.passed

    @property
    def exit_code(self) -> int:
        """0 when all pairs pass, 1 otherwise."""
        return 0 if self.passed else 1

    @property
    def cuda_used(self) -> bool:
        """Whether any run used the CUDA provider."""
        return any(r.provider == "cuda" for r in self.runs)

    def tf32_line(self) -> str:
        """Whether TF32 was off on CUDA (it must be, for verification)."""
        if not self.cuda_used:
            return "TF32: not applicable (CUDA not used)"
        on = [r.label for r in self.runs if r.provider == "cuda" and r.tf32]
        return "TF32: ON for " + ", ".join(on) if on else "TF32: off on every CUDA session"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able report (written by `--report`)."""
        return {
            "passed": self.passed,
            "input": {
                "source": self.input_source,
                "rows": self.n_rows,
                "features": self.n_features,
            },
            "tolerance": {"atol": self.atol, "rtol": self.rtol},
            "runs": [r.to_dict() for r in self.runs],
            "pairs": [p.to_dict() for p in self.pairs],
            "folding": [f.to_dict() for f in self.folding],
            "locations": [loc.to_dict() for loc in self.locations],
            "tf32": self.tf32_line(),
            "warnings": list(self.warnings),
        }


def verify_providers(spec: str) -> list[str]:
    """Short provider names to verify on: `auto` means every one of cuda, cpu available."""
    if spec.strip().lower() == "auto":
        return ["cuda", "cpu"] if CUDA in resolve_providers("auto") else ["cpu"]
    names = [p.strip().lower() for p in spec.split(",") if p.strip()]
    if not names:
        raise UsageError("no provider given (choose from auto, cpu, cuda)")
    out = []
    for name in names:
        short = short_name(resolve_providers(name)[0])
        if short not in out:
            out.append(short)
    return out


def _labels(paths: Sequence[str]) -> list[str]:
    names = [Path(p).name for p in paths]
    if len(set(names)) == len(names):
        return names
    return [str(p) for p in paths]


def _metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def _is_folded(model: onnx.ModelProto) -> bool:
    flag = _metadata(model).get("bn_onnx.folded")
    if flag in ("true", "false"):
        return flag == "true"
    return not any(n.op_type == "BatchNormalization" for n in model.graph.node)


def _model_input(model: onnx.ModelProto) -> tuple[int | None, np.dtype]:
    init = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in init]
    if len(inputs) != 1:
        raise UsageError(f"verify needs models with one input, got {len(inputs)}")
    t = inputs[0].type.tensor_type
    dims = t.shape.dim
    width = dims[1].dim_value if len(dims) == 2 and dims[1].HasField("dim_value") else None
    np_dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type) if t.elem_type else np.float32
    return width, np.dtype(np_dtype)


def _default_inputs(
    checkpoint: Any, n_features: int, rows: int, seed: int, warnings: list[str]
) -> tuple[np.ndarray, str]:
    if checkpoint is not None and isinstance(checkpoint.meta.get("dataset"), dict):
        try:
            from bn_onnx.data import load_split_from_checkpoint_meta

            data = load_split_from_checkpoint_meta(checkpoint.meta)
            x = np.asarray(data.x_test, dtype=np.float32)
            name = checkpoint.meta["dataset"].get("name", "dataset")
            return x, f"the checkpoint's test split ({name}, {len(x)} rows)"
        except (BnOnnxError, ImportError) as exc:
            warnings.append(f"cannot rebuild the checkpoint's test split ({exc}); random inputs")
    z = np.random.default_rng(seed).standard_normal((rows, n_features))
    tensors = checkpoint.tensors if checkpoint is not None else {}
    if "input_norm.running_mean" in tensors:
        # In the training data's range: raw N(0, 1) rows can sit thousands of standard
        # deviations out for features of tiny variance, and measure nothing but overflow.
        mean = np.asarray(tensors["input_norm.running_mean"], dtype=np.float64)
        std = np.sqrt(np.asarray(tensors["input_norm.running_var"], dtype=np.float64))
        x = (mean + std * z).astype(np.float32)
        return x, f"seeded random inputs with the checkpoint's input statistics (seed {seed})"
    return z.astype(np.float32), f"seeded random normal inputs (seed {seed}, {rows} rows)"


def _onnx_taps(
    model: onnx.ModelProto, x: np.ndarray, provider: str | None
) -> tuple[list[Tap], dict[str, np.ndarray]]:
    taps = find_taps(model)
    names = [t.tensor for t in taps]
    if provider is None:  # the float64 reference of a graph
        return taps, reference.onnx_forward(model, x, names)
    from bn_onnx.runtime import create_session

    info = create_session(
        with_outputs(model, names).SerializeToString(), provider=provider, use_tf32=False
    )
    values = info.session.run(names, {info.session.get_inputs()[0].name: x})
    return taps, dict(zip(names, values, strict=True))


def _checkpoint_tap_nodes(config: Any) -> dict[str, list[str]]:
    n = len(config.hidden)
    nodes: dict[str, list[str]] = {}
    for i in range(n):
        pre = [f"blocks.{i}.linear"]
        if i == 0 and config.input_norm:
            pre.insert(0, "input_norm")
        if config.bn == "post" and i > 0:
            pre.insert(0, f"blocks.{i - 1}.bn")
        if config.bn == "pre":
            pre.append(f"blocks.{i}.bn")
        nodes[f"block {i} pre-activation"] = pre
        nodes[f"block {i} activation"] = [f"blocks.{i}.act"]
    out = ["head"]
    if config.bn == "post" and n:
        out.insert(0, f"blocks.{n - 1}.bn")
    if n == 0 and config.input_norm:
        out.insert(0, "input_norm")
    nodes["output"] = out
    return nodes


@dataclass
class _Source:
    """How to get a run's intermediate values again, for `locate`."""

    kind: str
    model: onnx.ModelProto | None = None
    provider: str | None = None
    taps: dict[str, np.ndarray] | None = None


def verify(
    models: Sequence[str | os.PathLike[str]],
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    inputs: np.ndarray | None = None,
    input_source: str | None = None,
    provider: str = "auto",
    atol: float | None = None,
    rtol: float | None = None,
    locate: bool = False,
    torch_runner: TorchRunner | None = None,
    rows: int = DEFAULT_ROWS,
    seed: int = 0,
) -> VerifyReport:
    """Run every model on every provider (plus torch and float64 with a checkpoint) and compare.

    Args:
        models: ONNX files (typically unfolded then folded).
        checkpoint: the checkpoint directory the models came from (enables the float64
            reference of the checkpoint, torch eval, and its test split as inputs).
        inputs: rows to run; default the checkpoint's test split, else seeded random rows.
        input_source: words for where `inputs` came from.
        provider: `auto` (every available of cuda, cpu), `cpu`, `cuda` or `cpu,cuda`.
        atol, rtol: tolerances (None: the defaults for the output dtype, 1e-5/1e-4 for float32).
        locate: for pairs that disagree, find the first matching point that diverges.
        torch_runner: `f(checkpoint_dir, x) -> outputs` running the checkpoint in torch.
        rows, seed: the size and seed of random inputs.
    """
    from bn_onnx.onnx_io import load_model

    if not models:
        raise UsageError("give at least one model")
    paths = [str(m) for m in models]
    protos = [load_model(p) for p in paths]
    labels = _labels(paths)
    n_features, in_dtype = _model_input(protos[0])
    for path, proto in zip(paths[1:], protos[1:], strict=True):
        w, _ = _model_input(proto)
        if w != n_features:
            raise UsageError(f"{path} takes {w} features, {paths[0]} takes {n_features}")
    warnings: list[str] = []
    ckpt = None
    if checkpoint is not None:
        from bn_onnx.checkpoint import read_checkpoint

        ckpt = read_checkpoint(checkpoint)
        if n_features is not None and ckpt.config.in_features != n_features:
            raise UsageError(
                f"checkpoint takes {ckpt.config.in_features} features, the models take {n_features}"
            )
        n_features = ckpt.config.in_features
    if inputs is None:
        if n_features is None:
            raise UsageError("the model's feature count is symbolic; pass --input")
        inputs, input_source = _default_inputs(ckpt, n_features, rows, seed, warnings)
    x = check_input(inputs, n_features, np.dtype(np.float32))
    if x.shape[0] == 0:
        raise InputDataError("input has no rows")
    n_features = x.shape[1]
    providers = verify_providers(provider)

    meta0 = _metadata(protos[0])
    task = meta0.get("bn_onnx.task") or (ckpt.config.task if ckpt is not None else None)
    classifier = task == "classification" or (
        task is None and protos[0].graph.output[0].name == "logits"
    )
    report = VerifyReport(
        input_source=input_source or "the given input",
        n_rows=int(x.shape[0]),
        n_features=int(n_features),
        atol=atol,
        rtol=rtol,
        warnings=warnings,
    )
    sources: dict[str, _Source] = {}
    ref_taps: dict[str, np.ndarray] | None = None
    ref_nodes: dict[str, list[str]] = {}

    # The float64 reference: of the checkpoint, else of the first unfolded graph.
    if ckpt is not None:
        fwd = reference.forward_tensors(ckpt.config, ckpt.tensors, x)
        report.runs.append(
            Run("float64 reference", "reference", fwd.output, f"numpy float64 of {checkpoint}")
        )
        ref_taps = dict(fwd.taps)
        ref_nodes = _checkpoint_tap_nodes(ckpt.config)
        sources["float64 reference"] = _Source("checkpoint")
    else:
        order = sorted(range(len(protos)), key=lambda i: _is_folded(protos[i]))
        i = order[0]
        try:
            out = reference.onnx_output(protos[i], x.astype(in_dtype))
            report.runs.append(
                Run("float64 reference", "reference", out, f"numpy float64 of {labels[i]}")
            )
            sources["float64 reference"] = _Source("onnx", protos[i], None)
        except BnOnnxError as exc:
            report.warnings.append(f"no float64 reference: {exc}")

    if ckpt is not None:
        if torch_runner is None:
            report.warnings.append("torch is not installed: torch eval skipped")
        else:
            result = torch_runner(str(checkpoint), x)
            torch_taps = None
            if isinstance(result, tuple):
                result, torch_taps = result
            out = np.asarray(result)
            report.runs.append(Run("torch eval", "torch", out, "torch float32, CPU, eval mode"))
            if torch_taps is not None:
                sources["torch eval"] = _Source("torch", taps=dict(torch_taps))

    auto = provider.strip().lower() == "auto"
    for path, label, proto in zip(paths, labels, protos, strict=True):
        for prov in list(providers):
            try:
                pred = Predictor(path, provider=prov, use_tf32=False, allow_nonfinite=True)
            except ProviderError as exc:
                if not (auto and prov == "cuda"):
                    raise
                # auto: CUDA was only found, not asked for; verify on the rest and say so.
                report.warnings.append(f"CUDA skipped: {exc}")
                providers.remove(prov)
                continue
            report.warnings.extend(pred.info.warnings)
            run_label = f"{label} [{prov}]"
            report.runs.append(
                Run(
                    run_label,
                    "onnx",
                    pred.predict(x.astype(pred.input_dtype, copy=False)),
                    f"onnxruntime {pred.info.describe()}",
                    model=path,
                    provider=pred.info.main_provider,
                    folded=_is_folded(proto),
                    tf32=pred.info.tf32,
                )
            )
            sources[run_label] = _Source("onnx", proto, prov)

    if not providers:
        raise ProviderError("no execution provider could run the models")
    runs = {r.label: r for r in report.runs}
    base = report.runs[0]
    out_name = protos[0].graph.output[0].name

    def add_pair(a: Run, b: Run, counted: bool = True) -> None:
        comp = compare_arrays(
            a.output, b.output, atol=atol, rtol=rtol, name=out_name, classifier=classifier
        )
        report.pairs.append(Pair(a.label, b.label, comp, counted))

    for r in report.runs[1:]:
        add_pair(r, base)
    if base.kind == "reference" and len(paths) > 1:
        # Shown, not counted: both sides carry float32 error (up to twice the tolerance apart
        # when each is within it); each was checked against float64 above.
        for prov in providers:
            first = runs[f"{labels[0]} [{prov}]"]
            for label in labels[1:]:
                add_pair(runs[f"{label} [{prov}]"], first, counted=False)

    # Does folding add error? Folded vs unfolded, both against float64, per provider.
    if base.kind == "reference":
        errors = {p.actual: p.comparison for p in report.pairs if p.expected == base.label}
        for prov in providers:
            onnx_runs = [
                r for r in report.runs if r.kind == "onnx" and r.label.endswith(f"[{prov}]")
            ]
            unf = [r for r in onnx_runs if not r.folded]
            fol = [r for r in onnx_runs if r.folded]
            if unf and fol:
                u, f = errors[unf[0].label], errors[fol[0].label]
                report.folding.append(
                    FoldingRow(
                        prov,
                        unf[0].label,
                        fol[0].label,
                        u.max_abs,
                        f.max_abs,
                        u.median_abs,
                        f.median_abs,
                    )
                )

    if locate:
        cache: dict[str, tuple[dict[str, np.ndarray], dict[str, list[str]]] | None] = {}

        def taps_of(label: str) -> tuple[dict[str, np.ndarray], dict[str, list[str]]] | None:
            if label in cache:
                return cache[label]
            src = sources.get(label)
            value = None
            if src is not None and src.kind == "checkpoint" and ref_taps is not None:
                value = (ref_taps, ref_nodes)
            elif src is not None and src.kind == "torch" and src.taps is not None:
                value = (src.taps, ref_nodes)
            elif src is not None and src.kind == "onnx" and src.model is not None:
                try:
                    taps, vals = _onnx_taps(src.model, x, src.provider)
                    value = (
                        {t.label: vals[t.tensor] for t in taps},
                        {t.label: t.nodes for t in taps},
                    )
                except Exception as exc:  # locate is a diagnosis; never fail the report for it
                    line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                    report.warnings.append(
                        f"locate: cannot expose values of {label}: {type(exc).__name__} {line}"
                    )
            cache[label] = value
            return value

        for pair in report.pairs:
            if pair.passed or not (pair.counted or not report.passed):
                continue
            loc = Location(pair.actual, pair.expected)
            a, b = taps_of(pair.actual), taps_of(pair.expected)
            if a is None or b is None:
                loc.note = "no intermediate values for one of these runs"
                report.locations.append(loc)
                continue
            (va, na), (vb, nb) = a, b
            common = [lab for lab in va if lab in vb]
            if list(va) != list(vb):
                loc.note = (
                    f"the models have {len(va)} and {len(vb)} matching points; compared the "
                    f"{len(common)} with the same label"
                )
            for lab in common:
                comp = compare_arrays(va[lab], vb[lab], atol=atol, rtol=rtol, name=lab)
                loc.points.append(
                    {
                        "label": lab,
                        "passed": comp.passed,
                        "max_abs": comp.max_abs,
                        "n_mismatched": comp.n_mismatched,
                    }
                )
                if not comp.passed and loc.first is None:
                    loc.first = lab
                    loc.nodes_actual = list(na.get(lab, []))
                    loc.nodes_expected = list(nb.get(lab, []))
            report.locations.append(loc)
    return report


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3g}" if np.isfinite(v) else str(v)


def render(report: VerifyReport) -> str:
    """The report as the text `bn-onnx verify` prints: runs, a table of pairs, folding, verdict."""
    tol_a = _fmt(report.atol) if report.atol is not None else "1e-05"
    tol_r = _fmt(report.rtol) if report.rtol is not None else "0.0001"
    lines = [
        f"input: {report.n_rows} rows x {report.n_features} features, {report.input_source}",
        f"tolerance: atol {tol_a}, rtol {tol_r} (an element fails only where both are exceeded)"
        + (" [float32 defaults]" if report.atol is None and report.rtol is None else ""),
        "",
        "runs:",
    ]
    width = max(len(r.label) for r in report.runs)
    for r in report.runs:
        lines.append(f"  {r.label:<{width}}  {r.detail}")
    lines.append("")
    head = ["actual", "expected", "max abs", "median abs", "max rel", "worst", "argmax", "bad", ""]
    rows = []
    for p in report.pairs:
        c = p.comparison
        rows.append(
            [
                p.actual,
                p.expected,
                _fmt(c.max_abs),
                _fmt(c.median_abs),
                _fmt(c.max_rel),
                str(list(c.worst_index)) if c.worst_index is not None else "-",
                f"{100 * c.argmax_agreement:.2f}%" if c.argmax_agreement is not None else "-",
                f"{c.n_mismatched}/{c.n_total}",
                ("ok" if c.passed else "FAIL" + (f" ({c.note})" if c.note else ""))
                if p.counted
                else ("ok (info)" if c.passed else "differs (info)"),
            ]
        )
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    lines.append("  " + "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)).rstrip())
    for row in rows:
        lines.append(
            "  " + "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip()
        )
    if not all(p.counted for p in report.pairs):
        lines.append(
            "  (info: float32 vs float32, not counted; each side is checked against float64)"
        )
    if report.folding:
        lines += ["", "folding vs float64 (does folding add error?):"]
        for f in report.folding:
            lines.append(
                f"  [{f.provider}] unfolded max abs {_fmt(f.unfolded_max_abs)} (median "
                f"{_fmt(f.unfolded_median_abs)}), folded max abs {_fmt(f.folded_max_abs)} "
                f"(median {_fmt(f.folded_median_abs)}): "
                + ("folding ADDS error" if f.adds_error else "no added error")
            )
    for loc in report.locations:
        lines += ["", f"locate: {loc.actual} vs {loc.expected}"]
        for pt in loc.points:
            mark = "ok" if pt["passed"] else "DIVERGES"
            lines.append(f"  {pt['label']:<26} max abs {_fmt(pt['max_abs']):<10} {mark}")
        if loc.first is not None:
            lines.append(f"  first divergence: {loc.layer}")
            lines.append(f"    nodes in {loc.actual}: {', '.join(loc.nodes_actual) or '-'}")
            lines.append(f"    nodes in {loc.expected}: {', '.join(loc.nodes_expected) or '-'}")
        if loc.note:
            lines.append(f"  note: {loc.note}")
    used = sorted({r.detail.removeprefix("onnxruntime ") for r in report.runs if r.kind == "onnx"})
    lines += ["", f"providers used: {'; '.join(used) or '-'}; {report.tf32_line()}"]
    for w in report.warnings:
        lines.append(f"warning: {w}")
    counted = [p for p in report.pairs if p.counted]
    failed = sum(not p.passed for p in counted)
    verdict = (
        f"PASS: all {len(counted)} comparisons within tolerance"
        if report.passed
        else f"FAIL: {failed} of {len(counted)} comparisons outside tolerance"
    )
    lines.append(verdict)
    return "\n".join(lines)


def write_report(report: VerifyReport, path: str | os.PathLike[str]) -> None:
    """Write the JSON report atomically."""
    from bn_onnx.files import atomic_output

    with atomic_output(path, suffix=".json") as tmp:
        tmp.write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
