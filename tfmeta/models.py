"""Model factories used by the experiments (plain Keras models)."""

import keras

layers = keras.layers


def convnet(num_classes=20, input_shape=(28, 28, 1), filters=64, blocks=4, batchnorm_momentum=0.9):
    """Leap's Omniglot network: blocks x [Conv 3x3, MaxPool 2, BatchNorm, ReLU] -> Dense.

    `batchnorm_momentum=0.9` is PyTorch's default (0.1 there), which the Leap
    code uses; Keras' own default, 0.99, leaves the moving statistics stale
    after the ~100 steps of a fine-tuning run.

    Example:
        >>> model = convnet(num_classes=20)            # the paper's width
        >>> small = convnet(num_classes=20, filters=32)
    """
    model = keras.Sequential([keras.Input(input_shape)], name="convnet")
    for _ in range(blocks):
        model.add(layers.Conv2D(filters, 3, padding="same"))
        model.add(layers.MaxPooling2D(2, padding="same"))
        model.add(layers.BatchNormalization(momentum=batchnorm_momentum))
        model.add(layers.ReLU())
    model.add(layers.Flatten())
    model.add(layers.Dense(num_classes, name="head"))
    return model


def mlp(num_classes=10, input_shape=(8, 8, 1), units=(64, 64)):
    """A small multi-layer perceptron on flattened inputs.

    Example:
        >>> model = mlp(num_classes=5, input_shape=(8, 8, 1))
    """
    model = keras.Sequential([keras.Input(input_shape), layers.Flatten()], name="mlp")
    for width in units:
        model.add(layers.Dense(width, activation="relu"))
    model.add(layers.Dense(num_classes, name="head"))
    return model
