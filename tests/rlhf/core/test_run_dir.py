"""A run's writes failing (a full disk, a read-only directory) become one RunStopped that names what
could not be written, why, and the checkpoint to resume from: in this process, and in a Ray worker
(the policy worker writes an RL run's checkpoints), whose OSError arrives wrapped by Ray."""
from __future__ import annotations

from pathlib import Path

import pytest

from speechrl.rlhf.core.config import RunStopped
from speechrl.rlhf.core.run_dir import RunLogger, stop_on_write_error, write_trainer_state


def a_run_with_a_step_5_checkpoint(root: Path) -> Path:
    run_dir = root / "run"
    (run_dir / "checkpoints" / "step-5").mkdir(parents=True)
    write_trainer_state(run_dir / "checkpoints" / "step-5", 5)
    return run_dir


@pytest.mark.ray
def test_a_checkpoint_write_failing_in_a_ray_worker_stops_the_run_naming_why(small_disk):
    import ray

    run_dir = a_run_with_a_step_5_checkpoint(small_disk.path)
    partial = run_dir / "checkpoints" / "step-10"
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        @ray.remote
        class Saver:  # what the policy worker's save does: a folder, then the weights
            def save(self, path: str) -> None:
                Path(path).mkdir(parents=True, exist_ok=True)
                (Path(path) / "model.safetensors").write_bytes(b"\0" * 2**20)

        saver = Saver.remote()
        small_disk.fill()
        with pytest.raises(RunStopped) as stopped:
            with stop_on_write_error(run_dir, "the step-10 checkpoint", partial=partial):
                ray.get(saver.save.remote(str(partial)))
    finally:
        ray.shutdown()
    message = str(stopped.value)
    assert message.startswith("could not write the step-10 checkpoint (No space left on device"), message
    assert f"the last complete checkpoint is {run_dir / 'checkpoints' / 'step-5'}; continue with --resume {run_dir}" \
        in message
    assert not partial.exists(), "the half-written checkpoint gives its space back"


def test_a_metrics_row_cut_off_by_a_full_disk_is_dropped_and_damage_elsewhere_is_named(tmp_path):
    from speechrl.rlhf.core.config import load_recipe

    logger = RunLogger(tmp_path, load_recipe("asr/sft"), [])
    logger.log(1, {"train/loss": 1.0})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "train/lo')  # the disk filled up in the middle of the row
    assert [r["step"] for r in logger.rows()] == [1]
    (tmp_path / "metrics.jsonl").write_text('{"step": 1\n{"step": 2}\n')
    with pytest.raises(ValueError, match="metrics.jsonl: line 1 is not JSON"):
        logger.rows()
    logger.close()
