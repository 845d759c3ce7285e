"""Paired intervals (`speechrl eval`, the demos): per-example scores resampled over the held-out examples."""
import json
import re

import numpy as np
import pytest

from speechrl.rlhf.core.intervals import example_means, first_and_last, paired_changes, paired_intervals, write_example_scores

HEADLINES = [("held-out CER", "eval/cer")]


def write(path, values, repeats=4):
    """values[i][r]: example i's score at repeat r; None = unscored."""
    with open(path, "w") as f:
        for i, row in enumerate(values):
            for r in range(repeats):
                f.write(json.dumps({"id": f"ex-{i}", "repeat": r, "eval/cer": row[r]}) + "\n")
    return path


def test_example_means_average_repeats_and_leave_out_unscored(tmp_path):
    path = write(tmp_path / "a.jsonl", [[0.1, 0.3, None, 0.2], [None] * 4])
    assert example_means(path, "eval/cer") == {"ex-0": pytest.approx(0.2)}
    assert example_means(path, "eval/wer") == {}


def test_a_broken_scores_file_is_named_with_its_line(tmp_path):
    path = write(tmp_path / "a.jsonl", [[0.1] * 4])
    with open(path, "a") as f:
        f.write('{"id": "ex-1", "eval/cer": 0.')  # cut off mid-write
    with pytest.raises(ValueError, match=r"a\.jsonl, line 5: not a per-example score"):
        example_means(path, "eval/cer")


def test_a_real_change_is_beyond_the_noise_and_none_is_not(tmp_path):
    rng = np.random.default_rng(1)
    base = rng.uniform(0.2, 0.8, (96, 4))
    a = write(tmp_path / "a.jsonl", base.tolist())
    better = write(tmp_path / "b.jsonl", (base - 0.1 + rng.normal(0, 0.05, base.shape)).tolist())
    same = write(tmp_path / "c.jsonl", (base + rng.normal(0, 0.05, base.shape)).tolist())
    text = paired_intervals(HEADLINES, [("sft", a), ("grpo", better), ("copy", same)])
    lines = text.splitlines()
    assert len(lines) == 2 and lines[0].startswith("held-out CER, grpo: ") and lines[1].startswith("held-out CER, copy: ")
    change, low, high = map(float, re.search(r": ([-+.\d]+)  95% interval \[([-+.\d]+), ([-+.\d]+)\]", lines[0]).groups())
    assert abs(change + 0.1) < 0.02 and low < change < high < 0
    assert "(beyond the noise)" in lines[0] and "(beyond the noise)" not in lines[1] and "over 96 examples" in lines[0]


def test_only_examples_both_scored_are_compared(tmp_path):
    a = write(tmp_path / "a.jsonl", [[0.5] * 4, [0.5] * 4, [0.9] * 4])
    b = write(tmp_path / "b.jsonl", [[0.4] * 4, [0.4] * 4, [None] * 4])
    text = paired_intervals(HEADLINES, [("a", a), ("b", b)])
    assert "-0.100  95% interval [-0.100, -0.100] over 2 examples" in text
    assert paired_intervals([("held-out WER", "eval/wer")], [("a", a), ("b", b)]).startswith("(no per-example")


def test_checkpoints_are_named_by_run_and_folder_unless_that_repeats():
    from speechrl.rlhf.cli.main import short_names

    assert short_names(["runs/sft/final", "/tmp/x/grpo/final"]) == ["sft/final", "grpo/final"]
    assert short_names(["a/grpo/final", "b/grpo/final"]) == ["a/grpo/final", "b/grpo/final"]


def test_written_scores_read_back_with_transcripts_and_nan_left_out(tmp_path):
    path = write_example_scores(tmp_path / "scores" / "step-0.jsonl", [
        {"id": "u1", "text": "turn left", "transcript": "turn lift", "eval/wer": 0.5, "eval/cer": 0.1},
        {"id": "u2", "text": "stop", "transcript": "", "eval/wer": float("nan"), "eval/cer": 1.0}])
    assert json.loads(path.read_text().splitlines()[1])["eval/wer"] is None  # NaN is not JSON: null, unscored
    assert example_means(path, "eval/wer") == {"u1": 0.5}
    assert example_means(path, "eval/cer") == {"u1": 0.1, "u2": 1.0}
    assert example_means(path, "transcript") == {}  # text beside a score is not a score


def test_one_shared_example_gives_no_interval(tmp_path):
    a = write(tmp_path / "a.jsonl", [[0.5] * 4])
    b = write(tmp_path / "b.jsonl", [[0.4] * 4])
    assert "-0.100  (no interval: 1 examples, too few to resample)" in paired_intervals(HEADLINES, [("a", a), ("b", b)])


def test_a_runs_first_and_last_evaluations():
    assert first_and_last({20: "b", 0: "a", 80: "c"}) == [("step 0", "a"), ("step 80", "c")]
    assert first_and_last({0: "a"}) is None


def test_changes_carry_their_numbers_and_whether_they_clear_the_noise(tmp_path):
    rng = np.random.default_rng(2)
    base = rng.uniform(0.2, 0.8, (40, 2))
    a = write(tmp_path / "a.jsonl", base.tolist(), repeats=2)
    b = write(tmp_path / "b.jsonl", (base - 0.2).tolist(), repeats=2)
    (change,) = paired_changes(HEADLINES, [("sft", a), ("grpo", b)])
    assert (change.label, change.name, change.count) == ("held-out CER", "grpo", 40)
    assert change.change == pytest.approx(-0.2) and change.beyond_noise
    assert paired_intervals(HEADLINES, [("sft", a), ("grpo", b)], unit="clips").endswith("over 40 clips  (beyond the noise)")
