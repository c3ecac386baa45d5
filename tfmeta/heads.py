"""The head of a model: find it, cut the model at its input, or replace it.

The head is the model's last layer when it is a Dense layer producing the
model's only output (Sequential and functional models); subclassed models
have no layer graph to cut. A head that meta-learning leaves out (per-task
heads, `tfmeta.TaskHeads`) is marked so that exports record that its
weights are not meta-learned (`mark_not_meta_learned`, `head_meta_learned`).

Example::

    from tfmeta.heads import features_model

    trunk = features_model(model)   # model input -> head input, same layers
"""

from __future__ import annotations

import weakref

import keras

__all__ = ["features_model", "find_head", "head_meta_learned", "mark_not_meta_learned", "with_new_head"]

# Head layers whose weights meta-learning leaves out, for exports that get
# only the model. Weak, so that an entry goes when its model does.
_NOT_META_LEARNED = weakref.WeakSet()


def find_head(model):
    """`(head, features)`: the last Dense layer and its input tensor, or `TypeError` saying why not.

    `features` is the head's input in the call that produces the model's
    output, so any built Sequential or functional model qualifies, however
    it was built (on an `Input`, by `build(input_shape)`, by `clone_model`).

    Example::

        head, features = find_head(model)   # features: the head's input tensor
    """
    old_head = model.layers[-1] if model.layers else None
    if not isinstance(old_head, keras.layers.Dense):
        raise TypeError(
            "the head can be replaced only when the model's last layer is a "
            f"Dense head (got {type(old_head).__name__}): end the model with "
            "keras.layers.Dense, or keep its head (load_initialization with "
            "num_classes=None) and add your own"
        )
    outputs = getattr(model, "outputs", None)
    if not outputs:
        raise TypeError(
            f"{type(model).__name__} is a subclassed model: its head cannot be "
            "rewired. Load with num_classes=None (or head='keep') "
            "and build the new head in the model class, e.g. by constructing it "
            "with num_classes and copying the other layers' weights."
        )
    history = getattr(outputs[0], "_keras_history", None) if len(outputs) == 1 else None
    if history is None or history.operation is not old_head:
        raise TypeError(
            "the head can be replaced only in single-output models "
            "whose output is produced by their last Dense layer"
        )
    # The call of the head that made the model's output: a layer called in
    # several graphs (a clone_model'd Sequential rebuilt by build(input_shape),
    # a layer reused in another model) has a node per call, and
    # `old_head.input` / `.output` are only the first call's.
    node = old_head._inbound_nodes[history.node_index]
    return old_head, node.input_tensors[0]


def features_model(model):
    """The model from its input to its head's input (same layers), or None if it has no clear head.

    Example::

        penultimate = features_model(model)(x, training=False)
    """
    try:
        _, features = find_head(model)
    except TypeError:
        return None  # e.g. subclassed: exported without the features endpoints
    return keras.Model(model.inputs[0], features, name=f"{model.name}_features")


def with_new_head(model, num_classes):
    """`model` with a fresh head of `num_classes` units (the old head's config otherwise).

    Example::

        five_way = with_new_head(model, 5)
    """
    old_head, features = find_head(model)
    new_head = keras.layers.Dense.from_config({**old_head.get_config(), "units": num_classes})
    if isinstance(model, keras.Sequential):
        inputs = model.inputs[0]
        input_layer = keras.Input(batch_shape=inputs.shape, dtype=inputs.dtype)
        return keras.Sequential([input_layer, *model.layers[:-1], new_head], name=model.name)
    # `model.input` keeps the structure the model was built on (one tensor, a
    # list, a dict); `model.inputs` is always a list, and a model built on a
    # list warns when it is called on a single array.
    return keras.Model(model.input, new_head(features), name=model.name)


def mark_not_meta_learned(head):
    """Record that meta-learning leaves the weights of the layer `head` out (`TaskHeads.bind` does).

    Example::

        mark_not_meta_learned(model.layers[-1])
        head_meta_learned(model)               # False
    """
    _NOT_META_LEARNED.add(head)


def head_meta_learned(model):
    """False when `model`'s head was marked by `mark_not_meta_learned`, else True.

    Models without a head tfmeta can find (`find_head`) count as meta-learned
    whole.

    Example::

        export_info["head_meta_learned"] = head_meta_learned(model)
    """
    try:
        head, _ = find_head(model)
    except TypeError:
        return True
    return head not in _NOT_META_LEARNED
