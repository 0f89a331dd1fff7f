"""Shared fixtures: tiny models built from configs, saved and loaded back through real loading."""

import os

import pytest
import torch

from rlhf_ppo import builtin


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="run slow / real-model tests")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow") or os.environ.get("RLHF_PPO_RUNSLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow test: pass --runslow (or RLHF_PPO_RUNSLOW=1)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Built-in assets go to a per-session folder, never the user's cache."""
    old = os.environ.get("RLHF_PPO_CACHE")
    os.environ["RLHF_PPO_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    os.environ["HF_HUB_OFFLINE"] = "1"
    # Tiny models: one thread is fastest, and several spin against each other on a busy machine.
    torch.set_num_threads(1)
    yield
    if old is None:
        os.environ.pop("RLHF_PPO_CACHE", None)
    else:
        os.environ["RLHF_PPO_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_policy_dir(tmp_path_factory):
    """A tiny random-init Llama causal LM + word tokenizer, saved with save_pretrained."""
    return str(builtin.build_tiny_model(tmp_path_factory.mktemp("policy"), seed=0))


@pytest.fixture(scope="session")
def tiny_reward_dir(tmp_path_factory):
    """A tiny Llama sequence classifier (1 label) sharing the policy's word tokenizer."""
    return str(builtin.build_tiny_model(tmp_path_factory.mktemp("rm"), seed=1, task="reward"))


@pytest.fixture(scope="session")
def char_reward_dir(tmp_path_factory):
    """A tiny Llama sequence classifier with a character-level tokenizer (not the policy's)."""
    tok = builtin.build_char_tokenizer()
    return str(builtin.build_tiny_model(tmp_path_factory.mktemp("char_rm"), seed=2,
                                        task="reward", tokenizer=tok, bos_token_id=None,
                                        eos_token_id=None))
