"""The README's commands and reload snippet are what users copy: they must work as written."""
import glob
import os
import re

from conftest import ROOT, TINY, compose
from core.loop import run

README = open(os.path.join(ROOT, "README.md")).read()
DOCS = sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
PAGES = [os.path.join(ROOT, "README.md")] + DOCS + sorted(glob.glob(os.path.join(ROOT, "benchmarks", "*.md")))
MAIN_COMMAND = "python train.py +experiment=shakespeare_char_cpu"


def code_lines(text: str) -> list[str]:
    """The lines of every fenced code block."""
    return [line for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S) for line in block.splitlines()]


def test_reload_snippet_runs_against_a_run_directory(tmp_path, text_file, capsys):
    out = str(tmp_path / "run")
    run(compose(TINY + [f"data.path={text_file}", f"out_dir={out}", "steps=5"]))
    snippet = re.search(r"## Reloading a run.*?```python\n(.*?)```", README, re.S).group(1)
    assert len(snippet.strip().splitlines()) <= 12
    exec(snippet.replace('"runs/shakespeare_char_cpu"', repr(out)).replace('"ROMEO:"', '"The"'), {})
    first, sample = capsys.readouterr().out.split("\n", 1)
    assert first == "5 2"  # step, n_layers of the debug experiment
    assert len(sample) == 100 + 1  # 100 new characters and print's newline


def test_readme_commands_match_the_ci_and_the_configs():
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert "pip install -q -r requirements.txt" in ci and "python -m pytest -q" in ci
    assert "pip install -r requirements.txt" in README and "python -m pytest -q" in README
    for page in PAGES:
        text = open(page).read()
        for name in set(re.findall(r"\+experiment=(\w+)", text)) - {"NAME"}:
            assert os.path.isfile(os.path.join(ROOT, "configs", "experiment", f"{name}.yaml")), (page, name)


def test_readme_is_short():
    assert len(README.splitlines()) < 250


def test_the_main_command_needs_nothing_outside_the_repository():
    commands = [line.strip() for line in code_lines(README) if line.strip().startswith("python train.py")]
    assert commands and commands[0] == MAIN_COMMAND, commands[:1]  # the first command a newcomer runs
    assert os.path.isfile(os.path.join(ROOT, "data", "tinyshakespeare.txt"))  # the default text it reads
    for line in code_lines(README) + re.findall(r"`(python [^`]*)`", README):
        assert "../" not in line and not re.search(r"=/", line), line  # no path outside the checkout


def test_every_relative_link_points_to_a_file():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", open(page).read()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue  # a URL or an anchor within the page
            path = os.path.normpath(os.path.join(os.path.dirname(page), target.split("#")[0]))
            assert os.path.exists(path), f"{os.path.relpath(page, ROOT)} links to missing {target}"


def test_the_readme_links_every_docs_page():
    for page in DOCS:
        assert f"](docs/{os.path.basename(page)})" in README, os.path.basename(page)
