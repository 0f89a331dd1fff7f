"""What can be checked of the DeepSpeed / FSDP paths without GPUs: the shipped accelerate
configs load, PPO's batch settings land in the DeepSpeed config, and a DeepSpeed launch on CPU
stops with a clear message instead of silently training every process on the same prompts."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rlhf_ppo import load_config
from rlhf_ppo.distributed import configure_deepspeed, gradient_accumulation_steps, make_ppo_accelerator

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))
EXPECTED = {"single_gpu": "NO", "multi_gpu": "MULTI_GPU", "deepspeed_zero2": "DEEPSPEED",
            "deepspeed_zero3": "DEEPSPEED", "fsdp": "FSDP", "two_machines": "MULTI_GPU"}


def test_every_documented_engine_has_a_config():
    assert sorted(p.stem for p in CONFIGS) == sorted(EXPECTED)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_accelerate_configs_load(path):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(path))
    assert str(cfg.distributed_type).split(".")[-1] == EXPECTED[path.stem]
    if path.stem.startswith("deepspeed"):
        assert cfg.deepspeed_config["zero_stage"] == int(path.stem[-1])
    if path.stem == "fsdp":
        assert cfg.fsdp_config["fsdp_version"] == 2
    if path.stem == "two_machines":
        assert cfg.num_machines == 2 and cfg.num_processes == 16


def _fake_deepspeed_accelerator(ds_config: dict, processes: int):
    plugin = SimpleNamespace(deepspeed_config=ds_config, gradient_accumulation_steps=1)
    return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin), num_processes=processes)


def test_deepspeed_config_takes_ppo_batch_settings(caplog):
    # 256 over 8 processes: 32 per process, minibatch 16, micro-batch 4
    cfg = load_config(None, ["ppo.batch_size=256", "ppo.num_minibatches=2",
                             "ppo.micro_batch_size=4", "optim.max_grad_norm=0.5"])
    assert gradient_accumulation_steps(cfg, 8) == 4  # minibatch 16 / micro-batch 4
    acc = _fake_deepspeed_accelerator({"train_micro_batch_size_per_gpu": "auto",
                                       "gradient_accumulation_steps": 7}, processes=8)
    configure_deepspeed(acc, cfg)
    ds = acc.state.deepspeed_plugin.deepspeed_config
    assert ds == {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 4,
                  "train_batch_size": 4 * 4 * 8, "gradient_clipping": 0.5}
    assert "gradient_accumulation_steps=7 replaced by 4" in caplog.text


def test_deepspeed_launch_without_cuda_is_refused(monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(RuntimeError, match="DeepSpeed.*GPUs only"):
        make_ppo_accelerator(load_config(None, []))


def test_zero3_new_parameters_take_the_partitioned_dtype():
    """A policy loaded partitioned in bf16 plus a float32 value head: the head is cast to bf16,
    so the stage-3 optimizer can flatten them together (it failed on a GPU before)."""
    from rlhf_ppo.distributed import match_partitioned_dtype

    model = torch.nn.Sequential(torch.nn.Linear(4, 4).bfloat16(), torch.nn.Linear(4, 1))
    for p in model[0].parameters():
        p.ds_id = 0  # what zero.Init marks partitioned parameters with
    head = model[1].weight
    match_partitioned_dtype(model)
    assert model[1].weight is head and head.dtype == torch.bfloat16
    plain = torch.nn.Linear(4, 1)  # nothing partitioned (ZeRO-1/2, DDP): left alone
    match_partitioned_dtype(plain)
    assert plain.weight.dtype == torch.float32


def test_ppo_batch_size_counts_over_all_processes():
    from rlhf_ppo.config import ConfigError
    from rlhf_ppo.distributed import ppo_batch_per_process

    cfg = load_config(None, ["ppo.batch_size=16", "ppo.num_minibatches=2", "ppo.micro_batch_size=4"])
    assert ppo_batch_per_process(cfg, 1) == 16 and ppo_batch_per_process(cfg, 2) == 8
    assert gradient_accumulation_steps(cfg, 2) == 1  # minibatch 4 per process, micro-batch 4
    with pytest.raises(ConfigError, match="ppo.batch_size: 16 is the batch over all processes "
                                          "and must be a multiple of the 3 processes"):
        ppo_batch_per_process(cfg, 3)
    with pytest.raises(ConfigError, match="1 rollouts each, not a multiple of ppo.num_minibatches=2"):
        ppo_batch_per_process(cfg, 16)


def test_threads_default_reads_omp_then_splits_half_the_cores(monkeypatch):
    import os

    import torch

    from rlhf_ppo.distributed import set_threads

    before = torch.get_num_threads()
    try:
        assert set_threads(3) == 3 and torch.get_num_threads() == 3  # the setting wins
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert set_threads(None) == 2
        monkeypatch.delenv("OMP_NUM_THREADS")
        cores = len(os.sched_getaffinity(0))
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cores))
        assert set_threads(None) == 1  # one core per process
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
        assert set_threads(None) == max(1, cores // 2)  # half: room for the machine's other work
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
        assert set_threads(None) == 8
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
        assert set_threads(None) == 2  # 8 of 16 cores among 4 processes
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
        assert set_threads(None) == 1  # a 2-core machine: one thread (docs/performance.md)
    finally:
        torch.set_num_threads(before)
    with pytest.raises(Exception, match="threads: expected an integer >= 1 or null"):
        load_config(None, ["threads=0"])
