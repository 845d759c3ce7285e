"""The driver's side of the policy workers: starting one Ray actor per trainer rank, and the client
that sends every call to all of them and combines what they return (workers/policy_worker.py)."""
from __future__ import annotations

from pathlib import Path

from speechrl.rlhf.algos.batch import TrainBatch
from speechrl.rlhf.core.config import RecipeConfig, RunStopped
from speechrl.rlhf.core.run_dir import resume_hint
from speechrl.rlhf.model.layout import ReplyLayout
from speechrl.rlhf.workers.policy_worker import PolicyWorker
from speechrl.rlhf.workers.ranks import rank0_address


def make_policy_workers(cfg: RecipeConfig, backbone_path: str, checkpoint: str | None = None, *,
                        allowed_ids: list[int] | ReplyLayout, reference: bool = False, critic: bool = False,
                        options: list[dict] | None = None) -> list:
    """The policy worker of each trainer rank as a Ray actor; `options`: each rank's resources and bundle
    (workers/placement.py), one per rank (default: train.num_ranks actors of a CPU each)."""
    import ray

    options = options or [{"num_cpus": 1, "num_gpus": 0} for _ in range(cfg.train.num_ranks)]
    world = len(options)
    address = rank0_address(options[0]) if world > 1 else None
    return [ray.remote(PolicyWorker).options(max_concurrency=1, **o).remote(
        cfg, str(backbone_path), checkpoint, allowed_ids=allowed_ids, reference=reference, critic=critic,
        rank=rank, world=world, address=address) for rank, o in enumerate(options)]


class PolicyClient:
    """The driver's handle on the policy workers: plain calls (each waits for its result), so the
    updates and modes that use it need not know they are Ray actors, or how many ranks there are.
    Every call goes to every rank; results are rank 0's, or the ranks' combined (train, values)."""

    def __init__(self, actors: list, run_dir=None):
        self.actors, self.run_dir = list(actors), run_dir

    def train(self, batch: TrainBatch) -> dict:
        results = self._all("train", batch)
        # train/* are each rank's part of the batch's weighted sums; grad_norm and lr are the same on all
        out = dict(results[0])
        for key in {k for r in results for k in r}:
            if key.startswith("train/"):
                out[key] = sum(r.get(key, 0.0) for r in results)
            elif key.startswith("perf/"):
                out[key] = max(r.get(key, 0.0) for r in results)
        return out

    def values(self, batch: TrainBatch) -> dict:
        results = self._all("values", batch)
        out = {"values": [None] * len(batch), "ref_logprobs": None if results[0]["ref_logprobs"] is None
               else [None] * len(batch)}
        for r in results:
            for j, row in enumerate(r["rows"]):
                out["values"][row] = r["values"][j]
                if out["ref_logprobs"] is not None:
                    out["ref_logprobs"][row] = r["ref_logprobs"][j]
        return out

    def with_model(self, fn, *args):
        return self._all("with_model", fn, *args)[0]

    def weights(self):
        return self._all("weights")[0]

    def stored_weights(self):
        return self._all("stored_weights")[0]

    def connect_engines(self, engines: list, transport: str, tp_sizes: list[int]) -> None:
        self._all("connect_engines", engines, transport, tp_sizes)

    def push_weights(self):
        return self._all("push_weights")[0]

    def save(self, path: str) -> None:
        self._all("save", path)

    def save_final(self, path: str) -> str:
        return self._all("save_final", path)[0]

    def ping(self) -> bool:
        return all(self._all("ping"))

    def node_ids(self) -> list[str]:
        return self._all("node_id")

    def precisions(self) -> list[dict]:
        return self._all("precision")

    def _all(self, method: str, *args) -> list:
        """`method(*args)` on every rank, their results in rank order. A dead policy worker took its
        weights and optimizer state since the last checkpoint with it, so nothing is retried: the run
        stops, saying where to resume from. Its peers would wait in a collective for it, so they go too."""
        import ray
        from ray.exceptions import RayActorError

        if len(args) == 1 and len(self.actors) > 1 and isinstance(args[0], TrainBatch):
            args = (ray.put(args[0]),)  # one copy in the object store for all ranks
        refs = [getattr(a, method).remote(*args) for a in self.actors]
        pending = list(refs)
        try:
            while pending:  # as they finish, so a dead rank is seen while its peers still wait on it
                done, pending = ray.wait(pending, num_returns=1)
                ray.get(done)
            return ray.get(refs)
        except RayActorError as e:
            for actor in self.actors:
                ray.kill(actor)
            where = resume_hint(Path(self.run_dir)) if self.run_dir else "continue with --resume"
            raise RunStopped(f"a policy worker died ({type(e).__name__}); its weights and optimizer state since "
                             f"the last checkpoint are lost; {where}") from e
