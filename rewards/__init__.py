"""Rewards: plain callables over a batch (dataset columns as keyword arguments) returning one score
per completion, or named components with the score under "reward". docs/rewards.md is the guide.

api.py        the call, `Unscored`, sync and async rewards alike
normalize.py  text normalization for scoring transcripts
asr.py        WER/CER and the `asr_wer` reward
speech.py     TTS batches' waveforms, and `speech_sanity` (speaking rate, silence, clipping)
intelligibility.py  `tts_intelligibility`: judge-ASR error rate of the generated audio (pocketsphinx or transformers)
speaker.py    `speaker_similarity`: speaker-embedding cosine to the reference voice (resemblyzer or x-vector)
quality.py    `dnsmos`: no-reference MOS (DNSMOS ONNX from speechmos)
hosted.py     `hf_classifier`: a transformers classifier from a local directory as a reward
learned.py    `learned_preference`: a reward model trained on preference pairs (rlhf/trainers/reward_model.py)
remote.py     `remote`: score on a reward server over HTTP (timeouts, retries, unscored marking)
persona_judge.py  `persona_judge`: an LLM judge of staying in character (rating-token probabilities, pairwise, cache)
persona_prompts.py what the judge is asked: rubric, anchors, cues, the card and dialogue as text
judge_backends.py where the judge runs: in-process vLLM or transformers (and the tiny test judge)
judge_endpoint.py the judge on an OpenAI-compatible server
judge_cache.py    the judge's answers cached in memory and in SQLite
persona_similarity.py  `persona_similarity`: sentence-embedding cosine of the reply and the persona card
dialogue.py   realtime `reply_length`, `latency`, and `emotion` (a team's classifier as a reward)
serve.py      the reward server behind `speechrl serve-reward`
wire.py       the JSON both speak
registry.py   find a reward by registered name, dotted path or entry point (`resolve_reward`)
combine.py    score a batch with several rewards, isolate failing samples, weight and normalize
worker.py     `RewardWorker`, in process or as Ray actors placed by the recipe's resources
"""
