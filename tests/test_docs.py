"""The docs are current and connected: README.md is short, starts with the two commands, links
every docs page; relative links resolve; docs/config.md documents every config field (its tables
are generated from the dataclasses by rlhf_ppo.config_reference)."""

import re
from pathlib import Path

import pytest

from rlhf_ppo import config_reference as ref

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
README_MAX_BYTES = 15_000

_FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def links(text: str) -> list[str]:
    """Targets of the markdown links and images in `text`, outside code blocks and code spans."""
    text = _CODE.sub("", _FENCE.sub("", text))
    return _LINK.findall(text)


def broken_links(path: Path) -> list[str]:
    """Relative link targets of the markdown file `path` that name no existing file or folder."""
    bad = []
    for target in links(path.read_text()):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue  # a URL (http:, mailto:, ...) or an anchor in the same page
        file = target.split("#", 1)[0].split("?", 1)[0]
        if not (path.parent / file).exists():
            bad.append(target)
    return bad


def unlinked_pages(readme: Path, pages: list[Path]) -> list[Path]:
    """The pages that `readme` does not link to."""
    linked = {(readme.parent / t.split("#", 1)[0]).resolve() for t in links(readme.read_text())
              if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.I) and not t.startswith("#")}
    return [p for p in pages if p.resolve() not in linked]


def doc_pages() -> list[Path]:
    return sorted((ROOT / "docs").glob("*.md"))


def test_config_reference_is_current():
    text = (ROOT / "docs" / "config.md").read_text()
    assert not ref.stale(text), f"docs/config.md is stale: run {ref.WRITE_COMMAND}"


def test_config_reference_check_fails_when_stale(tmp_path, capsys):
    current = tmp_path / "current.md"
    current.write_text((ROOT / "docs" / "config.md").read_text())
    assert ref.main(["--check", "--file", str(current)]) == 0
    stale = tmp_path / "stale.md"
    begin, end = ref.markers("sft")
    stale.write_text(current.read_text().replace(begin, f"{begin}\n| `old_key` | int | `0` | x |"))
    assert ref.stale(stale.read_text()) == ["sft"]
    assert ref.main(["--check", "--file", str(stale)]) == 1
    assert ref.WRITE_COMMAND in capsys.readouterr().err
    assert ref.main(["--write", "--file", str(stale)]) == 0
    assert stale.read_text() == current.read_text()
    missing = tmp_path / "missing.md"
    missing.write_text("# no markers\n")
    assert ref.stale(missing.read_text()) == list(ref.COMMANDS)
    assert ref.main(["--write", "--file", str(missing)]) == 1


def test_readme_starts_with_the_two_commands():
    lines = [ln for ln in README.read_text().splitlines() if ln.strip()]
    blocks = [ln for ln in lines[:12] if ln.startswith(("python", "pip"))]
    assert len(blocks) == 2
    assert blocks[0].endswith("rlhf-ppo quickstart")
    assert "pytest" in blocks[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert blocks[1] in ci  # CI runs exactly the README's test command


def test_readme_is_short():
    size = README.stat().st_size
    assert size <= README_MAX_BYTES, (
        f"README.md is {size} bytes, over {README_MAX_BYTES}: move detail to a docs/ page")


def test_readme_links_every_docs_page():
    pages = doc_pages()
    assert pages
    missing = unlinked_pages(README, pages)
    assert not missing, f"README.md does not link {[str(p.relative_to(ROOT)) for p in missing]}"


@pytest.mark.parametrize("page", [README, *doc_pages()], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    bad = broken_links(page)
    assert not bad, f"{page.relative_to(ROOT)}: links to missing files: {bad}"


def test_the_link_checks_can_fail(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("[b](b.md) [up](../README.md#x) ![i](img/i.png)")
    (tmp_path / "docs" / "b.md").write_text("")
    readme = tmp_path / "README.md"
    readme.write_text("[a](docs/a.md#s) [web](https://x.org/y.md) [here](#top)\n"
                      "```\n[in code](docs/gone.md)\n```\n`[span](docs/gone.md)`\n")
    pages = sorted((tmp_path / "docs").glob("*.md"))
    assert broken_links(readme) == []
    assert broken_links(tmp_path / "docs" / "a.md") == ["img/i.png"]
    assert unlinked_pages(readme, pages) == [tmp_path / "docs" / "b.md"]
    readme.write_text(readme.read_text() + "[b](docs/b.md) [gone](docs/gone.md)")
    assert unlinked_pages(readme, pages) == []
    assert broken_links(readme) == ["docs/gone.md"]


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


def test_readme_python_example_runs_twice(tmp_path, monkeypatch):
    """The README's Python example, run as a user would from a checkout (relative paths), twice:
    the second run must not be refused because the first left its run folder behind."""
    block = re.search(r"```python\n(from rlhf_ppo import .*?)```", README.read_text(), re.S).group(1)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        scope: dict = {}
        exec(compile(block, "README.md", "exec"), scope)
        assert [m["iteration"] for m in scope["history"]] == list(range(1, 11))
    assert (tmp_path / scope["cfg"].output_dir / "final" / "config.json").is_file()


def test_estimator_table_is_current_and_reads_the_registry(monkeypatch):
    from rlhf_ppo import estimators

    text = (ROOT / "docs" / "estimators.md").read_text()
    assert ref.estimators_current(text), f"docs/estimators.md is stale: run {ref.WRITE_COMMAND}"
    for name in estimators.ESTIMATORS:
        assert f"| `{name}` |" in ref.estimator_table()
    # a new registry entry makes the docs stale until they are rewritten
    extra = estimators.Estimator("toy", "a toy", critic=False, whiten=False,
                                 baseline=estimators.ops.group_centered)
    monkeypatch.setitem(estimators.ESTIMATORS, "toy", extra)
    assert not ref.estimators_current(text)
    assert "| `toy` | a toy | no | yes | never | no |" in ref.render_estimators(text)


def test_layout_names_every_module():
    """docs/layout.md names every module of rlhf_ppo/ (a new module gets a row)."""
    import pkgutil

    import rlhf_ppo

    text = (ROOT / "docs" / "layout.md").read_text()
    names = {m.name: f"`{m.name}/`" if m.ispkg else f"`{m.name}.py`"
             for m in pkgutil.iter_modules(rlhf_ppo.__path__)}
    missing = [m for m, name in names.items() if name not in text]
    assert not missing, f"docs/layout.md does not name {missing}"
