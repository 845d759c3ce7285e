"""Rewards: plain callables over a batch (dataset columns as keyword arguments) returning one score
per completion, or named components with the score under "reward".

normalize.py  text normalization for scoring transcripts
asr.py        WER/CER and the `asr_wer` reward
registry.py   find a reward by registered name, dotted path or entry point (`resolve_reward`)
combine.py    score a batch with several rewards, isolate failing samples, weight and normalize
worker.py     `RewardWorker`, in process or as a Ray actor
"""
