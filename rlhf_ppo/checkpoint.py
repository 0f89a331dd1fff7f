"""Checkpoints that resume exactly, written so that a crash mid-save never corrupts one.

A checkpoint folder ``OUTPUT_DIR/checkpoint-N`` holds:
- the policy and tokenizer (``save_pretrained``, loadable by ``AutoModelForCausalLM``) with the
  value head (``value_head.safetensors``) or the separate critic (``critic/``);
- ``training_state/``: ``optimizer.pt`` and ``scheduler.pt`` (tensors and numbers only, read
  back with ``torch.load(weights_only=True)``), ``rng_state_R.pt`` for every process R, and
  ``trainer_state.json`` (iteration, KL coefficient, data position, score statistics);
- ``.complete``, written last. The folder is assembled under ``.tmp-checkpoint-N`` and renamed
  into place, so a folder named ``checkpoint-N`` is always whole.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import shutil
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .trainer import PPOTrainer

logger = logging.getLogger(__name__)

STATE_DIR = "training_state"
COMPLETE = ".complete"
_NAME = re.compile(r"^checkpoint-(\d+)$")
# Test hook: "checkpoint-N:STAGE" kills the process with SIGKILL at that point of that save
# (STAGE: model, optimizer, rng, state), to show that an interrupted save loses nothing.
ABORT_ENV = "RLHF_PPO_TEST_KILL_DURING_SAVE"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not fit this run."""


def _maybe_abort(folder_name: str, stage: str) -> None:
    if os.environ.get(ABORT_ENV) == f"{folder_name}:{stage}":
        os.kill(os.getpid(), signal.SIGKILL)


def json_safe(obj):
    """``obj`` with every NaN / inf float replaced by None, recursively through dicts and lists,
    so metrics lines and summaries are strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    out = []
    for p in Path(output_dir).glob("checkpoint-*"):
        m = _NAME.match(p.name)
        if m and (p / COMPLETE).is_file():
            out.append((int(m.group(1)), p))
    return [p for _, p in sorted(out)]


def resolve_resume(resume_from: str, output_dir: str | Path) -> Path:
    """The checkpoint folder named by ``resume_from`` (``latest`` or a path)."""
    if resume_from == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise CheckpointError(f"resume_from=latest: no complete checkpoint in {str(output_dir)!r}")
        return found[-1]
    path = Path(resume_from)
    if not (path / COMPLETE).is_file() or not (path / STATE_DIR).is_dir():
        raise CheckpointError(f"resume_from: {resume_from!r} is not a complete checkpoint folder "
                              f"(expected {STATE_DIR}/ and {COMPLETE} inside)")
    return path


def _rng_state(trainer: PPOTrainer) -> dict[str, Any]:
    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
             "torch": torch.get_rng_state(), "shuffle": trainer.shuffle_gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(trainer: PPOTrainer, state: dict[str, Any]) -> None:
    import numpy as np

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    trainer.shuffle_gen.set_state(state["shuffle"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainer_state(trainer: PPOTrainer) -> dict[str, Any]:
    """Everything besides weights, optimizer and RNG that the next iteration depends on."""
    s = trainer.sampler
    m = trainer.rewards.moments
    return {
        "iteration": trainer.iteration,
        "kl_coef": trainer.kl_ctl.value,
        # Position in the current pass, counted in prompts of all processes, so that a resume
        # with another process count continues the same pass.
        "data": {"epoch": s.epoch, "global_position": s.position * s.world_size,
                 "world_size": s.world_size},
        "score_moments": {"mean": m.mean, "var": m.var, "count": m.count},
        "num_processes": trainer.accelerator.num_processes,
        "nonfinite_skips": trainer.nonfinite_skips,
    }


def save_checkpoint(trainer: PPOTrainer, folder: Path) -> None:
    """Write a checkpoint of ``trainer`` atomically to ``folder`` (every process must call)."""
    from .config import save_config
    from .distributed import full_state_dict
    from .models import save_actor_critic

    acc = trainer.accelerator
    folder = Path(folder)
    tmp = folder.parent / f".tmp-{folder.name}"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # left over by a crash during an earlier save
        (tmp / STATE_DIR).mkdir(parents=True)
    acc.wait_for_everyone()
    state = full_state_dict(acc, trainer.model)
    # Sharded engines keep per-process optimizer shards: not saved (resume refuses them).
    sharded = acc.distributed_type.name in ("DEEPSPEED", "FSDP")
    optim_state = None if sharded else trainer.optimizer.state_dict()
    torch.save(_rng_state(trainer), tmp / STATE_DIR / f"rng_state_{acc.process_index}.pt")
    if acc.is_main_process:
        save_actor_critic(trainer.unwrapped, trainer.tokenizer, tmp, state)
        _maybe_abort(folder.name, "model")
        if optim_state is not None:
            torch.save(optim_state, tmp / STATE_DIR / "optimizer.pt")
        torch.save(trainer.scheduler.state_dict(), tmp / STATE_DIR / "scheduler.pt")
        _maybe_abort(folder.name, "optimizer")
        (tmp / STATE_DIR / "trainer_state.json").write_text(
            json.dumps(trainer_state(trainer), indent=1))
        save_config(trainer.cfg, tmp / STATE_DIR / "config.yaml")
        with open(tmp / STATE_DIR / "metrics.jsonl", "w") as f:
            for m in trainer.history:
                f.write(json.dumps(json_safe(m)) + "\n")
        _maybe_abort(folder.name, "state")
    acc.wait_for_everyone()
    if acc.is_main_process:
        (tmp / COMPLETE).write_text("ok\n")
        if folder.exists():  # an older save of the same iteration (e.g. an extended run)
            shutil.rmtree(folder)
        os.replace(tmp, folder)
        prune(folder.parent, trainer.cfg.keep_last)
        logger.info("checkpoint written: %s", folder)
    acc.wait_for_everyone()


def prune(output_dir: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints (0 keeps all)."""
    if keep_last <= 0:
        return
    for old in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def _load(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {str(path)!r} is missing")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_weights(model, folder: Path) -> None:
    """Load the checkpoint's policy and value head / critic into an (unprepared) ActorCritic."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from .models import VALUE_HEAD_FILE, is_peft

    if is_peft(model.policy):  # the trained adapter; the base and "reference" stay as loaded
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model.policy, load_file(folder / "adapter_model.safetensors"),
                                  adapter_name="default")
        if model.critic_adapter is not None:  # on the policy's or the reward model's base
            name = model.critic_adapter
            _, host = model.critic_adapter_host
            set_peft_model_state_dict(host, load_file(folder / name / "adapter_model.safetensors"),
                                      adapter_name=name)
            folder = folder / name  # its value head lies beside it
    else:
        saved = AutoModelForCausalLM.from_pretrained(folder,
                                                     dtype=next(model.policy.parameters()).dtype)
        model.policy.load_state_dict(saved.state_dict())
        del saved
    if model.value_head is not None:
        model.value_head.load_state_dict(load_file(folder / VALUE_HEAD_FILE))
    else:
        critic = AutoModelForSequenceClassification.from_pretrained(folder / "critic")
        model.critic.load_state_dict(critic.state_dict())


def load_metrics(folder: Path) -> list[dict]:
    """The metrics history saved with a checkpoint."""
    path = folder / STATE_DIR / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_training_state(trainer: PPOTrainer, folder: Path) -> dict[str, Any]:
    """Restore optimizer, scheduler, RNG, KL coefficient, data position and score statistics."""
    acc = trainer.accelerator
    sd = folder / STATE_DIR
    state = json.loads((sd / "trainer_state.json").read_text())
    trainer.optimizer.load_state_dict(_load(sd / "optimizer.pt"))
    trainer.scheduler.load_state_dict(_load(sd / "scheduler.pt"))
    rng_file = sd / f"rng_state_{acc.process_index}.pt"
    if rng_file.is_file():
        _set_rng_state(trainer, _load(rng_file))
    else:  # more processes than the run that saved: fresh, distinct streams for the new ones
        logger.warning("%s has no RNG state for process %d; seeding it afresh", folder,
                       acc.process_index)
    trainer.iteration = state["iteration"]
    trainer.kl_ctl.value = state["kl_coef"]
    s, data = trainer.sampler, state["data"]
    s.epoch = data["epoch"]
    s._order = s._permutation()
    s.position = data["global_position"] // s.world_size
    m, sm = trainer.rewards.moments, state["score_moments"]
    m.mean, m.var, m.count = sm["mean"], sm["var"], sm["count"]
    return state
