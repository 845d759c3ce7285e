"""The JSON a reward server speaks (`speechrl serve-reward` and the `remote` reward).

POST /v1/score with a bearer token; docs/rewards.md shows a request and its answer. "completions" is
required, any other list is a per-sample column, any other value reaches the reward as is; audio is
base64 WAV (one sample rate per request). Errors answer {"error": ...} naming what to fix, with 400,
401, 413, 500 or 503 (busy: retry later).
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import math
from typing import Any, Mapping

import numpy as np
import soundfile as sf

from speechrl.rewards.combine import PER_SAMPLE, RawScores

SCORE_PATH = "/v1/score"
HEALTH_PATH = "/health"


class WireError(ValueError):
    """A request or response that does not follow the schema above; the message names the field."""


def encode_request(batch: Mapping[str, Any], send_audio: bool = True) -> bytes:
    """The batch as the JSON body of a score request; waveforms become base64 16-bit WAV."""
    body = {k: v for k, v in batch.items() if k not in ("audio", "sample_rate")}
    if send_audio and batch.get("audio") is not None:
        if "sample_rate" not in batch:
            raise WireError("the batch has 'audio' but no 'sample_rate'; a WAV needs its rate")
        rate, encoded = int(batch["sample_rate"]), {}
        for a in batch["audio"]:  # the n samples of one prompt share one waveform object: encode it once
            if a is not None and id(a) not in encoded:
                encoded[id(a)] = _wav_base64(a, rate)
        body["audio"] = [None if a is None else encoded[id(a)] for a in batch["audio"]]
    return json.dumps(body, default=_jsonable).encode()


def decode_request(body: bytes) -> dict[str, Any]:
    """A score request's body as a reward batch (audio as float32 arrays); WireError if malformed."""
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WireError(f"the body is not JSON ({e}); see docs/rewards.md for the schema") from None
    if not isinstance(payload, dict):
        raise WireError(f"the body must be a JSON object of columns, got {type(payload).__name__}")
    completions = payload.get("completions")
    if not isinstance(completions, list) or not all(isinstance(c, str) for c in completions):
        raise WireError("field 'completions' must be a list of strings (one per sample)")
    n = len(completions)
    wrong = {k: len(v) for k, v in payload.items() if isinstance(v, list) and len(v) != n}
    if wrong:
        raise WireError(f"fields {wrong} must have one entry per sample ({n}, the length of 'completions')")
    if "sample_rate" in payload:
        raise WireError("field 'sample_rate' is set by the server from the WAV headers; leave it out")
    if "audio" in payload:
        payload["audio"], payload["sample_rate"] = _decode_audio(payload["audio"])
    return payload


def encode_response(raw: RawScores, name: str) -> dict[str, Any]:
    return {"scores": {k: [v if math.isfinite(v) else None for v in values.tolist()]
                       for k, values in raw.components[name].items()},
            "errors": {str(i): "; ".join(why) for i, why in raw.reasons.items()}}


def decode_response(payload: Any, n: int) -> tuple[dict[str, list[float]], dict[int, str]]:
    """(components, errors) of a 200 answer for n samples; WireError if it is not one score per sample."""
    scores = payload.get("scores") if isinstance(payload, dict) else None
    if not isinstance(scores, dict) or not isinstance(scores.get("reward"), list):
        raise WireError("the server's answer has no 'scores.reward' list; is the URL a speechrl reward server?")
    bad = {k: len(v) if isinstance(v, list) else type(v).__name__ for k, v in scores.items()
           if not isinstance(v, list) or len(v) != n}
    if bad:
        raise WireError(f"the server answered {bad} for {n} samples; it must return one score per sample")
    components = {k: [math.nan if v is None else float(v) for v in values] for k, values in scores.items()}
    errors = {int(i): str(why) for i, why in (payload.get("errors") or {}).items()}
    return components, errors


def _wav_base64(audio: np.ndarray, rate: int) -> str:
    buf = io.BytesIO()
    # clipped: libsndfile would wrap samples past full scale around rather than clip them
    sf.write(buf, np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0), rate, format="WAV", subtype="PCM_16")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _decode_audio(column: Any) -> tuple[list, int | None]:
    if not isinstance(column, list):
        raise WireError("field 'audio' must be a list of base64 WAV strings (or nulls), one per sample")
    clips, rates = [], set()
    for i, item in enumerate(column):
        if item is None:
            clips.append(None)
            continue
        try:
            audio, rate = sf.read(io.BytesIO(base64.b64decode(item, validate=True)), dtype="float32", always_2d=True)
        except (TypeError, binascii.Error, sf.LibsndfileError, RuntimeError) as e:
            raise WireError(f"field 'audio[{i}]' is not a base64 WAV ({type(e).__name__}: {e})") from None
        clips.append(audio.mean(axis=1) if audio.shape[1] > 1 else audio[:, 0])
        rates.add(rate)
    if len(rates) > 1:
        raise WireError(f"field 'audio' mixes sample rates {sorted(rates)}; send one rate per request")
    return clips, rates.pop() if rates else None


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    if isinstance(value, PER_SAMPLE):
        return list(value)
    raise TypeError(f"batch value {value!r} ({type(value).__name__}) cannot be sent as JSON")
