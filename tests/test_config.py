"""Tests of rlhf_ppo.config: defaults, YAML loading, dotted overrides, validation, field docs."""

import dataclasses
import typing

import pytest

from rlhf_ppo import config as C
from rlhf_ppo.config import Config, ConfigError, load_config


def _raises(overrides, *fragments):
    """load_config with these overrides must raise ConfigError naming every fragment."""
    with pytest.raises(ConfigError) as info:
        load_config(overrides=overrides)
    msg = str(info.value)
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in {msg!r}"
    return msg


# --------------------------------------------------------------------------- defaults and loading

def test_defaults_build():
    cfg = Config()
    assert cfg.ppo.batch_size == 16 and cfg.ppo.num_minibatches == 2
    assert cfg.ppo.clip_range == 0.2
    assert cfg.optim.lr == 3e-6 and cfg.optim.critic_lr is None
    assert len(cfg.reward.sources) == 1 and cfg.reward.sources[0].function is not None
    assert isinstance(cfg.reward.sources[0], C.RewardSource)
    # load_config without a file gives the same defaults
    assert load_config().to_dict() == cfg.to_dict()
    assert C.config_from_dict({}).to_dict() == cfg.to_dict()
    assert C.config_from_dict(None).to_dict() == cfg.to_dict()


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


def test_load_config_from_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "seed: 7\n"
        "output_dir: runs/x\n"
        "ppo:\n"
        "  clip_range: 0.1\n"
        "  kl_estimator: k3\n"
        "  clip_range_value: null\n"
        "optim:\n"
        "  lr: 3e-6\n"          # YAML 1.1 reads this as the string '3e-6'
        "  adam_betas: [0.9, 0.95]\n"
        "reward:\n"
        "  sources:\n"
        "    - model: some/reward-model\n"
        "      weight: 2\n"
        "    - function: pkg.mod:fn\n"
        "      kwargs: {alpha: 1}\n"
    )
    cfg = load_config(path)
    assert cfg.seed == 7 and cfg.output_dir == "runs/x"
    assert cfg.ppo.clip_range == 0.1
    assert cfg.ppo.kl_estimator == "k3"
    assert cfg.ppo.clip_range_value is None
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == 3e-6
    assert cfg.optim.adam_betas == [0.9, 0.95]
    src0, src1 = cfg.reward.sources
    assert isinstance(src0, C.RewardSource) and src0.model == "some/reward-model"
    assert src0.weight == 2.0 and isinstance(src0.weight, float)  # int coerced to float
    assert src1.function == "pkg.mod:fn" and src1.kwargs == {"alpha": 1}
    # untouched fields keep their defaults
    assert cfg.ppo.batch_size == 16
    assert load_config(str(path)).to_dict() == cfg.to_dict()  # str path works too


def test_empty_yaml_file_gives_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(path).to_dict() == Config().to_dict()


def test_overrides_win_over_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("ppo:\n  clip_range: 0.3\n  lam: 0.9\n")
    cfg = load_config(path, ["ppo.clip_range=0.1"])
    assert cfg.ppo.clip_range == 0.1
    assert cfg.ppo.lam == 0.9


def test_string_float_coerced():
    cfg = load_config(overrides=["optim.lr=3e-6", "optim.critic_lr=1e-5"])
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == 3e-6
    assert isinstance(cfg.optim.critic_lr, float) and cfg.optim.critic_lr == 1e-5


def test_save_config_round_trip(tmp_path):
    cfg = load_config(overrides=["ppo.clip_range=0.15", "generation.stop_strings=['\\n\\n']"])
    path = tmp_path / "saved.yaml"
    C.save_config(cfg, path)
    assert load_config(path).to_dict() == cfg.to_dict()


# --------------------------------------------------------------------------- dotted overrides

def test_dotted_overrides_scalars_lists_and_nulls():
    cfg = load_config(overrides=[
        "ppo.clip_range=0.1",
        "ppo.batch_size=32",
        "optim.critic_lr=null",
        "optim.max_grad_norm=null",
        "generation.stop_token_ids=[5, 7]",
        "generation.stop_strings=['###']",
        "report_to=[tensorboard]",
        "ppo.adaptive_kl=true",
        "model.dtype=bfloat16",
    ])
    assert cfg.ppo.clip_range == 0.1
    assert cfg.ppo.batch_size == 32
    assert cfg.optim.critic_lr is None
    assert cfg.optim.max_grad_norm is None
    assert cfg.generation.stop_token_ids == [5, 7]
    assert cfg.generation.stop_strings == ["###"]
    assert cfg.report_to == ["tensorboard"]
    assert cfg.ppo.adaptive_kl is True
    assert cfg.model.dtype == "bfloat16"


def test_override_reward_sources_list_of_mappings():
    cfg = load_config(overrides=["reward.sources=[{function: 'a.b:c'}, {model: m, weight: 0.5}]"])
    assert [type(s) for s in cfg.reward.sources] == [C.RewardSource, C.RewardSource]
    assert cfg.reward.sources[0].function == "a.b:c" and cfg.reward.sources[0].model is None
    assert cfg.reward.sources[1].model == "m" and cfg.reward.sources[1].weight == 0.5


def test_override_later_wins_and_value_with_equals_sign():
    cfg = load_config(overrides=["ppo.lam=0.5", "ppo.lam=0.7", "output_dir=runs/a=b"])
    assert cfg.ppo.lam == 0.7
    assert cfg.output_dir == "runs/a=b"


def test_apply_overrides_nested_dict():
    data = {"ppo": {"lam": 0.5}}
    C.apply_overrides(data, ["ppo.gamma=0.99", "optim.lr=1e-4"])
    assert data == {"ppo": {"lam": 0.5, "gamma": 0.99}, "optim": {"lr": "1e-4"}}


@pytest.mark.parametrize("item", ["ppo.clip_range", "=1", "ppo..clip_range=1", ".x=1"])
def test_malformed_override(item):
    _raises([item], item)


def test_override_through_a_non_section():
    _raises(["seed=1", "seed.x=2"], "seed")


# --------------------------------------------------------------------------- unknown keys, types

def test_unknown_top_level_key():
    _raises(["ppo_epochs=2"], "ppo_epochs", "unknown key")


def test_unknown_nested_key():
    _raises(["ppo.clip_rnge=0.1"], "ppo.clip_rnge", "unknown key")


def test_unknown_key_in_reward_source():
    _raises(["reward.sources=[{function: 'a.b:c', wieght: 2}]"], "reward.sources[0].wieght")


def test_unknown_key_in_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"optim\.learning_rate"):
        load_config(path)


@pytest.mark.parametrize("override, key, expected", [
    ("ppo.batch_size=abc", "ppo.batch_size", "expected int"),
    ("ppo.ppo_epochs=1.5", "ppo.ppo_epochs", "expected int"),
    # a bool is not an int, even where its int value (1 or 0) would pass validation
    ("ppo.ppo_epochs=true", "ppo.ppo_epochs", "expected int"),
    ("seed=false", "seed", "expected int"),
    ("generation.batch_size=true", "generation.batch_size", "expected int or null"),
    ("ppo.clip_range=true", "ppo.clip_range", "expected float"),  # a bool is not a float
    ("ppo.clip_range=abc", "ppo.clip_range", "expected float"),
    ("ppo.adaptive_kl=1", "ppo.adaptive_kl", "expected bool"),    # an int is not a bool
    ("ppo.adaptive_kl=yes_please", "ppo.adaptive_kl", "expected bool"),
    ("output_dir=123", "output_dir", "expected str"),             # an int is not a str
    ("generation.stop_token_ids=5", "generation.stop_token_ids", "expected a list"),
    ("generation.stop_token_ids=[1, x]", "generation.stop_token_ids[1]", "expected int"),
    ("ppo=5", "ppo", "expected a mapping"),                       # a section is a mapping
    ("reward.sources=[{function: 'a.b:c', kwargs: 3}]", "reward.sources[0].kwargs",
     "expected a mapping"),
    ("ppo.batch_size=null", "ppo.batch_size", "expected int"),    # not optional
])
def test_wrong_type(override, key, expected):
    msg = _raises([override], key, expected)
    assert msg.startswith(key + ":"), msg


@pytest.mark.parametrize("override, key", [
    ("ppo.kl_estimator=k4", "ppo.kl_estimator"),
    ("model.dtype=float64", "model.dtype"),
    ("ppo.loss_aggregation=sum", "ppo.loss_aggregation"),
    ("report_to=[wandb]", "report_to[0]"),
])
def test_literal_invalid_choice(override, key):
    msg = _raises([override], key)
    assert "k1" in msg or "float32" in msg or "token-mean" in msg or "tensorboard" in msg


# --------------------------------------------------------------------------- invalid values

@pytest.mark.parametrize("override, key", [
    ("optim.lr=-1e-5", "optim.lr"),
    ("optim.lr=0", "optim.lr"),
    ("optim.critic_lr=-1.0", "optim.critic_lr"),
    ("ppo.clip_range=0", "ppo.clip_range"),
    ("ppo.clip_range_value=0", "ppo.clip_range_value"),
    ("ppo.gamma=1.5", "ppo.gamma"),
    ("ppo.lam=-0.1", "ppo.lam"),
    ("ppo.kl_coef=-0.1", "ppo.kl_coef"),
    ("ppo.ppo_epochs=0", "ppo.ppo_epochs"),
    ("ppo.kl_target=0", "ppo.kl_target"),
    ("iterations=0", "iterations"),
    ("generation.temperature=0", "generation.temperature"),
    ("generation.top_p=0", "generation.top_p"),
    ("generation.min_new_tokens=100", "generation.min_new_tokens"),
    ("optim.adam_betas=[0.9]", "optim.adam_betas"),
    ("optim.adam_betas=[0.9, 1.0]", "optim.adam_betas"),
    ("reward.sources=[]", "reward.sources"),
    ("reward.clip=0", "reward.clip"),
    ("model.critic_name_or_path=some/model", "model.critic_name_or_path"),
    ("generation.cache_implementation=statik", "generation.cache_implementation"),
    # a model.generate option: refused with the native loop, not silently ignored
    ("generation.cache_implementation=static", "generation.cache_implementation"),
])
def test_invalid_values(override, key):
    _raises([override], key)


def test_batch_size_not_divisible_by_num_minibatches():
    _raises(["ppo.batch_size=10", "ppo.num_minibatches=3"], "ppo.batch_size")


def test_micro_batch_size_not_dividing_minibatch():
    # minibatch = 16 / 2 = 8; 3 does not divide 8
    _raises(["ppo.micro_batch_size=3"], "ppo.micro_batch_size")
    # 4 divides 8: fine
    assert load_config(overrides=["ppo.micro_batch_size=4"]).ppo.micro_batch_size == 4


def test_reward_source_with_both_model_and_function():
    _raises(["reward.sources=[{model: m, function: 'a.b:c'}]"], "reward.sources[0]")


def test_reward_source_with_neither_model_nor_function():
    _raises(["reward.sources=[{function: 'a.b:c'}, {weight: 2.0}]"], "reward.sources[1]")


def test_reward_function_without_colon():
    _raises(["reward.sources=[{function: a.b.c}]"], "reward.sources[0].function")


def test_validation_also_runs_on_direct_construction():
    with pytest.raises(ConfigError, match=r"ppo\.clip_range"):
        Config(ppo=C.PPOConfig(clip_range=-0.1))


# --------------------------------------------------------------------------- files

def test_missing_config_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(path)


def test_invalid_yaml(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("ppo:\n  clip_range: [0.1\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_config(path)


def test_yaml_top_level_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="list.yaml"):
        load_config(path)


# --------------------------------------------------------------------------- field docs

def _leaf_keys(cls, prefix=""):
    """Every leaf dotted key, walking the dataclasses directly (independent of iter_fields)."""
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            keys += _leaf_keys(tp, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def test_every_leaf_field_has_a_docstring():
    rows = list(C.iter_fields())
    keys = [r[0] for r in rows]
    assert len(keys) == len(set(keys))
    # every leaf of Config is listed
    assert set(_leaf_keys(Config)) <= set(keys)
    # and the fields of the RewardSource items of reward.sources
    for name in ("model", "function", "weight", "kwargs"):
        assert f"reward.sources[].{name}" in keys
    for key, type_name, _default, doc in rows:
        assert isinstance(doc, str) and doc.strip(), f"{key} has no docstring"
        assert type_name, key


def test_every_dataclass_field_has_a_docstring():
    for cls in (Config, C.ModelConfig, C.RewardSource, C.RewardConfig, C.DataConfig,
                C.GenerationConfig, C.PPOConfig, C.OptimConfig):
        docs = C.field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name, "").strip(), f"{cls.__name__}.{f.name} has no docstring"


def test_field_docs_and_iter_fields_content():
    assert C.field_docs(C.PPOConfig)["clip_range"] == "PPO ratio clip epsilon"
    rows = {r[0]: r for r in C.iter_fields()}
    key, type_name, default, doc = rows["ppo.clip_range"]
    assert type_name == "float" and default == 0.2 and doc == "PPO ratio clip epsilon"
    assert rows["ppo.kl_estimator"][1] == "one of 'k1', 'k2', 'k3'"
    assert rows["optim.critic_lr"][1] == "float or null"
    assert rows["optim.adam_betas"][2] == [0.9, 0.999]
    # list-of-dataclass defaults are shown as plain dicts
    assert rows["reward.sources"][2] == [dataclasses.asdict(s) for s in Config().reward.sources]


def test_cache_implementations_match_transformers():
    """config.py stays free of transformers imports, so it keeps its own copy of generate's
    cache_implementation values: this fails when transformers' list changes."""
    from transformers.generation.configuration_utils import ALL_CACHE_IMPLEMENTATIONS

    from rlhf_ppo.config import CACHE_IMPLEMENTATIONS

    assert sorted(CACHE_IMPLEMENTATIONS) == sorted(ALL_CACHE_IMPLEMENTATIONS)


def test_renamed_ppo_keys_map_to_the_new_ones_with_a_warning():
    with pytest.warns(FutureWarning, match="eval_every is deprecated .* use sample_every"):
        cfg = C.load_config(None, ["eval_every=3", "eval_prompts=2"])
    assert (cfg.sample_every, cfg.sample_prompts) == (3, 2)
    with pytest.raises(C.ConfigError, match="eval_every: renamed to sample_every, and both are set"):
        C.load_config(None, ["eval_every=3", "sample_every=2"])


def test_every_renamed_key_points_to_a_key_that_exists():
    from rlhf_ppo.reward_training import RewardTrainConfig
    from rlhf_ppo.sft import SFTConfig

    for cls in (C.Config, SFTConfig, RewardTrainConfig):
        keys = {key for key, *_ in C.iter_fields(cls)}
        assert cls.RENAMED, cls
        for old, new in cls.RENAMED.items():
            assert new in keys and old not in keys, (cls.__name__, old, new)


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(C.ConfigError, match=r"ppo.kl_coeff: unknown key; did you mean ppo.kl_coef\? "
                                            r"expected one of adaptive_kl, "):
        C.load_config(None, ["ppo.kl_coeff=0.1"])
    with pytest.raises(C.ConfigError) as err:  # nothing close: no guess
        C.load_config(None, ["ppo.zzz=1"])
    assert "did you mean" not in str(err.value)


def test_help_shows_no_rest_markup(capsys):
    from rlhf_ppo import cli

    for command in ([], ["train"], ["sft"], ["reward"], ["evaluate"]):
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args([*command, "--help"])
        out = capsys.readouterr().out
        assert "``" not in out and ":func:" not in out and ":class:" not in out, command
    assert cli.plain("the ``rlhf-ppo`` command, see :func:`ops.whiten`") == \
        "the rlhf-ppo command, see ops.whiten"
