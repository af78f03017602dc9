"""The README's commands and reload snippet are what users copy: they must work as written."""
import os
import re

from conftest import ROOT, TINY, compose
from core.loop import run

README = open(os.path.join(ROOT, "README.md")).read()


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
    for name in set(re.findall(r"\+experiment=(\w+)", README)) - {"NAME"}:
        assert os.path.isfile(os.path.join(ROOT, "configs", "experiment", f"{name}.yaml")), name
