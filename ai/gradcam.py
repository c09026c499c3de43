"""Grad-CAM (Selvaraju et al., 2017): where in the image the predicted class's evidence lies.

Pure: a Keras model and a batch in, heatmaps in [0, 1] out. The target layer is the model's last
convolutional feature map, named in the model's metadata.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def build_grad_model(model: Any, layer_name: str) -> Any:
    """A model that returns the target layer's activations and the class scores."""
    import keras

    layer = model.get_layer(layer_name)
    return keras.Model(model.inputs, [layer.output, model.output])


def gradcam(grad_model: Any, x: np.ndarray, class_index: np.ndarray | None = None) -> np.ndarray:
    """Heatmaps of shape (N, h, w) in [0, 1] for the batch *x*.

    *class_index* gives each image's target class; by default the predicted one.
    """
    import tensorflow as tf

    inputs = tf.convert_to_tensor(x, dtype=tf.float32)
    with tf.GradientTape() as tape:
        activations, probs = grad_model(inputs, training=False)
        if class_index is None:
            class_index = np.argmax(probs.numpy(), axis=-1)
        idx = tf.constant(np.asarray(class_index).reshape(-1), dtype=tf.int32)
        scores = tf.gather(probs, idx, axis=1, batch_dims=1)
    grads = tape.gradient(scores, activations)
    weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
    cams = tf.nn.relu(tf.reduce_sum(weights * activations, axis=-1)).numpy()
    out = np.zeros_like(cams, dtype=np.float32)
    for i, cam in enumerate(cams):
        peak = float(cam.max())
        out[i] = cam / peak if peak > 0 else cam
    return out
