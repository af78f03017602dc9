"""A family being written (model/NAME.py + configs/model/NAME.yaml) breaks no other choice, and choosing it
while it is incomplete is one line naming what it lacks."""
import os
import shutil

import pytest

from conftest import ROOT, run_cli
from test_cli import one_line_error

GOOD = '''from dataclasses import dataclass
TASKS = ("lm",)
INPUTS = ("text",)


@dataclass
class Config:
    family: str = "zz_half"
    width: int = 4


Model = object
'''


@pytest.fixture
def half_family(tmp_path):
    """write(source) puts model/zz_half.py (and its YAML) into a copy of the code: the checkout itself stays
    as it is for the tests running beside this one. Returns the copy's train.py runner."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT, repo, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "__pycache__", "tests",
                                                              "benchmarks", "docs", "*.txt"))
    (repo / "configs" / "model" / "zz_half.yaml").write_text("defaults:\n  - zz_half_schema\n  - _self_\n")

    def write(text):
        (repo / "model" / "zz_half.py").write_text(text)

    write.train = lambda *args: run_cli("train.py", *args, cwd=repo)
    return write


@pytest.mark.parametrize("source, expected", [
    (GOOD.replace("Model = object", ""), "model/zz_half.py lacks Model"),
    (GOOD.replace("class Config", "class Cfg"), "model/zz_half.py lacks Config"),
    (GOOD.replace('"zz_half"', '"zz_halff"'), 'Config needs `family: str = "zz_half"`'),
    (GOOD + "from errors import NoSuchName\n", "model/zz_half.py fails to import (line 13): ImportError"),
])
def test_an_incomplete_family_fails_in_one_line_and_breaks_no_other(half_family, source, expected, tmp_path):
    half_family(source)
    line = one_line_error(half_family.train("model=zz_half", f"out_dir={tmp_path}/run"))
    assert expected in line, line
    assert not os.path.exists(tmp_path / "run")
    printed = one_line_error(half_family.train("--cfg", "job", "model=zz_half"))  # printing the config checks it too
    assert expected in printed, printed
    other = one_line_error(half_family.train("model=rnn", "model.n_layre=1", f"out_dir={tmp_path}/run"))
    assert "unknown config key 'model.n_layre'" in other


WRONG_WIDTH = "from flax import nnx\n" + GOOD.replace("Model = object", '''class Model(nnx.Module):
    def __init__(self, cfg, *, vocab_size, rngs):
        self.embed = nnx.Embed(vocab_size, cfg.width, rngs=rngs)

    def __call__(self, x_BL, *, key=None):
        return self.embed(x_BL)  # width scores per token where the loss reads vocab_size
''')


def test_a_family_whose_output_does_not_fit_the_task_fails_before_training(half_family, text_file, tmp_path):
    half_family(WRONG_WIDTH)
    line = one_line_error(half_family.train("model=zz_half", f"data.path={text_file}", "data.seq_len=8",
                                            "batch_size=4", "steps=2", f"out_dir={tmp_path}/run"))
    assert "model=zz_half returns (4, 8, 4)" in line and "task=lm reads (4, 8, " in line, line
    assert not os.path.exists(tmp_path / "run")
