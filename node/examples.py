"""Realistic example models, exported to ONNX with their BatchNormalization nodes kept.

They exist to exercise the BatchNorm fusion pass on graphs shaped like the ones people ship
(ResNet-50 bottlenecks, MobileNetV2 depthwise convs, a ConvTranspose decoder), to drive the
benchmark, and to give the demo something to fuse. Each builder writes an ``.onnx`` file and
returns its path; the same arguments always give the same weights (seeded).

Why the BatchNorm statistics are randomized: a freshly built BatchNorm has mean 0, var 1,
gamma 1, beta 0, i.e. (almost) the identity. Folding it wrongly changes almost nothing, so a
test on such a model proves nothing. Worse, the TorchScript exporter de-duplicates equal
initializers: with default statistics it emits ``running_var = Identity(weight)`` and
``running_mean = Identity(bias)``, so the BatchNorm parameters are no longer constants and a
correct pass must refuse to fuse. Every BatchNorm here gets its own random statistics drawn
from one generator (mean ~ N(0, 0.5), var ~ U(0.5, 2), gamma ~ U(0.5, 1.5), beta ~ N(0, 0.2)),
so the parameters are distinct plain initializers and a wrong fold shows in the outputs.

How BatchNormalization survives the export (checked with torch 2.13, opset 17): the
TorchScript exporter with ``torch.onnx.export(model.eval(), args, path, dynamo=False,
do_constant_folding=False, training=torch.onnx.TrainingMode.PRESERVE)``. PRESERVE on an
``eval()`` model exports the inference form: one output, ``training_mode=0`` (explicit; at
opsets below 14, BatchNormalization-9 has no such attribute). ``TrainingMode.EVAL`` with folding
off gives the same graph; ``TrainingMode.EVAL`` with ``do_constant_folding=True`` folds Conv+BN
during export (only the Gemm+BN survives), and PRESERVE with folding on keeps BN but warns. The
new dynamo exporter is avoided because it decomposes and optimizes the graph itself.

``import torch`` happens inside the functions only, so that importing this module (the CLI
does, for the demo) stays fast and works without torch.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch

__all__ = [
    "BN_STATS_SEED",
    "RESNET50_WIDTHS",
    "RESNET50_WIDTH_100MB",
    "RESNET50_WIDTH_400MB",
    "convtranspose_decoder",
    "convtranspose_decoder_module",
    "count_ops",
    "mobilenetv2_like",
    "mobilenetv2_like_module",
    "random_inputs",
    "resnet50_like",
    "resnet50_like_module",
    "resnet50_like_param_count",
    "tiny_cnn",
    "tiny_cnn_module",
]

PathLike = str | os.PathLike[str]

#: Seed of the generator that draws every BatchNorm's statistics (weights use ``seed``).
BN_STATS_SEED = 1234
#: ResNet-50-like width whose fp32 weights are about 100 MB (25.1M parameters, like ResNet-50).
RESNET50_WIDTH_100MB = 1.0
#: ResNet-50-like width whose fp32 weights are about 400 MB (99.2M parameters).
RESNET50_WIDTH_400MB = 2.0
#: The two benchmark sizes by name.
RESNET50_WIDTHS: dict[str, float] = {"100mb": RESNET50_WIDTH_100MB, "400mb": RESNET50_WIDTH_400MB}

_RESNET_STAGES = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))  # planes, blocks, stride
_RESNET_EXPANSION = 4
_RESNET_HEAD_HIDDEN = 512
_NUM_CLASSES = 1000


def _channels(base: int, width: float) -> int:
    """Scale a channel count and round to a multiple of 8 (at least 8), as width multipliers do."""
    return max(8, int(base * width + 4) // 8 * 8)


# --------------------------------------------------------------------------- torch modules


def _randomize_batchnorms(model: torch.nn.Module) -> None:
    """Give every BatchNorm distinct, non-trivial statistics and affine parameters.

    One generator for all layers, in module order, so no two layers get equal tensors (equal
    initializers would be de-duplicated into Identity nodes by the exporter).
    """
    import torch

    gen = torch.Generator().manual_seed(BN_STATS_SEED)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                n = mod.num_features
                mod.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
                mod.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
                mod.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                mod.bias.copy_(torch.randn(n, generator=gen) * 0.2)


def _seeded_build(seed: int, factory: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Build ``factory()`` under ``seed`` without disturbing the caller's global torch RNG."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = factory()
    _randomize_batchnorms(model)
    return model.eval()


def resnet50_like_module(width: float = 1.0, seed: int = 0) -> torch.nn.Module:
    """ResNet-50 layout: bottlenecks (3, 4, 6, 3), Conv+BN+ReLU, Conv+BN downsamples.

    The head is Linear + BatchNorm1d + ReLU + Linear so that Gemm+BatchNormalization appears
    next to the 53 Conv+BatchNormalization pairs. ``width`` scales every channel count.
    """
    from torch import nn

    class Bottleneck(nn.Module):
        def __init__(self, cin: int, planes: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(cout)
            self.relu = nn.ReLU()
            self.downsample: nn.Module | None = None
            if stride != 1 or cin != cout:
                self.downsample = nn.Sequential(
                    nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
                )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            identity = x if self.downsample is None else self.downsample(x)
            y = self.relu(self.bn1(self.conv1(x)))
            y = self.relu(self.bn2(self.conv2(y)))
            y = self.bn3(self.conv3(y))
            return self.relu(y + identity)

    def factory() -> nn.Module:
        stem = _channels(64, width)
        layers: list[nn.Module] = [
            nn.Conv2d(3, stem, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(stem),
            nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
        ]
        cin = stem
        for base, blocks, stride in _RESNET_STAGES:
            planes = _channels(base, width)
            cout = planes * _RESNET_EXPANSION
            for i in range(blocks):
                layers.append(Bottleneck(cin, planes, cout, stride if i == 0 else 1))
                cin = cout
        hidden = _channels(_RESNET_HEAD_HIDDEN, width)
        layers += [
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(cin, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            nn.Linear(hidden, _NUM_CLASSES),
        ]
        return nn.Sequential(*layers)

    return _seeded_build(seed, factory)


def resnet50_like_param_count(width: float = 1.0) -> int:
    """Number of float values stored by :func:`resnet50_like` (BN running stats included).

    Pure arithmetic (no torch) so the benchmark can say how big a model will be before
    building it; ``tests/node/test_examples.py`` checks it against the torch module.
    """
    stem = _channels(64, width)
    total = 3 * stem * 49 + 4 * stem  # stem conv + BN (gamma, beta, mean, var)
    cin = stem
    for base, blocks, _stride in _RESNET_STAGES:
        planes = _channels(base, width)
        cout = planes * _RESNET_EXPANSION
        for i in range(blocks):
            total += cin * planes + 4 * planes
            total += planes * planes * 9 + 4 * planes
            total += planes * cout + 4 * cout
            if i == 0:  # every stage's first block changes channels or stride
                total += cin * cout + 4 * cout
            cin = cout
    hidden = _channels(_RESNET_HEAD_HIDDEN, width)
    total += cin * hidden + hidden + 4 * hidden
    total += hidden * _NUM_CLASSES + _NUM_CLASSES
    return total


def mobilenetv2_like_module(width: float = 0.5, seed: int = 0) -> torch.nn.Module:
    """MobileNetV2 layout: inverted residuals, depthwise 3x3 convs (group = channels), ReLU6.

    Convs have no bias (as in torchvision), so the fused Conv must gain one. 100 classes.
    """
    from torch import nn

    def conv_bn(cin: int, cout: int, k: int, stride: int, groups: int, act: bool) -> nn.Module:
        mods: list[nn.Module] = [
            nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
        ]
        if act:
            mods.append(nn.ReLU6())
        return nn.Sequential(*mods)

    class InvertedResidual(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
            super().__init__()
            hidden = cin * expand
            mods: list[nn.Module] = []
            if expand != 1:
                mods.append(conv_bn(cin, hidden, 1, 1, 1, act=True))
            mods.append(conv_bn(hidden, hidden, 3, stride, hidden, act=True))  # depthwise
            mods.append(conv_bn(hidden, cout, 1, 1, 1, act=False))
            self.body = nn.Sequential(*mods)
            self.residual = stride == 1 and cin == cout

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.body(x)
            return x + y if self.residual else y

    settings = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1))
    settings += ((6, 160, 3, 2), (6, 320, 1, 1))  # expand, channels, repeats, stride

    def factory() -> nn.Module:
        cin = _channels(32, width)
        layers: list[nn.Module] = [conv_bn(3, cin, 3, 2, 1, act=True)]
        for expand, c, repeats, stride in settings:
            cout = _channels(c, width)
            for i in range(repeats):
                layers.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expand))
                cin = cout
        last = _channels(1280, max(1.0, width))
        layers += [
            conv_bn(cin, last, 1, 1, 1, act=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(0.2),
            nn.Linear(last, 100),
        ]
        return nn.Sequential(*layers)

    return _seeded_build(seed, factory)


def convtranspose_decoder_module(seed: int = 0) -> torch.nn.Module:
    """Decoder from a [N, 64, 4, 4] latent to a [N, 3, 32, 32] image; three ConvTranspose+BN.

    Stride 2 everywhere; the second layer is grouped (groups=2, 64 -> 32 channels, so
    C/group != M/group and a wrong weight layout shows); the third has no bias and an
    ``output_padding``; the last layer is a plain Conv without BN (nothing to fuse there).
    """
    from torch import nn

    def factory() -> nn.Module:
        return nn.Sequential(
            nn.ConvTranspose2d(64, 64, 4, stride=2, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1, groups=2),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.ConvTranspose2d(32, 16, 3, stride=2, padding=1, output_padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 3, 3, padding=1),
            nn.Tanh(),
        )

    return _seeded_build(seed, factory)


def tiny_cnn_module(seed: int = 0) -> torch.nn.Module:
    """Two Conv+BN+ReLU and a classifier: small enough to read the whole graph in a demo."""
    from torch import nn

    def factory() -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(16, 10),
        )

    return _seeded_build(seed, factory)


# --------------------------------------------------------------------------- export


def _count_batchnorms(model: torch.nn.Module) -> int:
    import torch

    return sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _export(
    model: torch.nn.Module, input_shape: tuple[int, ...], path: PathLike, opset: int
) -> Path:
    """Export with BatchNormalization kept in inference form; check the result; return path.

    The batch axis is dynamic (named ``batch``) so the benchmark and tests can pick a batch.
    Checks that every torch BatchNorm became one ONNX BatchNormalization, so a future torch
    that folds them during export fails here instead of making the fusion tests vacuous.
    """
    import onnx
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(input_shape)
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of dynamo (which does not keep
        # the graph as written); its deprecation notices are expected here and nowhere else.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            do_constant_folding=False,
            training=torch.onnx.TrainingMode.PRESERVE,
            opset_version=opset,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        )
    onnx.checker.check_model(str(path))
    found = count_ops(path).get("BatchNormalization", 0)
    expected = _count_batchnorms(model)
    if found != expected:
        raise RuntimeError(f"export kept {found} of {expected} BatchNormalization nodes")
    return path


def resnet50_like(
    path: PathLike, width: float = 1.0, image_size: int = 64, opset: int = 17, seed: int = 0
) -> Path:
    """Write the ResNet-50-like model (54 BatchNormalization: 53 after Conv, 1 after Gemm).

    Weights: ~100 MB at width 1.0 (:data:`RESNET50_WIDTH_100MB`), ~400 MB at width 2.0
    (:data:`RESNET50_WIDTH_400MB`). Input ``[batch, 3, image_size, image_size]``.
    """
    model = resnet50_like_module(width, seed)
    return _export(model, (1, 3, image_size, image_size), path, opset)


def mobilenetv2_like(
    path: PathLike, opset: int = 17, image_size: int = 64, width: float = 0.5, seed: int = 0
) -> Path:
    """Write the MobileNetV2-like model (52 BatchNormalization, 17 depthwise convs, ~3.4 MB)."""
    model = mobilenetv2_like_module(width, seed)
    return _export(model, (1, 3, image_size, image_size), path, opset)


def convtranspose_decoder(path: PathLike, opset: int = 17, seed: int = 0) -> Path:
    """Write the ConvTranspose decoder (3 BatchNormalization). Input ``[batch, 64, 4, 4]``."""
    return _export(convtranspose_decoder_module(seed), (1, 64, 4, 4), path, opset)


def tiny_cnn(path: PathLike, opset: int = 17, seed: int = 0) -> Path:
    """Write the tiny demo CNN (2 BatchNormalization). Input ``[batch, 3, 16, 16]``."""
    return _export(tiny_cnn_module(seed), (1, 3, 16, 16), path, opset)


# --------------------------------------------------------------------------- helpers


def count_ops(path: PathLike) -> dict[str, int]:
    """Count the nodes of the main graph by op type (the models here have no subgraphs)."""
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def random_inputs(path: PathLike, batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded standard-normal float32 inputs for every graph input of the model at ``path``.

    Symbolic dimensions (the dynamic batch) become ``batch``. Used by tests and the
    benchmark so that every tool's output is compared on the same input.
    """
    import numpy as np
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    initializers = {t.name for t in model.graph.initializer}
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for inp in model.graph.input:
        if inp.name in initializers:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else batch for d in _dims(inp)]
        feeds[inp.name] = rng.standard_normal(dims).astype(np.float32)
    return feeds


def _dims(value_info: Any) -> list[Any]:
    return list(value_info.type.tensor_type.shape.dim)
