"""Runs saved before a schema key existed still load: the key takes its default (what the run had)."""
import glob
import json
import os
import shutil

from conftest import TINY, compose


def _saved_before_keys(run_dir, dest, keys):
    """A copy of `run_dir` whose checkpoints' configs lack model.KEY for each of `keys`."""
    shutil.copytree(run_dir, dest)
    for path in glob.glob(os.path.join(dest, "checkpoints", "*", "meta", "metadata")):
        with open(path) as f:
            meta = json.load(f)
        for key in keys:
            del meta["config"]["model"][key]
        with open(path, "w") as f:
            json.dump(meta, f)
    return str(dest)


def test_load_run_and_init_from_read_a_run_saved_before_a_model_key(trained_run, text_file, tmp_path):
    from core.loop import run
    from core.state import load_run

    old = _saved_before_keys(trained_run, tmp_path / "old", ["scan_layers", "remat"])
    loaded = load_run(old)
    assert loaded.cfg.model.scan_layers is False and loaded.step == 20
    result = run(compose(TINY + [f"data.path={text_file}", f"init_from={old}", f"out_dir={tmp_path}/new",
                                 "steps=1", "eval_every=1"]))
    assert result["step"] == 1
