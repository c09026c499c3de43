"""Training: a patient-disjoint split from the manifest, a model, and the folder the node loads.

This first version trains a small CNN from scratch (the ``small-cnn`` backbone): enough for
the node's baseline models and for tests that train in seconds. Pretrained backbones, two-phase
fine-tuning and the evaluation report build on the same split and preprocessing.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ai.model import ModelSpec
from ai.outputs import ClassCode
from ai.preprocess import LUNG_WINDOW, read_image_file, to_model_input

COVID = ClassCode("covid", "SCT", "840539006", "COVID-19")
CLASSES = {
    "cxr": (
        COVID,
        ClassCode("pneumonia", "SCT", "233604007", "Pneumonia"),
        ClassCode("normal", "SCT", "17621005", "Normal"),
    ),
    "ct": (COVID, ClassCode("noncovid", "SCT", "260385009", "Negative")),
}
SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Sample:
    path: Path
    label: str
    group: str  # patient group: never split across train/validation/test


@dataclass
class TrainSettings:
    task: str
    data_dir: Path
    manifest: Path
    out_dir: Path
    name: str = ""
    version: str = "0.1.0"
    image_size: int = 128
    epochs: int = 20
    batch_size: int = 16
    learning_rate: float = 1e-3
    patience: int = 4
    seed: int = 0
    validation_fraction: float = 0.15
    test_fraction: float = 0.15
    limit_per_class: int | None = None  # for quick runs and tests
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def read_manifest(manifest: Path, task: str, data_dir: Path) -> list[Sample]:
    """The task's rows of ``manifest.csv`` whose files exist under *data_dir*."""
    with manifest.open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["task"] == task]
    samples = [Sample(data_dir / r["file"], r["label"], r["patient_group"]) for r in rows]
    return [s for s in samples if s.path.is_file()]


def split_by_group(
    samples: Sequence[Sample], seed: int, validation_fraction: float, test_fraction: float
) -> dict[str, list[Sample]]:
    """Assign whole patient groups to splits, stratified by label, reproducibly from *seed*.

    Each group goes to one split only, so no patient is in two; groups are ordered by a hash of
    (seed, group) within each label and cut by fraction.
    """
    by_label: dict[str, dict[str, list[Sample]]] = {}
    for s in samples:
        by_label.setdefault(s.label, {}).setdefault(s.group, []).append(s)
    out: dict[str, list[Sample]] = {k: [] for k in SPLITS}
    assigned: dict[str, str] = {}
    for label in sorted(by_label):
        groups = sorted(
            by_label[label],
            key=lambda g: hashlib.sha256(f"{seed}:{g}".encode()).hexdigest(),
        )
        n = len(groups)
        n_test = max(1, round(n * test_fraction)) if test_fraction > 0 else 0
        n_val = max(1, round(n * validation_fraction)) if validation_fraction > 0 else 0
        for i, group in enumerate(groups):
            split = "test" if i < n_test else "validation" if i < n_test + n_val else "train"
            split = assigned.setdefault(group, split)  # a group seen under another label
            out[split].extend(by_label[label][group])
    return out


def limit(samples: Sequence[Sample], per_class: int | None, seed: int) -> list[Sample]:
    if per_class is None:
        return list(samples)
    rng = random.Random(seed)
    shuffled = list(samples)
    rng.shuffle(shuffled)
    counts: Counter[str] = Counter()
    kept = []
    for s in shuffled:
        if counts[s.label] < per_class:
            counts[s.label] += 1
            kept.append(s)
    return kept


def load_arrays(
    samples: Sequence[Sample], classes: Sequence[ClassCode], size: int
) -> tuple[np.ndarray, np.ndarray]:
    names = [c.name for c in classes]
    x = np.stack([to_model_input(read_image_file(s.path), size) for s in samples])
    y = np.array([names.index(s.label) for s in samples], dtype=np.int64)
    return x, y


def build_small_cnn(size: int, channels: int, n_classes: int, seed: int) -> Any:
    """Four conv blocks and global pooling; the last conv layer is ``last_conv`` for Grad-CAM."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((size, size, channels), name="image")
    x = layers.RandomRotation(0.03, fill_mode="constant", seed=seed)(inputs)
    x = layers.RandomTranslation(0.05, 0.05, fill_mode="constant", seed=seed)(x)
    x = layers.Normalization(mean=0.5, variance=0.0625)(x)
    for i, filters in enumerate((16, 32, 64)):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv{i}")(x)
        x = layers.BatchNormalization(momentum=0.9)(x)  # few steps per epoch
        x = layers.Activation("relu")(x)
        x = layers.MaxPooling2D()(x)
    x = layers.Conv2D(96, 3, padding="same", activation="relu", name="last_conv")(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(0.3, seed=seed)(x)
    outputs = layers.Dense(n_classes, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="small_cnn")


def class_weights(y: np.ndarray, n_classes: int) -> dict[int, float]:
    counts = np.bincount(y, minlength=n_classes).astype(float)
    counts[counts == 0] = 1
    return {i: float(len(y) / (n_classes * c)) for i, c in enumerate(counts)}


def train(settings: TrainSettings) -> dict[str, Any]:
    """Train, evaluate on the held-out patients, and write a model folder the node can load."""
    import keras

    classes = CLASSES[settings.task]
    samples = read_manifest(settings.manifest, settings.task, settings.data_dir)
    if not samples:
        raise ValueError(f"no {settings.task} images listed in {settings.manifest} were found")
    splits = split_by_group(
        samples, settings.seed, settings.validation_fraction, settings.test_fraction
    )
    splits = {k: limit(v, settings.limit_per_class, settings.seed) for k, v in splits.items()}
    size = settings.image_size
    x_train, y_train = load_arrays(splits["train"], classes, size)
    x_val, y_val = load_arrays(splits["validation"], classes, size)
    model = build_small_cnn(size, 1, len(classes), settings.seed)
    model.compile(
        optimizer=keras.optimizers.Adam(settings.learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    history = model.fit(
        x_train,
        y_train,
        validation_data=(x_val, y_val),
        epochs=settings.epochs,
        batch_size=settings.batch_size,
        class_weight=class_weights(y_train, len(classes)),
        callbacks=[
            keras.callbacks.EarlyStopping(
                monitor="val_loss", patience=settings.patience, restore_best_weights=True
            ),
            keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=2),
        ],
        shuffle=True,
        verbose=2,
    )
    metrics: dict[str, Any] = {
        "history": {k: [float(v) for v in vals] for k, vals in history.history.items()},
        "split_sizes": {k: len(v) for k, v in splits.items()},
        "split_groups": {k: len({s.group for s in v}) for k, v in splits.items()},
    }
    if splits["test"]:
        x_test, y_test = load_arrays(splits["test"], classes, size)
        pred = np.argmax(model.predict(x_test, verbose=0), axis=-1)
        metrics["test_accuracy"] = float(np.mean(pred == y_test))
        confusion = np.zeros((len(classes), len(classes)), dtype=int)
        for t, p in zip(y_test, pred, strict=True):
            confusion[t, p] += 1
        metrics["test_confusion"] = confusion.tolist()
    spec = ModelSpec(
        name=settings.name or f"{settings.task}-small-cnn",
        version=settings.version,
        task=settings.task,
        classes=classes,
        input_size=size,
        channels=1,
        gradcam_layer="last_conv",
        window=LUNG_WINDOW if settings.task == "ct" else None,
        description=settings.description,
    )
    out = settings.out_dir
    out.mkdir(parents=True, exist_ok=True)
    model.save(out / spec.file)
    (out / "model.json").write_text(json.dumps(spec.to_json(), indent=2) + "\n")
    record = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()}
    (out / "training.json").write_text(
        json.dumps({"settings": record, "metrics": metrics}, indent=2) + "\n"
    )
    return metrics
