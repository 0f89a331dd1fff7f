"""What a user sees while a run runs and when their code fails: log lines instead of ``\\r``
progress bars when stderr is not a terminal, the Python API logging like the command line,
counted nouns, and a user function's error naming its file and line (issue 26)."""

import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rollouts import rollout_of  # tests/rollouts.py

from rlhf_ppo.config import RewardSource
from rlhf_ppo.data import Prompt
from rlhf_ppo.errors import RewardError, raised
from rlhf_ppo.progress import LineProgress, ensure_logging, plural, progress_bar
from rlhf_ppo.rewards import FunctionReward

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
# a tiny critic-free run of 1 iteration, with counts of 1 where a log line prints counts
SMALL = ["iterations=1", "sample_every=0", "ppo.batch_size=4", "ppo.num_minibatches=1",
         "ppo.ppo_epochs=1", "ppo.forward.micro_batch_size=4", "ppo.advantage_estimator=reinforce_pp",
         "ppo.samples_per_prompt=1", "ppo.critic.vf_coef=0.1", "optim.critic_lr=null"]


# --------------------------------------------------------------------------- plurals

def test_plural_takes_the_number():
    assert plural(1, "sample") == "1 sample"
    assert plural(0, "sample") == "0 samples"
    assert plural(2, "process", "processes") == "2 processes"
    assert plural(1, "process", "processes") == "1 process"


# --------------------------------------------------------------------------- progress

def test_line_progress_logs_every_nth_step_with_the_postfix_and_the_last(caplog):
    caplog.set_level(logging.INFO, logger="rlhf_ppo.progress")
    bar = LineProgress(total=45, desc="sft")  # every ceil(45 / 20) = 3 steps
    for step in range(1, 46):
        bar.update(1)
        bar.set_postfix(loss=f"{step / 10:.3f}")
    bar.close()  # the last step was logged: nothing more
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 15  # steps 3, 6, ..., 45
    assert lines[0].startswith("sft 3/45 [00:00<00:00, ") and lines[0].endswith("] loss=0.300")
    assert lines[-1].startswith("sft 45/45 [") and lines[-1].endswith("] loss=4.500")


def test_line_progress_logs_the_last_step_of_a_loop_that_stopped_early(caplog):
    caplog.set_level(logging.INFO, logger="rlhf_ppo.progress")
    bar = LineProgress(total=40, desc="ppo", initial=10, every=4)
    for _ in range(6):  # iterations 11..16: a line at 12 and 16; then 17 (interrupted)
        bar.update(1)
        bar.set_postfix({"kl": "0.1"})
    bar.update(1)
    bar.close()
    assert [r.getMessage().split(" [")[0] for r in caplog.records] == ["ppo 12/40", "ppo 16/40",
                                                                       "ppo 17/40"]
    quiet = LineProgress(total=2, desc="ppo", enabled=False)  # a process other than the main one
    quiet.update(2)
    quiet.set_postfix(kl="0")
    assert len(caplog.records) == 3


def test_progress_bar_is_a_bar_on_a_terminal_and_lines_elsewhere():
    from tqdm.std import tqdm

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    bar = progress_bar(3, "ppo", stream=Terminal())
    assert isinstance(bar, tqdm)
    bar.close()
    assert isinstance(progress_bar(3, "ppo", stream=io.StringIO()), LineProgress)


def test_redirected_train_logs_lines_without_carriage_returns(tmp_path, tiny_policy_dir, cli):
    # the CLI in this process: stderr is pytest's capture, not a terminal (the old tqdm bar
    # wrote `\r` frames into it)
    out = cli("train", "--config", TINY, f"output_dir={tmp_path / 'ppo'}",
              f"model.name_or_path={tiny_policy_dir}", *SMALL)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "\r" not in out.stderr
    lines = [x for x in out.stderr.splitlines() if "rlhf_ppo.progress" in x]
    assert [x.split(": ", 1)[1].split(" [")[0] for x in lines] == ["ppo 1/1"]
    assert all(f" {k}=" in lines[-1] for k in ("score_mean", "kl", "kl_coef", "entropy", "clipfrac"))
    # counts of one in the start-of-run summary and the closing line
    assert "(reinforce_pp, 1 sample per prompt)" in out.stderr
    assert "= 1 process x 4; 1 minibatch of 4 per process in micro-batches of 4 sequences; " \
           "1 epoch: 1 optimizer step per iteration, 1 in 1 iteration" in out.stderr
    assert out.stdout.splitlines()[-1].startswith("done: 1 iteration, ")


def test_redirected_reward_training_logs_lines_without_carriage_returns(tmp_path, tiny_policy_dir, cli):
    out = cli("reward", "--config", ROOT / "configs" / "reward_tiny.yaml", f"output_dir={tmp_path / 'rm'}",
              f"model.name_or_path={tiny_policy_dir}", "train.max_steps=2")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "\r" not in out.stderr
    lines = [x.split(": ", 1)[1] for x in out.stderr.splitlines() if "rlhf_ppo.progress" in x]
    assert [x.split(" [")[0] for x in lines] == ["reward 1/2", "reward 2/2"]
    assert lines[-1].endswith(" loss=" + lines[-1].rsplit("loss=", 1)[1]) and "loss=" in lines[-1]
    assert "1 process, device" in out.stderr and "2 steps (2 epochs of " in out.stderr


@pytest.mark.slow
def test_rlhf_ppo_train_into_a_pipe_has_no_carriage_returns(tmp_path, tiny_policy_dir):
    """The real thing: a separate process whose stdout and stderr are pipes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "rlhf_ppo", "train", "--config", str(TINY),
                          f"output_dir={tmp_path}", f"model.name_or_path={tiny_policy_dir}", *SMALL],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "\r" not in out.stderr + out.stdout
    assert "INFO rlhf_ppo.progress: ppo 1/1 [" in out.stderr


# --------------------------------------------------------------------------- logging setup

@pytest.fixture
def no_logging_setup(monkeypatch):
    """A function that gives the logging of a script that set none up: no root handler (pytest's
    removed; called in the test, after pytest adds its own for the call), ``rlhf_ppo``'s logger
    as it comes. Both are put back after the test."""
    package, root = logging.getLogger("rlhf_ppo"), logging.getLogger()
    level = package.level

    def bare() -> logging.Logger:
        monkeypatch.setattr(root, "handlers", [])
        monkeypatch.setattr(package, "handlers", [])
        package.setLevel(logging.NOTSET)
        return package

    yield bare
    package.setLevel(level)


def test_python_api_logs_like_the_cli(no_logging_setup, capsys, tmp_path, tiny_policy_dir):
    from rlhf_ppo import PPOTrainer, load_config

    cfg = load_config(TINY, [f"output_dir={tmp_path}", f"model.name_or_path={tiny_policy_dir}", *SMALL])
    package = no_logging_setup()
    capsys.readouterr()
    PPOTrainer(cfg)
    err = capsys.readouterr().err
    assert " INFO rlhf_ppo.trainer: run:\n  prompts: 256 from builtin:tiny" in err, err[-2000:]
    PPOTrainer(load_config(TINY, [f"output_dir={tmp_path}", "overwrite=true",
                                  f"model.name_or_path={tiny_policy_dir}", *SMALL]))
    assert len(package.handlers) == 1  # once, however many runs
    assert capsys.readouterr().err.count("rlhf_ppo.trainer: run:") == 1


def test_a_logging_setup_of_the_users_own_is_left_alone(no_logging_setup, capsys):
    package = no_logging_setup()
    users = logging.StreamHandler(io.StringIO())
    logging.getLogger().handlers.append(users)  # the script's own (e.g. basicConfig at WARNING)
    ensure_logging()
    assert package.handlers == [] and package.level == logging.NOTSET
    logging.getLogger().handlers.remove(users)
    ensure_logging()  # none yet: ours, until the script sets up its own after all
    logging.getLogger("rlhf_ppo.x").info("first")
    logging.getLogger().handlers.append(users)
    logging.getLogger("rlhf_ppo.x").info("second")  # the script's handler only: not doubled
    assert "INFO rlhf_ppo.x: first" in capsys.readouterr().err
    assert "second" in users.stream.getvalue() and "first" not in users.stream.getvalue()
    assert "second" not in capsys.readouterr().err


# --------------------------------------------------------------------------- user code errors

USER_REWARDS = '''\
import statistics


def ratio(prompts, responses, **kwargs):
    return [len(responses[0]) / 0]


def mean_of_nothing(prompts, responses, **kwargs):
    return [statistics.mean([])]
'''


def test_a_raising_reward_function_names_its_file_and_line(tmp_path, monkeypatch, tok):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_rewards.py").write_text(USER_REWARDS)
    rollout = rollout_of(tok, [Prompt("i think", tok("i think")["input_ids"])], ["good"])
    with pytest.raises(RewardError) as e:
        FunctionReward(RewardSource(function="my_rewards.py:ratio"), "reward.sources[0]")(rollout)
    assert str(e.value) == ("reward.sources[0] (my_rewards.py:ratio) raised ZeroDivisionError: "
                            "division by zero at my_rewards.py:5 in ratio")
    assert isinstance(e.value.__cause__, ZeroDivisionError)  # the traceback, for --traceback
    # raised inside the standard library: the line of the user's file that called it
    with pytest.raises(RewardError, match=r"raised StatisticsError: mean requires at least one data "
                                          r"point at my_rewards.py:9 in mean_of_nothing$"):
        FunctionReward(RewardSource(function="my_rewards.py:mean_of_nothing"), "reward.sources[1]")(rollout)


def test_the_location_of_a_callable_object_and_of_code_without_one(tmp_path):
    class Scorer:
        def __call__(self, prompts, responses):
            raise ValueError("no scores")

    try:
        Scorer()([], [])
    except ValueError as e:
        line = e.__traceback__.tb_next.tb_lineno
        assert raised("reward", e, Scorer()) == (f"reward raised ValueError: no scores at "
                                                 f"tests/test_logging_and_errors.py:{line} in __call__")
    assert raised("tool 'x'", KeyError("k")) == "tool 'x' raised KeyError: 'k'"  # no traceback


def test_the_cli_prints_one_line_or_with_traceback_the_whole_traceback(cli, monkeypatch):
    from rlhf_ppo import cli as cli_module

    def fail(args):
        try:
            print(1 / 0)
        except ZeroDivisionError as e:
            raise RewardError(raised("reward.sources[0].function (f.py:f)", e)) from e

    monkeypatch.setattr(cli_module, "_run", fail)
    out = cli("train")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().startswith(
        "rlhf-ppo: RewardError: reward.sources[0].function (f.py:f) raised ZeroDivisionError: "
        "division by zero at tests/test_logging_and_errors")
    assert out.stderr.strip().endswith("in fail (--traceback shows the full traceback)")
    out = cli("train", "--traceback")
    assert out.returncode == 1 and "Traceback (most recent call last)" in out.stderr
    assert "print(1 / 0)" in out.stderr and "ZeroDivisionError" in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("rlhf-ppo: RewardError: ")
