"""Asynchronous rollouts: the next steps' batches are generated and scored while the trainer updates.

One producer thread in the driver plays the rollout and scoring phases of batch j, j+1, ... on the
engines and the reward worker (Ray actors: the thread mostly waits in `ray.get`, so the GIL is free)
while the loop's own thread prepares advantages and trains. The policy's weights have a *version*:
the number of updates made (the loop's step). After each update the loop `publish`es the new version's
weights (a reference into Ray's object store); the producer loads the latest published weights into
the engines before it starts a batch, never during one (a realtime episode's turns all come from one
version). A batch trained at version v that was sampled at version u has staleness v - u.

`on_stale: wait` bounds it: batch j is not started before version j - max_staleness is published, so
no batch is older than the bound and none is wasted; with max_staleness 0 this is the synchronous loop,
sample for sample. `on_stale: drop` never makes the producer wait for a version (only for room in
its queue of max_staleness + 1 batches), and the loop drops a batch older than the bound when it takes
it; the producer stops once the trainer has published the run's last version.

Why our own thread and not a library: the phases are Ray calls already (vLLM engines and reward
workers are actors), so the overlap needs only an ordering of those calls with a version counter;
verl's and AReaL's async trainers do the same inside their own (non-speech) loops.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

log = logging.getLogger(__name__)


@dataclass
class Rollout:
    """One batch as the producer made it."""
    step: int  # which batch of prompts (the mode's rollout(step)); without drops, the step that trains it
    version: int  # the policy version the engines held while sampling it
    requests: list
    samples: list
    scores: Any
    seconds: dict = field(default_factory=dict)  # the producer's own phase times (generate, score, sync)


class PipelineStopped(RuntimeError):
    """The producer was closed while the loop waited for a batch."""


class RolloutPipeline:
    """`produce(step)` -> (requests, samples, scores, seconds) runs in the producer thread with the engines
    held (it calls `load(weights)` first when a newer version is published); `load(weights)` sends
    weights to the engines. `start_step`: the first batch, and the version the engines hold now."""

    def __init__(self, produce: Callable[[int], tuple], load: Callable[[Any], None], *, start_step: int,
                 end_step: Optional[int], max_staleness: int, on_stale: str = "wait"):
        if max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {max_staleness}")
        if on_stale not in ("wait", "drop"):
            raise ValueError(f"on_stale must be 'wait' or 'drop', got {on_stale!r}")
        self.produce, self.load = produce, load
        self.max_staleness, self.on_stale = max_staleness, on_stale
        # wait: batches are never dropped, so the producer makes exactly the ones the run trains on;
        # drop: it makes batches until the trainer has published its last version (end_step)
        self.end_step = end_step
        self.next_step = start_step
        self.published = start_step  # the newest version the trainer has made
        self.weights: Any = None  # its weights (None: the engines hold them already)
        self.engine_version = start_step
        self.engine_lock = threading.Lock()  # one user of the engines at a time: the producer or evaluation
        self.changed = threading.Condition()
        self.batches: queue.Queue = queue.Queue(maxsize=max_staleness + 1)
        self.stopping = False
        self.dropped = 0
        self.thread = threading.Thread(target=self._run, name="rollout-producer", daemon=True)

    def start(self) -> "RolloutPipeline":
        self.thread.start()
        return self

    # --- the loop's side ------------------------------------------------------------------------
    def publish(self, version: int, weights: Any) -> None:
        """The trainer made `version` (its weights: what the transport sends to the engines)."""
        with self.changed:
            self.published, self.weights = version, weights
            self.changed.notify_all()

    def take(self, version: int) -> tuple[Rollout, int]:
        """The next batch the trainer at `version` may use, and how many older batches were dropped
        to reach it. A producer error is raised here, in the loop's thread."""
        dropped = 0
        while True:
            item = self._get()
            if isinstance(item, BaseException):
                raise item
            if version - item.version <= self.max_staleness:
                return item, dropped
            dropped += 1
            self.dropped += 1
            log.info("dropped batch %d: sampled at version %d, the trainer is at %d (rollout.async.max_staleness=%d)",
                     item.step, item.version, version, self.max_staleness)

    def _get(self):
        while True:
            try:
                return self.batches.get(timeout=1.0)
            except queue.Empty:
                if not self.thread.is_alive():
                    raise PipelineStopped("the rollout producer stopped without a batch for the trainer")

    @contextmanager
    def engines(self):
        """The engines alone, with the latest published weights: for an evaluation between steps."""
        with self.engine_lock:
            self._catch_up()
            yield

    def close(self, timeout: float = 120.0) -> None:
        """Stop the producer and wait for the batch it is making (its engines must not be killed under
        it: a dead engine would be replaced after the run's cleanup). Past `timeout` s, it is left."""
        with self.changed:
            self.stopping = True
            self.changed.notify_all()
        while True:  # unblock a producer waiting to queue a batch
            try:
                self.batches.get_nowait()
            except queue.Empty:
                break
        if self.thread.is_alive():
            log.info("waiting for the rollout producer to finish its batch")
            self.thread.join(timeout=timeout)

    # --- the producer ---------------------------------------------------------------------------
    def _catch_up(self) -> Optional[float]:
        """Load the newest published weights into the engines if they hold older ones (the engine
        lock held); the seconds it took, or None when they were current."""
        with self.changed:
            version, weights = self.published, self.weights
        if version == self.engine_version:
            return None
        began = time.perf_counter()
        self.load(weights)
        self.engine_version = version
        return time.perf_counter() - began

    def _run(self) -> None:
        try:
            while self._more():
                step = self.next_step
                with self.changed:
                    while (self.on_stale == "wait" and self.published < step - self.max_staleness
                           and not self.stopping):
                        self.changed.wait()
                    if self.stopping:
                        return
                with self.engine_lock:
                    synced = self._catch_up()
                    version = self.engine_version
                    requests, samples, scores, seconds = self.produce(step)
                if synced is not None:
                    seconds = {**seconds, "sync": synced}
                self._put(Rollout(step, version, requests, samples, scores, seconds))
                self.next_step += 1
        except BaseException as e:  # noqa: BLE001 - handed to the loop's thread, which raises it
            if not self.stopping:
                self._put(e)

    def _more(self) -> bool:
        """Whether a next batch may be needed: wait mode makes exactly end_step - start_step batches;
        drop mode makes them until the last version is published (dropped ones are replaced)."""
        if self.stopping or self.end_step is None:
            return not self.stopping
        if self.on_stale == "wait":
            return self.next_step < self.end_step
        with self.changed:
            return self.published < self.end_step

    def _put(self, item) -> None:
        while not self.stopping:
            try:
                self.batches.put(item, timeout=0.5)
                return
            except queue.Full:
                continue
