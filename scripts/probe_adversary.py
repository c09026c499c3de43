"""Fine-tune the top of EfficientNet-Lite0 against the hospital, leave one source out (issue 8).

Section H of docs/model_comparison.md took the hospital out of *frozen* features linearly and
lifted five of six held-out sources. This asks the next question cheaply enough to run every
fold on two CPU cores: does *training* features that cannot tell the hospital apart do better?

* The lower network (stem to block 5c, ImageNet weights, the shipped preprocessing) is run once
  per image, on the clean image and on ``--views`` augmented copies (the shipped recipe's
  augmentation: rotation, shift, zoom, brightness, contrast, blur, erasing); its 14 x 14 x 112
  maps are cached (``--out/features``).
* The top (blocks 6a-7a, the 1280-channel head convolution: 62 % of Lite0's weights) and a
  3-class head are fine-tuned on the cached maps, BatchNormalization frozen as in the shipped
  recipe, one random view per image per epoch, loss weighted by inverse class frequency, early
  stopping on validation loss.
* ``--adversary L``: a source classifier *within each class* (one softmax over the training
  sources of that class, on the pooled features, through one hidden layer) is trained through a
  gradient-reversal layer (Ganin et al., 2016) with weight ramped to ``L``: the top is pushed to
  features that do not tell NIH's normal films from the teaching set's, without being pushed
  off the diagnosis (the adversary never separates classes).
* ``--project K`` (optional): section H's nullspace projection of the pooled features, fitted on
  the training split, and the logistic head refitted.

Every fold fits on its training split, stops on its validation split and is scored on the whole
held-out source (COVID-19 called by argmax, as in sections G and H). The all-sources run gives
validation and test macro-F1.

    python scripts/probe_adversary.py --data ../shared/data --out build/probe --adversary 0,1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

from probe_backbones import (  # noqa: E402
    COVID,
    LABELS,
    add_common_arguments,
    cache_slug,
    held_out_rates,
    prepare,
    scores,
)
from probe_hospital import ProjectedProbe  # noqa: E402

from ai import backbones  # noqa: E402
from ai.augment import Augmentation, apply_augmentation  # noqa: E402
from ai.calibration import choose_threshold  # noqa: E402
from ai.dataset import Sample, make_splits  # noqa: E402
from ai.preprocess import parse_options, read_inputs  # noqa: E402

CUT = "block5c_add"  # the last layer of the frozen part
RECIPE = Augmentation(
    rotation_degrees=10, shift=0.08, zoom=0.12, brightness=0.2, contrast=0.3, blur=1.0, erase=0.3
)


def lower_maps(samples: list[Sample], options: dict, size: int, views: int, cache: Path):
    """[N, 1 + views, h, w, c] float16: the frozen part's output on the clean image and on
    *views* augmented copies of it."""
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"lite0_{size}_{CUT}_{cache_slug(options)}_views{views}.npy"
    files = [str(s.path) for s in samples]
    index = path.with_suffix(".files.json")
    if path.is_file() and index.is_file() and json.loads(index.read_text()) == files:
        return np.load(path, mmap_mode="r")
    import keras

    full = backbones.efficientnet_lite("lite0", (size, size, 3), weights="imagenet")
    lower = keras.Model(full.input, full.get_layer(CUT).output)
    inp = keras.Input((size, size, 3))
    augment = keras.Model(inp, apply_augmentation(inp, RECIPE, seed=0))
    out = None
    t0 = time.perf_counter()
    for i in range(0, len(files), 32):
        x = read_inputs(files[i : i + 32], size, 3, options)
        maps = [np.asarray(lower(x, training=False))]
        for _ in range(views):
            maps.append(np.asarray(lower(augment(x, training=True), training=False)))
        block = np.stack(maps, axis=1).astype(np.float16)
        if out is None:
            out = np.lib.format.open_memmap(
                path, mode="w+", dtype=np.float16, shape=(len(files), *block.shape[1:])
            )
        out[i : i + len(block)] = block
    assert out is not None
    out.flush()
    index.write_text(json.dumps(files))
    print(f"  lower maps: {len(files)} images x {1 + views} in {time.perf_counter() - t0:.0f} s")
    keras.backend.clear_session()
    return np.load(path, mmap_mode="r")


def build_top(size: int, n_sources: int, hidden: int = 256):
    """(top: maps -> pooled 1280, head: pooled -> 3 logits, adversary: pooled -> 3 x sources
    logits), the top built from a fresh ImageNet Lite0's own layers after :data:`CUT`, so
    that it starts from the ImageNet weights."""
    import keras
    from keras import layers

    full = backbones.efficientnet_lite("lite0", (size, size, 3), weights="imagenet")
    names = [lyr.name for lyr in full.layers]
    start = names.index(CUT) + 1
    cut_shape = full.get_layer(CUT).output.shape[1:]
    maps = keras.Input(cut_shape)
    tensors: dict[str, Any] = {CUT: maps}
    for lyr in full.layers[start:]:
        inbound = [t._keras_history[0].name for t in _flat(lyr._inbound_nodes[0].input_tensors)]
        args = [tensors[n] for n in inbound]
        tensors[lyr.name] = lyr(args if len(args) > 1 else args[0])
    pooled = layers.GlobalAveragePooling2D(name="head_pool")(tensors[backbones.FEATURE_LAYER])
    top = keras.Model(maps, pooled)
    f = keras.Input((backbones.HEAD_FILTERS,))
    head = keras.Model(
        f,
        layers.Dense(len(LABELS), name="probabilities")(layers.Dropout(0.3, seed=0)(f)),
    )
    h = layers.Dense(hidden, activation="relu")(f)
    adversary = keras.Model(f, layers.Dense(len(LABELS) * n_sources)(h))
    return top, head, adversary


def _flat(x: Any) -> list[Any]:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def train_fold(
    maps: np.ndarray,
    rows: dict[str, np.ndarray],
    labels: np.ndarray,
    sources: np.ndarray,
    size: int,
    adversary_weight: float,
    epochs: int,
    seed: int,
    log: str,
) -> tuple[Any, Any]:
    """Fit top + head (+ the adversary) on rows['train']; keep the epoch with the lowest
    validation loss. Returns (top, head)."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    tr, va = rows["train"], rows["validation"]
    src_names = sorted(set(sources[tr]))
    n_src = len(src_names)
    src_index = np.array([src_names.index(s) if s in src_names else 0 for s in sources])
    # within-class adversary: only classes with two or more training sources take part
    adv_mask = np.zeros((len(LABELS), n_src), np.float32)
    for c in range(len(LABELS)):
        present = set(src_index[tr][labels[tr] == c])
        if len(present) >= 2:
            adv_mask[c, sorted(present)] = 1.0
    top, head, adversary = build_top(size, n_src)
    for lyr in top.layers:
        if isinstance(lyr, keras.layers.BatchNormalization):
            lyr.trainable = False
    counts = np.bincount(labels[tr], minlength=len(LABELS)).astype(np.float32)
    class_w = len(tr) / (len(LABELS) * np.maximum(counts, 1))
    opt_top = keras.optimizers.Adam(1e-4)
    opt_head = keras.optimizers.Adam(1e-3)
    opt_adv = keras.optimizers.Adam(1e-3)
    mask_t = tf.constant(adv_mask)

    @tf.custom_gradient
    def reverse(x, lam):  # type: ignore[no-untyped-def]
        return tf.identity(x), lambda dy: (-lam * dy, tf.zeros_like(lam))

    @tf.function
    def step(x, y, s, w, lam):  # type: ignore[no-untyped-def]
        with tf.GradientTape(persistent=True) as tape:
            f = top(x, training=True)
            logits = head(f, training=True)
            ce = tf.keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
            loss = tf.reduce_sum(ce * w) / tf.reduce_sum(w)
            adv_logits = tf.reshape(adversary(reverse(f, lam)), (-1, len(LABELS), n_src))
            adv_logits = tf.gather(adv_logits, y, batch_dims=1)  # this class's sources
            m = tf.gather(mask_t, y)
            adv_logits = adv_logits + (m - 1.0) * 1e9  # sources absent from this class
            take = tf.cast(tf.reduce_sum(m, 1) > 0, tf.float32)
            adv_ce = tf.keras.losses.sparse_categorical_crossentropy(
                s, adv_logits, from_logits=True
            )
            adv_loss = tf.reduce_sum(adv_ce * take) / tf.maximum(tf.reduce_sum(take), 1.0)
            total = loss + adv_loss
        opt_top.apply_gradients(
            zip(tape.gradient(total, top.trainable_weights), top.trainable_weights, strict=True)
        )
        opt_head.apply_gradients(
            zip(tape.gradient(loss, head.trainable_weights), head.trainable_weights, strict=True)
        )
        opt_adv.apply_gradients(
            zip(
                tape.gradient(adv_loss, adversary.trainable_weights),
                adversary.trainable_weights,
                strict=True,
            )
        )
        return loss, adv_loss

    def val_loss() -> float:
        p = predict(top, head, maps, va)
        ce = -np.log(np.clip(p[np.arange(len(va)), labels[va]], 1e-7, None))
        w = class_w[labels[va]]
        return float((ce * w).sum() / w.sum())

    rng = np.random.default_rng(seed)
    best = (val_loss(), [v.numpy() for v in top.weights + head.weights], 0)
    patience, batch = 4, 32
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        p = (epoch - 1) / max(epochs - 1, 1)
        lam = np.float32(adversary_weight * (2.0 / (1.0 + np.exp(-10 * p)) - 1.0))
        order = rng.permutation(tr)
        losses = []
        for i in range(0, len(order), batch):
            b = np.sort(order[i : i + batch])
            view = rng.integers(0, maps.shape[1], len(b))
            x = np.asarray(maps[b], dtype=np.float32)[np.arange(len(b)), view]
            losses.append(
                [
                    float(v)
                    for v in step(
                        x, labels[b], src_index[b], class_w[labels[b]].astype(np.float32), lam
                    )
                ]
            )
        vl = val_loss()
        mean = np.mean(losses, 0)
        print(
            f"    {log} epoch {epoch}: loss {mean[0]:.3f} adversary {mean[1]:.3f} "
            f"(lambda {lam:.2f}) val {vl:.3f} [{time.perf_counter() - t0:.0f} s]",
            flush=True,
        )
        if vl < best[0]:
            best = (vl, [v.numpy() for v in top.weights + head.weights], epoch)
        elif epoch - best[2] >= patience:
            break
    for v, value in zip(top.weights + head.weights, best[1], strict=True):
        v.assign(value)
    print(f"    {log}: best epoch {best[2]}, validation loss {best[0]:.3f}", flush=True)
    return top, head


def predict(top: Any, head: Any, maps: np.ndarray, rows: np.ndarray) -> np.ndarray:
    out = []
    for i in range(0, len(rows), 64):
        b = rows[i : i + 64]
        x = np.asarray(maps[np.sort(b)], dtype=np.float32)[:, 0]  # the clean view
        order = np.argsort(np.argsort(b))
        z = np.asarray(head(top(x, training=False), training=False))[order]
        z = z - z.max(1, keepdims=True)
        p = np.exp(z)
        out.append(p / p.sum(1, keepdims=True))
    return np.concatenate(out) if out else np.zeros((0, len(LABELS)))


def operating_point_rates(
    val: np.ndarray, y_val: np.ndarray, held: np.ndarray, part: list[Sample], target: float = 0.95
) -> dict:
    """The held-out rates with COVID-19 called at the threshold that reaches *target*
    sensitivity on validation (what ``ai.serving`` stores as the operating point)."""
    threshold = choose_threshold(val[:, COVID], y_val == COVID, target)
    rates = held_out_rates(held, part, threshold)
    del rates["n"]
    return {"threshold": round(threshold, 3), **rates}


def pooled_features(top: Any, maps: np.ndarray) -> np.ndarray:
    """The fine-tuned top's pooled 1280-d features of every image's clean view."""
    return np.concatenate(
        [
            np.asarray(top(np.asarray(maps[i : i + 64, 0], dtype=np.float32), training=False))
            for i in range(0, len(maps), 64)
        ]
    )


def wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95 % Wilson score interval of a proportion *p* of *n*."""
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def print_tables(paths: list[Path], samples: list[Sample]) -> None:
    """Markdown tables of the saved runs: one row per (file, adversary weight[, k]); each
    held-out source's rate with its Wilson interval, by argmax and at the operating point."""
    count = {
        s: (
            sum(x.source == s and x.label == "covid" for x in samples),
            sum(x.source == s and x.label != "covid" for x in samples),
        )
        for s in sorted({x.source for x in samples})
    }
    for rule in ("argmax", "at_operating_point"):
        how = "by argmax" if rule == "argmax" else "at the validation operating point (sens 0.95)"
        print(f"\nCOVID-19 called {how}:\n")
        first = True
        for path in paths:
            seed = path.stem.split("_seed")[1].split("_")[0]
            for run in json.loads(path.read_text()):
                heads = [("trained head", None)]
                heads += [(f"logistic head, k = {k}", k) for k in run.get("projected", {})]
                for name, k in heads:
                    loso = {
                        s: (d if k is None else d["projected"][k]) for s, d in run["loso"].items()
                    }
                    if first:
                        print(
                            "| Adversary λ | Seed | Head | Val macro-F1 | Test macro-F1 | "
                            + " | ".join(loso)
                            + " | Mean of rates |"
                        )
                        print("|---:|---:|---|---:|---:|" + "---|" * len(loso) + "---:|")
                        first = False
                    scores_ = run if k is None else run["projected"][k]
                    cells, rates = [], []
                    for s, d in loso.items():
                        d = d if rule == "argmax" else d["at_operating_point"]
                        parts = []
                        for key, n in (("sensitivity", count[s][0]), ("specificity", count[s][1])):
                            if key in d:
                                lo, hi = wilson(d[key], n)
                                parts.append(f"{key[:4]} {d[key]:.2f} ({lo:.2f}-{hi:.2f})")
                                rates.append(d[key])
                        cells.append(", ".join(parts))
                    print(
                        f"| {run['adversary']:g} | {seed} | {name} | "
                        f"{scores_['validation']['macro_f1']:.3f} | "
                        f"{scores_['test']['macro_f1']:.3f} | "
                        + " | ".join(cells)
                        + f" | {np.mean(rates):.2f} |"
                    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(ap)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--views", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0, help="initialisation, view sampling, dropout")
    ap.add_argument("--adversary", default="0,1", help="adversary weights to compare")
    ap.add_argument("--folds", default="", help="held-out sources (default: every source)")
    ap.add_argument("--no-all", action="store_true", help="skip the all-sources run")
    ap.add_argument(
        "--project",
        default="",
        help="also refit a logistic head after k rounds of nullspace projection (section H) "
        "of each fold's fine-tuned pooled features, for each k listed (e.g. 0,10)",
    )
    ap.add_argument("--table", nargs="+", type=Path, help="print the tables of saved runs")
    args = ap.parse_args()
    options = parse_options(args.preprocess)
    settings, samples, sources, splits = prepare(args.data)
    if args.table:
        print_tables(args.table, samples)
        return
    maps = lower_maps(samples, options, args.size, args.views, args.out / "features")
    index = {s.path.resolve(): i for i, s in enumerate(samples)}
    labels = np.array([LABELS.index(s.label) for s in samples])
    src = np.array([s.source for s in samples])

    def rows_of(split: dict[str, list[Sample]]) -> dict[str, np.ndarray]:
        return {k: np.array([index[s.path.resolve()] for s in v], int) for k, v in split.items()}

    folds = args.folds.split(",") if args.folds else sources
    projections = [int(v) for v in args.project.split(",")] if args.project else []
    results = []
    for lam in (float(v) for v in args.adversary.split(",")):
        row: dict[str, Any] = {"adversary": lam, "views": args.views, "loso": {}}
        if not args.no_all:
            r = rows_of(splits)
            top, head = train_fold(
                maps, r, labels, src, args.size, lam, args.epochs, args.seed, f"all λ={lam}"
            )
            for part in ("validation", "test"):
                row[part] = scores(predict(top, head, maps, r[part]), splits[part])
            if projections:
                pooled = pooled_features(top, maps)
                for k in projections:
                    fn, _, _ = ProjectedProbe(pooled, samples, k).train(
                        splits["train"], splits["validation"]
                    )
                    row.setdefault("projected", {})[k] = {
                        part: scores(fn(splits[part]), splits[part])
                        for part in ("validation", "test")
                    }
            print(
                json.dumps({"adversary": lam, **{k: row[k] for k in ("validation", "test")}}),
                flush=True,
            )
        for s in folds:
            split = make_splits({**settings, "hold_out_source": s}, LABELS)
            r = rows_of(split)
            top, head = train_fold(
                maps, r, labels, src, args.size, lam, args.epochs, args.seed, f"{s} λ={lam}"
            )
            held = predict(top, head, maps, r["held_out"])
            val = predict(top, head, maps, r["validation"])
            row["loso"][s] = {
                **held_out_rates(held, split["held_out"]),
                "at_operating_point": operating_point_rates(
                    val, labels[r["validation"]], held, split["held_out"]
                ),
            }
            if projections:
                pooled = pooled_features(top, maps)
                for k in projections:
                    fn, _, _ = ProjectedProbe(pooled, samples, k).train(
                        split["train"], split["validation"]
                    )
                    held, val = fn(split["held_out"]), fn(split["validation"])
                    row["loso"][s].setdefault("projected", {})[k] = {
                        **held_out_rates(held, split["held_out"]),
                        "at_operating_point": operating_point_rates(
                            val, labels[r["validation"]], held, split["held_out"]
                        ),
                    }
            print(json.dumps({"adversary": lam, "held_out": s, **row["loso"][s]}), flush=True)
        results.append(row)
        args.out.mkdir(parents=True, exist_ok=True)
        tag = f"lambda{args.adversary.replace(',', '_')}_seed{args.seed}"
        tag += f"_project{args.project.replace(',', '_')}" if args.project else ""
        (args.out / f"adversary_lite0_{tag}.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
