"""Scale-out on 8 fake CPU devices: every layout follows the same curve; checkpoints move between them."""
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import ROOT, compose, devices_env, run_cli
from core import metrics
from errors import UserError
from core.loop import run
from core.state import load_run, state_spec
from core import mesh as mesh_lib

# d_model=64 makes the MLP and attention matrices big enough for the FSDP rule to shard them.
BASE = ["+experiment=debug", "model.d_model=64", "steps=6", "log_every=1", "eval_every=100", "ckpt_every=100",
        "optim.decay_steps=8"]  # one schedule, whether a run stops at 6 steps or goes on to 8
LAYOUTS = {
    "1 device": ["mesh.data=1"],
    "jit data=8": ["mesh.data=8"],
    "jit data=4 x fsdp=2": ["mesh.data=4", "mesh.fsdp=2"],
    "pmap over 8": ["parallel=pmap", "mesh.data=8"],
}


def losses(out_dir):
    return np.array([r["train_loss"] for r in metrics.read(os.path.join(out_dir, "metrics.jsonl")) if "train_loss" in r])


@pytest.fixture(scope="module")
def curves(tmp_path_factory, text_file):
    root = tmp_path_factory.mktemp("layouts")
    out = {}
    for name, extra in LAYOUTS.items():
        d = str(root / name.replace(" ", "_").replace("=", ""))
        run(compose(BASE + [f"data.path={text_file}", f"out_dir={d}"] + extra))
        out[name] = (d, losses(d))
    return out


@pytest.mark.parametrize("name", [n for n in LAYOUTS if n != "1 device"])
def test_every_layout_follows_the_single_device_curve(curves, name):
    reference, curve = curves["1 device"][1], curves[name][1]
    assert len(curve) == len(reference) == 6
    np.testing.assert_allclose(curve, reference, atol=5e-6, rtol=0)


def test_fsdp_really_shards_the_big_params():
    cfg = compose(BASE + ["mesh.data=4", "mesh.fsdp=2"])
    mesh = mesh_lib.make_mesh(cfg.mesh)
    spec = state_spec(cfg, {"vocab_size": 65}, mesh)
    state = jax.jit(spec.make_state, out_shardings=spec.shardings)()
    fc = state["params"]["blocks"]["mlp"]["fc"]["kernel"]  # (N, D, F) = (2, 64, 256)
    assert "fsdp" in str(fc.sharding.spec)
    assert fc.sharding.shard_shape(fc.shape) == (2, 64, 128)
    mu = state["opt_state"][1][0].mu["blocks"]["mlp"]["fc"]["kernel"]  # Adam moments follow their params
    assert mu.sharding.shard_shape(mu.shape) == (2, 64, 128)
    scale = state["params"]["blocks"]["ln1"]["scale"]
    assert scale.sharding.is_fully_replicated


def test_checkpoint_from_8_devices_continues_on_1_and_4_with_the_same_losses(curves, tmp_path, text_file):
    sharded_dir = curves["jit data=4 x fsdp=2"][0]
    nexts = []
    for extra in (["mesh.data=1"], ["mesh.data=4"], ["mesh.data=2", "mesh.fsdp=2"]):
        d = str(tmp_path / "_".join(extra).replace("=", ""))
        shutil.copytree(sharded_dir, d)
        run(compose(BASE + [f"data.path={text_file}", f"out_dir={d}", "steps=8"] + extra))
        nexts.append(losses(d)[-2:])
    whole = str(tmp_path / "uninterrupted")  # the same 8 steps on the source's layout, never stopped
    run(compose(BASE + [f"data.path={text_file}", f"out_dir={whole}", "steps=8", "mesh.data=4", "mesh.fsdp=2"]))
    for other in nexts:
        np.testing.assert_allclose(other, losses(whole)[-2:], atol=5e-6, rtol=0)


def test_sample_py_on_one_device_reads_a_sharded_checkpoint(curves):
    proc = run_cli("sample.py", f"out_dir={curves['jit data=4 x fsdp=2'][0]}", "num_samples=2",
                   "max_new_tokens=20", "temperature=0")
    assert proc.returncode == 0, proc.stderr[-1500:]
    assert len(proc.stdout.split("\n---\n")) == 2
    assert load_run(curves["pmap over 8"][0]).step == 6  # pmap runs save the same checkpoint format


def free_port() -> int:
    """A port the OS just handed out; the coordinator binds it a moment later (the test's only race)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_processes(*args, harness=None):
    """Run train.py as processes 0 and 1 of a 2-host job (2 fake devices each); [(returncode, stderr)]."""
    port = free_port()
    env = devices_env(2)
    head = ["-c", harness, "train.py"] if harness else [os.path.join(ROOT, "train.py")]
    procs = [subprocess.Popen([sys.executable, *head, *args, "distributed.enabled=true",
                               f"distributed.coordinator=127.0.0.1:{port}", "distributed.num_processes=2",
                               f"distributed.process_id={i}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            p.kill()
    return [(p.returncode, err) for p, (_, err) in zip(procs, outs)]


# Process 1 alone gets SIGINT (a Ctrl-C, which a multi-process run turns into the SIGTERM of a
# preemption notice) while it builds the batch of step 7.
# Every step waits 0.2 s, so the notice reaches the other host through the coordinator well before
# the run's last step (a stop is agreed at a later step, as on a real pod).
SIGINT_PROCESS_1 = """
import os, signal, sys, time
sys.argv = sys.argv[1:]
from data import text
orig, me = text.train_windows, [a for a in sys.argv if a.startswith("distributed.process_id=")][0][-1]
def train_windows(corpus, seed, step, *a, **k):
    if me == "1" and step == 7:
        os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.2)
    return orig(corpus, seed, step, *a, **k)
text.train_windows = train_windows
exec(open("train.py").read())
"""


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, text_file):
    """An uninterrupted 2-process run (2 hosts x 2 devices) and its arguments."""
    args = [*BASE, f"data.path={text_file}", "steps=16", "ckpt_every=100"]
    out = tmp_path_factory.mktemp("two") / "whole"
    results = two_processes(*args, f"out_dir={out}")
    assert all(rc == 0 for rc, _ in results), results[0][1][-1500:] + results[1][1][-1500:]
    return out, args, results


def test_two_processes_follow_the_same_curve_as_one_process_with_as_many_devices(two_process_run, tmp_path):
    out, args, results = two_process_run
    assert "global batch 8 = 2 per device x 4 devices" in results[0][1]
    assert "step 16: val_loss" not in results[1][1]  # only process 0 logs
    single = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args, f"out_dir={tmp_path / 'single'}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=240,
                            env=devices_env(4))
    assert single.returncode == 0, single.stderr[-1500:]
    np.testing.assert_allclose(losses(out), losses(tmp_path / "single"), atol=5e-6, rtol=0)
    # pmap across the two processes: each keeps replicas on its own devices; checkpoints hold one
    pmap = two_processes(*args, "parallel=pmap", "steps_per_call=1", f"out_dir={tmp_path / 'pmap'}")
    assert all(rc == 0 for rc, _ in pmap), pmap[0][1][-1500:] + pmap[1][1][-1500:]
    np.testing.assert_allclose(losses(tmp_path / "pmap"), losses(out), atol=5e-6, rtol=0)


def test_ctrl_c_on_one_of_two_processes_stops_both_at_one_step_and_resumes_exactly(two_process_run, tmp_path):
    # SIGINT runs both handlers: core/preempt.py records it and raises the SIGTERM jax.distributed syncs on
    whole, args, _ = two_process_run
    stopped = two_processes(*args, f"out_dir={tmp_path / 'run'}", harness=SIGINT_PROCESS_1)
    assert all(rc == 0 for rc, _ in stopped), stopped[0][1][-1500:] + stopped[1][1][-1500:]
    step = int(stopped[0][1].split("stopped by preemption at step ")[1].split(";")[0])
    assert 7 <= step < 16 and os.listdir(tmp_path / "run" / "checkpoints") == [str(step)]
    resumed = two_processes(*args, f"out_dir={tmp_path / 'run'}")
    assert all(rc == 0 for rc, _ in resumed) and f"resuming from step {step}" in resumed[0][1]
    np.testing.assert_array_equal(losses(tmp_path / "run"), losses(whole))
    a, b = load_run(str(whole)), load_run(str(tmp_path / "run"))
    for x, y in zip(jax.tree.leaves(a.state), jax.tree.leaves(b.state), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def on_process_1(*extra) -> str:
    """A harness that gives process 1 alone the overrides `extra` (after the shared ones: they win)."""
    return (f"import sys\nsys.argv = sys.argv[1:] + ({list(extra)!r} if 'distributed.process_id=1' in sys.argv "
            f"else [])\nexec(open('train.py').read())\n")


def test_processes_started_with_different_configs_all_refuse_in_one_line(text_file, tmp_path):
    results = two_processes(*BASE, f"data.path={text_file}", f"out_dir={tmp_path / 'run'}",
                            harness=on_process_1("seed=1"))
    for rc, err in results:
        assert rc == 2 and "error: processes [1] were started with another config than process 0" in err, err[-1500:]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("key, says", [("data.path", "does not exist"), ("init_from", "holds no checkpoints")])
def test_a_mistake_only_one_process_sees_stops_every_process_in_one_line(key, says, two_process_run, tmp_path):
    # Paths to the inputs may differ per host; a bad one on one host must not leave the others in a collective
    whole, args, _ = two_process_run
    results = two_processes(*args, f"init_from={whole}", f"out_dir={tmp_path / 'run'}",
                            harness=on_process_1(f"{key}=/nowhere/x"))
    errors = [[line for line in err.splitlines() if line.startswith("error: ")] for _, err in results]
    assert [rc for rc, _ in results] == [2, 2], results[0][1][-1500:] + results[1][1][-1500:]
    assert errors[0] == [f"error: process 1 could not read its inputs: {errors[1][0][len('error: '):]}"], errors
    assert f"{key}=/nowhere/x {says}" in errors[1][0]
    assert "Traceback" not in results[0][1] + results[1][1]
    assert not (tmp_path / "run").exists()


def test_processes_reading_their_own_copies_of_the_data_resume_exactly(two_process_run, tmp_path):
    # The checkpoint holds process 0's data.path: process 1's own path is no change to refuse on resume
    whole, args, _ = two_process_run
    copy = tmp_path / "copy.txt"
    shutil.copy(next(a.split("=", 1)[1] for a in args if a.startswith("data.path=")), copy)
    own = on_process_1(f"data.path={copy}")
    first = two_processes(*args, "steps=8", f"out_dir={tmp_path / 'run'}", harness=own)
    assert [rc for rc, _ in first] == [0, 0], first[0][1][-1500:] + first[1][1][-1500:]
    resumed = two_processes(*args, f"out_dir={tmp_path / 'run'}", harness=own)
    assert [rc for rc, _ in resumed] == [0, 0], resumed[0][1][-1500:] + resumed[1][1][-1500:]
    assert "resuming from step 8" in resumed[0][1]
    np.testing.assert_array_equal(losses(tmp_path / "run"), losses(whole))
    # Moved on every host, the data is a change process 0 refuses, and every process stops with it
    moved = two_processes(*args, f"data.path={copy}", "steps=20", f"out_dir={tmp_path / 'run'}")
    errors = [[line for line in err.splitlines() if line.startswith("error: ")] for _, err in moved]
    assert [rc for rc, _ in moved] == [2, 2], moved[0][1][-1500:] + moved[1][1][-1500:]
    assert "config differs from its checkpoint in data.path" in errors[0][0], errors
    assert errors[1] == [f"error: process 0 refused to resume: {errors[0][0][len('error: '):]}"], errors


@pytest.mark.parametrize("key", ["init_from", "data.path"])
def test_a_stale_copy_on_one_host_is_refused_on_every_process(key, two_process_run, tmp_path):
    # Per-host copies of init_from or the data must hold what process 0's does, or the hosts would mix them
    whole, args, _ = two_process_run
    if key == "init_from":  # an older copy of the source run: its newest checkpoint is another step
        copy = tmp_path / "stale"
        shutil.copytree(whole, copy)
        os.rename(copy / "checkpoints" / "16", copy / "checkpoints" / "8")
        shared, says = [f"init_from={whole}"], "init_from: step 8, meta "
    else:  # another version of the text, with the same characters: a line more at its start
        copy = tmp_path / "other.txt"
        text = open(next(a.split("=", 1)[1] for a in args if a.startswith("data.path="))).read()
        copy.write_text(text.splitlines(keepends=True)[0] + text)
        shared, says = [], "data: meta "
    results = two_processes(*args, *shared, f"out_dir={tmp_path / 'run'}", harness=on_process_1(f"{key}={copy}"))
    errors = [[line for line in err.splitlines() if line.startswith("error: ")] for _, err in results]
    assert [rc for rc, _ in results] == [2, 2], results[0][1][-1500:] + results[1][1][-1500:]
    assert errors[0] == errors[1] and len(errors[0]) == 1, errors
    assert errors[0][0].startswith(f"error: process 1 read other inputs than process 0 ({says}"), errors
    assert ("against step 16, meta " in errors[0][0]) == (key == "init_from"), errors
    assert "Traceback" not in results[0][1] + results[1][1]
    assert not (tmp_path / "run").exists()


def test_a_run_directory_in_use_stops_every_process_in_one_line(two_process_run, tmp_path):
    from core.runlock import RunLock

    _, args, _ = two_process_run
    with RunLock(str(tmp_path / "run")):  # process 0 alone takes the lock: the others must hear of its refusal
        results = two_processes(*args, f"out_dir={tmp_path / 'run'}")
    errors = [[line for line in err.splitlines() if line.startswith("error: ")] for _, err in results]
    assert [rc for rc, _ in results] == [2, 2], results[0][1][-1500:] + results[1][1][-1500:]
    assert f"is in use by pid {os.getpid()} on " in errors[0][0], errors
    assert errors[1] == [f"error: process 0 could not lock out_dir: {errors[0][0][len('error: '):]}"], errors


def test_a_two_process_sweep_skips_a_held_job_on_every_process(text_file, tmp_path):
    from core.runlock import RunLock

    root = tmp_path / "sweep"
    with RunLock(str(root / "seed=1,steps=4")):
        results = two_processes("-m", "+experiment=debug", f"data.path={text_file}", "steps=4", "seed=0,1",
                                f"hydra.sweep.dir={root}")
    assert [rc for rc, _ in results] == [1, 1], results[0][1][-1500:] + results[1][1][-1500:]
    assert "is in use by pid" in results[0][1] and "process 0 could not lock out_dir" in results[1][1]
    assert all("1 sweep job(s) skipped" in err and "sweep job(s) failed" not in err for _, err in results)
    assert os.path.isdir(root / "seed=0,steps=4" / "checkpoints" / "4")
    assert not os.path.exists(root / "seed=1,steps=4" / "FAILED")


def test_a_two_process_sweep_goes_on_after_a_job_with_a_bad_value(text_file, tmp_path):
    # The first job fails before the processes join the runtime; recording it must not start a local
    # backend, which would keep the next job from joining
    root = tmp_path / "sweep"
    results = two_processes("-m", "+experiment=debug", f"data.path={text_file}", "steps=0,4", f"hydra.sweep.dir={root}")
    assert [rc for rc, _ in results] == [1, 1], results[0][1][-1500:] + results[1][1][-1500:]
    assert all("1 sweep job(s) failed" in err and "Traceback" not in err for _, err in results)
    assert "steps=0 must be a positive integer" in (root / "steps=0" / "FAILED").read_text()
    assert os.path.isdir(root / "steps=4" / "checkpoints" / "4")


def test_init_from_on_some_processes_only_is_refused(two_process_run, tmp_path):
    whole, args, _ = two_process_run
    results = two_processes(*args, f"init_from={whole}", f"out_dir={tmp_path / 'run'}",
                            harness=on_process_1("init_from=null"))
    for rc, err in results:
        assert rc == 2 and "error: processes [1] were started with another config than process 0" in err, err[-1500:]


def test_layout_mistakes_are_user_errors(text_file, tmp_path):
    BASE = globals()["BASE"] + [f"out_dir={tmp_path}/run"]  # noqa: N806
    with pytest.raises(UserError, match="not divisible by the 8 data-parallel devices"):
        run(compose(BASE + [f"data.path={text_file}", "batch_size=12", "mesh.data=8"]))
    with pytest.raises(UserError, match="does not fit the 8 devices.*a smaller product runs on the first devices"):
        run(compose(BASE + [f"data.path={text_file}", "mesh.data=4", "mesh.fsdp=4"]))
    with pytest.raises(UserError, match="needs mesh.fsdp=1"):
        run(compose(BASE + [f"data.path={text_file}", "parallel=pmap", "mesh.fsdp=2", "mesh.data=4"]))
    with pytest.raises(UserError, match="go together"):
        run(compose(BASE + [f"data.path={text_file}", "distributed.enabled=true",
                            "distributed.coordinator=127.0.0.1:1234"]))


def test_pmap_runs_an_experiment_as_configured_steps_per_call_included(tmp_path, text_file, capsys):
    """The experiments set steps_per_call=10: under pmap the same K steps run as a scan inside pmap."""
    base = ["+experiment=shakespeare_char_cpu", f"data.path={text_file}", "steps=20", "eval_every=20",
            "eval_batches=2", "ckpt_every=20", "mesh.data=4", "progress=false"]
    jit = run(compose(base + [f"out_dir={tmp_path}/jit"]))
    pmap = run(compose(base + ["parallel=pmap", f"out_dir={tmp_path}/pmap"]))
    assert "parallel=pmap: 10 steps per call run as a lax.scan" in capsys.readouterr().err
    assert pmap["val_loss"] == pytest.approx(jit["val_loss"], abs=1e-3)
    np.testing.assert_allclose(losses(f"{tmp_path}/pmap"), losses(f"{tmp_path}/jit"), atol=1e-3)


@pytest.mark.parametrize("task", ["mlm", "classify"])
def test_pmap_and_grad_accum_pool_shards_by_their_weight_as_jit_does(task, tmp_path):
    """Masked-token counts differ between devices and micro-batches, and padded eval batches leave some
    devices only padding: pooled means that count every shard alike are off (tasks.WEIGHT)."""
    from test_encoder import ENC_TINY, write_sentiment

    train, dev = write_sentiment(tmp_path / "train.tsv", 400, 0), write_sentiment(tmp_path / "dev.tsv", 37, 1)
    base = ENC_TINY + [f"task={task}", f"data.path={train}", f"data.val_path={dev}", "model.dropout=0",
                       "steps=4", "eval_every=4", "ckpt_every=4", "log_every=1", "eval_batches=4"]
    layouts = {"jit": ["mesh.data=4"], "pmap": ["mesh.data=4", "parallel=pmap"]}
    if task == "mlm":
        layouts["accumulated"] = ["mesh.data=1", "optim.grad_accum=4"]
    results = {name: run(compose(base + extra + [f"out_dir={tmp_path / name}"])) for name, extra in layouts.items()}
    ref = metrics.read(os.path.join(tmp_path, "jit", "metrics.jsonl"))
    for name in layouts:
        rows = metrics.read(os.path.join(tmp_path, name, "metrics.jsonl"))
        assert results[name]["val_loss"] == pytest.approx(results["jit"]["val_loss"], abs=1e-5), name
        np.testing.assert_allclose(losses(tmp_path / name), losses(tmp_path / "jit"), atol=2e-5, err_msg=name)
        val = [{k: v for k, v in r.items() if k.startswith("val_")} for r in rows if "val_loss" in r]
        want = [{k: v for k, v in r.items() if k.startswith("val_")} for r in ref if "val_loss" in r]
        for got_row, want_row in zip(val, want, strict=True):
            assert got_row.keys() == want_row.keys() and "val__weight" not in got_row
            for k in got_row:
                assert got_row[k] == pytest.approx(want_row[k], abs=1e-5), (name, k)


def test_pmap_computes_batch_norm_statistics_over_the_global_batch_as_jit_does(tmp_path):
    """Under pmap each device sees 1/n of the batch: its batch norms pool their statistics over the devices."""
    from test_families import CNN_TINY, quadrant_images

    base = CNN_TINY + [f"data.path={quadrant_images(tmp_path / 'q.npz', n=64)}", "model.batch_norm=true",
                       "steps=3", "log_every=1", "eval_every=3", "ckpt_every=3", "eval_batches=1"]
    for name, extra in {"jit": ["mesh.data=8"], "pmap": ["mesh.data=8", "parallel=pmap"]}.items():
        run(compose(base + extra + [f"out_dir={tmp_path / name}"]))
    np.testing.assert_allclose(losses(tmp_path / "pmap"), losses(tmp_path / "jit"), atol=1e-5, rtol=0)


# Process 1's reads of out_dir's checkpoints fail (a disk error on one host)
FAILING_CHECKPOINT_READ_ON_PROCESS_1 = """
import sys
sys.argv = sys.argv[1:]
if "distributed.process_id=1" in sys.argv:
    from core import checkpoint
    def failing(*a, **k):
        raise OSError(5, "Input/output error")
    checkpoint.manager = checkpoint.read_meta = failing
exec(open("train.py").read())
"""


def test_a_finished_run_is_finished_on_every_process_whatever_one_host_reads(two_process_run):
    # Process 0, which wrote the checkpoints, decides: a host left to its own failed read would go on alone
    whole, args, _ = two_process_run
    results = two_processes(*args, f"out_dir={whole}", harness=FAILING_CHECKPOINT_READ_ON_PROCESS_1)
    assert [rc for rc, _ in results] == [0, 0], results[0][1][-1500:] + results[1][1][-1500:]
    assert f"run in {whole} is already at step 16" in results[0][1]  # (only process 0 logs)
    assert "Traceback" not in results[1][1] and "error: " not in results[1][1]


def test_an_out_dir_only_process_0_cannot_write_stops_every_process_in_one_line(two_process_run, tmp_path):
    _, args, _ = two_process_run
    (tmp_path / "run" / ".write_probe").mkdir(parents=True)  # process 0's proof of a writable out_dir fails
    results = two_processes(*args, f"out_dir={tmp_path / 'run'}")
    errors = [[line for line in err.splitlines() if line.startswith("error: ")] for _, err in results]
    assert [rc for rc, _ in results] == [2, 2], results[0][1][-1500:] + results[1][1][-1500:]
    assert errors[0][0].startswith(f"error: cannot write to out_dir={tmp_path / 'run'} "), errors
    assert errors[1] == [f"error: process 0 could not write out_dir: {errors[0][0][len('error: '):]}"], errors
    assert not {"checkpoints", "metrics.jsonl", "config.yaml"} & set(os.listdir(tmp_path / "run"))
