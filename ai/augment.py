"""Training-time augmentation as Keras layers at the front of the model.

The layers are active only while training (``model.fit``); at inference (``predict``, the node,
Grad-CAM) they pass images through unchanged, so a saved model needs no special handling. They
take the model input, [0, 1] images, and keep it in [0, 1].

Chest images are not mirror-symmetric (heart on the left), so horizontal flips are off unless
asked for; rotations are small (a patient is never upside down).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Augmentation:
    rotation_degrees: float = 10.0  # uniform in +-degrees
    shift: float = 0.05  # fraction of height/width, uniform in +-shift
    zoom: float = 0.05  # fraction, uniform in +-zoom
    horizontal_flip: bool = False
    brightness: float = 0.1  # added brightness, fraction of the [0, 1] range
    contrast: float = 0.1  # contrast factor in [1 - contrast, 1 + contrast]
    blur: float = 0.0  # Gaussian blur, sigma up to this (pixels): sources differ in resolution
    erase: float = 0.0  # probability of blanking one patch (2-8 % of the image): markers, text

    @property
    def enabled(self) -> bool:
        return bool(
            self.rotation_degrees
            or self.shift
            or self.zoom
            or self.horizontal_flip
            or self.brightness
            or self.contrast
            or self.blur
            or self.erase
        )


def apply_augmentation(x: Any, aug: Augmentation, seed: int) -> Any:
    """Wire the augmentation layers after the symbolic tensor *x* (names start ``aug_``)."""
    from keras import layers

    if aug.rotation_degrees:
        x = layers.RandomRotation(
            aug.rotation_degrees / 360.0, fill_mode="constant", seed=seed, name="aug_rotation"
        )(x)
    if aug.shift:
        x = layers.RandomTranslation(
            aug.shift, aug.shift, fill_mode="constant", seed=seed + 1, name="aug_shift"
        )(x)
    if aug.zoom:
        x = layers.RandomZoom(aug.zoom, fill_mode="constant", seed=seed + 2, name="aug_zoom")(x)
    if aug.horizontal_flip:
        x = layers.RandomFlip("horizontal", seed=seed + 3, name="aug_flip")(x)
    if aug.brightness:
        x = layers.RandomBrightness(
            aug.brightness, value_range=(0.0, 1.0), seed=seed + 4, name="aug_brightness"
        )(x)
    if aug.contrast:
        x = layers.RandomContrast(
            aug.contrast, value_range=(0.0, 1.0), seed=seed + 5, name="aug_contrast"
        )(x)
    if aug.blur:
        x = layers.RandomGaussianBlur(
            factor=1.0,
            kernel_size=2 * max(1, round(2 * aug.blur)) + 1,
            sigma=aug.blur,
            value_range=(0.0, 1.0),
            seed=seed + 6,
            name="aug_blur",
        )(x)
    if aug.erase:
        x = layers.RandomErasing(
            factor=aug.erase,
            scale=(0.02, 0.08),
            value_range=(0.0, 1.0),
            seed=seed + 7,
            name="aug_erase",
        )(x)
    return x
