"""Shared fixtures. Tests import the installed `speechrl` package, never the bare folders.

Test files have unique basenames (there is no __init__.py under tests/): pytest imports each by its
name alone. Run-level tests build their assets through `tiny_overrides`, so the small backbone, the
corpora, codecs and judges are built once in one cache (kept between pytest runs), not once per file.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from speechrl.rlhf.core.kernels import pin_cpu_kernels

pin_cpu_kernels()  # as the CLI does, before torch computes anything: builds repeat across x86 CPUs
# ... and every run's actors too, whatever its recipe's run.cpu_kernels (asr/grpo's is native): the
# tests' floats, and their vLLM/trainer agreement bounds, are the same on every x86 CPU. A test of the
# native path takes this away (tests/e2e/test_placement_e2e.py).
os.environ.setdefault("SPEECHRL_CPU_KERNELS", "avx2")

REPO = Path(__file__).resolve().parent.parent

# head_dim 64 (vLLM's CPU kernels need >= 32); about 1M parameters, a training step well under a second
TINY = {"hidden_size": 128, "num_heads": 2, "num_kv_heads": 1, "encoder_dim": 128, "num_layers": 2,
        "encoder_layers": 1, "num_codec_tokens": 64}


def _shared_data_dir() -> Path:
    # ../shared/data beside the checkout (this workplace and CI); overridable for other setups.
    return Path(os.environ.get("SPEECHRL_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """Where ../shared/data would be, present or not: for tests that fall back to other data."""
    return _shared_data_dir()


@pytest.fixture(scope="session")
def shared_data(shared_data_dir) -> Path:
    """Real recordings made by other people (see SOURCES.md there); skip where absent."""
    path = shared_data_dir
    if not (path / "real_speech").is_dir():
        pytest.skip(f"real recordings not found at {path} (set SPEECHRL_SHARED_DATA to use them)")
    return path


def pytest_collection_modifyitems(config, items):
    """The whole runs (tests/e2e/, a minute or more each) first, each file's tests in their order: on
    several workers (-n) the long files start at once and the short tests fill in around them, instead
    of one long file running alone at the end."""
    e2e = REPO / "tests" / "e2e"
    items.sort(key=lambda item: e2e not in Path(item.path).parents)  # a stable sort


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: absent without it
def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto` (the README's test command): a worker per core, at most 4. Each worker starts Ray
    clusters and vLLM engines of its own (a few GiB at once), and past 4 the longest file sets the time."""
    return max(1, min(4, os.cpu_count() or 1))


# --- the tiny assets every run-level test shares -----------------------------------------------------

def _source_key() -> str:
    """A hash of the package's code and recipes: assets built by other code are never reused."""
    digest = hashlib.sha1()
    for folder in ("rlhf", "rewards", "rollouts", "data", "recipes"):
        for path in sorted((REPO / folder).rglob("*")):
            if path.suffix in (".py", ".yaml") and "__pycache__" not in path.parts:
                digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


@pytest.fixture(scope="session")
def tiny_cache(request, tmp_path_factory) -> Path:
    """The tests' one `run.cache_dir`: assets are keyed by their settings inside it, so runs of
    different modes and corpus sizes share it without rebuilding each other's. It lives in pytest's
    cache folder (.pytest_cache/d/speechrl-assets/<hash of the package's code>), so every worker of a
    run (-n), the e2e runs and the fast tests, and a second local run, build each asset once (behind
    its build lock); a change to the code starts a new folder and deletes the old ones. Tests of
    building itself use folders of their own.
    (Under `-p no:cacheprovider` it is the session's temporary folder.)"""
    if getattr(request.config, "cache", None) is None:
        return tmp_path_factory.mktemp("cache")
    root = request.config.cache.mkdir("speechrl-assets")
    key = _source_key()
    for old in root.iterdir():  # built by other code: never read again
        if old.name != key:
            shutil.rmtree(old, ignore_errors=True)
    (root / key).mkdir(exist_ok=True)
    return root / key


@pytest.fixture(scope="session")
def small_tiny():
    from speechrl.rlhf.core.config import TinyBackboneConfig

    return TinyBackboneConfig(**TINY)


@pytest.fixture(scope="session")
def tiny_overrides(tiny_cache) -> list[str]:
    """Recipe overrides for the small tiny backbone, its 64-unit codec and the shared cache. Add a
    `run.output_dir` of the test file's own, so run names never collide across files."""
    return [*(f"model.tiny.{k}={v}" for k, v in TINY.items()), "tts.embedded_codec.codebook_size=64",
            f"run.cache_dir={tiny_cache}"]


@pytest.fixture(scope="session")
def tts_overrides(tiny_overrides) -> list[str]:
    """A fast TTS run (tests/rlhf/modes/test_tts.py, tests/e2e/test_tts_e2e.py)."""
    return [*tiny_overrides, "data.synthetic.num_utterances=60", "data.max_eval_examples=4", "eval_max_new_tokens=24",
            "tts.eval_samples=2", "tts.eval_repeats=2", "train.batch_size=4", "train.warmup_steps=2", "train.log_every=1",
            "rewards=[{name: speech_sanity}]"]


@pytest.fixture(scope="session")
def realtime_overrides(tiny_overrides) -> list[str]:
    """A small realtime run (tests/rlhf/modes/test_realtime.py, tests/e2e/test_realtime_e2e.py)."""
    return [*tiny_overrides, "realtime.personas=builtin", "realtime.dialogues_per_persona=2", "realtime.max_turns=2",
            "realtime.drift_dialogues_per_persona=1", "realtime.drift_turns=3", "data.max_eval_examples=4",
            "eval_max_new_tokens=40", "rollout.sampling.max_new_tokens=40", "train.batch_size=4",
            "train.torch_threads=1", "rollout.threads_per_worker=1",
            "rewards.0.kwargs.model=tiny"]  # the random tiny judge: these runs test machinery, not judgment


@pytest.fixture(scope="session")
def duplex_overrides(tiny_overrides) -> list[str]:
    """A small duplex setup (tests/rlhf/modes/test_duplex_data.py, tests/e2e/test_duplex_e2e.py): two
    training dialogues and one held-out of each kind, espeak-ng user speech."""
    return [*tiny_overrides, "duplex.dialogues_per_kind=2",
            "duplex.dialogues_by_kind={backchannel: 2, interrupt: 2, tool: 2}", "duplex.heldout_per_kind=1", "duplex.user_voices=[en-us]",
            "data.max_eval_examples=8", "train.batch_size=4", "train.torch_threads=1", "rollout.threads_per_worker=1"]


# --- a fast ASR SFT run: the trainer tests, the model tests on its backbone, DeepSpeed's e2e test ----

@pytest.fixture(scope="session")
def sft_overrides(tiny_overrides, tmp_path_factory):
    """sft_overrides(name, *extra) -> asr/sft overrides for a fast run writing <runs>/<name>."""
    runs = tmp_path_factory.mktemp("sft-runs")
    base = [*tiny_overrides, f"run.output_dir={runs}",
            "data.synthetic.num_utterances=80", "data.max_eval_examples=4", "eval_max_new_tokens=8",
            "train.batch_size=4", "train.steps=15", "train.warmup_steps=2", "train.eval_every=100",
            "train.log_every=1", "train.checkpoint_every=5"]
    return lambda name, *extra: [*base, f"run.name={name}", *extra]


@pytest.fixture(scope="session")
def sft_config(sft_overrides):
    """sft_config(name, *extra) -> the fast asr/sft RecipeConfig."""
    from speechrl.rlhf.core.config import load_recipe

    return lambda name, *extra: load_recipe("asr/sft", sft_overrides(name, *extra))


@pytest.fixture(scope="session")
def sft_assets(sft_config):
    """(backbone dir, train manifest, eval manifest) of the fast recipe, built once."""
    from speechrl.rlhf.modes import assets

    cfg = sft_config("assets")
    return (assets.backbone_path(cfg), *assets.manifests(cfg))


@pytest.fixture(scope="session")
def small_backbone_dir(sft_assets) -> Path:
    return sft_assets[0]


@pytest.fixture(scope="session")
def full_run(sft_config, sft_assets):
    """15 uninterrupted steps, a checkpoint every 5 (2 kept), loss logged every step: (cfg, run dir, summary)."""
    from speechrl.rlhf.trainers.sft import run_sft

    cfg = sft_config("full")
    table = run_sft(cfg)
    return cfg, Path(cfg.run.output_dir) / cfg.run.name, table


# --- a real file system to fill up or turn read-only (tests of a run's writes failing) ------------

class SmallDisk:
    """A 64 MiB tmpfs of its own at `path`: `fill()` writes until it is full (`free()` gives the
    space back), `read_only()` / `writable()` remount it."""

    def __init__(self, path: Path):
        self.path, self.filler = path, path / "filler"

    def _mount(self, *args: str) -> None:
        import subprocess

        subprocess.run(["mount", *args, str(self.path)], check=True, capture_output=True)

    def fill(self) -> None:
        chunk = b"\0" * 2**20
        with open(self.filler, "wb") as f:
            try:
                while True:
                    f.write(chunk)
                    f.flush()
            except OSError:  # ENOSPC: full
                pass

    def free(self) -> None:
        self.filler.unlink()

    def read_only(self) -> None:
        self._mount("-o", "remount,ro")

    def writable(self) -> None:
        self._mount("-o", "remount,rw")


@pytest.fixture
def small_disk(tmp_path):
    """A SmallDisk; skipped where this process may not mount a tmpfs (it needs root or CAP_SYS_ADMIN)."""
    import subprocess

    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}): needs root or CAP_SYS_ADMIN")
    yield SmallDisk(mount)
    subprocess.run(["umount", "-l", str(mount)], check=False)
