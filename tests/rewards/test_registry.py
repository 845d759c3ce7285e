import functools
from pathlib import Path

import pytest

from speechrl.rewards.asr import AsrWerReward
from speechrl.rewards.registry import REWARDS, register_reward, resolve_reward

HERE = Path(__file__).resolve().parent


@pytest.fixture
def helper_module_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))


@pytest.fixture
def scratch_registry(monkeypatch):
    # Registrations made by a test stay in the test.
    monkeypatch.setattr(REWARDS, "_items", dict(REWARDS._items))


def test_builtin_found_by_name_and_built_with_kwargs():
    reward = resolve_reward("asr_wer", metric="cer", wer_cap=0.5)
    assert isinstance(reward, AsrWerReward) and reward.metric == "cer" and reward.wer_cap == 0.5


def test_registry_rejects_duplicates(scratch_registry):
    with pytest.raises(ValueError, match="'asr_wer' is already registered"):
        register_reward("asr_wer")(lambda completions, **kw: [0.0] * len(completions))


def test_registered_function_gets_kwargs_bound(scratch_registry):
    @register_reward("test_double")
    def double(completions, factor=2.0, **kwargs):
        return [factor * len(c) for c in completions]

    assert resolve_reward("test_double") is double
    bound = resolve_reward("test_double", factor=3.0)
    assert isinstance(bound, functools.partial) and bound(completions=["ab"]) == [6.0]


@pytest.mark.parametrize("path", ["custom_reward_mod:length_reward", "custom_reward_mod.length_reward"])
def test_dotted_path(helper_module_on_path, path):
    assert resolve_reward(path, scale=0.5)(completions=["abcd"]) == [2.0]


def test_dotted_path_to_class(helper_module_on_path):
    assert resolve_reward("custom_reward_mod:ConstantReward", value=0.25)(completions=["a", "b"]) == [0.25, 0.25]


def test_dotted_path_errors_name_the_problem(helper_module_on_path):
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        resolve_reward("custom_reward_mod:nope")
    with pytest.raises(TypeError, match="not callable"):
        resolve_reward("custom_reward_mod:NOT_CALLABLE")
    with pytest.raises(TypeError, match=r"\['sclae'\] are not parameters of length_reward"):
        resolve_reward("custom_reward_mod:length_reward", sclae=2.0)
    with pytest.raises(TypeError, match="cannot build ConstantReward"):
        resolve_reward("custom_reward_mod:ConstantReward", valeu=2.0)


def test_entry_point_from_installed_dist(tmp_path, helper_module_on_path, monkeypatch):
    # A real (if tiny) installed distribution: importlib.metadata finds *.dist-info on sys.path.
    dist_info = tmp_path / "team_rewards-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: team-rewards\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text(
        "[speechrl.rewards]\nteam_length = custom_reward_mod:length_reward\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert resolve_reward("team_length", scale=2.0)(completions=["abc"]) == [6.0]


def test_unknown_name_lists_registered():
    with pytest.raises(KeyError, match="unknown reward 'no_such_reward'.*asr_wer"):
        resolve_reward("no_such_reward")
    with pytest.raises(KeyError, match="unknown reward 'no_such_pkg.mod:fn'"):
        resolve_reward("no_such_pkg.mod:fn")
