"""Multi-process training on CPU (torchrun + gloo): splitting the batch over processes must not
change the update, and a 2-process run must train, save once and log once."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("dist_worker.py")

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")


def torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", str(WORKER), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    return out


# Adaptive KL, score normalisation and whitening all use cross-process statistics, so they are on.
# adam_eps 1e-4: Adam's first step is lr * g / (|g| + eps), which turns float noise in near-zero
# gradients into ±lr updates at eps 1e-8; a larger eps keeps the comparison about the gradients.
COMMON = ["iterations=1", "ppo.num_minibatches=1", "ppo.ppo_epochs=2", "ppo.micro_batch_size=2",
          "generation.stop_token_ids=[4,5,6,7,8]",  # punctuation stops: lengths vary by row
          "generation.max_new_tokens=12", "ppo.adaptive_kl=true", "ppo.kl_target=0.5",
          "ppo.kl_horizon=100", "reward.normalize=true", "optim.adam_eps=1e-4"]


def test_two_processes_reproduce_one_process_with_the_same_batch(tmp_path):
    """ppo.batch_size counts over all processes: 2 processes of b rows each give the update
    of one process with all 2b rows."""
    b = 4
    torchrun(1, "step", str(tmp_path / "one"), f"output_dir={tmp_path / 'run1'}",
             f"ppo.batch_size={2 * b}", *COMMON)
    torchrun(2, "step", str(tmp_path / "two"), f"output_dir={tmp_path / 'run2'}",
             f"ppo.batch_size={2 * b}", *COMMON)  # the batch over all processes: b each
    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    for key in ("score_mean", "score_std", "kl", "entropy", "policy_loss", "value_loss",
                "clipfrac", "approx_kl", "grad_norm", "explained_variance", "response_length",
                "value_mean", "return_mean"):
        assert m2[key] == pytest.approx(m1[key], rel=1e-4, abs=1e-6), key
    w1 = torch.load(tmp_path / "one" / "weights.pt", weights_only=True)
    w2 = torch.load(tmp_path / "two" / "weights.pt", weights_only=True)
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=1e-5, rtol=1e-4, msg=k)
    assert m1["ppo_steps"] == m2["ppo_steps"] == 2
    initial = torch.load(tmp_path / "one" / "initial.pt", weights_only=True)
    assert not torch.equal(initial["policy.lm_head.weight"], w1["policy.lm_head.weight"])


def test_two_processes_reproduce_one_process_for_grpo_and_the_loss_variants(tmp_path):
    """A group estimator (groups stay on one process) with clip-higher, dual-clip, the KL loss
    term and Dr. GRPO's aggregation: the same update on 1 and 2 processes."""
    variants = ["ppo.advantage_estimator=grpo", "ppo.samples_per_prompt=2", "ppo.kl_coef=0.0",
                "ppo.kl_loss_coef=0.1", "ppo.clip_range_high=0.28", "ppo.dual_clip=3.0",
                "ppo.loss_aggregation=seq-mean-token-sum-norm"]
    common = [c for c in COMMON if not c.startswith(("ppo.adaptive_kl", "ppo.kl_"))] + variants
    torchrun(1, "step", str(tmp_path / "one"), f"output_dir={tmp_path / 'run1'}",
             "ppo.batch_size=8", *common)
    torchrun(2, "step", str(tmp_path / "two"), f"output_dir={tmp_path / 'run2'}",
             "ppo.batch_size=8", *common)
    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    for key in ("score_mean", "kl", "policy_loss", "kl_loss", "clipfrac", "dual_clipfrac",
                "approx_kl", "grad_norm"):
        assert m2[key] == pytest.approx(m1[key], rel=1e-4, abs=1e-6), key
    assert m1["value_loss"] == m2["value_loss"] == 0.0  # no critic
    w1 = torch.load(tmp_path / "one" / "weights.pt", weights_only=True)
    w2 = torch.load(tmp_path / "two" / "weights.pt", weights_only=True)
    assert w1.keys() == w2.keys() and not any("value_head" in k for k in w1)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=1e-5, rtol=1e-4, msg=k)


def test_two_processes_with_token_budgets_reproduce_one_padded_process(tmp_path):
    """Packed micro-batches cut by a token budget on 2 processes (each process may need another
    number of them: they agree on the largest) give the update of one process with padded
    micro-batches of 2 sequences."""
    torchrun(1, "step", str(tmp_path / "one"), f"output_dir={tmp_path / 'run1'}",
             "ppo.batch_size=8", "ppo.packing=false", *COMMON)
    torchrun(2, "step", str(tmp_path / "two"), f"output_dir={tmp_path / 'run2'}",
             "ppo.batch_size=8", "ppo.micro_batch_tokens=24", *COMMON)
    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    for key in ("score_mean", "kl", "policy_loss", "value_loss", "clipfrac", "approx_kl",
                "grad_norm", "explained_variance"):
        assert m2[key] == pytest.approx(m1[key], rel=1e-4, abs=1e-6), key
    assert m1["ppo_steps"] == m2["ppo_steps"] == 2
    assert m2["padding_share"] < m1["padding_share"]
    w1 = torch.load(tmp_path / "one" / "weights.pt", weights_only=True)
    w2 = torch.load(tmp_path / "two" / "weights.pt", weights_only=True)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=1e-5, rtol=1e-4, msg=k)


def test_two_process_run_trains_saves_once_and_logs_once(tmp_path):
    out = tmp_path / "run"
    torchrun(2, "train", "", f"output_dir={out}", "iterations=3", "save_every=2",
             "ppo.batch_size=8", "ppo.micro_batch_size=4")
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["iteration"] for x in lines] == [1, 2, 3]  # one writer
    assert sorted(p.name for p in out.iterdir()) == ["alarms.jsonl", "checkpoint-2", "checkpoint-3",
                                                      "config.yaml", "final", "metrics.jsonl",
                                                      "report.html"]
    assert sorted(p.name for p in (out / "checkpoint-3" / "training_state").iterdir()) == [
        "config.yaml", "metrics.jsonl", "optimizer.pt", "rng_state_0.pt", "rng_state_1.pt",
        "scheduler.pt", "trainer_state.json"]
    from transformers import AutoModelForCausalLM

    from rlhf_ppo import builtin

    # the saved policy is the trained one: not the initial weights
    initial = AutoModelForCausalLM.from_pretrained(builtin.resolve_model("builtin:tiny"))
    final = AutoModelForCausalLM.from_pretrained(out / "final").state_dict()
    assert any(not torch.equal(v, final[k]) for k, v in initial.state_dict().items())
    shutil.rmtree(out)


AGENT_ENV = '''
import os


class Game:
    """Answers each turn with "user : the movie"; the episode's length depends on what the model
    wrote (1 to 3 turns), so rows, and processes, finish at different turns."""

    def reset(self, row):
        self.turns = 0
        with open(LOG, "a") as f:
            f.write(f"{os.getpid()}\\n")

    def step(self, text):
        self.turns += 1
        with open(LOG, "a") as f:
            f.write("step\\n")
        return "user : the movie", 1.0, self.turns >= 1 + len(text.split()) % 3
'''


def test_two_processes_sample_multiturn_episodes_each_with_its_own_environments(tmp_path):
    """Under DDP every process samples its share of the batch through its own environment
    instances (no collective while sampling, so rows that end at different turns on different
    processes cannot deadlock), and the agent/* metrics are means over both processes' episodes."""
    log = tmp_path / "resets.log"
    (tmp_path / "game.py").write_text(f"LOG = {str(log)!r}\n" + AGENT_ENV)
    out = tmp_path / "run"
    torchrun(2, "train", "", f"output_dir={out}", "iterations=2", "ppo.batch_size=8",
             "ppo.micro_batch_size=4", f"agent.environment={tmp_path / 'game.py'}:Game",
             "agent.protocol=text", "agent.max_tokens_per_turn=3", "agent.max_total_tokens=24")
    lines = log.read_text().split()
    pids = [x for x in lines if x != "step"]
    assert len(pids) == 16 and len(set(pids)) == 2  # 2 iterations x 8 episodes, over 2 processes
    assert sorted(pids.count(p) for p in set(pids)) == [8, 8]  # 4 per process per iteration
    turns = []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        turns.append(m["agent/turns"])
        assert 1.0 <= m["agent/turns"] <= 3.0 and m["agent/success"] >= 0.0
        # each observation is 4 words, one fewer than the turns (the last step ends the episode)
        assert m["agent/observation_tokens"] == pytest.approx(4 * (m["agent/turns"] - 1))
    # the logged means are over both processes' episodes: 8 per iteration, every step logged
    assert lines.count("step") == pytest.approx(8 * sum(turns))


FROZEN_SHARDED = ["model.shard_frozen_models=true", "reward.sources=[{model: 'builtin:tiny-reward'}]"]


# The FSDP2 cases run by default (about 20-25 s each on 2 CPU cores); the DeepSpeed ones are
# opt-in (slow: pass --runslow; DeepSpeed must be installed).
@pytest.mark.parametrize("engine,frozen,ref_type", [
    pytest.param("fsdp2", [], "ReferenceModel", id="fsdp2"),
    pytest.param("fsdp2", FROZEN_SHARDED, "FSDPReferenceModel", id="fsdp2-sharded-ref-and-reward"),
    pytest.param("zero2", [], "ReferenceModel", id="zero2", marks=pytest.mark.slow),
    pytest.param("zero3", [], "ReferenceModel", id="zero3", marks=pytest.mark.slow),
    pytest.param("zero3", FROZEN_SHARDED, "ReferenceModel", id="zero3-sharded-ref-and-reward",
                 marks=pytest.mark.slow),
])
def test_sharded_engine_on_cpu_reproduces_one_process(tmp_path, engine, frozen, ref_type):
    """FSDP2 / DeepSpeed ZeRO on CPU (gloo; the worker forces the engine's plugin, see
    dist_worker.py): generation through gathered weights, the sharded update, the gathered save,
    optionally sharded reference and reward models. FSDP2 processes on gloo can abort at exit
    (the run is judged by its outputs)."""
    if engine.startswith("zero"):
        pytest.importorskip("deepspeed")
    b = 4
    common = [*COMMON, *frozen]
    torchrun(1, "step", str(tmp_path / "one"), f"output_dir={tmp_path / 'run1'}",
             f"ppo.batch_size={2 * b}", *common)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(WORKER), "step", str(tmp_path / "two"), f"--engine={engine}",
           f"output_dir={tmp_path / 'run2'}", f"ppo.batch_size={2 * b}", *common]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    kind = "FSDP" if engine == "fsdp2" else "DEEPSPEED"
    assert f"engine: DistributedType.{kind} " in out.stdout, out.stderr[-3000:]
    assert ref_type in out.stdout.split("engine:", 1)[1].split()[2]
    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    for key in ("score_mean", "kl", "entropy", "policy_loss", "value_loss", "clipfrac",
                "approx_kl", "grad_norm", "ppo_steps"):
        assert m2[key] == pytest.approx(m1[key], rel=1e-4, abs=1e-6), key
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "final").state_dict()
    w1 = torch.load(tmp_path / "one" / "weights.pt", weights_only=True)
    for k, v in saved.items():
        torch.testing.assert_close(v, w1["policy." + k], atol=1e-5, rtol=1e-4, msg=k)

def test_resume_with_another_process_count(tmp_path):
    from rlhf_ppo import PPOTrainer, load_config

    out = tmp_path / "run"
    root = Path(__file__).resolve().parents[1]
    PPOTrainer(load_config(root / "configs" / "tiny.yaml", [
        f"output_dir={out}", "iterations=2", "ppo.batch_size=8", "ppo.micro_batch_size=4"])).train()
    torchrun(2, "train", "", f"output_dir={out}", "iterations=3", "resume_from=latest",
             "ppo.batch_size=8", "ppo.micro_batch_size=4")
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in lines] == [1, 2, 3]
    state = json.loads((out / "checkpoint-3" / "training_state" / "trainer_state.json").read_text())
    assert state["num_processes"] == 2 and state["iteration"] == 3
