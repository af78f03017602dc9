"""What a user types: typos, unknown names and bad values fail at once with one line and exit 2."""
import itertools
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, devices_env, run_cli


@pytest.fixture(scope="module")
def typo_experiment(tmp_path_factory):
    """An experiment of the user's own, in a config directory outside the repository."""
    root = tmp_path_factory.mktemp("configs")
    (root / "experiment").mkdir()
    (root / "experiment" / "zz_test_typo.yaml").write_text("# @package _global_\nmodel:\n  n_layre: 3\n")
    return ["+experiment=zz_test_typo", f"hydra.searchpath=[file://{root}]"]


def one_line_error(proc):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-1500:])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


@pytest.mark.parametrize("args, expected", [
    (["model.n_layre=3"], "unknown config key 'model.n_layre'"),
    (["stpes=10"], "unknown config key 'stpes'"),
    (["+optim.lrr=1"], "unknown config key 'optim.lrr'"),
    (["+experiment=nope"], "unknown experiment 'nope'; available: "),
    (["experiment=debug"], "+experiment=NAME"),
    (["model=nope"], "unknown model 'nope'; available: cnn, "),
    (["data=nope"], "unknown data 'nope'; available: images, series, "),
    (["task=nope"], "unknown task 'nope'; available: classify, lm, "),
    (["steps=abc"], "could not be converted to Integer (key 'steps')"),
])
def test_bad_overrides_fail_at_compose_time(args, expected, tmp_path):
    line = one_line_error(run_cli("train.py", *args, f"out_dir={tmp_path}/run"))
    assert expected in line
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("script, args, expected", [
    ("train.py", ["--steps", "3"], "unknown option --steps: settings are key=value overrides, e.g. steps=3 "
                                    "(`python train.py --help` lists the options)"),
    ("export.py", ["--out_dir=runs/x"], "unknown option --out_dir: settings are key=value overrides, e.g. "
                                        "out_dir=runs/x"),
])
def test_flags_that_hydra_does_not_know_name_the_override(script, args, expected):
    assert expected in one_line_error(run_cli(script, *args))


def test_typo_in_an_experiment_yaml_names_the_key_and_file(typo_experiment):
    line = one_line_error(run_cli("train.py", *typo_experiment))
    assert "model.n_layre" in line and "zz_test_typo" in line


@pytest.mark.parametrize("args, expected", [
    (["data.path=/nonexistent/input.txt"], "does not exist"),
    (["steps=0"], "steps=0 must be a positive integer"),
    (["model.n_heads=3"], "not divisible by model.n_heads=3"),
    (["batch_size=7", "optim.grad_accum=2"], "not divisible by optim.grad_accum=2"),
    (["optim.grad_accum=-2"], "optim.grad_accum=-2 must be a positive integer"),
])
def test_bad_values_fail_before_anything_is_written(args, expected, tmp_path, text_file):
    base = ["+experiment=debug", f"data.path={text_file}"]
    line = one_line_error(run_cli("train.py", *base, *args, f"out_dir={tmp_path}/run"))
    assert expected in line
    assert not os.path.exists(tmp_path / "run")


def _file(tmp_path, name, content: bytes):
    path = tmp_path / name
    path.write_bytes(content)
    return str(path)


# The same mistakes, in-process (no interpreter start-up each): each raises the UserError that
# train.py prints as one line with exit 2, before anything is compiled or written.
@pytest.mark.parametrize("overrides, expected", [
    (["batch_size=0"], "batch_size=0 must be a positive integer"),
    (["batch_size=-4"], "batch_size=-4 must be a positive integer"),
    (["steps=-1"], "steps=-1 must be a positive integer"),
    (["on_nan=ignore"], "on_nan=ignore must be 'stop' or 'skip'"),
    (["parallel=vmap"], "parallel=vmap must be 'jit' or 'pmap'"),
    (["model.dropout=1.5"], "model.dropout=1.5 must be in [0, 1)"),
    (["model.dtype=int8"], "model.dtype=int8 must be float32, bfloat16 or float16"),
    (["data.path=EMPTY"], "is empty"),
    (["data.path=BINARY"], "is not UTF-8"),
    (["data.val_fraction=1.5"], "data.val_fraction=1.5 must be in (0, 1)"),
    (["optim.lr=nan"], "optim.lr=nan must be a finite number"),  # NaN passes every comparison
    (["optim.weight_decay=inf"], "optim.weight_decay=inf must be a finite number"),
    (["optim.min_lr=-1.0"], "optim.min_lr=-1.0 and"),
    (["data.seq_len=0"], "data.seq_len=0 must be positive"),  # not the block_size it interpolates
])
def test_bad_input_table(overrides, expected, tmp_path, text_file):
    from conftest import TINY

    files = {"EMPTY": _file(tmp_path, "empty.txt", b""), "BINARY": _file(tmp_path, "bin.txt", b"\xff\xfe\x00\x80")}
    _assert_refused(TINY + [f"data.path={text_file}"] + overrides, files, expected, tmp_path)


def _assert_refused(overrides, files, expected, tmp_path):
    """Running `overrides` (FILE placeholders replaced by paths) raises a one-line UserError and writes nothing."""
    from conftest import compose
    from errors import UserError
    from core.loop import run

    overrides = [o.split("=")[0] + "=" + files.get(o.split("=")[1], o.split("=")[1]) for o in overrides]
    with pytest.raises(UserError) as error:
        run(compose(overrides + [f"out_dir={tmp_path}/run"]))
    assert expected in str(error.value) and "\n" not in str(error.value)
    assert not os.path.exists(tmp_path / "run")


def test_a_folder_of_other_files_is_not_trained_into(tmp_path, text_file):
    """A mistyped out_dir (a project, a dataset) would get a run's config.yaml and metrics among its files."""
    from conftest import TINY, compose
    from core.loop import run
    from errors import UserError

    project = tmp_path / "project"
    project.mkdir()
    (project / "config.yaml").write_text("my: precious\n")
    with pytest.raises(UserError, match=r"holds other files than a run's \(e.g. config.yaml\); pass a new or empty"):
        run(compose(TINY + [f"data.path={text_file}", f"out_dir={project}"]))
    assert os.listdir(project) == ["config.yaml"] and (project / "config.yaml").read_text() == "my: precious\n"
    tokenizer = compose(TINY + [f"data.path={text_file}", f"out_dir={tmp_path}/run", "data.tokenizer=charr"])
    with pytest.raises(UserError, match="tokenizer file .*charr does not exist; pass char, bpe, a tokenizer.json"):
        run(tokenizer)


def _npz(tmp_path, name, **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return str(path)


IMAGES = ["model=cnn", "data=images", "task=classify", "batch_size=8", "mesh.data=1"]


# Family and image-data mistakes: each a one-line UserError before anything is compiled or written.
@pytest.mark.parametrize("overrides, expected", [
    (["model=cnn", "data.path=TEXT"], "model=cnn cannot train task=lm (it does classify); use model=rnn or "
                                      "model=transformer"),
    (["model=rnn", "data=images", "data.path=NPZ"], "task=lm reads tokens, and data=images provides classes; "
                                                     "use task=classify"),
    (["model=rnn", "data=images", "task=classify", "data.path=NPZ"],
     "model=rnn reads text or sequences, and data=images gives images; use model=cnn or model=mlp"),
    (["model=cnn", "data=text_classify", "task=classify", "data.path=TEXT"],
     "model=cnn reads images, and data=text_classify gives text; use model=encoder or model=rnn"),
    (["model=rnn", "data=tabular", "task=regress", "data.path=TEXT"],
     "model=rnn reads text or sequences, and data=tabular gives rows; use model=mlp"),
    (["model=rnn", "data.path=TEXT", "model.bidirectional=true"], "model.bidirectional is for text classifiers"),
    (["model=rnn", "data=series", "task=regress", "model.word_dropout=0.1"], "model.word_dropout is for text classifiers"),
    (["model=cnn", "task=classify", "data.path=TEXT"], "task=classify reads classes, and data=text provides tokens"),
    (["data.seq_len=32", "model.block_size=16"], "data.seq_len=32 is longer than the model's model.block_size=16"),
    (["data.path=DIR"], "is a directory"),
    (["data.path=NPZ"], "is an array file, and data=text reads text"),
    (IMAGES + ["data.path=/nonexistent/images.npz"], "does not exist; pass data.path=FILE.npz"),
    (IMAGES + ["data.path=TEXT"], "is not a readable .npz file"),
    (IMAGES + ["data.path=WRONG_KEYS"], "it needs x_train, y_train, x_test, y_test (or x, y)"),
    (IMAGES + ["data.path=FLOAT_LABELS"], "must be a vector of non-negative integer class labels"),
    (IMAGES + ["data.path=NPZ", "model.pool=[true]"], "model.pool has 1 entries for 3 model.channels"),
    (IMAGES + ["data.path=NPZ"], "shrinks 8x8 images to nothing; use model.padding=SAME"),
    (IMAGES + ["data.path=NPZ", "model.padding=same"], "model.padding=same must be VALID or SAME"),
    (["model=rnn", "data.path=TEXT", "model.cell=rnn"], "model.cell=rnn must be 'lstm' or 'gru'"),
])
def test_bad_family_input_table(overrides, expected, tmp_path, text_file):
    rng = np.random.default_rng(0)
    files = {"TEXT": text_file,
             "DIR": str(tmp_path),
             "NPZ": _npz(tmp_path, "ok.npz", x=rng.integers(0, 255, (20, 8, 8), np.uint8), y=np.arange(20) % 3),
             "WRONG_KEYS": _npz(tmp_path, "keys.npz", images=np.zeros((4, 8, 8))),
             "FLOAT_LABELS": _npz(tmp_path, "float.npz", x=np.zeros((10, 8, 8)), y=np.linspace(0, 1, 10))}
    _assert_refused(overrides, files, expected, tmp_path)


def test_windows_longer_than_the_data(tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("hello world\n" * 3)
    line = one_line_error(run_cli("train.py", "+experiment=debug", f"data.path={small}", f"out_dir={tmp_path}/r"))
    assert "fewer than a window of 17; use more text or a smaller data.seq_len" in line


@pytest.mark.parametrize("args, expected", [
    (["out_dir=/nonexistent/run"], "does not exist"),
    ([], "pass out_dir=DIR"),
    (["out_dir=.", "top_p=1.5"], "top_p=1.5 must be in (0, 1]"),
    (["out_dir=.", "temperature=-1"], "temperature=-1.0 must be a finite number >= 0"),
    (["out_dir=.", "temperature=nan"], "temperature=nan must be a finite number >= 0"),
    (["out_dir=.", "temperature=inf"], "temperature=inf must be a finite number >= 0"),
    (["out_dir=.", "top_k=-5"], "top_k=-5 must be >= 0"),
    (["out_dir=.", "tempreature=1"], "unknown config key 'tempreature'"),
])
def test_sample_py_bad_input(args, expected):
    assert expected in one_line_error(run_cli("sample.py", *args))


def test_sample_py_on_a_directory_without_checkpoints(tmp_path):
    assert "holds no checkpoints" in one_line_error(run_cli("sample.py", f"out_dir={tmp_path}"))


# Every (model, data, task) the config check lets through: the combinations that train.
TRAINABLE = {("transformer", "text", "lm"), ("transformer", "tokens", "lm"), ("rnn", "text", "lm"),
             ("rnn", "tokens", "lm"), ("rnn", "series", "regress"), ("rnn", "text_classify", "classify"),
             ("cnn", "images", "classify"), ("mlp", "images", "classify"), ("mlp", "tabular", "classify"),
             ("mlp", "tabular", "regress"), ("encoder", "text_classify", "classify"),
             ("encoder", "text_classify", "mlm")}


def test_every_other_family_data_and_task_combination_is_a_one_line_error():
    from conftest import compose
    from core.config import check, choices
    from errors import UserError
    passed = set()
    for combo in itertools.product(choices("model"), choices("data"), choices("task")):
        try:
            check(compose([f"{group}={name}" for group, name in zip(("model", "data", "task"), combo)]))
            passed.add(combo)
        except UserError as e:
            assert "\n" not in str(e) and " use " in str(e), (combo, str(e))
            model, data, task = combo
            for group, name in re.findall(r"(model|task)=(\w+)", str(e).split(" use ", 1)[1]):
                # what the message suggests trains on this data (a task: with some family)
                fits = (name, data, task) in TRAINABLE if group == "model" else \
                    any((m, data, name) in TRAINABLE for m in choices("model"))
                assert fits, (combo, str(e))
    assert passed == TRAINABLE


def test_a_default_named_run_prints_commands_that_paste_as_they_are(tmp_path, text_file):
    """Run directories named by overrides hold ',' and '='; a path value names them by its basename."""
    import shlex

    tok = os.path.join(ROOT, "tests", "fixtures", "import", "hf_gpt2", "tokenizer.json")
    train = [sys.executable, os.path.join(ROOT, "train.py"), "+experiment=debug", f"data.path={text_file}",
             f"data.tokenizer={tok}", "steps=2", "eval_every=2", "optim.lr=3e-3", "progress=false"]
    env = devices_env()
    done = subprocess.run(train, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert os.listdir(tmp_path / "runs") == ["debug,data.tokenizer=tokenizer.json,optim.lr=3e-3,steps=2"]
    hint = done.stderr.strip().splitlines()[-1].split("sample with: ")[1]
    argv = shlex.split(hint)
    assert argv[:2] == ["python", "sample.py"]
    sampled = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), *argv[2:], "num_samples=1",
                              "max_new_tokens=4"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert sampled.returncode == 0 and sampled.stdout.strip(), sampled.stderr[-2000:]


def test_shell_arg_pastes_back_to_the_same_value_through_a_shell_and_hydra():
    import shlex

    from core.cli import shell_arg
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for value in ("runs/plain", "runs/a,optim.lr=3e-4", "runs/x$HOME,y", "runs/a`id`", "runs/it's,a=1"):
        (arg,) = shlex.split(shell_arg("out_dir", value))  # what the shell hands the script
        assert OverridesParser.create().parse_override(arg).value() == value, (value, arg)


@pytest.mark.parametrize("body", ["steps: 3\n", "defaults:\n  - override /model: rnn\nsteps: 3\n"])
def test_an_experiment_without_its_package_line_says_to_add_it(body, tmp_path):
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "zz_nopkg.yaml").write_text(body)
    line = one_line_error(run_cli("train.py", "+experiment=zz_nopkg", f"hydra.searchpath=[file://{tmp_path}]",
                                  f"out_dir={tmp_path}/run"))
    assert "zz_nopkg.yaml" in line and "# @package _global_" in line, line


def test_config_mistakes_say_what_to_write(tmp_path):
    from core.cli import compose_error

    (tmp_path / "experiment").mkdir()
    for name, body in (("zz_dot", "model.n_layer: 1\n"), ("zz_typo", "model:\n  n_layerz: 1\n")):
        (tmp_path / "experiment" / f"{name}.yaml").write_text("# @package _global_\n" + body)
    search = f"hydra.searchpath=[file://{tmp_path}]"
    dotted = compose_error("train", ["+experiment=zz_dot", search])
    assert "zz_dot.yaml sets 'model.n_layer' as one dotted key" in dotted and "`model:`" in dotted, dotted
    typo = compose_error("train", ["+experiment=zz_typo", search])
    assert "unknown config key 'model.n_layerz'" in typo and "check its spelling" in typo, typo
    (tmp_path / "experiment" / "zz_nomodel.yaml").write_text("# @package _global_\ndefaults:\n  - override /model: bagg\n")
    nomodel = compose_error("train", ["+experiment=zz_nomodel", search])
    assert "unknown model 'bagg'" in nomodel and "available: cnn, encoder, mlp, rnn, transformer" in nomodel, nomodel
    other = compose_error("train", ["+experiment=debug", "model=rnn"])  # debug sets the transformer's n_heads
    assert "'model.n_heads' (in experiment/debug.yaml); it is a key of model=encoder or model=transformer" in other
    assert compose_error("train", ["+steps=3"]) == "steps is already in the config: set it without the +, as steps=VALUE"
    assert compose_error("train", ["steps"]) == "the override 'steps' has no value: write steps=VALUE"
    assert compose_error("sample", ["runs/x"]) == "'runs/x' is not an override: write key=value, e.g. out_dir=runs/x"
    assert compose_error("train", ["model.n_layers=[2"]).startswith("could not parse '[2' in an override; close its brackets")
    listed = compose_error("train", ["model=mlp", "model.hidden=16"])
    assert listed == "model.hidden takes a list: write model.hidden=[a,b] (brackets, no spaces), or model.hidden=[a] " \
                     "for one", listed
