"""Training: a patient-disjoint split from the manifest, a model, and the folder the node loads.

Backbones by name (:data:`BACKBONES`): ``small-cnn`` (a small CNN from scratch, the default, for
baselines and quick tests), ``efficientnet_lite0``/``lite1``/``lite2`` (the only ones with
real ImageNet weights here, shipped in ``ai/weights/``), and the keras.applications
architectures EfficientNet-B0, MobileNetV2, DenseNet121, ResNet50, VGG16/19, InceptionV3 and
InceptionResNetV2 - these are **randomly initialised**: their ImageNet weights would have to be
downloaded, which this project does not do at run time.

Every classifier is one flat functional graph, [0, 1] images in::

    image -> augmentation (training only, ai.augment) -> the backbone's own input normalisation
          -> backbone layers (wired on the input, not nested) -> feature map (``gradcam_layer``)
          -> GlobalAveragePooling2D -> Dropout -> Dense softmax "probabilities"

so Grad-CAM (``model.get_layer(gradcam_layer)``) and the ONNX export see the feature map.
Backbones that need RGB take three channels (grey replicated by ``ai.preprocess``).

Two phases: phase 1 trains the head on a frozen base (for a pretrained base; a randomly
initialised base has nothing to keep, so it trains with the head), phase 2 trains the base too
(all layers, or the last ``fine_tune_layers``) at ``phase2_learning_rate``. BatchNormalization
layers of a pretrained base stay frozen in phase 2 unless ``train_batchnorm`` (few images per
batch). Each phase has early stopping on validation loss (best weights restored) and a learning
rate schedule (reduce-on-plateau or cosine). Class weights, augmentation, shortcut-removing
preprocessing (``ai.preprocess.prepare``, stored in model.json for serving) and DCGAN class
balancing (``ai.dcgan``) are settings; every setting is written to ``training.json``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ai import metrics as m
from ai.augment import Augmentation, apply_augmentation
from ai.dataset import (  # noqa: F401  (re-exported: older callers import them from here)
    SPLITS,
    STRATIFY,
    DataError,
    Sample,
    cap_classes,
    describe_sources,
    limit,
    make_splits,
    read_manifest,
    split_by_group,
)
from ai.model import ModelSpec
from ai.outputs import ClassCode
from ai.preprocess import LUNG_WINDOW, check_options, read_inputs

log = logging.getLogger(__name__)

COVID = ClassCode("covid", "SCT", "840539006", "COVID-19")
CLASSES = {
    "cxr": (
        COVID,
        ClassCode("pneumonia", "SCT", "233604007", "Pneumonia"),
        ClassCode("normal", "SCT", "17621005", "Normal"),
    ),
    "ct": (COVID, ClassCode("noncovid", "SCT", "260385009", "Negative")),
}
LR_SCHEDULES = ("plateau", "cosine", "constant")


@dataclass(frozen=True)
class Backbone:
    label: str
    channels: int
    min_size: int
    normalisation: str  # how [0, 1] input is brought to what the architecture expects
    application: str | None = None  # keras.applications constructor
    can_pretrain: bool = False


BACKBONES: dict[str, Backbone] = {
    "small-cnn": Backbone("small CNN (from scratch)", 1, 16, "small-cnn"),
    "efficientnet_lite0": Backbone("EfficientNet-Lite0", 3, 32, "none", can_pretrain=True),
    "efficientnet_lite1": Backbone("EfficientNet-Lite1", 3, 32, "none", can_pretrain=True),
    "efficientnet_lite2": Backbone("EfficientNet-Lite2", 3, 32, "none", can_pretrain=True),
    "efficientnet_b0": Backbone("EfficientNet-B0", 3, 32, "x255", "EfficientNetB0"),
    "mobilenet_v2": Backbone("MobileNetV2", 3, 32, "tf", "MobileNetV2"),
    "densenet121": Backbone("DenseNet121", 3, 32, "torch", "DenseNet121"),
    "resnet50": Backbone("ResNet50", 3, 32, "caffe", "ResNet50"),
    "vgg16": Backbone("VGG16", 3, 32, "caffe", "VGG16"),
    "vgg19": Backbone("VGG19", 3, 32, "caffe", "VGG19"),
    "inception_v3": Backbone("InceptionV3", 3, 75, "tf", "InceptionV3"),
    "inception_resnet_v2": Backbone("InceptionResNetV2", 3, 75, "tf", "InceptionResNetV2"),
}


@dataclass
class TrainSettings:
    task: str
    data_dir: Path  # the first data folder (see ai.dataset)
    manifest: Path  # its manifest.csv
    out_dir: Path
    extra_data: tuple[Path, ...] = ()  # more data folders, each with a manifest or class folders
    hold_out_source: str = ""  # keep this source out of train/validation/test: the held_out split
    exclude_sources: tuple[str, ...] = ()  # not used at all (e.g. a licence forbids shipping)
    stratify: str = "source"  # split strata: "source" (label and source) or "label"
    name: str = ""
    version: str = "0.1.0"
    backbone: str = "small-cnn"  # a key of BACKBONES
    pretrained: bool = False  # ImageNet weights: only the efficientnet_lite* have them here
    image_size: int = 128
    epochs: int = 20  # phase-1 epochs (the name older callers use; phase1_epochs wins)
    phase1_epochs: int | None = None  # head (frozen pretrained base), or all layers
    phase2_epochs: int = 0  # 0: one phase only
    batch_size: int = 16
    learning_rate: float = 1e-3  # phase 1
    phase2_learning_rate: float = 1e-4
    fine_tune_layers: int | None = None  # phase 2 trains the last N base layers; None: all
    train_batchnorm: bool = False  # phase 2: also train a pretrained base's BatchNormalization
    lr_schedule: str = "plateau"  # plateau (halve after patience//2 flat epochs), cosine, constant
    patience: int = 4  # early stopping on validation loss, per phase
    dropout: float = 0.3  # before the classifier
    class_weights: bool = True  # weight the loss by inverse class frequency
    balance: str = "class"  # "class" (class_weights) or "source": each (class, source) equal
    # augmentation (ai.augment.Augmentation), training only
    rotation_degrees: float = 10.0
    shift: float = 0.05
    zoom: float = 0.05
    horizontal_flip: bool = False  # chest images are not mirror-symmetric
    brightness: float = 0.1
    contrast: float = 0.1
    blur: float = 0.0  # max Gaussian blur sigma, in input pixels (varies apparent resolution)
    erase: float = 0.0  # probability of blanking a random patch (markers, text, lines)
    # shortcut-removing options (ai.preprocess.prepare): stored in model.json, applied in serving
    preprocessing: dict[str, Any] = field(default_factory=dict)
    dcgan: bool = False  # balance the training split's classes with DCGAN samples (ai.dcgan)
    dcgan_steps: int = 800  # generator steps per minority class (ai.dcgan.STEPS)
    dcgan_target: int | None = None  # images per class after balancing; None: largest class
    # cap classes of the TRAINING split only (e.g. {"covid": 30} to simulate scarce data);
    # validation and test are untouched, so evaluation stays comparable
    train_class_limit: dict[str, int] = field(default_factory=dict)
    seed: int = 0
    validation_fraction: float = 0.15
    test_fraction: float = 0.15
    limit_per_class: int | None = None  # for quick runs and tests
    # grouped cross-validation: (fold, folds) makes fold `fold` of the non-test patient groups
    # the validation split and the other folds the training split; the test split is unchanged
    cv_fold: tuple[int, int] | None = None
    description: str = ""
    jit_compile: bool = False  # XLA compilation of the train step (no gain seen on CPU here)
    run_eagerly: bool = False  # no graph tracing: slower steps, much faster start (tests)
    fit_serving: bool = True  # calibration, operating point, abstention (ai.serving) at the end
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.phase1_epochs is None:
            self.phase1_epochs = self.epochs
        self.epochs = self.phase1_epochs
        self.preprocessing = check_options(self.preprocessing)
        self.extra_data = tuple(Path(p) for p in self.extra_data)
        self.exclude_sources = tuple(self.exclude_sources)
        if self.stratify not in STRATIFY:
            raise ValueError(f"stratify must be one of {', '.join(STRATIFY)}")
        if self.hold_out_source and self.hold_out_source in self.exclude_sources:
            raise ValueError(f"source {self.hold_out_source!r} is both held out and excluded")
        if self.balance not in ("class", "source"):
            raise ValueError("balance must be 'class' or 'source'")
        if self.balance == "source" and self.dcgan:
            raise ValueError("balance='source' and dcgan cannot be combined")
        if not 0.0 <= self.erase <= 1.0 or self.blur < 0:
            raise ValueError("erase must be in [0, 1] and blur >= 0")
        if self.backbone not in BACKBONES:
            raise ValueError(
                f"unknown backbone {self.backbone!r}; choose one of {', '.join(BACKBONES)}"
            )
        info = BACKBONES[self.backbone]
        if self.pretrained and not info.can_pretrain:
            raise ValueError(
                f"no pretrained weights for {self.backbone} here (ImageNet weights cannot be "
                "downloaded at run time); only the efficientnet_lite backbones ship real "
                "ImageNet weights"
            )
        if self.image_size < info.min_size:
            raise ValueError(f"{self.backbone} needs an image size of at least {info.min_size}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}")
        if self.phase1_epochs < 0 or self.phase2_epochs < 0:
            raise ValueError("epochs cannot be negative")
        if self.phase1_epochs + self.phase2_epochs < 1:
            raise ValueError("nothing to train: phase1_epochs + phase2_epochs is 0")
        if self.cv_fold is not None:
            fold, folds = (int(v) for v in self.cv_fold)
            if not (folds >= 2 and 0 <= fold < folds):
                raise ValueError(f"cv_fold {fold}/{folds}: need folds >= 2 and 0 <= fold < folds")
            self.cv_fold = (fold, folds)

    @property
    def augmentation(self) -> Augmentation:
        return Augmentation(
            rotation_degrees=self.rotation_degrees,
            shift=self.shift,
            zoom=self.zoom,
            horizontal_flip=self.horizontal_flip,
            brightness=self.brightness,
            contrast=self.contrast,
            blur=self.blur,
            erase=self.erase,
        )

    def record(self) -> dict[str, Any]:
        """The settings as JSON-ready values (paths as strings), for training.json."""

        def plain(value: Any) -> Any:
            if isinstance(value, Path):
                return str(value)
            if isinstance(value, tuple | list):
                return [plain(v) for v in value]
            return value

        return {k: plain(v) for k, v in asdict(self).items()}


def load_arrays(
    samples: Sequence[Sample],
    classes: Sequence[ClassCode],
    size: int,
    channels: int = 1,
    options: Mapping[str, Any] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Model inputs and class indices of *samples*, through the serving preprocessing."""
    names = [c.name for c in classes]
    if not samples:
        return np.zeros((0, size, size, channels), np.float32), np.zeros(0, np.int64)
    x = read_inputs([s.path for s in samples], size, channels, options)
    y = np.array([names.index(s.label) for s in samples], dtype=np.int64)
    return x, y


# ------------------------------------------------------------------------------- the model


def _small_cnn_features(x: Any) -> Any:
    """Four conv blocks; the last conv layer is ``last_conv`` for Grad-CAM."""
    from keras import layers

    x = layers.Normalization(mean=0.5, variance=0.0625, name="input_norm")(x)
    for i, filters in enumerate((16, 32, 64)):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv{i}")(x)
        x = layers.BatchNormalization(momentum=0.9)(x)  # few steps per epoch
        x = layers.Activation("relu")(x)
        x = layers.MaxPooling2D()(x)
    return layers.Conv2D(96, 3, padding="same", activation="relu", name="last_conv")(x)


def _normalise_input(x: Any, how: str) -> Any:
    """Bring [0, 1] grey-as-RGB input to the range the architecture was designed for.

    Grey is replicated to three channels, so caffe's RGB->BGR swap changes nothing and is left
    out; its mean subtraction is kept.
    """
    from keras import layers

    if how == "none":  # EfficientNet-Lite0 normalises itself
        return x
    if how == "x255":  # keras EfficientNet rescales [0, 255] itself
        return layers.Rescaling(255.0, name="input_scale")(x)
    if how == "tf":
        return layers.Rescaling(2.0, offset=-1.0, name="input_scale")(x)
    if how == "torch":
        mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
        return layers.Normalization(mean=mean, variance=[v * v for v in std], name="input_norm")(x)
    if how == "caffe":
        caffe_mean = [v / 255.0 for v in (103.939, 116.779, 123.68)]
        return layers.Normalization(
            mean=caffe_mean, variance=[(1 / 255.0) ** 2] * 3, name="input_norm"
        )(x)
    raise ValueError(f"unknown input normalisation {how!r}")


def build_model(settings: TrainSettings, n_classes: int) -> tuple[Any, list[Any], str]:
    """(model, the backbone's layers, the Grad-CAM layer's name) for *settings*."""
    import keras
    from keras import layers

    from ai.backbones import FEATURE_LAYER, efficientnet_lite

    info = BACKBONES[settings.backbone]
    size, seed = settings.image_size, settings.seed
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((size, size, info.channels), name="image")
    x = apply_augmentation(inputs, settings.augmentation, seed)
    base_layers: list[Any] = []
    if settings.backbone == "small-cnn":
        features = _small_cnn_features(x)
        gradcam_layer = "last_conv"
    else:
        x = _normalise_input(x, info.normalisation)
        ours = {id(lyr) for lyr in keras.Model(inputs, x).layers}  # input, augmentation, scaling
        # Build the backbone's layers on our tensor (as keras.applications' input_tensor does),
        # not the backbone as one nested layer: its feature map is then a top-level layer of the
        # classifier, called once, as Grad-CAM and the ONNX export need.
        if settings.backbone.startswith("efficientnet_lite"):
            weights = "imagenet" if settings.pretrained else None
            variant = settings.backbone.removeprefix("efficientnet_")
            base = efficientnet_lite(variant, weights=weights, input_tensor=x)
            gradcam_layer = FEATURE_LAYER
        else:
            constructor = getattr(keras.applications, str(info.application))
            base = constructor(include_top=False, weights=None, input_tensor=x)
            gradcam_layer = base.layers[-1].name
        features = base.output
        base_layers = [
            lyr
            for lyr in base.layers
            if id(lyr) not in ours and not isinstance(lyr, layers.InputLayer)
        ]
    x = layers.GlobalAveragePooling2D(name="head_pool")(features)
    x = layers.Dropout(settings.dropout, seed=seed, name="head_dropout")(x)
    outputs = layers.Dense(n_classes, activation="softmax", name="probabilities")(x)
    name = settings.backbone.replace("-", "_")
    return keras.Model(inputs, outputs, name=name), base_layers, gradcam_layer


def source_balanced_weights(samples: Sequence[Sample], n_classes: int) -> np.ndarray:
    """Per-image loss weights: every class weighs the same in total, and within a class every
    source weighs the same, so a source that brings most of a class's images (Hannover's
    COVID-19, NIH's normals) cannot make "looks like that hospital" the cheapest answer.
    Mean weight 1."""
    strata: dict[tuple[str, str], int] = {}
    for s in samples:
        strata[(s.label, s.source)] = strata.get((s.label, s.source), 0) + 1
    sources_per_label: dict[str, int] = {}
    for label, _ in strata:
        sources_per_label[label] = sources_per_label.get(label, 0) + 1
    labels = len(sources_per_label)
    w = np.array(
        [
            1.0 / (labels * sources_per_label[s.label] * strata[(s.label, s.source)])
            for s in samples
        ],
        dtype=np.float32,
    )
    return (w * len(samples) / w.sum()).astype(np.float32) if len(w) else w


def class_weights(y: np.ndarray, n_classes: int) -> dict[int, float]:
    counts = np.bincount(y, minlength=n_classes).astype(float)
    counts[counts == 0] = 1
    return {i: float(len(y) / (n_classes * c)) for i, c in enumerate(counts)}


# ---------------------------------------------------------------------------- training


def _set_trainable(model: Any, base_layers: Sequence[Any], phase: int, s: TrainSettings) -> None:
    """Phase 1: freeze a pretrained base. Phase 2: unfreeze (the last fine_tune_layers of) it,
    keeping a pretrained base's BatchNormalization frozen unless train_batchnorm."""
    from keras import layers

    base = {id(lyr) for lyr in base_layers}
    tuned = base_layers if not s.fine_tune_layers else base_layers[-s.fine_tune_layers :]
    tuned_ids = {id(lyr) for lyr in tuned}
    for lyr in model.layers:
        if id(lyr) not in base:
            lyr.trainable = True
        elif not s.pretrained:
            lyr.trainable = phase == 1 or id(lyr) in tuned_ids
        elif phase == 1 or (isinstance(lyr, layers.BatchNormalization) and not s.train_batchnorm):
            lyr.trainable = False
        else:
            lyr.trainable = id(lyr) in tuned_ids


def _fit_phase(
    model: Any,
    data: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    s: TrainSettings,
    *,
    learning_rate: float,
    first_epoch: int,
    epochs: int,
    weights: dict[int, float] | None,
    sample_weight: np.ndarray | None = None,
) -> dict[str, list[float]]:
    import keras

    x_train, y_train, x_val, y_val = data
    steps = max(1, int(np.ceil(len(x_train) / s.batch_size)))
    rate: Any = learning_rate
    callbacks: list[Any] = [
        keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=s.patience, restore_best_weights=True
        )
    ]
    if s.lr_schedule == "cosine":
        rate = keras.optimizers.schedules.CosineDecay(
            learning_rate, decay_steps=steps * epochs, alpha=0.05
        )
    elif s.lr_schedule == "plateau":
        callbacks.append(
            keras.callbacks.ReduceLROnPlateau(
                monitor="val_loss", factor=0.5, patience=max(1, s.patience // 2), min_lr=1e-6
            )
        )
    model.compile(
        optimizer=keras.optimizers.Adam(rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=s.jit_compile,
        run_eagerly=s.run_eagerly,
    )
    history = model.fit(
        x_train,
        y_train,
        validation_data=(x_val, y_val),
        initial_epoch=first_epoch,
        epochs=first_epoch + epochs,
        batch_size=s.batch_size,
        class_weight=weights if sample_weight is None else None,
        sample_weight=sample_weight,
        callbacks=callbacks,
        shuffle=True,
        verbose=1,  # a progress bar per epoch
    )
    return {k: [float(v) for v in vals] for k, vals in history.history.items()}


def _without_optimizer(model: Any) -> Any:
    """A copy of *model* with the same weights and no optimizer state (a third of the size)."""
    import keras

    clean = keras.Model.from_config(model.get_config())
    clean.set_weights(model.get_weights())
    return clean


def predict_arrays(model: Any, x: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Class probabilities by calling the model eagerly in batches (no predict-function trace)."""
    parts = [
        np.asarray(model(x[i : i + batch_size], training=False))
        for i in range(0, len(x), batch_size)
    ]
    return np.concatenate(parts) if parts else np.zeros((0, model.output_shape[-1]), np.float32)


def _scores(
    y: np.ndarray, probs: np.ndarray, classes: Sequence[ClassCode]
) -> dict[str, float | None]:
    """Accuracy, macro-F1 and (with a covid class) COVID AUC of predictions on one split."""
    if not len(y):
        return {}
    cm = m.confusion_matrix(y, probs.argmax(axis=1), len(classes))
    out: dict[str, float | None] = {
        "accuracy": float(m.accuracy(cm)),
        "macro_f1": float(m.macro_f1(cm)),
    }
    names = [c.name for c in classes]
    if "covid" in names:
        k = names.index("covid")
        auc = m.roc_auc(y == k, probs[:, k])
        out["covid_auc"] = None if np.isnan(auc) else float(auc)
    return out


def _prepare_training_data(
    settings: TrainSettings,
    splits: dict[str, list[Sample]],
    classes: Sequence[ClassCode],
    channels: int,
    dcgan_fn: Callable[..., Any] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """Train and validation arrays; the DCGAN sees the training split only."""
    size, opts = settings.image_size, settings.preprocessing
    x_train, y_train = load_arrays(splits["train"], classes, size, channels, opts)
    x_val, y_val = load_arrays(splits["validation"], classes, size, channels, opts)
    info: dict[str, Any] = {}
    if settings.dcgan:
        from ai.dcgan import balance_with_dcgan, save_sample_sheet

        kwargs = {"train_fn": dcgan_fn} if dcgan_fn is not None else {}
        n_real = len(x_train)
        x_train, y_train, info = balance_with_dcgan(
            x_train,
            y_train,
            len(classes),
            steps=settings.dcgan_steps,
            seed=settings.seed,
            target=settings.dcgan_target,
            **kwargs,
        )
        info["synthetic"] = {classes[k].name: n for k, n in info["synthetic"].items()}
        info["skipped"] = {classes[k].name: n for k, n in info.get("skipped", {}).items()}
        info["final_losses"] = {classes[k].name: v for k, v in info.get("final_losses", {}).items()}
        settings.out_dir.mkdir(parents=True, exist_ok=True)
        save_sample_sheet(x_train, y_train, n_real, settings.out_dir / "dcgan_samples.png")
    return x_train, y_train, x_val, y_val, info


def train(settings: TrainSettings, *, dcgan_fn: Callable[..., Any] | None = None) -> dict[str, Any]:
    """Train, evaluate on the held-out patients, and write a model folder the node can load.

    *dcgan_fn* replaces :func:`ai.dcgan.train_dcgan` (tests use a cheaper one).
    """
    import keras

    started = time.monotonic()
    classes = CLASSES[settings.task]
    info = BACKBONES[settings.backbone]
    splits = make_splits(settings.record(), [c.name for c in classes])
    if not splits["train"] or not splits["validation"]:
        raise DataError(
            f"the split left {len(splits['train'])} training and {len(splits['validation'])} "
            "validation images: too few patients"
        )
    log.info(
        "split (patient-disjoint): %s; held out: %s",
        ", ".join(f"{k} {len(v)}" for k, v in splits.items() if k != "held_out"),
        f"{settings.hold_out_source} ({len(splits['held_out'])} images)"
        if settings.hold_out_source
        else "none",
    )
    splits["train"] = cap_classes(splits["train"], settings.train_class_limit, settings.seed)
    keras.utils.set_random_seed(settings.seed)
    x_train, y_train, x_val, y_val, dcgan_info = _prepare_training_data(
        settings, splits, classes, info.channels, dcgan_fn
    )
    model, base_layers, gradcam_layer = build_model(settings, len(classes))
    weights = class_weights(y_train, len(classes)) if settings.class_weights else None
    sample_weight = None
    if settings.balance == "source":
        sample_weight = source_balanced_weights(splits["train"], len(classes))
    data = (x_train, y_train, x_val, y_val)
    history: dict[str, list[float]] = {}
    phase_epochs: list[int] = []
    phases = (
        (1, settings.phase1_epochs, settings.learning_rate),
        (2, settings.phase2_epochs, settings.phase2_learning_rate),
    )
    best: tuple[float, list[np.ndarray], int] = (np.inf, [], -1)  # val_loss, weights, epoch
    for phase, epochs, rate in phases:
        if not epochs:
            phase_epochs.append(0)
            continue
        _set_trainable(model, base_layers, phase, settings)
        log.info(
            "phase %d: %d epochs at learning rate %g, %d of %d weights trainable",
            phase,
            epochs,
            rate,
            sum(int(np.prod(w.shape)) for w in model.trainable_weights),
            model.count_params(),
        )
        done = len(history.get("loss", []))
        got = _fit_phase(
            model,
            data,
            settings,
            learning_rate=rate,
            first_epoch=done,
            epochs=epochs,
            weights=weights,
            sample_weight=sample_weight,
        )
        phase_epochs.append(len(got.get("loss", [])))
        for key, values in got.items():
            if key in ("loss", "accuracy", "val_loss", "val_accuracy") or phase == 1:
                history.setdefault(key, []).extend(values)
        # Early stopping restored this phase's best epoch; keep the best over both phases.
        phase_best = min(got.get("val_loss") or [np.inf])
        if phase_best <= best[0]:
            best = (
                phase_best,
                [w.copy() for w in model.get_weights()],
                done + int(np.argmin(got.get("val_loss") or [0])),
            )
        else:
            log.info("phase %d did not beat val_loss %.4f: restoring that epoch", phase, best[0])
            model.set_weights(best[1])
    history = {k: v for k, v in history.items() if len(v) == sum(phase_epochs)}
    train_time = time.monotonic() - started
    model = _without_optimizer(model)

    metrics: dict[str, Any] = {
        "history": history,
        "phase_epochs": phase_epochs,
        "best_epoch": best[2] + 1,  # 1-based, over both phases: the weights saved
        "split_sizes": {k: len(v) for k, v in splits.items()},
        "split_groups": {k: len({s.group for s in v}) for k, v in splits.items()},
        "split_sources": {k: describe_sources(v) for k, v in splits.items()},
        "train_images_per_class": {
            c.name: int(n)
            for c, n in zip(classes, np.bincount(y_train, minlength=len(classes)), strict=True)
        },
        "train_time_s": round(train_time, 1),
        "params": int(model.count_params()),
        "backbone": settings.backbone,
        "gradcam_layer": gradcam_layer,
    }
    if dcgan_info:
        metrics["dcgan"] = dcgan_info
    if len(x_val):
        metrics["validation"] = _scores(y_val, predict_arrays(model, x_val), classes)
    if splits["test"]:
        x_test, y_test = load_arrays(
            splits["test"], classes, settings.image_size, info.channels, settings.preprocessing
        )
        probs = predict_arrays(model, x_test)
        pred = np.argmax(probs, axis=-1)
        metrics["test_accuracy"] = float(np.mean(pred == y_test))
        confusion = np.zeros((len(classes), len(classes)), dtype=int)
        for t, p in zip(y_test, pred, strict=True):
            confusion[t, p] += 1
        metrics["test_confusion"] = confusion.tolist()
    spec = ModelSpec(
        name=settings.name or f"{settings.task}-{settings.backbone}",
        version=settings.version,
        task=settings.task,
        classes=classes,
        input_size=settings.image_size,
        channels=info.channels,
        gradcam_layer=gradcam_layer,
        window=LUNG_WINDOW if settings.task == "ct" else None,
        description=settings.description or describe(settings),
        preprocessing=dict(settings.preprocessing),
    )
    out = settings.out_dir
    out.mkdir(parents=True, exist_ok=True)
    model.save(out / spec.file)
    (out / "model.json").write_text(json.dumps(spec.to_json(), indent=2) + "\n")
    (out / "training.json").write_text(
        json.dumps({"settings": settings.record(), "metrics": metrics}, indent=2) + "\n"
    )
    if settings.fit_serving:
        from ai.abstention import AbstentionError
        from ai.serving import fit_serving

        try:
            metrics["serving"] = fit_serving(out)
        except (AbstentionError, ValueError) as exc:
            log.warning("%s: calibration/operating point/abstention not fitted: %s", out, exc)
            metrics["serving"] = {"error": str(exc)}
        (out / "training.json").write_text(
            json.dumps({"settings": settings.record(), "metrics": metrics}, indent=2) + "\n"
        )
    return metrics


def describe(s: TrainSettings) -> str:
    """One line for model.json: backbone, initialisation, budget and preprocessing."""
    info = BACKBONES[s.backbone]
    init = "ImageNet-pretrained" if s.pretrained else "randomly initialised"
    text = f"{info.label}, {init}, {s.image_size}x{s.image_size}"
    text += (
        f", {s.phase1_epochs}+{s.phase2_epochs} epochs (two-phase)"
        if s.phase2_epochs
        else (f", {s.phase1_epochs} epochs")
    )
    if s.preprocessing:
        text += ", preprocessing " + ",".join(f"{k}={v}" for k, v in s.preprocessing.items())
    if s.dcgan:
        text += ", DCGAN-balanced"
    return text
