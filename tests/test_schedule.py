"""The schedule: its modes, its checks, and its counts against real meta-training runs.

`Schedule.steps_for` is checked twice: against counts derived by hand from
the modes' definitions (REFERENCE.md: Leap/Reptile/FOMAML meta-update once
per K-step trajectory; CTS every `every` steps; CTS "accurate" after
trajectories of length 1, 2, .., K, 1, ..), and against the number of
meta-updates `MetaModel.fit` actually makes in that many train steps.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfmeta
from tfmeta import ContinualTrajectoryShifting, Leap, MetaModel, Reptile
from tfmeta.schedule import AfterUpdate, Schedule
from tfmeta.validation import ConfigError


def test_modes_are_typed_and_compare_to_their_names():
    assert Schedule().after_update is AfterUpdate.RESET
    shift = Schedule(2, "shift", reset_optimizer=False)
    assert shift.after_update is AfterUpdate.SHIFT and shift.after_update == "shift"
    assert shift.shifts and not Schedule().shifts
    assert Schedule(after_update=AfterUpdate.GROW) == Schedule(after_update="grow")
    # the public names keep working
    assert tfmeta.Schedule is Schedule and tfmeta.learners.Schedule is Schedule


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(after_update="rest"), r"after_update='rest'\) is not a mode: choose one of 'reset', 'shift', 'grow'"),
        (dict(after_update="shift"), r"give update_every an integer >= 1, got None"),
        (dict(update_every=0, after_update="shift"), r"give update_every an integer >= 1, got 0"),
        (dict(update_every=2), r"update_every applies to after_update='shift' only.*leave update_every=None"),
        (dict(update_every=1, after_update="grow"), r"update_every applies to after_update='shift' only"),
    ],
)
def test_invalid_schedules_say_what_to_change(kwargs, message):
    with pytest.raises(ConfigError, match=message) as raised:
        Schedule(**kwargs)
    assert len(str(raised.value).splitlines()) == 1


# Counts by hand, from each mode's definition.
@pytest.mark.parametrize(
    "schedule, K, S, updates, inner, chunks",
    [
        (Schedule(), 4, 2, 3, 3 * 4, 6),                                  # one per trajectory
        (Schedule(), 4, 4, 1, 4, 1),
        (Schedule(2, "shift"), 4, 2, 5, 5 * 2, 5),                        # every 2 steps
        (Schedule(1, "shift"), 3, 1, 7, 7, 7),
        (Schedule(after_update="grow"), 3, 1, 4, 1 + 2 + 3 + 1, 7),       # lengths 1, 2, 3, 1
        (Schedule(after_update="grow"), 3, 1, 6, 2 * (1 + 2 + 3), 12),
        (Schedule(), 10, 3, 1, 10, 4),                                    # a partial last chunk
    ],
)
def test_counts_match_the_definitions(schedule, K, S, updates, inner, chunks):
    assert schedule.inner_steps_for(updates, K) == inner
    assert schedule.steps_for(updates, K, S) == chunks


def test_period_and_first_length():
    assert (Schedule().period(5), Schedule().first_length(5)) == (5, 5)
    assert (Schedule(1, "shift").period(5), Schedule(1, "shift").first_length(5)) == (1, 5)
    grow = Schedule(after_update="grow")
    assert (grow.period(5), grow.first_length(5)) == (1, 1)


def test_due_and_after_follow_each_mode():
    K = 3
    # reset: due at the trajectory's end, then position 0
    assert not bool(Schedule().due(tf.constant(2), tf.constant(K)))
    assert bool(Schedule().due(tf.constant(3), tf.constant(K)))
    position, length = Schedule().after(tf.constant(3), tf.constant(K), K)
    assert (int(position), int(length)) == (0, K)
    # shift: due every 2 steps; tasks restart (position 0) only after K steps
    shift = Schedule(1, "shift")
    assert bool(shift.due(tf.constant(2), tf.constant(K)))
    assert [int(shift.after(tf.constant(p), tf.constant(K), K)[0]) for p in (1, 2, 3)] == [1, 2, 0]
    # grow: the next trajectory is one step longer, K wraps to 1
    grow = Schedule(after_update="grow")
    assert [int(grow.after(tf.constant(n), tf.constant(n), K)[1]) for n in (1, 2, 3)] == [2, 3, 1]


def test_chunk_and_k_checks_name_the_fix():
    with pytest.raises(ConfigError, match=r"does not divide the meta-update period of 4 steps.*steps_per_chunk=1"):
        Schedule().check_chunk(3, inner_steps=4)
    Schedule().check_chunk(2, inner_steps=4)
    with pytest.raises(ConfigError, match="choose K as a multiple"):
        Schedule(2, "shift").check_inner_steps(3)


@pytest.mark.parametrize(
    "learner, K, S, updates",
    [
        (Leap, 2, 1, 2),
        (lambda: ContinualTrajectoryShifting(Reptile(), every=2), 4, 2, 3),
        (lambda: ContinualTrajectoryShifting(Reptile(), shift="accurate"), 3, 1, 4),
    ],
    ids=["reset", "shift", "grow"],
)
def test_steps_for_gives_exactly_the_meta_updates_of_fit(learner, K, S, updates):
    """`steps_for(n)` train steps make n meta-updates; one step fewer makes n - 1."""
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    meta = MetaModel(model)
    meta.compile(optimizer=keras.optimizers.SGD(0.1), inner_optimizer=keras.optimizers.SGD(0.1),
                 loss="mse", learner=learner(), inner_steps=K)
    steps = meta.steps_for(updates, steps_per_chunk=S)
    assert steps == meta.schedule.steps_for(updates, K, S)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(steps, 2, S, 3, 2)).astype("float32")
    y = rng.normal(size=(steps, 2, S, 3, 1)).astype("float32")
    counts = []

    class Count(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            counts.append(int(meta.meta_updates.numpy()))

    meta.fit(tf.data.Dataset.from_tensor_slices((x, y)), verbose=0, callbacks=[Count()])
    assert counts[-1] == updates
    assert counts[-2] == updates - 1
