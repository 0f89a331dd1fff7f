"""The README documents every config field (its table is generated from the dataclasses)."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("config_reference",
                                                  ROOT / "scripts" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_config_tables_are_current():
    ref = _script()
    readme = (ROOT / "README.md").read_text()
    for command in ref.COMMANDS:
        begin, end = ref.markers(command)
        section = readme.split(begin, 1)[1].split(end, 1)[0].strip()
        assert section == ref.table(command), "run: python scripts/config_reference.py --write"


def test_readme_starts_with_the_two_commands():
    lines = [ln for ln in (ROOT / "README.md").read_text().splitlines() if ln.strip()]
    blocks = [ln for ln in lines[:12] if ln.startswith(("python", "pip"))]
    assert len(blocks) == 2
    assert blocks[0].endswith("rlhf-ppo quickstart")
    assert "pytest" in blocks[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert blocks[1] in ci  # CI runs exactly the README's test command


def test_a_command_can_redocument_a_section_field():
    """evaluate's `data.shuffle` picks the prompt subset; in training it reshuffles every pass."""
    from rlhf_ppo.config import Config, iter_fields
    from rlhf_ppo.evaluate import EvalConfig

    train = {k: doc for k, _, _, doc in iter_fields(Config)}
    evaluate = {k: doc for k, _, _, doc in iter_fields(EvalConfig)}
    assert "every pass" in train["data.shuffle"]
    assert "num_prompts" in evaluate["data.shuffle"]
    assert evaluate["reward.normalize"].startswith("ignored")
    assert evaluate["data.path"] == train["data.path"]  # the others keep their docs
    assert not set(EvalConfig.NESTED_DOCS) - set(evaluate)  # every override names a real key
