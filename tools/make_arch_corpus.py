"""Export a corpus of real architectures with batch norm, with both torch exporters.

Each net is built with random weights (never a download), its batch-norm statistics and affine
parameters are randomized (see `randomize_bn`), and it is exported twice:

- `dynamo`: `torch.onnx.export(..., dynamo=True, optimize=False)`, as bn_onnx/export.py does
  (its optimizer would fold BN into Conv itself), torch's stack-trace metadata stripped;
- `torchscript`: `torch.onnx.export(..., dynamo=False, training=TrainingMode.PRESERVE)`. With
  its default `training=EVAL` the TorchScript exporter fuses every Conv+BN itself (a peephole
  pass), which leaves nothing to compare; PRESERVE on an eval-mode model writes each BN as an
  inference-mode BatchNormalization node (`training_mode=0`).

Both at opset 18, static shapes, batch 1. Files: `OUT/<name>.<exporter>.onnx`, plus
`OUT/manifest.json` (one entry per file: source, input and output shapes, BN count, size,
export time, or why the export failed). Deterministic: every net is seeded from its name.

Sources: torchvision and timm CNNs (the `corpus` extra; torchvision through
`tools/_torchvision_cpu.py`), and nets built here in plain torch: 1-D and 3-D conv nets, a
DCGAN generator (ConvTranspose), MLPs with BN before/after the activation and on the input,
a Linear on (N, L, C) with BatchNorm1d between transposes, a FrozenBatchNorm2d-style
(per-channel Mul/Add) residual net, and a net of the patterns issue 12 lists (BN after MaxPool
and Concat, before an unpadded Conv, 4-D BN before Flatten+Linear).

    python tools/make_arch_corpus.py --out /work/corpus          # everything (~20 min, 2 cores)
    python tools/make_arch_corpus.py --list
    python tools/make_arch_corpus.py --out /work/corpus --only 'tv_resnet*,audio_conv1d'
    python tools/make_arch_corpus.py --only ci --exporters dynamo --out /tmp/c
    python tools/make_arch_corpus.py --ci-data      # the small nets of tests/data/corpus/

`--only` takes comma-separated names, shell patterns and tags (`ci`, `torchvision`, `timm`,
`torch`, `frozen`, `concat`, ...). Progress goes to stderr, one line per file.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import hashlib
import io
import json
import logging
import os
import sys
import time
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CI_DATA = ROOT / "tests" / "data" / "corpus"
MANIFEST = "manifest.json"
EXPORTERS = ("dynamo", "torchscript")
OPSET = 18
SEED = 20260412
NEGATIVE_SCALE_FRACTION = 0.05
CALIBRATION_BATCH = 8

if TYPE_CHECKING:  # torch is imported lazily: --list and --help work without it
    from torch import nn


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# The nets


@dataclass(frozen=True)
class Net:
    """One architecture of the corpus.

    Attributes:
        name: file stem, unique.
        source: `torchvision`, `timm` or `torch` (built here).
        build: returns the torch module in eval mode (random weights, BN not yet randomized).
        inputs: the input shapes, batch 1, float32.
        tags: for `--only` (`ci`: small enough for tests/data/corpus/).
        note: what the net exercises.
    """

    name: str
    source: str
    build: Callable[[], nn.Module]
    inputs: tuple[tuple[int, ...], ...]
    tags: tuple[str, ...] = ()
    note: str = ""


def _torchvision() -> Any:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _torchvision_cpu import import_torchvision

    return import_torchvision()


def _tv(model: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        tv = _torchvision()
        return getattr(tv.models, model)(weights=None, **kwargs)

    return build


def _tv_video(model: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        tv = _torchvision()
        return getattr(tv.models.video, model)(weights=None)

    return build


def _tv_frozen(model: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        tv = _torchvision()
        from torchvision.ops.misc import FrozenBatchNorm2d

        return getattr(tv.models, model)(weights=None, norm_layer=FrozenBatchNorm2d)

    return build


def _timm(model: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        _torchvision()  # timm imports torchvision when it is installed
        import timm

        return timm.create_model(model, pretrained=False)

    return build


# Plain-torch nets: small, so that the `ci` ones fit in tests/data/corpus/ (< 200 KB a file).


def _conv1d_audio() -> nn.Module:
    """Log-mel frames (N, 40 bins, 64 frames) -> 10 classes: Conv1d+BN1d blocks, one depthwise,
    one with BN after the ReLU (post), global average pool, Linear."""
    from torch import nn

    return nn.Sequential(
        nn.Conv1d(40, 32, 5, padding=2, bias=False),
        nn.BatchNorm1d(32),
        nn.ReLU(),
        nn.Conv1d(32, 32, 3, padding=1, groups=32),
        nn.BatchNorm1d(32),
        nn.ReLU(),
        nn.MaxPool1d(2),
        nn.Conv1d(32, 48, 3, padding=1),
        nn.ReLU(),
        nn.BatchNorm1d(48),
        nn.Conv1d(48, 48, 1),
        nn.BatchNorm1d(48),
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(48, 10),
    )


def _conv3d_video() -> nn.Module:
    """Clips (N, 3, 8 frames, 32, 32) -> 10 classes: Conv3d+BN3d, a (2+1)-D residual block."""
    import torch
    from torch import nn

    class Video(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(
                nn.Conv3d(3, 16, 3, padding=1, bias=False), nn.BatchNorm3d(16), nn.ReLU()
            )
            self.down = nn.Sequential(
                nn.Conv3d(16, 24, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm3d(24),
                nn.ReLU(),
            )
            self.spatial = nn.Sequential(
                nn.Conv3d(24, 24, (1, 3, 3), padding=(0, 1, 1), bias=False),
                nn.BatchNorm3d(24),
                nn.ReLU(),
            )
            self.temporal = nn.Sequential(
                nn.Conv3d(24, 24, (3, 1, 1), padding=(1, 0, 0), bias=False), nn.BatchNorm3d(24)
            )
            self.head = nn.Linear(24, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.down(self.stem(x))
            x = torch.relu(x + self.temporal(self.spatial(x)))
            return self.head(x.mean(dim=(2, 3, 4)))

    return Video()


def _dcgan_generator() -> nn.Module:
    """DCGAN generator, latent (N, 16, 1, 1) -> image (N, 3, 32, 32): ConvTranspose2d+BN2d+ReLU,
    one of them grouped."""
    from torch import nn

    return nn.Sequential(
        nn.ConvTranspose2d(16, 48, 4, 1, 0, bias=False),
        nn.BatchNorm2d(48),
        nn.ReLU(),
        nn.ConvTranspose2d(48, 32, 4, 2, 1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.ConvTranspose2d(32, 16, 4, 2, 1, groups=2, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.ConvTranspose2d(16, 3, 4, 2, 1, bias=False),
        nn.Tanh(),
    )


def _mlp(placement: str) -> Callable[[], nn.Module]:
    """64 features -> 10: three Linear layers with BatchNorm1d before (`pre`) or after (`post`)
    the ReLU, with BN on the input (`input`), or bias-free Linear + BatchNorm1d(affine=False)
    (`noaffine`)."""

    def build() -> nn.Module:
        from torch import nn

        if placement == "pre":
            layers = [nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU()]
            layers += [nn.Linear(128, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10)]
        elif placement == "post":
            layers = [nn.Linear(64, 128), nn.ReLU(), nn.BatchNorm1d(128)]
            layers += [nn.Linear(128, 64), nn.ReLU(), nn.BatchNorm1d(64), nn.Linear(64, 10)]
        elif placement == "input":
            layers = [nn.BatchNorm1d(64), nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU()]
            layers += [nn.Linear(128, 10)]
        else:
            layers = [nn.Linear(64, 128, bias=False), nn.BatchNorm1d(128, affine=False)]
            layers += [nn.ReLU(), nn.Linear(128, 10)]
        return nn.Sequential(*layers)

    return build


def _seq_linear_bn() -> nn.Module:
    """Tokens (N, L=16, C=32) -> 10: Linear on the last axis, BatchNorm1d over C between two
    transposes (the BN channel is the Linear's output axis), twice; mean over L; Linear."""
    import torch
    from torch import nn

    class SeqBN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.bn1 = nn.Linear(32, 48), nn.BatchNorm1d(48)
            self.fc2, self.bn2 = nn.Linear(48, 48), nn.BatchNorm1d(48)
            self.head = nn.Linear(48, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.relu(self.bn1(self.fc1(x).transpose(1, 2)).transpose(1, 2))
            x = torch.relu(self.bn2(self.fc2(x).transpose(1, 2)).transpose(1, 2))
            return self.head(x.mean(dim=1))

    return SeqBN()


def _frozen_bn_module() -> type:
    """torchvision's FrozenBatchNorm2d forward, in plain torch: a per-channel Mul/Add whose
    scale and shift the exporters compute from four buffers (dynamo) or fold (TorchScript)."""
    import torch
    from torch import nn

    class FrozenBN2d(nn.Module):
        def __init__(self, n: int, eps: float = 1e-5) -> None:
            super().__init__()
            self.eps = eps
            self.register_buffer("weight", torch.ones(n))
            self.register_buffer("bias", torch.zeros(n))
            self.register_buffer("running_mean", torch.zeros(n))
            self.register_buffer("running_var", torch.ones(n))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            w = self.weight.reshape(1, -1, 1, 1)
            b = self.bias.reshape(1, -1, 1, 1)
            rv = self.running_var.reshape(1, -1, 1, 1)
            rm = self.running_mean.reshape(1, -1, 1, 1)
            scale = w * (rv + self.eps).rsqrt()
            return x * scale + (b - rm * scale)

    return FrozenBN2d


def _frozen_resnet() -> nn.Module:
    """Images (N, 3, 32, 32) -> 10: a ResNet stem and a downsampling basic block with a 1x1
    projection, normalized by FrozenBN2d (four of them: the dynamo export stays < 200 KB)."""
    import torch
    from torch import nn

    frozen = _frozen_bn_module()

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = frozen(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = frozen(cout)
            self.proj = (
                nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), frozen(cout))
                if stride != 1 or cin != cout
                else nn.Identity()
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(self.bn2(self.conv2(y)) + self.proj(x))

    return nn.Sequential(
        nn.Conv2d(3, 16, 3, 1, 1, bias=False),
        frozen(16),
        nn.ReLU(),
        Block(16, 32, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


def _bn_patterns() -> nn.Module:
    """Images (N, 3, 32, 32) -> 10 through the places issue 12 lists: BN after MaxPool (with
    negative scales: must stay), BN after a Concat of two Convs, BN before an unpadded 1x1
    Conv and before a padded 3x3 Conv, a 4-D BN -> Flatten -> Linear head."""
    import torch
    from torch import nn

    class Patterns(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv0 = nn.Conv2d(3, 16, 3, padding=1)
            self.pool_bn = nn.BatchNorm2d(16)
            self.branch_a = nn.Conv2d(16, 8, 1)
            self.branch_b = nn.Conv2d(16, 8, 3, padding=1)
            self.cat_bn = nn.BatchNorm2d(16)
            self.pre_bn = nn.BatchNorm2d(16)
            self.conv1x1 = nn.Conv2d(16, 16, 1)
            self.pad_bn = nn.BatchNorm2d(16)
            self.conv3x3 = nn.Conv2d(16, 8, 3, padding=1, stride=2)
            self.head_bn = nn.BatchNorm2d(8)
            self.head = nn.Linear(8 * 8 * 8, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.pool_bn(torch.max_pool2d(torch.relu(self.conv0(x)), 2))
            x = torch.relu(self.cat_bn(torch.cat([self.branch_a(x), self.branch_b(x)], 1)))
            x = torch.relu(self.conv1x1(self.pre_bn(x)))
            x = torch.relu(self.conv3x3(self.pad_bn(x)))
            return self.head(torch.flatten(self.head_bn(x), 1))

    return Patterns()


IMG = (1, 3, 64, 64)
NETS: list[Net] = [
    # torchvision
    Net("tv_resnet18", "torchvision", _tv("resnet18"), (IMG,), ("resnet",)),
    Net("tv_resnet50", "torchvision", _tv("resnet50"), (IMG,), ("resnet",)),
    Net("tv_mobilenet_v2", "torchvision", _tv("mobilenet_v2"), (IMG,), ("mobile",)),
    Net("tv_mobilenet_v3_small", "torchvision", _tv("mobilenet_v3_small"), (IMG,), ("mobile",)),
    Net(
        "tv_densenet121", "torchvision", _tv("densenet121"), (IMG,), ("concat",), "BN after Concat"
    ),
    Net("tv_shufflenet_v2_x1_0", "torchvision", _tv("shufflenet_v2_x1_0"), (IMG,), ("mobile",)),
    Net("tv_efficientnet_b0", "torchvision", _tv("efficientnet_b0"), (IMG,), ("mobile",)),
    Net("tv_regnet_y_400mf", "torchvision", _tv("regnet_y_400mf"), (IMG,)),
    Net("tv_mnasnet0_5", "torchvision", _tv("mnasnet0_5"), (IMG,), ("mobile",)),
    Net(
        "tv_googlenet",
        "torchvision",
        _tv("googlenet", aux_logits=False, init_weights=True),
        (IMG,),
        ("concat",),
    ),
    Net(
        "tv_resnet18_frozenbn",
        "torchvision",
        _tv_frozen("resnet18"),
        (IMG,),
        ("frozen", "resnet"),
        "FrozenBatchNorm2d: per-channel Mul/Add, no BatchNormalization node",
    ),
    Net("tv_r3d_18", "torchvision", _tv_video("r3d_18"), ((1, 3, 8, 32, 32),), ("3d",)),
    # timm
    Net("timm_dpn68", "timm", _timm("dpn68"), (IMG,), ("concat",), "BN after Concat (dual path)"),
    Net("timm_mixnet_s", "timm", _timm("mixnet_s"), (IMG,), ("mobile",)),
    Net("timm_ghostnet_100", "timm", _timm("ghostnet_100"), (IMG,), ("mobile",)),
    Net("timm_rexnet_100", "timm", _timm("rexnet_100"), (IMG,), ("mobile",)),
    Net("timm_resnet26d", "timm", _timm("resnet26d"), (IMG,), ("resnet",)),
    Net("timm_seresnext26d_32x4d", "timm", _timm("seresnext26d_32x4d"), (IMG,), ("resnet",)),
    Net("timm_cs3darknet_s", "timm", _timm("cs3darknet_s"), (IMG,)),
    Net("timm_dla34", "timm", _timm("dla34"), (IMG,), ("concat",)),
    Net("timm_repvgg_a0", "timm", _timm("repvgg_a0"), (IMG,), (), "BN on parallel branches"),
    Net("timm_lcnet_050", "timm", _timm("lcnet_050"), (IMG,), ("mobile",)),
    Net("timm_hrnet_w18_small", "timm", _timm("hrnet_w18_small"), (IMG,), ("concat",)),
    # plain torch
    Net("audio_conv1d", "torch", _conv1d_audio, ((1, 40, 64),), ("ci", "1d")),
    Net("video_conv3d", "torch", _conv3d_video, ((1, 3, 8, 32, 32),), ("ci", "3d")),
    Net("dcgan_generator", "torch", _dcgan_generator, ((1, 16, 1, 1),), ("ci", "convtranspose")),
    Net("mlp_bn_pre", "torch", _mlp("pre"), ((1, 64),), ("ci", "mlp")),
    Net("mlp_bn_post", "torch", _mlp("post"), ((1, 64),), ("ci", "mlp")),
    Net("mlp_bn_input", "torch", _mlp("input"), ((1, 64),), ("ci", "mlp")),
    Net("mlp_bn_noaffine", "torch", _mlp("noaffine"), ((1, 64),), ("ci", "mlp")),
    Net("seq_linear_bn", "torch", _seq_linear_bn, ((1, 16, 32),), ("ci", "seq")),
    Net("frozen_resnet", "torch", _frozen_resnet, ((1, 3, 32, 32),), ("ci", "frozen")),
    Net("bn_patterns", "torch", _bn_patterns, ((1, 3, 32, 32),), ("ci", "concat")),
]


def select(nets: list[Net], only: str | None) -> list[Net]:
    """The nets whose name, source or tag matches one of the comma-separated patterns."""
    if not only:
        return list(nets)
    pats = [p.strip() for p in only.split(",") if p.strip()]
    return [
        n
        for n in nets
        if any(fnmatch.fnmatchcase(k, p) for p in pats for k in (n.name, n.source, *n.tags))
    ]


# --------------------------------------------------------------------------------------------
# Batch-norm randomization


def _seed(name: str) -> int:
    return (SEED + zlib.crc32(name.encode())) % (2**31)


def _is_bn_like(module: nn.Module) -> bool:
    from torch import nn

    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return True
    return type(module).__name__ in ("FrozenBatchNorm2d", "FrozenBN2d")


def randomize_bn(model: nn.Module, example: list, rng: np.random.Generator) -> dict[str, Any]:
    """Give every BN (and FrozenBatchNorm2d) statistics and affine parameters far from identity.

    One eval-mode forward pass over a seeded N(0, 1) calibration batch measures each BN's input
    per channel (mean m, variance v) just before the BN runs, so each sees its input as already
    normalized by the BNs before it; then:

        running_mean = m + 0.2 * sqrt(v) * N(0, 1)
        running_var  = v * exp(0.3 * N(0, 1)) + 0.05 * median(v) + 1e-3
        weight       = (|N(1, 0.3)| + 0.1), negated on max(1, round(5%)) channels
        bias         = 0.5 * N(0, 1)

    so that activations stay O(1) through deep nets (random inputs give meaningful outputs)
    while each BN's affine map a*x + c has a far from 1 and c far from 0, and about 5% of the
    scales are negative. Returns counts: BN modules, channels, negative scales.
    """
    import torch

    hooks = []
    counts = {"bn_modules": 0, "frozen_modules": 0, "channels": 0, "negative_scales": 0}

    def pre_hook(module: nn.Module, args: tuple) -> None:
        if getattr(module, "_corpus_done", False):
            return
        module._corpus_done = True
        x = args[0].detach().double()
        dims = [d for d in range(x.dim()) if d != 1]
        # Rounded to 3 significant digits: the last bits of a conv's output depend on the
        # thread count and the CPU's kernels, and the files must not.
        m = _round_sig(x.mean(dim=dims).numpy())
        v = _round_sig(x.var(dim=dims, unbiased=False).numpy())
        c = m.shape[0]
        mean = m + 0.2 * np.sqrt(v) * rng.standard_normal(c)
        var = v * np.exp(0.3 * rng.standard_normal(c)) + 0.05 * np.median(v) + 1e-3
        weight = np.abs(1.0 + 0.3 * rng.standard_normal(c)) + 0.1
        k = max(1, round(NEGATIVE_SCALE_FRACTION * c))
        weight[rng.choice(c, size=k, replace=False)] *= -1.0
        bias = 0.5 * rng.standard_normal(c)
        with torch.no_grad():
            module.running_mean.copy_(torch.from_numpy(mean))
            module.running_var.copy_(torch.from_numpy(var))
            if getattr(module, "weight", None) is not None:
                module.weight.copy_(torch.from_numpy(weight))
                module.bias.copy_(torch.from_numpy(bias))
                counts["negative_scales"] += k
        counts["bn_modules"] += 1
        counts["frozen_modules"] += not isinstance(module, torch.nn.modules.batchnorm._BatchNorm)
        counts["channels"] += c

    for module in model.modules():
        if _is_bn_like(module):
            if getattr(module, "running_mean", None) is None:
                raise ValueError(f"{type(module).__name__} keeps no running statistics")
            hooks.append(module.register_forward_pre_hook(pre_hook))
    try:
        with torch.no_grad():
            model(*example)
    finally:
        for h in hooks:
            h.remove()
        for module in model.modules():
            if hasattr(module, "_corpus_done"):
                del module._corpus_done
    missed = sum(1 for m in model.modules() if _is_bn_like(m)) - counts["bn_modules"]
    if missed:
        raise ValueError(f"{missed} batch-norm module(s) never ran in the calibration pass")
    return counts


def _round_sig(a: np.ndarray, digits: int = 3) -> np.ndarray:
    """`a` rounded to `digits` significant digits (zeros stay zero)."""
    a = np.asarray(a, dtype=np.float64)
    mag = np.where(a == 0, 1.0, 10.0 ** np.floor(np.log10(np.abs(np.where(a == 0, 1.0, a)))))
    return np.round(a / mag, digits - 1) * mag


def prepare(net: Net) -> tuple[nn.Module, list, dict[str, Any]]:
    """Build `net` seeded from its name, randomize its BN, return (model, example, counts)."""
    import torch

    seed = _seed(net.name)
    torch.manual_seed(seed)
    model = net.build().eval()
    gen = torch.Generator().manual_seed(seed)
    calib = [torch.randn((CALIBRATION_BATCH, *s[1:]), generator=gen) for s in net.inputs]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same reduction order wherever it runs
    try:
        counts = randomize_bn(model, calib, np.random.default_rng(seed))
    finally:
        torch.set_num_threads(threads)
    example = [torch.randn(s, generator=gen) for s in net.inputs]
    return model, example, counts


# --------------------------------------------------------------------------------------------
# Export


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """bn_onnx.export's quieting and torchlib-registry cache when importable, else warnings off."""
    try:
        from bn_onnx.export import _quiet_torch_exporter, _reuse_torchlib_registry
    except ImportError:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
        return
    with _quiet_torch_exporter(), _reuse_torchlib_registry():
        yield


def _strip_stack_traces(model: Any) -> None:
    """Drop torch's per-node stack traces (absolute paths of this machine) in place."""
    for node in model.graph.node:
        keep = [p for p in node.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]
        if len(keep) != len(node.metadata_props):
            del node.metadata_props[:]
            node.metadata_props.extend(keep)


@contextlib.contextmanager
def _conv3d_zero_bias(model: nn.Module) -> Iterator[int]:
    """Give each bias-free Conv3d an explicit zero bias for the duration (the same function).

    onnxscript 0.7.2's torchlib `aten_conv3d`, which torch's dynamo exporter uses, writes the
    missing bias as `Expand(0, Concat(Shape(weight)[0:1], [2]))`: a [C_out, 2] tensor that
    onnxruntime refuses ("bias must be a 1D tensor"). Yields the number of convs changed.
    """
    import torch
    from torch import nn

    changed = [m for m in model.modules() if isinstance(m, nn.Conv3d) and m.bias is None]
    for m in changed:
        m.bias = nn.Parameter(torch.zeros(m.out_channels), requires_grad=False)
    try:
        yield len(changed)
    finally:
        for m in changed:
            m.bias = None


def export(model: nn.Module, example: list, exporter: str) -> Any:
    """Export `model` (eval mode) at `example`'s static shapes; return the onnx.ModelProto."""
    import onnx
    import torch

    names = {
        "input_names": [f"input_{i}" if len(example) > 1 else "input" for i in range(len(example))],
        "output_names": ["output"],
    }
    with _quiet(), torch.no_grad():
        if exporter == "dynamo":
            with _conv3d_zero_bias(model):
                prog = torch.onnx.export(
                    model,
                    tuple(example),
                    dynamo=True,
                    optimize=False,
                    opset_version=OPSET,
                    verbose=False,
                    **names,
                )
            proto = prog.model_proto
            _strip_stack_traces(proto)
            return proto
        buf = io.BytesIO()
        torch.onnx.export(
            model,
            tuple(example),
            buf,
            dynamo=False,
            opset_version=OPSET,
            training=torch.onnx.TrainingMode.PRESERVE,
            do_constant_folding=True,
            **names,
        )
        return onnx.load_from_string(buf.getvalue())


def check_against_torch(proto: Any, model: nn.Module, example: list) -> float:
    """Run `proto` in onnxruntime (optimizations off) and compare with torch's eval output.

    Returns the max abs error; raises ValueError when onnxruntime cannot run the file or an
    output is beyond atol 1e-4 + rtol 1e-3 of torch's.
    """
    import onnxruntime as ort
    import torch

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 4
    try:
        sess = ort.InferenceSession(
            proto.SerializeToString(), so, providers=["CPUExecutionProvider"]
        )
        feed = {i.name: x.numpy() for i, x in zip(sess.get_inputs(), example, strict=True)}
        got = sess.run(None, feed)
    except Exception as exc:
        raise ValueError(f"onnxruntime cannot run the export: {str(exc)[:300]}") from None
    with torch.no_grad():
        want = model(*example)
    want = [want] if isinstance(want, torch.Tensor) else list(want)
    err = 0.0
    for g, w in zip(got, want, strict=True):
        w = w.numpy().astype(np.float64)
        d = np.abs(g.astype(np.float64) - w)
        err = max(err, float(d.max()))
        if np.any(d > 1e-4 + 1e-3 * np.abs(w)):
            raise ValueError(f"onnxruntime's output is {float(d.max()):.3g} off torch's")
    return err


def _count_bn(graph: Any) -> int:
    n = 0
    for node in graph.node:
        n += node.op_type == "BatchNormalization"
        for a in node.attribute:
            n += _count_bn(a.g) if a.HasField("g") else 0
            n += sum(_count_bn(g) for g in a.graphs)
    return n


def _value_info(values: Any) -> list[dict[str, Any]]:
    import onnx

    out = []
    for v in values:
        t = v.type.tensor_type
        out.append(
            {
                "name": v.name,
                "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                "shape": [
                    d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim
                ],
            }
        )
    return out


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "torchvision", "timm", "onnx", "onnxscript"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out


def build_one(net: Net, exporters: list[str], out_dir: Path, skip_existing: bool) -> list[dict]:
    """Export `net` with each exporter into `out_dir`; one manifest entry per exporter."""
    import onnx

    from bn_onnx.files import atomic_output

    base = {
        "name": net.name,
        "source": net.source,
        "tags": list(net.tags),
        "note": net.note,
        "seed": _seed(net.name),
        "batch": 1,
        "opset": OPSET,
    }
    todo = [
        e for e in exporters if not (skip_existing and (out_dir / f"{net.name}.{e}.onnx").exists())
    ]
    entries = []
    model = example = counts = None
    if todo:
        t0 = time.perf_counter()
        try:
            model, example, counts = prepare(net)
        except Exception as exc:  # a missing package or a net that does not build here
            err = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            return [
                {
                    **base,
                    "exporter": e,
                    "file": f"{net.name}.{e}.onnx",
                    "status": "failed",
                    "error": err,
                }
                for e in todo
            ]
        base["prepare_s"] = round(time.perf_counter() - t0, 3)
        base.update({f"torch_{k}": v for k, v in counts.items()})
    for exporter in exporters:
        path = out_dir / f"{net.name}.{exporter}.onnx"
        entry = {**base, "exporter": exporter, "file": path.name}
        if exporter not in todo:
            entry["status"] = "kept"
            entries.append(entry)
            continue
        t0 = time.perf_counter()
        try:
            proto = export(model, example, exporter)
            onnx.checker.check_model(proto, full_check=True)
            entry["torch_max_abs_err"] = check_against_torch(proto, model, example)
        except Exception as exc:
            msg = str(exc).strip().splitlines()
            entry.update(
                status="failed", error=f"{type(exc).__name__}: {msg[0] if msg else ''}"[:500]
            )
            entry["export_s"] = round(time.perf_counter() - t0, 3)
            log(f"  {path.name}: export failed: {entry['error'][:200]}")
            entries.append(entry)
            continue
        entry["export_s"] = round(time.perf_counter() - t0, 3)
        with atomic_output(path, suffix=".onnx") as tmp:
            onnx.save(proto, tmp)
        data = path.read_bytes()
        init_names = {t.name for t in proto.graph.initializer}
        entry.update(
            status="ok",
            inputs=_value_info([v for v in proto.graph.input if v.name not in init_names]),
            outputs=_value_info(proto.graph.output),
            n_bn=_count_bn(proto.graph),
            n_nodes=len(proto.graph.node),
            file_bytes=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
        )
        entries.append(entry)
    return entries


def read_manifest(out_dir: Path) -> dict[str, Any]:
    path = out_dir / MANIFEST
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    return {"files": []}


def write_manifest(out_dir: Path, entries: list[dict], settings: dict[str, Any]) -> Path:
    """Merge `entries` into OUT/manifest.json (by file name) and write it atomically."""
    from bn_onnx.files import atomic_output

    manifest = read_manifest(out_dir)
    by_file = {e["file"]: e for e in manifest.get("files", [])}
    for e in entries:
        if e.get("status") == "kept" and e["file"] in by_file:
            continue
        by_file[e["file"]] = e
    manifest = {
        "schema": "bn-onnx-arch-corpus",
        "schema_version": 1,
        "settings": settings,
        "versions": _versions(),
        "files": sorted(by_file.values(), key=lambda e: e["file"]),
    }
    path = out_dir / MANIFEST
    with atomic_output(path, suffix=".json") as tmp:
        tmp.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
# CLI


def _list(nets: list[Net]) -> None:
    print(f"{'name':28} {'source':12} {'input':22} tags")
    for n in nets:
        shapes = ",".join("x".join(map(str, s)) for s in n.inputs)
        print(f"{n.name:28} {n.source:12} {shapes:22} {','.join(n.tags)}")
    print(f"{len(nets)} nets")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="output folder (e.g. /work/corpus; not in the repo)")
    p.add_argument("--only", help="comma-separated names, shell patterns or tags")
    p.add_argument("--exporters", default=",".join(EXPORTERS), help="dynamo,torchscript")
    p.add_argument("--list", action="store_true", help="list the nets and exit")
    p.add_argument("--skip-existing", action="store_true", help="keep files already in --out")
    p.add_argument(
        "--ci-data",
        action="store_true",
        help=f"write the `ci` nets into {CI_DATA.relative_to(ROOT)}",
    )
    args = p.parse_args(argv)
    nets = select(NETS, "ci" if args.ci_data and not args.only else args.only)
    if args.list:
        _list(nets)
        return 0
    out_dir = CI_DATA if args.ci_data else args.out
    if out_dir is None:
        p.error("--out is required (or --ci-data / --list)")
    exporters = [e.strip() for e in args.exporters.split(",") if e.strip()]
    bad = [e for e in exporters if e not in EXPORTERS]
    if bad or not nets:
        p.error(f"unknown exporter {bad[0]!r}" if bad else f"no net matches {args.only!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHVISION_WARN_WHEN_EXTENSION_LOADING_FAILS", "")
    logging.getLogger("timm").setLevel(logging.ERROR)
    settings = {"opset": OPSET, "batch": 1, "seed": SEED, "exporters": list(EXPORTERS)}
    start = time.perf_counter()
    all_entries: list[dict] = []
    for i, net in enumerate(nets, 1):
        t0 = time.perf_counter()
        entries = build_one(net, exporters, out_dir, args.skip_existing)
        all_entries += entries
        parts = []
        for e in entries:
            if e["status"] == "ok":
                parts.append(
                    f"{e['exporter']} {e['n_bn']} BN {e['n_nodes']} nodes "
                    f"{e['file_bytes'] / 1e6:.1f} MB {e['export_s']:.1f} s"
                )
            else:
                parts.append(f"{e['exporter']} {e['status']}")
        log(f"[{i}/{len(nets)}] {net.name}: {'; '.join(parts)} ({time.perf_counter() - t0:.1f} s)")
        write_manifest(out_dir, entries, settings)  # after each net: a killed run keeps its work
    failed = [e for e in all_entries if e["status"] == "failed"]
    log(
        f"done: {len(all_entries) - len(failed)} files, {len(failed)} failed, "
        f"{time.perf_counter() - start:.0f} s; manifest {out_dir / MANIFEST}"
    )
    for e in failed:
        log(f"  failed {e['file']}: {e.get('error', '')[:200]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
