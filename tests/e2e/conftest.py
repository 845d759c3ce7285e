"""Whole runs: SFT through DeepSpeed, the RL loops through Ray and vLLM, a judge trained to hear, the
annotation loop. Each takes a minute or more, so every test in this folder is marked `e2e` here:
`pytest -m "not e2e"` is the fast suite, `pytest -m e2e` these (.ci/run runs all, these first)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
EXAMPLES = HERE.parents[1] / "examples"


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items):
    for item in items:  # the hook sees the whole session's items, not only this folder's
        if HERE in Path(item.path).parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def example_package(tmp_path_factory):
    """examples/custom_reward installed (a real pip install, built as a wheel) into a directory put
    on sys.path and PYTHONPATH, so this process and the Ray workers it starts both find it."""
    target = tmp_path_factory.mktemp("site")
    build = tmp_path_factory.mktemp("build")
    shutil.copytree(EXAMPLES / "custom_reward", build / "custom_reward")  # pip would write build/ into examples/
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(build / "custom_reward")], check=True, timeout=300)
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(target))
        mp.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")])))
        yield target


@pytest.fixture(scope="module")
def module_ray():
    """One local Ray for a test file's runs, started as a run starts its own (the same job environment)
    and shut down after the file: each run on it kills its own actors and releases its placement
    (OnlineRecipe.cleanup), and a cluster start is ~5 CPU-seconds a run saves. Files whose tests
    check how a run starts or places its cluster (test_placement_e2e.py), or that set environment
    variables the workers must see (test_reward_plugins_e2e.py: Ray's workers get the environment
    the cluster started with), start their own."""
    import ray

    from speechrl.rlhf.core.config import load_recipe
    from speechrl.rlhf.workers.ray_setup import start_ray

    assert not ray.is_initialized(), "a Ray left running by an earlier test"
    start_ray(load_recipe("asr/grpo", ["ray.num_cpus=4"]))
    yield
    ray.shutdown()
