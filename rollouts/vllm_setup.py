"""What every vLLM engine of the project needs around its start-up (the rollout engines and the
judges' engines alike): the Qwen2-Audio schema relaxation for short audio windows, the guard on
vLLM's module scan, eager sampler helpers on CPU, and filters for the warnings vLLM-CPU repeats on
every step."""
from __future__ import annotations

import logging

import torch

_QWEN2_AUDIO_PATCHED = False


def relax_qwen2_audio_frames() -> None:
    """Let vLLM accept audio windows shorter than Whisper's 30 s.

    vLLM 0.32's Qwen2AudioFeatureInputs schema pins 3000 mel frames, but the encoder it runs
    (transformers' Qwen2AudioEncoder) only needs frames == 2 * max_source_positions. Our tiny
    backbones use a 4 s window (400 frames), so the frame axis is made symbolic. Idempotent.
    """
    global _QWEN2_AUDIO_PATCHED
    if _QWEN2_AUDIO_PATCHED:
        return
    from typing import Annotated

    from vllm.model_executor.models import qwen2_audio
    from vllm.utils.tensor_schema import TensorShape

    fields = qwen2_audio.Qwen2AudioFeatureInputs.__annotations__
    fields["input_features"] = Annotated[torch.Tensor | list[torch.Tensor], TensorShape("na", "nmb", "nf")]
    fields["feature_attention_mask"] = Annotated[torch.Tensor, TensorShape("na", "nf")]
    _QWEN2_AUDIO_PATCHED = True


def guard_vllm_module_scan() -> None:
    """Let an engine start in a process that has imported numba (librosa does). Idempotent.

    vLLM 0.32's start-up scan calls `vars(value).get(...)` on every module attribute; llvmlite's `ffi.lib`
    answers `__dict__` with a non-dict and the scan dies with AttributeError. Such attributes are set
    aside during the scan and restored after; vLLM's logic is untouched.
    """
    import sys

    from vllm.triton_utils import dispatcher

    original = dispatcher._rebind_kernels
    if getattr(original, "speechrl_guarded", False):
        return

    def guarded(overrides):
        hidden = []
        for module in list(sys.modules.values()):
            namespace = getattr(module, "__dict__", None)
            if not isinstance(namespace, dict):
                continue
            for attr, value in list(namespace.items()):
                try:  # exactly what the scan does with each attribute
                    scannable = not hasattr(value, "__dict__") or vars(value).get("kernel") is not Ellipsis
                except Exception:  # noqa: BLE001 - whatever would crash the scan is set aside
                    scannable = False
                if not scannable:
                    hidden.append((namespace, attr, value))
                    del namespace[attr]
        try:
            return original(overrides)
        finally:
            for namespace, attr, value in hidden:
                namespace[attr] = value

    guarded.speechrl_guarded = True
    dispatcher._rebind_kernels = guarded


class _DropMessages(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(f in record.getMessage() for f in self.fragments)


def eager_helpers_on_cpu(enforce_eager: bool = True) -> None:
    """On CPU, with `enforce_eager`, run vLLM's torch.compile'd helpers eagerly in this process.

    An eager engine never compiles its model, yet vLLM 0.32 still wraps a sampler helper in
    torch.compile (`batched_count_greater_than`: the rank of each returned logprob, which every
    rollout asks for). On CPU that is Inductor: a g++ build in every engine process, again for each new
    batch shape, 1.5 to 6 CPU-seconds an engine (measured: a first generate of 1.5 s warm cache, 6.2 s
    cold, 0.05 s eager). The helper counts integers, so eager gives the same numbers. Nothing else in
    an engine's process uses torch.compile; GPU engines, and CPU engines that opt out of eager, keep
    vLLM's compiled helpers."""
    if enforce_eager and not torch.cuda.is_available():
        import torch._dynamo as dynamo  # (a plain `import torch._dynamo` would make `torch` local here)

        dynamo.config.disable = True


def quiet_benign_vllm_warnings() -> None:
    """Messages vLLM-CPU repeats on every step, none a fault: its engine replaces
    torch.set_num_threads (and warns at each call from the feature extractor), rotary embeddings
    have no weights to reload, and every weight sync reports itself. Everything else is kept."""
    drop = _DropMessages(("doesn't allow to use `torch.set_num_threads`", "RotaryEmbedding: Failed to load",
                          # a weight sync after every step logs these two lines; the driver times the sync itself
                          "Reloading weights inplace", "Reloading and processing weights took",
                          "Successfully reset prefix cache",
                          # a bf16 engine (rollout.dtype) loading the trainer's fp32 weights casts them, as it should
                          "into parameter with dtype torch.bfloat16"))
    loggers = [logging.getLogger("vllm")] + [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
                                              if name.startswith("vllm.")]
    for target in [*logging.getLogger("vllm").handlers, *loggers]:
        if not any(isinstance(f, _DropMessages) for f in target.filters):  # called before and after start-up
            target.addFilter(drop)
