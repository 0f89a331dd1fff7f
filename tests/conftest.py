"""Shared fixtures: tiny models built from configs, saved and loaded back through real loading."""

import logging
import os
import signal
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from rlhf_ppo import builtin
from rlhf_ppo.config import ModelConfig
from rlhf_ppo.loading import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


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
    # OMP_NUM_THREADS too: the commands' `threads: null` reads it (and subprocesses inherit it).
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    yield
    if old is None:
        os.environ.pop("RLHF_PPO_CACHE", None)
    else:
        os.environ["RLHF_PPO_CACHE"] = old


@pytest.fixture(autouse=True)
def _one_thread_after_each_test():
    """A test that changes torch's thread count (a script's main, a command) must not change
    the float rounding of the tests after it: the bitwise comparisons with subprocesses, which
    run on one thread, depend on it."""
    yield
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)


class CliResult(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(capsys, monkeypatch):
    """``rlhf-ppo ARGS`` run in this process: ``cli("train", "--config", ...)`` returns a
    ``CliResult(returncode, stdout, stderr)`` like a finished subprocess (argparse's exits,
    ``--help`` included, become return codes). Runs in the repository root, as a user would;
    what a run changes in the process (environment variables, the working directory, the root
    logger's handlers and level from ``logging.basicConfig``, signal handlers) is put back."""
    from rlhf_ppo import cli as cli_module

    monkeypatch.chdir(ROOT)
    env = dict(os.environ)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    signals = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}

    def run(*args) -> CliResult:
        capsys.readouterr()  # only this command's output
        # the log lines go to stderr too, as basicConfig sends them in a process of its own
        # (under pytest the root logger has handlers already, so basicConfig adds none)
        log = logging.StreamHandler(sys.stderr)
        log.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(log)
        root.setLevel(logging.INFO)
        try:
            code = cli_module.main([str(a) for a in args])
        except SystemExit as e:  # argparse: --help, usage errors
            code = 0 if e.code is None else e.code
        finally:
            root.removeHandler(log)
            root.setLevel(level)
        out, err = capsys.readouterr()
        return CliResult(code, out, err)

    yield run
    for h in root.handlers[:]:
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)
    for s, handler in signals.items():
        signal.signal(s, handler)
    os.environ.clear()
    os.environ.update(env)


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one state per process and fixes its mixed precision when the first
    ``Accelerator`` is made: a test that needs another precision starts from a cleared state, and
    clears it again after, so the tests after it get their own default."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="session")
def tiny_policy_dir(tmp_path_factory):
    """A tiny random-init Llama causal LM + word tokenizer, saved with save_pretrained."""
    return str(builtin.build_tiny_model(tmp_path_factory.mktemp("policy"), seed=0))


@pytest.fixture(scope="module")
def model_cfg(tiny_policy_dir):
    """The model section naming the tiny policy."""
    return ModelConfig(name_or_path=tiny_policy_dir)


@pytest.fixture(scope="module")
def tok(tiny_policy_dir):
    """The tiny policy's word tokenizer, loaded through the real loading code."""
    return load_tokenizer(ModelConfig(name_or_path=tiny_policy_dir))


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
