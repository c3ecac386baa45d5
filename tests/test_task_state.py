"""TaskState: every task's state stacked in variables, restarted from phi, read and written whole.

Checked against values computed by hand from the wrapped model: a restart
gives phi (and the model's BatchNorm statistics) to every task, the seed
states of task t are the model's plus [first + t, 0], a task keeps its
written state when it does not restart, and a diverged task's inner
optimizer slots restart even when the schedule keeps the others'.
"""

import keras
import numpy as np
import tensorflow as tf

from tfmeta import Leap, Reptile
from tfmeta.inner_optimizer import make_stateless
from tfmeta.schedule import Schedule
from tfmeta.task_state import TaskState


def _model():
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((3,)), keras.layers.BatchNormalization(), keras.layers.Dropout(0.5, seed=4),
        keras.layers.Dense(2),
    ])


def _state(learner, num_tasks=3, momentum=0.9):
    model = _model()
    optimizer = make_stateless(keras.optimizers.SGD(0.1, momentum=momentum))
    optimizer.build(model.trainable_variables)
    owner = keras.layers.Layer(name="owner")
    return model, optimizer, TaskState(owner, model, optimizer, learner, num_tasks)


def _seed_index(model):
    return next(i for i, v in enumerate(model.non_trainable_variables)
                if v.path.endswith("seed_generator_state"))


def test_variables_are_stacked_per_task_with_stable_names():
    model, optimizer, state = _state(Leap())
    assert [v.shape for v in state.params] == [(3, *v.shape) for v in model.trainable_variables]
    assert len(state.optimizer) == len(optimizer.variables)
    assert state.variables == state.params + state.non_trainable + state.optimizer + state.learner_state
    assert state.params[0].path == "owner/task_state/params_0"
    assert state.learner_state[0].path == "owner/task_state/learner_0"


def test_restart_gives_phi_and_one_seed_stream_per_global_task():
    model, _, state = _state(Reptile())
    params, non_trainable, _, _ = state.read(restart=tf.constant(True), first=5)
    for stacked, phi in zip(params, model.trainable_variables):
        np.testing.assert_array_equal(stacked.numpy(), np.stack([phi.numpy()] * 3))
    i = _seed_index(model)
    seed = model.non_trainable_variables[i].numpy()
    expected = np.stack([seed + np.array([5 + t, 0], seed.dtype) for t in range(3)])
    np.testing.assert_array_equal(non_trainable[i].numpy(), expected)
    # global task 0's seed state comes back from this replica's first task (global 5)
    np.testing.assert_array_equal(state.first_task_state(i, non_trainable[i], 5).numpy(), seed)


def test_written_state_is_read_back_unless_the_task_restarts():
    model, _, state = _state(Reptile())
    tasks = state.read(restart=tf.constant(True), first=0)
    moved = tf.nest.map_structure(lambda v: v + tf.cast(1, v.dtype), tasks)
    state.write(moved)
    kept = state.read(restart=tf.constant(False), first=0)
    for a, b in zip(tf.nest.flatten(kept), tf.nest.flatten(moved)):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    restarted = state.read(restart=tf.constant(True), first=0)
    np.testing.assert_array_equal(restarted[0][0].numpy(),
                                  np.stack([model.trainable_variables[0].numpy()] * 3))
    # the view of one task slices every leaf
    one = TaskState.task(restarted, 1)
    assert one[0][0].shape == model.trainable_variables[0].shape


def test_kept_optimizer_slots_restart_only_for_diverged_tasks():
    learner = Reptile()
    learner.schedule = Schedule(1, "shift", reset_optimizer=False)  # CTS without hard_reset
    _, optimizer, state = _state(learner)
    tasks = state.read(restart=tf.constant(True), first=0)
    slots = [i for i, v in enumerate(optimizer.variables) if "momentum" in v.path]
    opt = [v.numpy().copy() for v in tasks[2]]
    for i in slots:
        opt[i] = np.full_like(opt[i], 0.5)
    opt[slots[0]][1] = np.nan  # task 1 diverged
    state.write((tasks[0], tasks[1], opt, tasks[3]))
    restarted = state.read(restart=tf.constant(True), first=0)[2]
    initial = [v.numpy() for v in optimizer.variables]
    for i in slots:
        np.testing.assert_array_equal(restarted[i].numpy()[[0, 2]], np.full_like(opt[i][[0, 2]], 0.5))
        np.testing.assert_array_equal(restarted[i].numpy()[1], initial[i])
    # without a restart even the diverged task keeps its (NaN) slots
    assert np.isnan(state.read(restart=tf.constant(False), first=0)[2][slots[0]].numpy()[1]).any()
