"""orthorecall.host_data: many seeds' numpy streams drawn ahead in worker processes give
exactly the batches, and the resumable states, of the streams drawn one by one."""

from __future__ import annotations

import json

import numpy as np
import pytest

from orthorecall import data, host_data

TASK = data.NoisyRecallTask(vocab_size=24, seq_len=16, noise_vocab_size=4, frac_noise=0.5)
SEEDS = (3, 4, 9)


def _sequential(seeds, batches, batch_size=2):
    streams = [data.ReferenceTrainingStream(TASK, seed=s, batch_size=batch_size) for s in seeds]
    drawn = [[stream.next_batch() for stream in streams] for _ in range(batches)]
    return drawn, [s.state() for s in streams]


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_and_states_equal_the_streams_drawn_one_by_one(workers):
    drawn, states_after = _sequential(SEEDS, 3)
    with host_data.ParallelStreams(TASK, seeds=SEEDS, batch_size=2, workers=workers) as streams:
        assert streams.workers == workers
        for step in range(3):
            inputs, targets = streams.next_batches()
            assert inputs.shape == targets.shape == (3, 2, 15) and inputs.dtype == np.int32
            np.testing.assert_array_equal(inputs, np.stack([b[0] for b in drawn[step]]))
            np.testing.assert_array_equal(targets, np.stack([b[1] for b in drawn[step]]))
        # The states of the batches returned, not of those drawn ahead; JSON-able.
        assert json.loads(json.dumps(streams.states())) == json.loads(json.dumps(states_after))
        assert streams.batches_returned == 3 and streams.wait_seconds >= 0


def test_resuming_from_states_continues_every_stream():
    drawn, _ = _sequential(SEEDS, 4)
    with host_data.ParallelStreams(TASK, seeds=SEEDS, batch_size=2, workers=2) as streams:
        streams.next_batches()
        saved = json.loads(json.dumps(streams.states()))  # as a checkpoint keeps them
    with host_data.ParallelStreams.from_states(saved, workers=1) as resumed:
        for step in (1, 2, 3):
            inputs, _ = resumed.next_batches()
            np.testing.assert_array_equal(inputs, np.stack([b[0] for b in drawn[step]]))


def test_after_close_batches_are_drawn_in_this_process():
    drawn, _ = _sequential(SEEDS[:1], 2)
    streams = host_data.ParallelStreams(TASK, seeds=SEEDS[:1], batch_size=2, workers=1)
    streams.next_batches()
    streams.close()
    streams.close()
    np.testing.assert_array_equal(streams.next_batches()[0], drawn[1][0][0][None])


def test_invalid_arguments_are_refused():
    with pytest.raises(ValueError, match="at least one seed"):
        host_data.ParallelStreams(TASK, seeds=[], batch_size=2)
    with pytest.raises(ValueError, match="workers"):
        host_data.ParallelStreams(TASK, seeds=[1], batch_size=2, workers=-1)
    with pytest.raises(ValueError):
        host_data.ParallelStreams.from_states([{"config": {}}], workers=0)


def test_workers_that_die_leave_the_batches_to_this_process():
    drawn, states_after = _sequential(SEEDS, 2)
    streams = host_data.ParallelStreams(TASK, seeds=SEEDS, batch_size=2, workers=2)
    try:
        # Killed while they start (importing takes them a second): the first batches
        # cannot have been drawn yet.
        for process in list(streams._pool._processes.values()):
            process.kill()
            process.join()
        with pytest.warns(RuntimeWarning, match="drawing it in this process"):
            inputs, _ = streams.next_batches()
        np.testing.assert_array_equal(inputs, np.stack([b[0] for b in drawn[0]]))
        assert streams.workers == 0
        np.testing.assert_array_equal(streams.next_batches()[0], np.stack([b[0] for b in drawn[1]]))
        assert json.loads(json.dumps(streams.states())) == json.loads(json.dumps(states_after))
    finally:
        streams.close()
