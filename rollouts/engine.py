"""A vLLM engine hosting the policy, and Ray workers that each hold one; token in, token out.

Logprobs are vLLM's "processed_logprobs" (after temperature, top-k/top-p and `allowed_token_ids`),
the distribution actually sampled from. The trainer reproduces them only if it masks the same way and
top_p = 1 (the default); with top_p < 1 they differ by the nucleus' log-mass. Realtime's per-position
constraint is a logits processor every engine loads (rlhf/model/layout.py).
"""
from __future__ import annotations

import os
import shutil
import weakref
from pathlib import Path
from typing import Iterable

import torch

from speechrl.rlhf.core.devices import compute_dtype
from speechrl.rlhf.core.kernels import precision_report
from speechrl.rlhf.model.layout import ReplyLayout, reply_layout_processor
from speechrl.rlhf.model.mtp import MTP_DIR, MTP_PREFIX, has_heads, saved_heads
from speechrl.rollouts.lora import LoraAdapter, adapter_dir, engine_lora_rank, register_lora_model
from speechrl.rollouts.types import RolloutRequest, Sample
from speechrl.rollouts.vllm_setup import (eager_helpers_on_cpu, guard_vllm_module_scan, quiet_benign_vllm_warnings,
                                          relax_qwen2_audio_frames)

# What constrains a completion's tokens: a static list of allowed ids (ASR, TTS) or a ReplyLayout
# (realtime), None for no constraint.
Constraint = list[int] | ReplyLayout | None

LOGPROBS_MODE = "processed_logprobs"


# vLLM's weight-transfer backends a rollout.weight_transport may name (rollouts/weight_transfer.py);
# "transfer" picks the one the layout needs
WEIGHT_TRANSFER = ("nccl", "ipc", "gloo")


class RolloutWorkerDied(RuntimeError):
    """A rollout actor died mid-call (generate, or a weight sync); the driver may retry on a fresh worker."""

    def __init__(self, worker_index: int, cause: BaseException, during: str = "generate"):
        super().__init__(f"rollout worker {worker_index} died during {during} ({type(cause).__name__}: "
                         f"{str(cause).splitlines()[0] if str(cause) else ''}); start a fresh worker and retry")
        self.worker_index = worker_index


class RolloutEngine:
    """One in-process vLLM engine for a backbone directory. A plain class; also a Ray actor."""

    def __init__(self, backbone_path: str, *, kv_cache_gib: float = 1.0, gpu_memory_utilization: float = 0.5,
                 tensor_parallel_size: int = 1, enforce_eager: bool = True, max_model_len: int = 1024,
                 seed: int = 0, threads: int = 0, sleep_mode: bool = False, lora_rank: int = 0, mtp_tokens: int = 0,
                 weight_transfer: str | None = None, dtype: str = "auto"):
        """`sleep_mode` (a GPU shared with the trainer): `sleep` frees the engine's GPU memory between
        generations, `wake_up` brings it back; vLLM offers it on CUDA only. `lora_rank` > 0: the engine
        serves the policy's LoRA adapter of that rank (load_adapter); 0: no LoRA. `mtp_tokens` > 0:
        verified multi-token decoding, the backbone's first k MTP heads (`<backbone>/mtp`, model/mtp.py)
        drafting through vLLM's Medusa proposer and its rejection sampler keeping what the policy
        verifies: greedy output is plain decoding's; sampling with drafts is refused on CPU, where
        vLLM 0.32's sampler does not keep the policy's distribution (generate; docs/mtp.md).
        `weight_transfer`: a rollout.weight_transport of vLLM's weight transfer ("nccl", "ipc", "gloo";
        rollouts/weight_transfer.py): the engine takes part in the policy worker's broadcasts.
        `dtype`: rollout.dtype (`vllm_dtype`); the trainer's fp32 weights are cast as they load."""
        # Keeps the engine core in this process (and actor): load_weights hands vLLM a Python
        # iterator through collective_rpc, which cannot cross into a separate engine process.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM

        from transformers import AutoFeatureExtractor

        path = Path(backbone_path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: no config.json; not a backbone directory")
        self.sample_rate = AutoFeatureExtractor.from_pretrained(path).sampling_rate
        relax_qwen2_audio_frames()
        guard_vllm_module_scan()
        eager_helpers_on_cpu(enforce_eager)
        if not torch.cuda.is_available() and threads > 0:
            # before LLM(): vLLM's CPU worker then forbids torch.set_num_threads. In a Ray actor
            # torch starts with OMP_NUM_THREADS=1, one thread for the whole engine.
            torch.set_num_threads(threads)
        # On CPU vLLM's gpu_memory_utilization fails at start-up; a fixed KV-cache size works.
        memory = ({"gpu_memory_utilization": gpu_memory_utilization} if torch.cuda.is_available()
                  else {"kv_cache_memory_bytes": int(kv_cache_gib * 2**30)})
        self.lora, self.lora_dir = None, None  # the adapter generate uses (a LoRARequest), where it is written
        lora = {}
        if lora_rank > 0:
            register_lora_model()
            # one adapter at a time: each sync replaces the last
            lora = {"enable_lora": True, "max_lora_rank": engine_lora_rank(lora_rank), "max_loras": 1}
            self.lora_dir = adapter_dir()
            weakref.finalize(self, shutil.rmtree, self.lora_dir, ignore_errors=True)
        speculative = {}
        if mtp_tokens > 0:
            if not has_heads(path):
                raise FileNotFoundError(f"{path / MTP_DIR}: no MTP heads for rollout.mtp_tokens={mtp_tokens}; train "
                                        "them in SFT (model.mtp.num_heads) or set rollout.mtp_tokens=0")
            if (saved := saved_heads(path)) < mtp_tokens:
                raise ValueError(f"{path / MTP_DIR}: {saved} MTP heads, fewer than rollout.mtp_tokens={mtp_tokens} "
                                 f"drafts a step; set it to at most {saved}")
            from transformers import AutoConfig

            # log stats on: the acceptance counters (spec_stats) come from vLLM's metrics. vLLM reads the
            # target's vocabulary size from the top of its config, where Qwen2-Audio has none (it sits in
            # text_config): hf_overrides puts it there for this engine, the files stay as they are
            vocab = AutoConfig.from_pretrained(path).text_config.vocab_size
            speculative = {"speculative_config": {"method": "medusa", "model": str(path / MTP_DIR),
                                                  "num_speculative_tokens": mtp_tokens},
                           "disable_log_stats": False, "hf_overrides": {"vocab_size": vocab}}
        self.mtp_tokens = mtp_tokens
        transfer = {}
        if weight_transfer:
            from speechrl.rollouts.weight_transfer import register_gloo, vllm_backend

            register_gloo()  # before LLM(): the worker builds its transfer engine while loading the model
            transfer = {"weight_transfer_config": {"backend": vllm_backend(weight_transfer)}}
        self._transfer = {"joined": False, "updating": False}
        quiet_benign_vllm_warnings()  # start-up warns too; the handler's filter sees every vllm.* logger
        self.dtype = vllm_dtype(dtype)
        self.llm = LLM(model=str(path), dtype=self.dtype,
                       enforce_eager=enforce_eager, tensor_parallel_size=tensor_parallel_size,
                       limit_mm_per_prompt={"audio": 1}, max_model_len=max_model_len, seed=seed,
                       logprobs_mode=LOGPROBS_MODE,
                       # vLLM's speculative decoding takes no custom logits processor: an engine that
                       # drafts serves static constraints only (ASR, TTS), not realtime's reply layout
                       logits_processors=[] if mtp_tokens else [reply_layout_processor()],
                       **({"enable_sleep_mode": True} if sleep_mode else {}), **lora, **memory, **speculative, **transfer)
        quiet_benign_vllm_warnings()

    def sleep(self) -> None:
        """Level 1: weights to host memory, KV cache dropped (the trainer has the GPU meanwhile)."""
        self.llm.sleep(level=1)

    def wake_up(self) -> None:
        self.llm.wake_up()
        self.reset_caches()

    def ping(self) -> bool:
        return True

    def node_id(self) -> str:
        """The Ray node this engine runs on (the run's placement.json records it)."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def precision(self) -> dict[str, str]:
        """vLLM's dtype and the CPU kernels this engine computes on (placement.json)."""
        return precision_report(self.llm.model_config.dtype)  # what vLLM chose, where it was "auto"

    def generate(self, requests: list[RolloutRequest], *, n: int, temperature: float, top_p: float,
                 max_new_tokens: int, seed: int | None = None, allowed_token_ids: Constraint = None,
                 stop_token_ids: list[int] | None = None, engine_seed: int | None = None,
                 unverified_sampling: bool = False) -> list[Sample]:
        """`n` samples per request, all requests in one vLLM call; grouped by request, in order.

        `allowed_token_ids` is a list of ids or a ReplyLayout (realtime); extra stop tokens (`<|codec_end|>`)
        are kept in completion_ids. With `seed`, request i's samples use seed + i*n + j, so a batch split
        across workers (generate_across) samples exactly as one engine would. With `engine_seed`, the
        engine's own generator is reseeded first, so the call samples the same whatever the engine did
        before (a resumed run as the run it continues) where per-request seeds cannot be used.
        `unverified_sampling`: sample with MTP drafts on CPU anyway (tests of that path only).
        """
        from vllm import SamplingParams

        if engine_seed is not None:
            self.reseed(engine_seed)

        layout = allowed_token_ids if isinstance(allowed_token_ids, ReplyLayout) else None
        if self.mtp_tokens and temperature > 0 and not torch.cuda.is_available() and not unverified_sampling:
            # measured (tests/rollouts/test_mtp_decoding.py): on CPU vLLM 0.32 keeps drafts far more often
            # than the policy would sample them, so the samples are not the policy's and RL would be off-policy
            raise ValueError("rollout.mtp_tokens > 0 samples (temperature > 0) with vLLM's CPU speculative "
                             "decoding, which does not keep the policy's distribution (docs/mtp.md): on CPU "
                             "verified decoding is for greedy decoding only; set rollout.mtp_tokens=0")
        if layout and self.mtp_tokens:
            raise ValueError("a reply layout (realtime) needs the engine's logits processor, which vLLM's "
                             "speculative decoding does not take: set rollout.mtp_tokens=0 for this mode")
        static = None if layout else allowed_token_ids
        extra = layout.as_extra_args() if layout else None
        inputs, params = [], []
        for i, req in enumerate(requests):
            if req.audio is None:
                inputs.append({"prompt": req.prompt})
            elif req.sample_rate != self.sample_rate:
                raise ValueError(f"request {i}: audio at {req.sample_rate} Hz; the backbone expects "
                                 f"{self.sample_rate} Hz (resample in data/ first)")
            else:
                inputs.append({"prompt": req.prompt, "multi_modal_data": {"audio": (req.audio, req.sample_rate)}})
            params.append(SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens,
                                         logprobs=0, seed=None if seed is None else seed + i * n,
                                         # text is decoded below, from the ids: vLLM's incremental
                                         # detokenizer drops a trailing partial UTF-8 character
                                         detokenize=False, allowed_token_ids=static, extra_args=extra,
                                         stop_token_ids=stop_token_ids))
        outputs = self.llm.generate(inputs, params, use_tqdm=False, lora_request=self.lora)
        samples = []
        for i, (req, out) in enumerate(zip(requests, outputs)):
            for j, c in enumerate(out.outputs):
                ids = list(c.token_ids)
                # logprobs=0 returns just the sampled token's entry at each step
                logprobs = [step[t].logprob for step, t in zip(c.logprobs, ids)]
                samples.append(Sample(prompt_index=i, sample_index=j, prompt_ids=list(out.prompt_token_ids),
                                      completion_ids=ids, logprobs=logprobs, text="",
                                      finish_reason=c.finish_reason, metadata=dict(req.metadata)))
        texts = self.llm.get_tokenizer().batch_decode([s.completion_ids for s in samples], skip_special_tokens=True)
        for s, text in zip(samples, texts):
            s.text = text
        return samples

    def reseed(self, seed: int) -> None:
        """Reseed the generator vLLM samples requests without a seed of their own from (torch's
        default generator, in every worker process of the engine).

        Per-request seeds would do this without touching the engine, but vLLM 0.32 on CPU fails on
        them once it splits a prefill ("CPU Generator does not use offset": a CPU generator has no
        Philox offset to rewind), so reseeding the shared generator before a call is what works on
        every device."""
        self.llm.collective_rpc(_seed_torch, args=(seed % 2**63,))

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace weights in place; names in the hub layout (model/backbone.py's hub_state_dict).

        A fused vLLM layer (qkv_proj, gate_up_proj) must get all its parts, or the missing ones come back
        uninitialized. Caches are dropped: reload_weights leaves the encoder cache's index stale, and the
        next request with the same audio fails "Encoder cache miss". It also unloads LoRA adapters; the
        next generate reloads the current one from its directory (vLLM loads a requested adapter it lacks).
        """
        named_tensors = list(named_tensors)
        heads = [(k[len(MTP_PREFIX):], v) for k, v in named_tensors if k.startswith(MTP_PREFIX)]
        policy = [(k, v) for k, v in named_tensors if not k.startswith(MTP_PREFIX)]
        if policy:  # an in-place reload with nothing in it would leave every layer unloaded
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(policy)})
        if heads and self.mtp_tokens:  # the drafter keeps its first mtp_tokens heads; the rest go unused
            self.llm.collective_rpc(_load_drafter, args=(heads,))
        self.reset_caches()

    # vLLM's weight-sync calls, for the policy worker's client (rollouts/weight_transfer.py: EnginesClient).
    # An update a failed sync left open is closed before the next group or update begins: the sync that
    # follows a failure sends every weight again before anything is generated.
    def init_weight_transfer_engine(self, request: dict) -> None:
        self._close_open_update()
        if self._transfer["joined"]:
            self.llm.shutdown_weight_transfer_engine()
        self.llm.init_weight_transfer_engine(request)
        self._transfer["joined"] = True

    def start_weight_update(self) -> None:
        self._close_open_update()
        self.llm.start_weight_update()
        self._transfer["updating"] = True

    def update_weights(self, request: dict) -> None:
        try:
            self.llm.update_weights(request)
        except BaseException:
            self._transfer["updating"] = False  # vLLM's worker has ended the update
            raise

    def finish_weight_update(self) -> None:
        self.llm.finish_weight_update()
        self._transfer["updating"] = False
        self.reset_caches()  # as after load_weights: vLLM's weight transfer resets neither cache

    def _close_open_update(self) -> None:
        if self._transfer["updating"]:
            self.finish_weight_update()

    def spec_stats(self) -> dict:
        """Verified decoding's counters since the engine started (vLLM's spec-decode metrics): drafting
        steps, and per draft position how many of them kept it. Empty without mtp_tokens."""
        if not self.mtp_tokens:
            return {}
        drafts, per_position = 0, [0] * self.mtp_tokens
        for metric in self.llm.get_metrics():
            if metric.name == "vllm:spec_decode_num_drafts":
                drafts = int(metric.value)
            elif metric.name == "vllm:spec_decode_num_accepted_tokens_per_pos":
                per_position = [int(v) for v in metric.values]
        return {"drafts": drafts, "accepted_per_position": per_position}

    def load_adapter(self, adapter: LoraAdapter) -> None:
        """Serve `adapter` (rollouts/lora.py) from the next generate on, in place of the last one.

        vLLM 0.32 loads adapters from a directory only (LoRARequest has no tensors; the in-memory route
        is internal API), so the adapter, which reached this engine by value (from any node), is written
        to this engine's own tmpfs directory and loaded through the public add_lora. Each version gets a
        new name: prefix-cache blocks are keyed by the adapter's name and path, not its weights, so a
        reused name would serve KV computed under the old adapter. The encoder cache stays valid: the
        audio tower carries no adapter.
        """
        from vllm.lora.request import LoRARequest

        if self.lora_dir is None:
            raise RuntimeError("load_adapter: this engine was started without LoRA; start it with lora_rank="
                               "model.lora.r (make_rollout_workers(..., lora_rank=...))")
        old, version = self.lora, (self.lora.lora_int_id + 1 if self.lora else 1)
        path = adapter.save(self.lora_dir / f"v{version}")
        request = LoRARequest(f"policy-v{version}", version, str(path))
        self.llm.llm_engine.add_lora(request)  # loads now: a bad adapter fails the sync, not the next generate
        self.lora = request
        if old is not None:
            self.llm.llm_engine.remove_lora(old.lora_int_id)
            shutil.rmtree(old.lora_path, ignore_errors=True)

    def reset_caches(self) -> None:
        """Forget cached prompts (prefix KV cache) and encoded audio (encoder cache)."""
        self.llm.llm_engine.reset_encoder_cache()
        self.llm.reset_prefix_cache()


def _load_drafter(worker, heads: list) -> None:
    """The MTP heads' new weights into the engine's Medusa drafter (collective_rpc passes the worker).
    Through vLLM's in-place reload, as the policy's weights: it also redoes what loading derives from
    the weights (on CPU the linear layers' packed copies; a plain load_weights leaves them stale)."""
    from vllm.model_executor.model_loader.reload.inplace import reload_weights

    reload_weights(worker.model_runner.vllm_config, worker.model_runner.drafter.model, weights_iterator=iter(heads),
                   weights_path=None, is_checkpoint_format=True)


def _seed_torch(worker, seed: int) -> None:
    """Run in each of an engine's worker processes (collective_rpc passes the worker first)."""
    torch.manual_seed(seed)  # seeds every CUDA device too


def vllm_dtype(name: str) -> str:
    """vLLM's `dtype` for rollout.dtype `name`: on a GPU "auto" is vLLM's own choice, as it always was;
    on CPU the policy's rule (core/devices.py: compute_dtype), bf16 only where this engine's kernels
    compute it natively, else fp32."""
    if name == "auto" and torch.cuda.is_available():
        return "auto"
    chosen = compute_dtype(name, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    return {torch.float32: "float32", torch.bfloat16: "bfloat16"}[chosen]


def _with_env(options: dict, env: dict[str, str]) -> dict:
    """Ray `options` with `env` added to its runtime_env's variables (the placement's own, such as
    run.cpu_kernels' native kernels, win where both set one)."""
    runtime = dict(options.get("runtime_env") or {})
    runtime["env_vars"] = {**env, **runtime.get("env_vars", {})}
    return {**options, "runtime_env": runtime}


def make_rollout_workers(backbone_path: str, cfg, num_workers: int, seed: int,
                         placement: list[dict] | None = None, sleep_mode: bool = False, lora_rank: int = 0,
                         weight_transfer: str | None = None) -> list:
    """Start `num_workers` Ray actors, each holding one RolloutEngine (`cfg`: a RolloutConfig).

    `placement[k]`: worker k's Ray options (resources, placement-group bundle and run.cpu_kernels'
    runtime_env, from the run's layout: rlhf/workers/placement.py); without it each asks for a CPU, and
    `tensor_parallel_size` GPUs where the cluster has any, and inherits this process's kernels. `sleep_mode`: the engines share their GPU with the trainer
    (RolloutEngine.sleep). `lora_rank` > 0 (a LoRA run's model.lora.r): the engines serve the
    policy's adapter (RolloutEngine.load_adapter). `weight_transfer` ("nccl", "ipc", "gloo"): the
    engines join the policy worker's weight-transfer group (rollouts/weight_transfer.py). On CPU the engine uses `cfg.threads_per_worker`
    threads (0: the machine's cores shared among workers; generation and training take turns, so they
    do not compete). Returns once every engine is up, so start-up errors surface here, not at the first generate.
    """
    import ray

    if placement is None:
        gpus = cfg.tensor_parallel_size if ray.cluster_resources().get("GPU", 0) > 0 else 0
        placement = [{"num_cpus": 1, "num_gpus": gpus}] * num_workers
    # the run's engine count, not this call's: a replacement for one dead engine (num_workers=1) must
    # compute with the threads its predecessor had, or its floats, and the run, drift (the soak found it)
    threads = cfg.threads_per_worker or max(1, (os.cpu_count() or 1) // max(cfg.num_workers, num_workers))
    actor = ray.remote(RolloutEngine)
    workers = [actor.options(**_with_env(placement[k], {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"})).remote(
                   str(backbone_path), kv_cache_gib=cfg.kv_cache_gib, gpu_memory_utilization=cfg.gpu_memory_utilization,
                   tensor_parallel_size=cfg.tensor_parallel_size, enforce_eager=cfg.enforce_eager,
                   max_model_len=cfg.max_model_len, seed=(seed + k) % 2**32, threads=threads,  # numpy's range
                   sleep_mode=sleep_mode, lora_rank=lora_rank, mtp_tokens=cfg.mtp_tokens,
                   weight_transfer=weight_transfer, dtype=cfg.dtype)
               for k in range(num_workers)]
    ray.get([w.ping.remote() for w in workers])
    return workers


def generate_across(workers: list, requests: list[RolloutRequest], *, n: int, temperature: float,
                    top_p: float, max_new_tokens: int, seed: int | None = None,
                    allowed_token_ids: Constraint = None, stop_token_ids: list[int] | None = None,
                    engine_seed: int | None = None) -> list[Sample]:
    """Split requests into contiguous chunks, one per worker; samples come back in global order.
    With `engine_seed`, worker k's engine is reseeded with engine_seed + k first (RolloutEngine.generate)."""
    import ray
    from ray.exceptions import RayActorError

    if not workers:
        raise ValueError("generate_across: no rollout workers")
    size = -(-len(requests) // len(workers))  # ceil: the last worker may get fewer
    chunks = [(k, k * size) for k in range(len(workers)) if k * size < len(requests)]
    futures = [workers[k].generate.remote(requests[start:start + size], n=n, temperature=temperature,
                                          top_p=top_p, max_new_tokens=max_new_tokens,
                                          seed=None if seed is None else seed + start * n,
                                          allowed_token_ids=allowed_token_ids, stop_token_ids=stop_token_ids,
                                          engine_seed=None if engine_seed is None else engine_seed + k)
               for k, start in chunks]
    samples = []
    for (k, start), future in zip(chunks, futures):
        try:
            part = ray.get(future)
        except RayActorError as e:
            raise RolloutWorkerDied(k, e) from e
        for s in part:
            s.prompt_index += start
        samples.extend(part)
    return samples
