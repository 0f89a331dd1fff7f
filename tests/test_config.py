"""Tests of rlhf_ppo.config: defaults, YAML loading, dotted overrides, validation, field docs."""

import dataclasses
import typing
from pathlib import Path

import pytest

from rlhf_ppo import config as C
from rlhf_ppo import estimators
from rlhf_ppo.config import Config, ConfigError, load_config
from rlhf_ppo.errors import UnreadKeyWarning

ROOT = Path(__file__).resolve().parents[1]


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
    ("report_to=[weights_and_biases]", "report_to[0]"),
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
    with pytest.raises(ConfigError, match=r"ppo\.loss\.clip_range"):
        Config(ppo=C.PPOConfig(loss=C.LossConfig(clip_range=-0.1)))
    # the keyword of before the sections builds the section, with a warning, and validates it
    with pytest.warns(FutureWarning, match="ppo.clip_range is deprecated"), \
            pytest.raises(ConfigError, match=r"ppo\.loss\.clip_range: expected a number > 0"):
        C.PPOConfig(clip_range=-0.1)
    with pytest.warns(FutureWarning):
        p = C.PPOConfig(kl_coef=0.3, kl_estimator="k3", target_kl=0.5, kl=C.KLConfig(adaptive=True))
    assert (p.kl.coef, p.kl.estimator, p.kl.adaptive, p.early_stop_kl) == (0.3, "k3", True, 0.5)


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
    rows = list(C.iter_fields(C.Config))
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
                C.GenerationConfig, C.PPOConfig, C.ForwardConfig, C.AdvantagesConfig, C.LossConfig,
                C.CriticTrainConfig, C.KLConfig, C.OptimConfig):
        docs = C.field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name, "").strip(), f"{cls.__name__}.{f.name} has no docstring"


def test_field_docs_and_iter_fields_content():
    assert C.field_docs(C.LossConfig)["clip_range"] == "PPO ratio clip epsilon"
    rows = {r[0]: r for r in C.iter_fields(C.Config)}
    key, type_name, default, doc = rows["ppo.loss.clip_range"]
    assert type_name == "float" and default == 0.2 and doc == "PPO ratio clip epsilon"
    assert rows["ppo.kl.estimator"][1] == "one of 'k1', 'k2', 'k3'"
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
    # a name close to an old name points to its new one
    with pytest.raises(C.ConfigError, match=r"ppo.kl_coeff: unknown key; did you mean ppo.kl.coef\? "
                                            r"expected one of advantage_estimator, advantages, "):
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


# --------------------------------------------------------------------------- estimators

CRITIC_FREE = [n for n, e in estimators.ESTIMATORS.items() if not e.critic]


@pytest.mark.parametrize("estimator", CRITIC_FREE)
@pytest.mark.parametrize("override, key", [
    ("ppo.critic.warmup=2", "ppo.critic.warmup"),  # was a raw RuntimeError in backward
    ("ppo.critic_warmup=2", "ppo.critic.warmup"),  # the old name: the same refusal
    ("model.critic=separate", "model.critic"),
])
def test_critic_free_estimators_refuse_the_keys_that_ask_for_a_critic(estimator, override, key):
    msg = _raises([f"ppo.advantage_estimator={estimator}", "ppo.samples_per_prompt=2", override],
                  key, f"not read by ppo.advantage_estimator='{estimator}' (it has no critic)")
    assert msg.startswith(override.split("=")[0] + ":")  # the key as the user wrote it
    assert set(estimators.CRITIC_REQUESTS) == {"ppo.critic.warmup", "model.critic",
                                               "model.critic_name_or_path", "model.critic_init"}


@pytest.mark.parametrize("estimator", CRITIC_FREE)
@pytest.mark.parametrize("override, key", [
    ("ppo.critic.vf_coef=0.5", "ppo.critic.vf_coef"),
    ("ppo.critic.value_clip=null", "ppo.critic.value_clip"),
    ("ppo.critic.lam=1.0", "ppo.critic.lam"),
    ("ppo.critic.scale_value_loss=false", "ppo.critic.scale_value_loss"),
    ("ppo.critic.backbone_grad=0.0", "ppo.critic.backbone_grad"),
    ("ppo.advantages.lam=0.9", "ppo.advantages.lam"),
    ("ppo.advantages.lam_length_alpha=0.05", "ppo.advantages.lam_length_alpha"),
    ("optim.critic_lr=0.001", "optim.critic_lr"),
    ("optim.separate_grad_clip=true", "optim.separate_grad_clip"),
])
def test_critic_free_estimators_warn_about_critic_settings_they_never_read(estimator, override, key):
    why = "it does not use GAE" if key.startswith("ppo.advantages") else "it has no critic"
    with pytest.warns(UnreadKeyWarning, match=rf"^{key}: .* not read by "
                      rf"ppo.advantage_estimator='{estimator}' \({why}\)"):
        load_config(None, [f"ppo.advantage_estimator={estimator}", "ppo.samples_per_prompt=2", override])


def test_a_gae_config_file_runs_with_a_critic_free_estimator(recwarn):
    # configs/tiny.yaml sets ppo.critic.vf_coef and optim.critic_lr: unread by grpo, not refused
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["ppo.advantage_estimator=grpo",
                                                       "ppo.samples_per_prompt=2"])
    assert cfg.ppo.critic.vf_coef == 0.5
    assert {str(w.message).split(":")[0] for w in recwarn if w.category is UnreadKeyWarning} == {
        "ppo.critic.vf_coef", "optim.critic_lr"}


def test_critic_keys_at_their_defaults_are_harmless_without_a_critic():
    cfg = load_config(None, ["ppo.advantage_estimator=grpo", "ppo.samples_per_prompt=2",
                             "ppo.critic.vf_coef=0.1", "model.critic=shared"])
    assert cfg.ppo.critic.vf_coef == 0.1


@pytest.mark.parametrize("estimator", [n for n, e in estimators.ESTIMATORS.items() if e.groups])
def test_group_estimators_need_a_group(estimator):
    _raises([f"ppo.advantage_estimator={estimator}"], "ppo.samples_per_prompt",
            "an integer > 1 with ppo.advantage_estimator")


@pytest.mark.parametrize("estimator, value", [
    (n, not e.whiten) for n, e in estimators.ESTIMATORS.items() if e.whiten is not None])
def test_an_estimator_with_a_fixed_whitening_rule_refuses_the_other(estimator, value):
    _raises([f"ppo.advantage_estimator={estimator}", "ppo.samples_per_prompt=2",
             f"ppo.advantages.whiten={str(value).lower()}"], "ppo.advantages.whiten",
            f"ppo.advantage_estimator='{estimator}' {'always' if not value else 'never'} whitens")


@pytest.mark.parametrize("estimator, whiten, expected", [
    ("gae", None, True), ("gae", False, False), ("grpo", None, False), ("rloo", False, False),
    ("reinforce_pp", None, True), ("reinforce_pp_baseline", True, True)])
def test_whitening_follows_the_estimators_rule(estimator, whiten, expected):
    assert estimators.get(estimator).whitens(whiten) is expected


@pytest.mark.parametrize("estimator, old, new", [
    ("gae", True, None), ("gae", False, False),  # read by gae: false stays false
    ("grpo", True, None), ("grpo", False, None),  # never read by grpo: null, not a refusal
    ("reinforce_pp", False, None)])
def test_the_old_whiten_key_keeps_old_configs_working(estimator, old, new):
    with pytest.warns(FutureWarning, match="ppo.whiten_advantages is deprecated"):
        cfg = load_config(None, [f"ppo.advantage_estimator={estimator}", "ppo.samples_per_prompt=2",
                                 f"ppo.whiten_advantages={str(old).lower()}"])
    assert cfg.ppo.advantages.whiten is new


def test_unknown_estimator_lists_the_registry():
    _raises(["ppo.advantage_estimator=ppo2"], "ppo.advantage_estimator",
            "expected one of " + ", ".join(repr(n) for n in estimators.ESTIMATORS))


@pytest.mark.parametrize("override, key, because", [
    ("ppo.kl.adaptive_target=3.0", "ppo.kl.adaptive_target", "ppo.kl.adaptive is false"),
    ("ppo.kl_target=3.0", "ppo.kl.adaptive_target", "ppo.kl.adaptive is false"),
    ("ppo.kl.horizon=100", "ppo.kl.horizon", "ppo.kl.adaptive is false"),
    ("ppo.kl.loss_estimator=k1", "ppo.kl.loss_estimator", "ppo.kl.loss_coef is 0"),
    ("ppo.loss.overlong_penalty=2.0", "ppo.loss.overlong_penalty", "ppo.loss.overlong_buffer is null"),
    ("ppo.kl.coef=0 ppo.kl.estimator=k3", "ppo.kl.estimator", "no KL setting reads the reference"),
])
def test_unread_kl_and_overlong_keys_warn(override, key, because):
    with pytest.warns(UnreadKeyWarning, match=rf"^{key}: set to .* but unread because {because}"):
        load_config(None, override.split())


@pytest.mark.parametrize("reads", ["ppo.kl.coef=0.1", "ppo.kl.adaptive=true", "ppo.kl.loss_coef=0.1"])
def test_the_penalty_estimator_is_read_when_the_reference_is(reads, recwarn):
    load_config(None, ["ppo.kl.coef=0", reads, "ppo.kl.estimator=k3"])
    assert not [w for w in recwarn if "ppo.kl.estimator" in str(w.message)]


def test_old_ppo_names_map_to_the_sections_in_files_overrides_and_attributes(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("ppo:\n  kl_coef: 0.2\n  target_kl: 0.3\n  kl_target: 4.0\n  adaptive_kl: true\n"
                    "  micro_batch_size: 4\n  loss_aggregation: seq-mean\n  clip_range_value: null\n")
    with pytest.warns(FutureWarning):
        cfg = load_config(path, ["ppo.critic_lam=1.0"])
    p = cfg.ppo
    assert (p.kl.coef, p.early_stop_kl, p.kl.adaptive_target, p.kl.adaptive) == (0.2, 0.3, 4.0, True)
    assert (p.forward.micro_batch_size, p.loss.aggregation, p.critic.value_clip, p.critic.lam) == (
        4, "seq-mean", None, 1.0)
    with pytest.warns(FutureWarning, match="ppo.kl_coef is deprecated.*use ppo.kl.coef"):
        assert p.kl_coef == 0.2
    with pytest.warns(FutureWarning):
        p.kl_coef = 0.5
    assert p.kl.coef == 0.5
    # both names at once: refused
    _raises(["ppo.kl_coef=0.1", "ppo.kl.coef=0.2"], "ppo.kl_coef", "renamed to ppo.kl.coef")


def test_an_override_under_either_name_wins_over_the_file(tmp_path):
    new, old = tmp_path / "new.yaml", tmp_path / "old.yaml"
    new.write_text("ppo:\n  kl:\n    coef: 0.2\n")
    old.write_text("ppo:\n  kl_coef: 0.2\n")
    with pytest.warns(FutureWarning):
        assert load_config(new, ["ppo.kl_coef=0.7"]).ppo.kl.coef == 0.7
    assert load_config(old, ["ppo.kl.coef=0.7"]).ppo.kl.coef == 0.7  # the file's old name


def test_cli_names_renamed_and_refused_keys_in_one_line_each(tmp_path, capsys, monkeypatch):
    import warnings

    from rlhf_ppo import cli

    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # restored afterwards
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        code = cli.main(["train", "--config", str(ROOT / "configs" / "tiny.yaml"),
                         "ppo.advantage_estimator=grpo", "ppo.samples_per_prompt=4",
                         "ppo.critic_warmup=2", f"output_dir={tmp_path}"])
    err = capsys.readouterr().err.splitlines()
    assert code == 2
    assert "rlhf-ppo: warning: config key ppo.critic_warmup is deprecated and will be removed: use " \
           "ppo.critic.warmup" in err
    assert err[-1].startswith("rlhf-ppo: config error: ppo.critic_warmup: iterations that train the "
                              "critic alone is not read by ppo.advantage_estimator='grpo'")
    assert not any("config.py" in line for line in err)  # no source lines of ours


def test_an_old_whiten_value_an_estimator_never_read_warns():
    with pytest.warns(UnreadKeyWarning, match=r"ppo.whiten_advantages: False was never read by "
                      r"ppo.advantage_estimator='reinforce_pp' \(it always whitens\); dropped"):
        cfg = load_config(None, ["ppo.advantage_estimator=reinforce_pp", "ppo.whiten_advantages=false"])
    assert cfg.ppo.advantages.whiten is None


def test_a_new_registry_entry_is_a_valid_estimator(monkeypatch):
    """Adding an estimator is one entry: the config accepts it and applies its needs."""
    toy = estimators.Estimator("toy", "score minus the group mean", critic=False, whiten=False,
                               baseline=estimators.ops.group_centered)
    monkeypatch.setitem(estimators.ESTIMATORS, "toy", toy)
    cfg = load_config(None, ["ppo.advantage_estimator=toy", "ppo.samples_per_prompt=2"])
    assert estimators.get(cfg.ppo.advantage_estimator) is toy
    _raises(["ppo.advantage_estimator=toy"], "ppo.samples_per_prompt", "an integer > 1")
    _raises(["ppo.advantage_estimator=toy", "ppo.samples_per_prompt=2", "ppo.critic.warmup=1"],
            "ppo.critic.warmup", "not read by ppo.advantage_estimator='toy'")
