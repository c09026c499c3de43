"""DCGAN class balancing (``--dcgan``): synthetic training images for the minority classes.

Some of the COVID-19 studies this project follows balanced their classes with a DCGAN
(Radford et al., 2016) trained on the scarce class. This is that idea, kept cheap for a CPU:
one small unconditional DCGAN per minority class, trained on that class's **training-split**
images only (never validation or test), at 64 x 64, for a fixed number of generator steps
(default 800: with 30 images, 60 epochs = 120 steps gave flat grey noise, 800 steps blurry but
chest-like images); its samples are resized to the model's input size and added to the training
set until every class has as many images as the largest one (or ``target`` images, where given).
A class short of the target by less than ``MIN_GAP`` of it (e.g. 104 of 105) gets no GAN.

Architecture (64 x 64 x 1, images scaled to [-1, 1]):

* generator: z ~ N(0, 1) of ``LATENT`` (64) -> Dense 4x4x256 -> BN -> ReLU ->
  4 x [Conv2DTranspose 4x4 stride 2 (128, 64, 32, then 1 channel)] with BN + ReLU between,
  tanh at the end;
* discriminator: 4 x [Conv2D 4x4 stride 2 (32, 64, 128, 256)] with LeakyReLU(0.2) (BN after
  all but the first) -> Flatten -> Dropout 0.3 -> Dense(1) logit;
* losses: binary cross-entropy on logits, one-sided label smoothing (real = 0.9);
  Adam(2e-4, beta_1 = 0.5) for both, one discriminator step per generator step.

The images it learns from are already prepared (``ai.preprocess.prepare`` options) and resized,
so its samples live in the same space as the real training inputs. Whether it helps is measured
in ``docs/model_comparison.md``; it is off by default.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np

log = logging.getLogger(__name__)

GAN_SIZE = 64
LATENT = 64
STEPS = 800
MIN_GAP = 0.05  # fraction of the target a class must lack to be worth a GAN


def build_generator(seed: int) -> Any:
    import keras
    from keras import layers

    init = keras.initializers.RandomNormal(stddev=0.02, seed=seed)
    z = keras.Input((LATENT,), name="z")
    x = layers.Dense(4 * 4 * 256, use_bias=False, kernel_initializer=init)(z)
    x = layers.ReLU()(layers.BatchNormalization()(x))
    x = layers.Reshape((4, 4, 256))(x)
    for filters in (128, 64, 32):
        x = layers.Conv2DTranspose(
            filters, 4, strides=2, padding="same", use_bias=False, kernel_initializer=init
        )(x)
        x = layers.ReLU()(layers.BatchNormalization()(x))
    x = layers.Conv2DTranspose(
        1, 4, strides=2, padding="same", activation="tanh", kernel_initializer=init
    )(x)
    return keras.Model(z, x, name="dcgan_generator")


def build_discriminator(seed: int) -> Any:
    import keras
    from keras import layers

    init = keras.initializers.RandomNormal(stddev=0.02, seed=seed)
    image = keras.Input((GAN_SIZE, GAN_SIZE, 1), name="image")
    x = image
    for i, filters in enumerate((32, 64, 128, 256)):
        x = layers.Conv2D(filters, 4, strides=2, padding="same", kernel_initializer=init)(x)
        if i:
            x = layers.BatchNormalization()(x)
        x = layers.LeakyReLU(0.2)(x)
    x = layers.Dropout(0.3, seed=seed)(layers.Flatten()(x))
    return keras.Model(image, layers.Dense(1, kernel_initializer=init)(x), name="dcgan_critic")


def _resize_all(images: np.ndarray, size: int) -> np.ndarray:
    interp = cv2.INTER_AREA if images.shape[1] > size else cv2.INTER_LINEAR
    return np.stack([cv2.resize(i, (size, size), interpolation=interp) for i in images])


def train_dcgan(
    images: np.ndarray, *, steps: int, seed: int, batch_size: int = 16, eager: bool = False
) -> tuple[Any, list[dict[str, float]]]:
    """Train a DCGAN on 2-D [0, 1] images (N, h, w) for *steps* generator steps (whole passes
    over the images, reshuffled); returns the generator and the losses of each pass.

    *eager* skips compiling the training step (quicker for a handful of steps, as in tests)."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    real = _resize_all(images.astype(np.float32), GAN_SIZE)[..., np.newaxis] * 2.0 - 1.0
    generator, critic = build_generator(seed), build_discriminator(seed + 1)
    g_opt = keras.optimizers.Adam(2e-4, beta_1=0.5)
    d_opt = keras.optimizers.Adam(2e-4, beta_1=0.5)
    bce = keras.losses.BinaryCrossentropy(from_logits=True)

    def step(batch: Any) -> tuple[Any, Any]:
        n = tf.shape(batch)[0]
        z = tf.random.normal((n, LATENT), seed=None)
        with tf.GradientTape() as g_tape, tf.GradientTape() as d_tape:
            fake = generator(z, training=True)
            real_logit = critic(batch, training=True)
            fake_logit = critic(fake, training=True)
            d_loss = bce(tf.fill(tf.shape(real_logit), 0.9), real_logit) + bce(
                tf.zeros_like(fake_logit), fake_logit
            )
            g_loss = bce(tf.ones_like(fake_logit), fake_logit)
        d_opt.apply_gradients(
            zip(
                d_tape.gradient(d_loss, critic.trainable_variables),
                critic.trainable_variables,
                strict=True,
            )
        )
        g_opt.apply_gradients(
            zip(
                g_tape.gradient(g_loss, generator.trainable_variables),
                generator.trainable_variables,
                strict=True,
            )
        )
        return d_loss, g_loss

    if not eager:
        step = tf.function(step)
    rng = np.random.default_rng(seed)
    history = []
    done = 0
    while done < steps:
        order = rng.permutation(len(real))
        d_sum = g_sum = 0.0
        n = 0
        for i in range(0, len(order), batch_size):
            if done >= steps:
                break
            d_loss, g_loss = step(tf.constant(real[order[i : i + batch_size]]))
            d_sum, g_sum, n, done = d_sum + float(d_loss), g_sum + float(g_loss), n + 1, done + 1
        history.append({"d_loss": d_sum / n, "g_loss": g_sum / n})
        if done >= steps or len(history) % 20 == 0:
            log.info("dcgan step %d/%d: %s", done, steps, history[-1])
    return generator, history


def sample(generator: Any, n: int, size: int, seed: int) -> np.ndarray:
    """*n* synthetic 2-D images in [0, 1], resized to ``size x size``."""
    z = np.random.default_rng(seed).standard_normal((n, LATENT)).astype(np.float32)
    fake = np.asarray(generator(z, training=False))[..., 0]
    fake = np.clip((fake + 1.0) / 2.0, 0.0, 1.0).astype(np.float32)
    return _resize_all(fake, size)


def balance_with_dcgan(
    x: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    *,
    steps: int = STEPS,
    seed: int,
    target: int | None = None,
    train_fn: Callable[..., tuple[Any, list[dict[str, float]]]] = train_dcgan,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Add DCGAN samples to the training arrays for every class below *target* images
    (default: the largest class's count). *x* is (N, s, s, c) in [0, 1] (channels replicated
    grey), *y* the class indices. Returns the new arrays, originals first, and a summary."""
    counts = np.bincount(y, minlength=n_classes)
    goal = int(target if target is not None else counts.max())
    size, channels = x.shape[1], x.shape[-1]
    new_x, new_y = [x], [y]
    info: dict[str, Any] = {"target": goal, "real": counts.tolist(), "synthetic": {}}
    for k in range(n_classes):
        missing = goal - int(counts[k])
        if counts[k] == 0 or missing <= 0:
            continue
        if missing < MIN_GAP * goal:
            info.setdefault("skipped", {})[k] = missing
            log.info("dcgan: class %d lacks only %d images: no GAN", k, missing)
            continue
        generator, history = train_fn(x[y == k][..., 0], steps=steps, seed=seed + 101 * k)
        fake = sample(generator, missing, size, seed + 7 * k)[..., np.newaxis]
        if channels > 1:
            fake = np.repeat(fake, channels, axis=-1)
        new_x.append(fake.astype(x.dtype))
        new_y.append(np.full(missing, k, dtype=y.dtype))
        info["synthetic"][k] = missing
        info.setdefault("final_losses", {})[k] = history[-1] if history else None
        log.info("dcgan: class %d: %d real + %d synthetic", k, counts[k], missing)
    return np.concatenate(new_x), np.concatenate(new_y), info


def save_sample_sheet(
    x: np.ndarray, y: np.ndarray, n_real: int, path: Any, per_row: int = 8
) -> None:
    """A PNG with, per class that got synthetic images, a row of real training images above a
    row of DCGAN samples (``x[:n_real]`` are the real ones), to judge the samples by eye."""
    rows = []
    for k in np.unique(y[n_real:]):
        real = x[:n_real][y[:n_real] == k][:per_row, ..., 0]
        fake = x[n_real:][y[n_real:] == k][:per_row, ..., 0]
        for group in (real, fake):
            tiles = list(group) + [np.zeros_like(x[0, ..., 0])] * (per_row - len(group))
            rows.append(np.concatenate(tiles, axis=1))
    if rows:
        sheet = (np.clip(np.concatenate(rows, axis=0), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        cv2.imwrite(str(path), sheet)
