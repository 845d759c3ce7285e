"""Codecs: the flat id layout, the backbone token map, the embedded codec on real speech (judged by
pocketsphinx), and tiny random transformers codecs (EnCodec, DAC, Mimi) loaded from a local path."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from speechrl.data.audio import load_audio
from speechrl.rollouts.codec import CodecTokens, flatten_codes, load_codec, unflatten_ids, vocab_size
from speechrl.rollouts.mel_codec import MelCodecConfig, MelUnitCodec

SR = 16000


def test_flat_ids_interleave_frames_with_codebook_offsets():
    codes = np.array([[3, 5, 7], [1, 0, 511]])  # 2 codebooks x 3 frames
    ids = flatten_codes(codes, 512)
    assert ids.tolist() == [3, 513, 5, 512, 7, 1023]
    assert (unflatten_ids(ids, 2, 512, "t") == codes).all()
    with pytest.raises(ValueError, match="not a whole number of frames"):
        unflatten_ids([1, 2, 3], 2, 512, "t")
    with pytest.raises(ValueError, match=r"id 3 at position 1 is outside codebook 1's range \[512, 1024\)"):
        unflatten_ids([1, 3], 2, 512, "t")
    with pytest.raises(ValueError, match="no codec ids"):
        unflatten_ids([], 2, 512, "t")


@pytest.fixture(scope="module")
def codec_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def codec(codec_cache):
    """The embedded codec as shipped: fit on espeak-ng Harvard sentences, cached, loaded back."""
    from speechrl.rollouts.mel_codec import default_codec

    fitted = default_codec(codec_cache)
    loaded = default_codec(codec_cache)  # the second call loads what the first saved
    assert (loaded.codebooks == fitted.codebooks).all() and len(list(codec_cache.glob("codecs/mel-*"))) == 1
    return loaded


def test_the_codec_fit_repeats_byte_for_byte_in_a_one_thread_process(codec, codec_cache, tmp_path):
    """Two machines with other core counts fit the same codec: its file is the same bytes."""
    import os
    import subprocess
    import sys

    from speechrl.rollouts.mel_codec import cache_directory

    code = "import sys; from speechrl.rollouts.mel_codec import default_codec; default_codec(sys.argv[1])"
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    ours, theirs = (cache_directory(c, MelCodecConfig()) / MelUnitCodec.FILE for c in (codec_cache, tmp_path))
    assert ours.read_bytes() == theirs.read_bytes()


@pytest.mark.parametrize("smooth_frames", [3])
def test_embedded_codec_round_trip_keeps_the_words(codec, smooth_frames, shared_data):
    """Real speech (an LJSpeech clip) through the codec: pocketsphinx's transcript of the decoded
    audio is nearer its own sentence than to any other. The codec is fit on espeak-ng, so on real
    voices it loses much (benchmarks/codec_roundtrip.py measures how much); it must not lose all.
    Only with smoothing: unsmoothed (WER 0.92 on the real clips) the margin is within the run-to-run
    spread of espeak-ng fits, and a fresh-clone CI run failed it (CER 0.74 vs 0.71 for another text)."""
    from speechrl.rewards.registry import resolve_reward

    codec = MelUnitCodec(replace(codec.config, smooth_frames=smooth_frames), codec.codebooks, codec.mean_logmel)

    clip = load_audio(shared_data / "real_speech" / "misc" / "LJ050-0131.wav", SR)
    text = "unless a system is established for the frequent formal review of activities thereunder. in this regard"
    others = [p.read_text().strip() for p in sorted((shared_data / "real_speech" / "librivox").glob("*.txt"))]
    ids = codec.encode(clip, SR)
    assert ids.dtype == np.int64 and len(ids) == 2 * (len(clip) // 256 + 1)  # centred frames, 2 codebooks
    assert 0 <= ids.min() and ids.max() < vocab_size(codec) == 1024
    audio = codec.decode(ids)
    assert audio.dtype == np.float32 and abs(len(audio) - len(clip)) < 256
    texts = [text] + others
    cer = resolve_reward("tts_intelligibility")([""] * len(texts), audio=[audio] * len(texts), text=texts,
                                                 sample_rate=SR)["cer"]
    assert cer[0] < min(cer[1:]), cer


def test_embedded_codec_resamples_and_rejects_bad_input(codec):
    t = np.arange(SR) / SR
    tone = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    import soxr

    at_44k = soxr.resample(tone, SR, 44100)
    assert abs(len(codec.encode(at_44k, 44100)) - len(codec.encode(tone, SR))) <= 2
    for bad, match in [(np.zeros(0, np.float32), "empty"), (np.zeros((2, 100), np.float32), "mono 1-D"),
                       (np.array([0, np.nan], np.float32), "NaN"), ((tone * 32767).astype(np.int16), "int16")]:
        with pytest.raises(ValueError, match=match):
            codec.encode(bad, SR)
    with pytest.raises(ValueError, match="sample_rate=0"):
        codec.encode(tone, 0)
    with pytest.raises(ValueError, match="outside codebook 0's range"):
        codec.decode([600, 700])
    with pytest.raises(FileNotFoundError, match="neither a transformers codec"):
        load_codec("/no/such/codec")


def test_every_length_of_ids_decodes_to_audio(codec):
    """One frame is audio too (a completion of one codec token): the centered inverse STFT alone
    would give hop * (frames - 1) samples, none for one frame, and an empty clip goes unscored."""
    hop = codec.config.hop_length
    for frames in (1, 2, 5):
        units = np.arange(codec.num_codebooks * frames).reshape(codec.num_codebooks, frames) % codec.codebook_size
        audio = codec.decode(flatten_codes(units, codec.codebook_size))
        assert len(audio) == hop * max(frames - 1, 1) and np.isfinite(audio).all() and np.abs(audio).max() > 0


def test_configs_from_before_smoothing_keep_their_cache_keys_and_repr():
    """The default and the TTS recipe's shape (rlhf/config.py EmbeddedCodecConfig) keep their cache
    directories (named by the fit and the synthesis version of its clips, data/synth.py
    BUILDER_VERSION 2) and print as before `smooth_frames` existed (judge keys hash the repr);
    smoothing, read only by decode, shares its codec's directory."""
    from speechrl.rollouts.mel_codec import cache_directory

    tts = MelCodecConfig(hop_length=320, num_codebooks=1, codebook_size=1024, n_cepstra=24, griffin_lim_iters=16)
    assert cache_directory("c", MelCodecConfig()).name == "mel-b3371536dad5"
    assert cache_directory("c", tts).name == "mel-112a2e538534"
    assert cache_directory("c", replace(tts, smooth_frames=3)) == cache_directory("c", tts)
    assert "smooth_frames" not in repr(tts) and "smooth_frames=3" in repr(replace(tts, smooth_frames=3))
    with pytest.raises(ValueError, match="smooth_frames=2; pass an odd number"):
        MelUnitCodec(MelCodecConfig(smooth_frames=2), np.zeros((2, 512, 24)), np.zeros(80))


def test_smoothing_reuses_the_cached_codebooks(codec, codec_cache):
    from speechrl.rollouts.mel_codec import default_codec

    smoothed = default_codec(codec_cache, MelCodecConfig(smooth_frames=3))
    assert smoothed.config.smooth_frames == 3 and len(list(codec_cache.glob("codecs/mel-*"))) == 1
    assert (smoothed.codebooks == codec.codebooks).all()


def test_smoothing_averages_neighbouring_frames(tmp_path):
    """A steady unit decodes the same smoothed or not (the window sums to 1); units alternating
    frame by frame are averaged towards their mean, so the decoded spectrum jumps less. The field
    survives save/load, and at its default is not saved."""
    from speechrl.data.synth import synthesize

    clips = [synthesize(t, "en", 175, 50) for t in ("go left three steps", "pick up the red box")]
    plain = MelUnitCodec.fit(clips, SR, MelCodecConfig(codebook_size=8, max_fit_frames=2000))
    smooth = MelUnitCodec(replace(plain.config, smooth_frames=5), plain.codebooks, plain.mean_logmel)
    steady = [3, 8 + 5] * 40
    assert np.allclose(smooth.decode(steady), plain.decode(steady), atol=1e-4)
    alternating = [3, 8 + 5, 6, 8 + 1] * 20

    def jitter(audio):  # mean change of the decoded log-mel spectrum from one frame to the next
        return np.abs(np.diff(plain._logmel(audio), axis=0)).mean()
    assert jitter(smooth.decode(alternating)) < 0.7 * jitter(plain.decode(alternating))

    loaded = MelUnitCodec.load(smooth.save(tmp_path / "smooth"))
    assert loaded.config == smooth.config and (loaded.decode(alternating) == smooth.decode(alternating)).all()
    plain.save(tmp_path / "plain")  # a field at its default is not written: the json reads as it did before
    assert "smooth_frames" not in (tmp_path / "plain" / MelUnitCodec.FILE).read_text()
    assert MelUnitCodec.load(tmp_path / "plain").config == plain.config


def test_codec_tokens_map_into_the_backbone_block(codec, tiny_backbone_dir):
    from speechrl.rlhf.model.backbone import CODEC_END, load_processor

    tokenizer = load_processor(tiny_backbone_dir).tokenizer
    tokens = CodecTokens(tokenizer, codec)
    ids = [0, 512, 511, 1023]
    backbone_ids = tokens.to_backbone(ids)
    assert tokenizer.convert_ids_to_tokens(backbone_ids) == ["<|a0|>", "<|a512|>", "<|a511|>", "<|a1023|>"]
    end = tokenizer.convert_tokens_to_ids(CODEC_END)
    assert tokens.from_backbone(backbone_ids + [end, backbone_ids[0]]) == ids
    with pytest.raises(ValueError, match="position 1 is not one of this codec's 1024 codec tokens"):
        tokens.from_backbone([backbone_ids[0], tokenizer.convert_tokens_to_ids("<|im_end|>")])
    big = MelUnitCodec(MelCodecConfig(codebook_size=1024), np.zeros((2, 1024, 24)), np.zeros(80))
    with pytest.raises(ValueError, match="needs 2048 codec tokens .* has 1024"):
        CodecTokens(tokenizer, big)


def _tiny_codecs():
    from transformers import DacConfig, DacModel, EncodecConfig, EncodecModel, MimiConfig, MimiModel

    small = dict(sampling_rate=SR, codebook_size=64)
    return {
        "encodec": (EncodecModel, EncodecConfig(num_filters=4, hidden_size=16, upsampling_ratios=[8, 8],
                                                num_residual_layers=1, num_lstm_layers=1, codebook_dim=16,
                                                target_bandwidths=[1.5, 3.0], **small)),
        "dac": (DacModel, DacConfig(encoder_hidden_size=4, downsampling_ratios=[8, 8], decoder_hidden_size=16,
                                    upsampling_ratios=[8, 8], n_codebooks=3, codebook_dim=4, hidden_size=32, **small)),
        "mimi": (MimiModel, MimiConfig(num_filters=4, hidden_size=32, upsampling_ratios=[4, 4], num_quantizers=4,
                                       num_semantic_quantizers=1, codebook_dim=16, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=2, head_dim=16, intermediate_size=64,
                                       sliding_window=32, upsample_groups=32, vector_quantization_hidden_dimension=16,
                                       num_residual_layers=1, **small)),
    }


@pytest.mark.parametrize("kind", ["encodec", "dac", "mimi"])
def test_transformers_codec_from_a_local_directory(kind, tmp_path):
    import torch

    model_cls, config = _tiny_codecs()[kind]
    torch.manual_seed(0)
    model_cls(config).save_pretrained(tmp_path)
    codec = load_codec(tmp_path)
    tone = (0.3 * np.sin(2 * np.pi * 220 * np.arange(SR // 2) / SR)).astype(np.float32)
    ids = codec.encode(tone, SR)
    frames = len(ids) // codec.num_codebooks
    assert len(ids) % codec.num_codebooks == 0 and frames == pytest.approx(codec.frame_rate * 0.5, abs=1)
    units = unflatten_ids(ids, codec.num_codebooks, codec.codebook_size, "t")  # every id in its codebook's block
    assert units.shape == (codec.num_codebooks, frames)
    audio = codec.decode(ids)
    assert audio.dtype == np.float32 and abs(len(audio) - len(tone)) <= SR / codec.frame_rate
    with pytest.raises(ValueError, match="outside codebook"):
        codec.decode([codec.codebook_size] * codec.num_codebooks)


def test_transformers_codec_number_of_codebooks(tmp_path):
    import torch

    model_cls, config = _tiny_codecs()["encodec"]
    torch.manual_seed(0)
    model_cls(config).save_pretrained(tmp_path)
    assert load_codec(tmp_path).num_codebooks == 1  # the lowest bandwidth
    assert load_codec(tmp_path, num_codebooks=2).num_codebooks == 2
    with pytest.raises(ValueError, match=r"num_codebooks=5 .* choose one of \[1, 2\]"):
        load_codec(tmp_path, num_codebooks=5)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        from speechrl.rollouts.hf_codec import HfCodec
        HfCodec(tmp_path / "missing")


def test_a_codec_fit_on_the_recipe_corpus_is_its_own_and_cached_by_the_manifest(tts_overrides, tmp_path):
    """tts.embedded_codec.fit_on: corpus fits the codebooks on the recipe's own training clips (the
    target voice), once per (settings, manifest); its identity names the manifest, so a learned
    reward trained through it is never paired with another codec."""
    from speechrl.rewards.learned import codec_identity
    from speechrl.rlhf.core.config import load_recipe
    from speechrl.rlhf.modes.assets import codec_spec
    from speechrl.rollouts.mel_codec import default_codec

    def spec(*extra):
        return codec_spec(load_recipe("tts/sft", [*tts_overrides, f"run.cache_dir={tmp_path}", *extra]))

    corpus = spec("tts.embedded_codec.fit_on=corpus", "tts.embedded_codec.fit_clips=20")
    assert corpus.fit_manifest and corpus.fit_manifest.endswith("train.jsonl")
    first = corpus.build()
    again = corpus.build()  # loaded from the cache, not fit again
    assert np.array_equal(first.codebooks, again.codebooks)
    assert len(list(tmp_path.glob("codecs/mel-corpus-*"))) == 1
    fewer = spec("tts.embedded_codec.fit_on=corpus", "tts.embedded_codec.fit_clips=10").build()
    assert len(list(tmp_path.glob("codecs/mel-corpus-*"))) == 2 and not np.array_equal(fewer.codebooks, first.codebooks)
    espeak = spec()
    assert espeak.fit_manifest is None
    assert not np.array_equal(default_codec(tmp_path, first.config).codebooks, first.codebooks)
    # identity: the manifest and clip count for a corpus fit; the espeak fit's is as before (no fit keys)
    assert codec_identity(corpus)["fit"]["clips"] == 20 and "fit" not in codec_identity(espeak)
    assert "fit_on" not in codec_identity(espeak)["embedded"] and "smooth_frames" not in codec_identity(espeak)["embedded"]
    # decode smoothing is decode only: the same cached codebooks
    smoothed = spec("tts.embedded_codec.fit_on=corpus", "tts.embedded_codec.fit_clips=20",
                    "tts.embedded_codec.smooth_frames=3").build()
    assert np.array_equal(smoothed.codebooks, first.codebooks) and smoothed.config.smooth_frames == 3
    assert len(list(tmp_path.glob("codecs/mel-corpus-*"))) == 2


@pytest.mark.parametrize("override, key", [("tts.embedded_codec.fit_on=piper", "tts.embedded_codec.fit_on"),
                                           ("tts.embedded_codec.smooth_frames=2", "tts.embedded_codec.smooth_frames")])
def test_bad_codec_fit_settings_are_refused_at_load(tts_overrides, override, key):
    from speechrl.rlhf.core.config import RecipeError, load_recipe

    with pytest.raises(RecipeError, match=key.replace(".", r"\.")):
        load_recipe("tts/sft", [*tts_overrides, override])
