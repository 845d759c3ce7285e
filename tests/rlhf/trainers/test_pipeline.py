"""The async rollout producer's ordering (trainers/pipeline.py), with plain callables in place of the
engines: which weights each batch was sampled with, the staleness bound, drops, errors, evaluation."""
from __future__ import annotations

import threading
import time

import pytest

from speechrl.rlhf.trainers.pipeline import RolloutPipeline


class Engines:
    """Records what the producer did, in order; `gate` (if set) holds a batch until it is opened."""

    def __init__(self):
        self.weights = "v0"
        self.events: list[tuple] = []
        self.lock = threading.Lock()
        self.gates: dict[int, threading.Event] = {}

    def produce(self, step):
        with self.lock:
            self.events.append(("produce", step, self.weights))
        if step in self.gates:
            assert self.gates[step].wait(10), f"batch {step} was never let through"
        return [f"prompts {step}"], [f"samples {step} by {self.weights}"], f"scores {step}", {"generate": 0.0}

    def load(self, weights):
        with self.lock:
            self.events.append(("load", weights))
        self.weights = weights


def train(pipeline: RolloutPipeline, steps: int, start: int = 0, on_update=None):
    """The loop's side: take a batch, 'update', publish the next version. Returns what it trained on."""
    trained = []
    for step in range(start, steps):
        item, dropped = pipeline.take(step)
        trained.append((step, item.step, item.version, dropped, item.samples[0]))
        if on_update:
            on_update(step)
        pipeline.publish(step + 1, f"v{step + 1}")
    pipeline.close()
    return trained


def test_max_staleness_0_samples_every_batch_with_the_weights_of_the_step_that_trains_it():
    engines = Engines()
    pipeline = RolloutPipeline(engines.produce, engines.load, start_step=0, end_step=4, max_staleness=0).start()
    trained = train(pipeline, 4)
    assert [(s, b, v, d) for s, b, v, d, _ in trained] == [(0, 0, 0, 0), (1, 1, 1, 0), (2, 2, 2, 0), (3, 3, 3, 0)]
    assert [samples for *_, samples in trained] == ["samples 0 by v0", "samples 1 by v1", "samples 2 by v2",
                                                    "samples 3 by v3"]
    # the synchronous loop's order: load the new weights, then sample the next batch, one at a time
    assert engines.events == [("produce", 0, "v0"), ("load", "v1"), ("produce", 1, "v1"), ("load", "v2"),
                              ("produce", 2, "v2"), ("load", "v3"), ("produce", 3, "v3")]


def test_max_staleness_1_samples_the_next_batch_during_the_update_and_never_lags_more():
    engines = Engines()
    pipeline = RolloutPipeline(engines.produce, engines.load, start_step=0, end_step=5, max_staleness=1).start()
    overlapped = []

    def update(step):  # the next batch is made while this step "updates"
        deadline = time.monotonic() + 10
        while not any(e[:2] == ("produce", step + 1) for e in engines.events) and step + 1 < 5:
            assert time.monotonic() < deadline, f"batch {step + 1} was not started during update {step}"
            time.sleep(0.01)
        overlapped.append(step)

    trained = train(pipeline, 5, on_update=update)
    assert overlapped == [0, 1, 2, 3, 4]
    staleness = [s - v for s, _, v, _, _ in trained]
    assert staleness == [0, 1, 1, 1, 1] and not any(d for *_, d, _ in trained)
    assert [b for _, b, *_ in trained] == [0, 1, 2, 3, 4], "wait mode trains every batch, in order"


def test_a_larger_bound_lets_the_producer_run_further_ahead_but_no_further():
    engines = Engines()
    pipeline = RolloutPipeline(engines.produce, engines.load, start_step=0, end_step=6, max_staleness=2).start()
    time.sleep(0.3)  # nothing published yet: batches 0, 1 and 2 only (version 0 is 2 behind batch 2)
    assert [e[1] for e in engines.events if e[0] == "produce"] == [0, 1, 2]
    trained = train(pipeline, 6)
    assert max(s - v for s, _, v, _, _ in trained) == 2


def test_drop_mode_never_waits_and_drops_batches_older_than_the_bound():
    engines = Engines()
    engines.gates = {1: threading.Event()}
    pipeline = RolloutPipeline(engines.produce, engines.load, start_step=0, end_step=None, max_staleness=0,
                               on_stale="drop").start()
    item, dropped = pipeline.take(0)
    assert (item.step, item.version, dropped) == (0, 0, 0)
    # batch 1 is already being sampled with v0 while step 0 "updates"; when it arrives it is 1 behind
    deadline = time.monotonic() + 10
    while ("produce", 1, "v0") not in engines.events:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    pipeline.publish(1, "v1")
    engines.gates[1].set()
    item, dropped = pipeline.take(1)
    assert dropped == 1 and item.step == 2 and item.version == 1 and item.samples == ["samples 2 by v1"]
    assert pipeline.dropped == 1
    pipeline.close()


def test_a_producer_error_is_raised_in_the_trainers_thread():
    def produce(step):
        if step == 1:
            raise RuntimeError("engine 0 died for good")
        return [], [], None, {}

    pipeline = RolloutPipeline(produce, lambda w: None, start_step=0, end_step=3, max_staleness=1).start()
    assert pipeline.take(0)[0].step == 0
    with pytest.raises(RuntimeError, match="engine 0 died for good"):
        pipeline.take(1)
    pipeline.close()


def test_evaluation_gets_the_engines_alone_with_the_newest_weights():
    engines = Engines()
    pipeline = RolloutPipeline(engines.produce, engines.load, start_step=0, end_step=3, max_staleness=0).start()
    pipeline.take(0)
    pipeline.publish(1, "v1")  # the producer may take the engines first (to sample batch 1) or not
    with pipeline.engines():  # between steps: the producer may not touch the engines meanwhile
        assert engines.weights == "v1"
        held = list(engines.events)
        time.sleep(0.2)
        assert engines.events == held
    pipeline.close()


def test_close_stops_a_producer_waiting_for_the_trainer():
    engines = Engines()
    pipeline = RolloutPipeline(engines.produce, engines.load, start_step=0, end_step=10, max_staleness=0).start()
    pipeline.take(0)
    pipeline.close()  # it waits for version 1, which never comes
    pipeline.thread.join(timeout=5)
    assert not pipeline.thread.is_alive()


@pytest.mark.parametrize("kwargs, match", [(dict(max_staleness=-1), "max_staleness"),
                                           (dict(max_staleness=1, on_stale="reweight"), "on_stale")])
def test_bad_settings_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RolloutPipeline(lambda s: None, lambda w: None, start_step=0, end_step=1, **kwargs)


def test_drop_mode_stops_making_batches_once_the_last_version_is_published():
    engines = Engines()
    pipeline = RolloutPipeline(engines.produce, engines.load, start_step=0, end_step=2, max_staleness=0,
                               on_stale="drop").start()
    trained = train(pipeline, 2)  # takes batches 0 and 1 (or later ones), publishes v1 and v2, closes
    assert len(trained) == 2
    pipeline.thread.join(timeout=5)
    assert not pipeline.thread.is_alive(), "the producer stopped after the run's last version"
