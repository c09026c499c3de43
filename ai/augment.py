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

    @property
    def enabled(self) -> bool:
        return bool(
            self.rotation_degrees
            or self.shift
            or self.zoom
            or self.horizontal_flip
            or self.brightness
            or self.contrast
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
    return x
