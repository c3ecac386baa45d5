"""Seeded image augmentation for task streams: Leap's random affine transform.

Every parameter is drawn with stateless random ops from the seed handed to
the callable, so a task stream's augmentation is reproducible.

Example::

    augment = random_affine(rotation=180.0)
    out = augment(tf.zeros([8, 28, 28, 1]), seed=tf.constant([0, 1]))
"""

from __future__ import annotations

import math

import tensorflow as tf

__all__ = ["RandomAffine", "random_affine"]

# Philox explicitly: "auto_select" may pick a different generator on another
# device, and a seed must mean the same stream everywhere.
_ALG = "philox"


def _pair(name, value, widen, unit):
    """`value` as a `(low, high)` pair of finite floats (a number through `widen`), else a
    ValueError naming `unit`: a string would be split into characters, silently."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = widen(float(value))
    try:
        pair = tuple(float(v) for v in value) if not isinstance(value, str) else ()
    except (TypeError, ValueError):
        pair = ()
    if len(pair) != 2 or not all(math.isfinite(v) for v in pair):
        raise ValueError(f"{name}={value!r} must be a number or a (low, high) pair of numbers "
                         f"({unit}).")
    return pair


class RandomAffine:
    """Seeded random affine augmentation of a batch of images (see `random_affine`)."""

    def __init__(self, rotation=180.0, translation=0.2, scale=(0.8, 1.2), fill_value=0.0,
                 interpolation="bilinear"):
        self.rotation = _pair("rotation", rotation, lambda r: (-r, r), "degrees, e.g. 180")
        self.translation = _pair("translation", translation, lambda t: (t, t),
                                 "a fraction of the image size, e.g. 0.2")
        self.scale = _pair("scale", scale, lambda s: (s, s), "zoom factors, e.g. (0.8, 1.2)")
        if min(self.scale) <= 0:
            raise ValueError(f"scale factors must be positive, got {self.scale}.")
        if not all(0 <= t < 1 for t in self.translation):
            # A shift of the whole image or more leaves it blank (77 % of the
            # digits at translation=2), and training goes on silently.
            raise ValueError(
                f"translation={translation!r} is a fraction of the image size (Leap: 0.2), "
                "not pixels: give values in [0, 1).")
        self.fill_value = float(fill_value)
        if interpolation.lower() not in ("bilinear", "nearest"):
            raise ValueError(f"interpolation must be 'bilinear' or 'nearest', got {interpolation!r}.")
        self.interpolation = interpolation.upper()

    def __repr__(self):
        return (
            f"random_affine(rotation={self.rotation}, translation={self.translation}, "
            f"scale={self.scale}, fill_value={self.fill_value})"
        )

    def __call__(self, images, seed, rows=None):
        """Transform `images` (float `[N, H, W, C]`) with parameters drawn from `seed` ([2] ints).

        `rows=(offset, total)` says that `images` are rows `offset..offset+N-1`
        of a batch of `total` images: they get exactly the transforms those
        rows get in `self(batch, seed)`. A worker's share of a task batch is
        augmented that way (`ClassificationTasks.as_dataset(task_shard=...)`).
        """
        images = tf.convert_to_tensor(images)
        height, width = int(images.shape[1]), int(images.shape[2])
        n = tf.shape(images)[0]
        offset, total = (0, n) if rows is None else rows
        # The transforms of all `total` rows are computed, then sliced: the
        # same element-wise math on a shorter vector can round differently.
        u = tf.random.stateless_uniform(
            tf.stack([total, 4]), tf.cast(seed, tf.int64), dtype=tf.float32, alg=_ALG
        )

        def between(column, low, high):
            return low + u[:, column] * (high - low)

        angle = between(0, *self.rotation) * (math.pi / 180.0)
        factor = between(1, *self.scale)
        tx = between(2, -self.translation[0], self.translation[0]) * width
        ty = between(3, -self.translation[1], self.translation[1]) * height
        # The op maps each *output* pixel to the input point it samples, so it
        # takes the inverse of "scale and rotate about the centre, then shift":
        # input = R(-angle) (output - centre - shift) / factor + centre.
        cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
        cos, sin = tf.cos(angle) / factor, tf.sin(angle) / factor
        x0, y0 = cx + tx, cy + ty
        zeros = tf.zeros_like(cos)
        transforms = tf.stack(
            [cos, sin, cx - cos * x0 - sin * y0, -sin, cos, cy + sin * x0 - cos * y0, zeros, zeros],
            axis=1,
        )[offset:offset + n]
        out = tf.raw_ops.ImageProjectiveTransformV3(
            images=images,
            transforms=transforms,
            output_shape=tf.constant([height, width], tf.int32),
            fill_value=tf.constant(self.fill_value, images.dtype),
            interpolation=self.interpolation,
            fill_mode="CONSTANT",
        )
        return tf.ensure_shape(out, images.shape)


def random_affine(rotation=180.0, translation=0.2, scale=(0.8, 1.2), fill_value=0.0,
                  interpolation="bilinear") -> RandomAffine:
    """Leap's Omniglot augmentation: a random rotation, shift and zoom per image.

    Leap's code uses torchvision's `RandomAffine((0, 360), (0.2, 0.2), (0.8, 1.2))`:
    an angle uniform in [0, 360) degrees (the same distribution as
    `rotation=180.0`, i.e. uniform in [-180, 180]), shifts uniform in
    +-20% of the width and height, and a zoom factor uniform in [0.8, 1.2].
    Here every parameter is drawn with stateless random ops from the seed
    handed to the callable, so augmentation is reproducible.

    Args:
        rotation: degrees; a number r means uniform in [-r, r], a pair
            (low, high) uniform in it.
        translation: largest shift as a fraction of the image size (one
            number, or (x, y)).
        scale: (low, high) zoom factor range (> 1 enlarges).
        fill_value: value of pixels that come from outside the image. 0 is
            the background of Omniglot as tfmeta stores it (strokes bright);
            torchvision also fills with 0, which in Leap's white-background
            images draws black corners.
        interpolation: "bilinear" or "nearest".

    Returns:
        A callable `augment(images, seed) -> images` for float `[N, H, W, C]`
        images and a `[2]` integer seed.

    Example::

        augment = random_affine(rotation=180.0)
        out = augment(tf.zeros([8, 28, 28, 1]), seed=tf.constant([0, 1]))
    """
    return RandomAffine(rotation, translation, scale, fill_value, interpolation)
