"""Where an online run's actors go: one Ray placement group for the policy worker and the engines.

Two layouts (`ray.layout`), which differ only where the cluster has GPUs:

- **colocated**: each trainer rank (train.num_ranks) shares a GPU with the engines placed on it (the
  rank half of it, the engines the other half between them). The phases take turns, so on GPU the
  engines sleep (vLLM's sleep mode frees their weights and KV cache) while the policy trains. Needs
  one GPU per rank and rollout.tensor_parallel_size=1.
- **separate**: each trainer rank has a GPU of its own, each engine `rollout.tensor_parallel_size`.

On a CPU cluster both reserve one CPU per actor. Reward workers are placed by their own `resources`
(rewards/worker.py). Before anything is reserved the request is checked against the cluster: a
bundle no node can hold, or more than the cluster has, is a RecipeError naming what is missing;
then the group must be ready within ray.placement_timeout_s (other jobs may hold the resources),
never a silent wait.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from speechrl.rlhf.core.config import RecipeConfig, RecipeError
from speechrl.rlhf.core.kernels import actor_env

COLOCATED_POLICY_GPU = 0.5  # the policy worker's share of a colocated GPU; the engines split the rest


@dataclass
class Placement:
    """The run's placement group and the Ray options that put each actor in its bundle."""

    bundles: list[dict]
    policies: list[dict]  # ray .options() of each trainer rank's policy worker
    engines: list[dict]  # of engine k; a replacement engine k gets the same
    layout: str
    group: Optional[object] = None  # ray.util.placement_group.PlacementGroup once reserved

    @property
    def on_gpu(self) -> bool:
        return any(b.get("GPU", 0) for b in self.bundles)

    @property
    def engines_sleep(self) -> bool:
        """Engines free their GPU memory while the policy trains: a shared GPU with a real CUDA build
        under it (logical GPUs on a CPU machine, as the tests use, have no memory to free)."""
        import torch

        return self.layout == "colocated" and self.on_gpu and torch.cuda.is_available()

    def options(self, which: dict) -> dict:
        """`which` (a rank's or an engine's options) with the scheduling strategy of its bundle."""
        if self.group is None:
            return dict(which)
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        out = {k: v for k, v in which.items() if k != "bundle"}
        out["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            self.group, placement_group_bundle_index=which["bundle"], placement_group_capture_child_tasks=True)
        return out


def plan(cfg: RecipeConfig, cluster_gpus: float, policy: bool = True, one_node: bool = True) -> Placement:
    """The bundles and actor options of the recipe's layout on a cluster with `cluster_gpus` GPUs: a
    bundle per trainer rank (train.num_ranks), then the engines'. `policy=False` (evaluating a checkpoint
    on the engines): no policy worker, no room kept for it. Under `run.cpu_kernels: native` the policy
    workers and engines get the CPU's own kernels through their runtime_env (core/kernels.py; ATen's
    too where the cluster is `one_node`, this machine, whose CPU the driver can see)."""
    placement = _layout(cfg, cluster_gpus, policy)
    env = actor_env(cfg.run.cpu_kernels, one_node)
    if env:
        for options in (*placement.policies, *placement.engines):
            options["runtime_env"] = {"env_vars": dict(env)}
    return placement


def _layout(cfg: RecipeConfig, cluster_gpus: float, policy: bool) -> Placement:
    layout, workers, tp = cfg.ray.layout, cfg.rollout.num_workers, cfg.rollout.tensor_parallel_size
    ranks = cfg.train.num_ranks if policy else 0
    if cluster_gpus <= 0:  # CPU: a CPU per actor, whatever the layout
        bundles = [{"CPU": 1} for _ in range(ranks + workers)]
        return Placement(bundles, [{"num_cpus": 1, "num_gpus": 0, "bundle": r} for r in range(ranks)],
                         [{"num_cpus": 1, "num_gpus": 0, "bundle": ranks + k} for k in range(workers)], layout)
    if layout == "colocated":
        if tp != 1:
            raise RecipeError(f"ray.layout=colocated shares one GPU between the policy and the engines, so "
                              f"rollout.tensor_parallel_size must be 1 (it is {tp}); use ray.layout=separate "
                              "for tensor-parallel engines")
        # a GPU per rank (one without a policy), each shared by its rank and every gpus-th engine
        gpus = max(ranks, 1)
        on = [sum(1 for k in range(workers) if k % gpus == g) for g in range(gpus)]
        bundles = [{"GPU": 1, "CPU": (1 if g < ranks else 0) + on[g]} for g in range(gpus)]
        return Placement(bundles,
                         [{"num_cpus": 1, "num_gpus": COLOCATED_POLICY_GPU, "bundle": r} for r in range(ranks)],
                         [{"num_cpus": 1, "num_gpus": (1 - COLOCATED_POLICY_GPU) / on[k % gpus], "bundle": k % gpus}
                          for k in range(workers)], layout)
    bundles = [{"GPU": 1, "CPU": 1} for _ in range(ranks)] + [{"GPU": tp, "CPU": 1} for _ in range(workers)]
    return Placement(bundles, [{"num_cpus": 1, "num_gpus": 1, "bundle": r} for r in range(ranks)],
                     [{"num_cpus": 1, "num_gpus": tp, "bundle": ranks + k} for k in range(workers)], layout)


def check_fits(cfg: RecipeConfig, placement: Placement, totals: dict, nodes: list[dict]) -> None:
    """RecipeError unless the cluster (`totals`: ray.cluster_resources(); `nodes`: each alive node's
    resources) can hold the placement and the rewards' own resources beside it."""
    what = (f"ray.layout={placement.layout}: train.num_ranks={len(placement.policies)} policy worker(s) and "
            f"rollout.num_workers={cfg.rollout.num_workers} "
            f"engine(s) x rollout.tensor_parallel_size={cfg.rollout.tensor_parallel_size}")
    rewards = {"CPU": sum(r.resources.num_cpus * r.resources.replicas for r in cfg.rewards),
               "GPU": sum(r.resources.num_gpus * r.resources.replicas for r in cfg.rewards)}
    for kind in ("GPU", "CPU"):
        need = sum(b.get(kind, 0) for b in placement.bundles) + rewards[kind]
        have = totals.get(kind, 0)
        if need > have + 1e-9:
            extra = f" (+{rewards[kind]:g} for rewards' resources)" if rewards[kind] else ""
            fix = ("use ray.layout=colocated, lower rollout.num_workers, or add GPU nodes" if kind == "GPU"
                   else "set ray.num_cpus higher, lower rollout.num_workers, or add nodes")
            raise RecipeError(f"{what} need {need:g} {kind}s{extra} but the Ray cluster has {have:g}; {fix}")
    for i, bundle in enumerate(placement.bundles):
        if not any(all(node.get(k, 0) >= v for k, v in bundle.items()) for node in nodes):
            largest = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)), default={})
            raise RecipeError(f"{what}: bundle {i} needs {_fmt(bundle)} on one node, but the largest node has "
                              f"{_fmt({k: largest.get(k, 0) for k in bundle})}; lower "
                              "rollout.tensor_parallel_size or use nodes with more GPUs")


def reserve(cfg: RecipeConfig, policy: bool = True) -> Placement:
    """The recipe's placement group, checked and ready (call after start_ray)."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    totals = ray.cluster_resources()
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    # this machine alone (no ray.address: the cluster start_ray started, or the caller's): its CPU is the driver's
    placement = plan(cfg, totals.get("GPU", 0), policy, one_node=len(nodes) == 1 and not cfg.ray.address)
    check_fits(cfg, placement, totals, nodes)
    group = placement_group(placement.bundles, strategy=cfg.ray.placement_strategy)
    ready, _ = ray.wait([group.ready()], timeout=cfg.ray.placement_timeout_s)
    if not ready:
        remove_placement_group(group)
        free = ray.available_resources()
        raise RecipeError(f"ray.layout={placement.layout}: the placement group {_fmt_list(placement.bundles)} "
                          f"(strategy {cfg.ray.placement_strategy}) was not ready after "
                          f"ray.placement_timeout_s={cfg.ray.placement_timeout_s:g} s; the cluster has "
                          f"{_fmt({k: free.get(k, 0) for k in ('CPU', 'GPU')})} free (other jobs may hold the "
                          "rest; `ray status` shows them)")
    placement.group = group
    return placement


def release(placement: Optional[Placement]) -> None:
    """Give the group back (a remote cluster keeps it otherwise until the job ends)."""
    if placement is None or placement.group is None:
        return
    import ray
    from ray.util.placement_group import remove_placement_group

    if ray.is_initialized():
        remove_placement_group(placement.group)
    placement.group = None


def _fmt(resources: dict) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in resources.items()) + "}"


def _fmt_list(bundles: list[dict]) -> str:
    return "[" + ", ".join(_fmt(b) for b in bundles) + "]"
