"""The training loop: one function for every model family and task.

`run(cfg)` wires config -> mesh -> data -> state (resumed, from `init_from`, or fresh) -> the jitted
step, then `_train` runs the phases below. The host keeps out of the device's way: the next batch is
built while the step runs, and metrics are fetched only at log steps. It stops cleanly on
SIGTERM/SIGINT (checkpoint, exit 0) and on a non-finite loss (on_nan=stop), and never writes a
checkpoint holding a NaN.
"""
import contextlib
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
from omegaconf import OmegaConf
from tqdm import tqdm

from core import checkpoint, config, distill, distributed, init_from, mesh as mesh_lib, metrics, task as tasks
from core.metrics import MetricsLog
from core.preempt import StopRequests
from core.cli import shell_arg
from core.runlock import RunLock, RunLocked
from core.state import Setup, setup
from core.step import first
from errors import Diverged, UserError
from model.matmul import resolve as resolve_matmul_dtype


def log(msg: str) -> None:
    """Progress and status go to stderr (stdout is kept for results), from process 0 only."""
    if jax.process_index() == 0:
        tqdm.write(msg, file=sys.stderr)


def resolve_out_dir(cfg) -> str:
    return os.path.abspath(os.path.expanduser(cfg.out_dir or os.path.join("runs", cfg.name)))


def _refuse_harmful_changes(saved: dict, current: dict) -> list[str]:
    """The harmless keys changed since the checkpoint; a change that alters training is an error."""
    if jax.process_index() != 0:  # its own paths to the inputs may differ from process 0's, which were saved
        current = distributed.with_paths_of(saved, current)
    harmful, harmless = config.diff(saved, current)
    if harmful:
        keys = ", ".join(harmful[:6]) + (f" and {len(harmful) - 6} more" if len(harmful) > 6 else "")
        raise UserError(f"this run's config differs from its checkpoint in {keys}; "
                        f"restore those values, or pass out_dir= (new run) or resume=false (start afresh)")
    return harmless


def _resumable(current_meta: dict, saved_meta: dict) -> list[str]:
    harmless = _refuse_harmful_changes(saved_meta["config"], current_meta["config"])
    changed = sorted(k for k in saved_meta if k != "config" and saved_meta[k] != current_meta.get(k))
    if changed:
        raise UserError(f"the data differs from the checkpoint's ({', '.join(changed)}); train on the same data "
                        f"or pass out_dir= for a new run")
    return harmless


def _check_resumable(current_meta: dict, saved_meta: dict) -> None:
    # Every process decides, and a refusal anywhere stops all: process 0 alone judges the paths it saved
    harmless = distributed.agree(partial(_resumable, current_meta, saved_meta), "refused to resume")
    if harmless:
        log(f"resuming with changed {', '.join(harmless)}")


def _prepare_out_dir(out_dir: str, fresh: bool) -> None:
    """Clear an old run if `fresh`, and prove out_dir writable, before any compile."""
    if jax.process_index() != 0:
        return
    try:
        if fresh:
            for name in ("checkpoints", "tb", "metrics.jsonl", "unreadable_checkpoints"):
                path = os.path.join(out_dir, name)
                if os.path.isdir(path):
                    shutil.rmtree(path)
                elif os.path.exists(path):
                    os.remove(path)
        probe = os.path.join(out_dir, ".write_probe")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write to out_dir={out_dir} ({e.strerror}); choose a writable out_dir=") from None


def _finished(cfg, out_dir: str):
    """(step, saved config) of a run whose newest checkpoint reached `steps`, else None. Plain file reads:
    orbax's checkpoint manager is a collective to create, and process 0 judges alone."""
    steps = checkpoint.steps_on_disk(out_dir) if cfg.resume else []
    found = checkpoint.peek_step_meta(out_dir, steps[0]) if steps else None
    saved = found[1].get("config") if found and isinstance(found[1], dict) else None
    if not isinstance(saved, dict) or found[0] < cfg.steps:
        return None  # an unreadable newest checkpoint too: the full restore path reports it and sets it aside
    return found[0], saved


def _finished_step(cfg, out_dir: str):
    """The step of a run that already reached `steps` (checked before any data is loaded), else None.
    Process 0, which wrote the checkpoints, decides for every process: a host whose read failed would
    otherwise go on alone and wait for the others in the next collective."""
    found = _finished(cfg, out_dir) if jax.process_index() == 0 else None
    step = distributed.from_process_0(-1 if found is None else found[0])
    if step < 0:
        return None
    judge = partial(_refuse_harmful_changes, found[1], OmegaConf.to_container(cfg, resolve=True)) if found else list
    distributed.agree(judge, "refused to resume")
    return step


def _last_val_loss(out_dir: str):
    """The last val_loss of metrics.jsonl, None where it holds none or cannot be read (a garbled line, a
    host's failed read): a finished run's summary, never a reason for the run to fail."""
    try:
        rows = [r for r in metrics.read(os.path.join(out_dir, "metrics.jsonl")) if "val_loss" in r]
    except (OSError, ValueError):
        return None
    return rows[-1]["val_loss"] if rows else None


def run(cfg) -> dict:
    """Train as the composed config says; returns {"out_dir", "step", "val_loss", "stopped_by"}."""
    config.check(cfg)
    distributed.initialize(cfg.distributed)
    distributed.check_same_config(cfg)
    cfg.out_dir = out_dir = resolve_out_dir(cfg)
    if cfg.parallel == "pmap" and cfg.steps_per_call > 1:
        log(f"parallel=pmap: {cfg.steps_per_call} steps per call run as a lax.scan inside the pmapped step")
    with contextlib.ExitStack() as held:
        # Process 0 alone holds the lock; the others learn of its refusal rather than wait for it
        distributed.agree(lambda: held.enter_context(RunLock(out_dir, enabled=jax.process_index() == 0)),
                          failed="could not lock out_dir", failed_as=RunLocked)
        done = _finished_step(cfg, out_dir)
        if done is not None:
            log(f"run in {out_dir} is already at step {done} (steps={cfg.steps}); to train it further pass "
                f"{shell_arg('out_dir', out_dir)} steps=N")
            return {"out_dir": out_dir, "step": done, "val_loss": _last_val_loss(out_dir), "stopped_by": None}
        own = cfg.resume and checkpoint.has_checkpoints(out_dir)
        # A run with checkpoints resumes them; a new one reads (and so checks) its source before writing.
        starting = cfg.init_from and not own
        task, teachers, read = distributed.agree(partial(_read_inputs, cfg, out_dir, own, starting))
        distributed.check_same_inputs(read)
        meta = {"config": OmegaConf.to_container(cfg, resolve=True), "task": task.name, "dims": task.dims,
                **task.meta}
        mesh = mesh_lib.make_mesh(cfg.mesh)
        teacher = distill.load(cfg, mesh, config.module("task", cfg.task.name), teachers, meta, task.name, log)
        built = setup(cfg, task.dims, task.loss_fn, mesh, teacher)
        tasks.check_outputs(task, built.spec, cfg.model.family)
        loaded = init_from.load(cfg, built.spec, built.mesh, meta, log) if starting else None
        distributed.agree(partial(_prepare_out_dir, out_dir, fresh=not cfg.resume), failed="could not write out_dir")
        distributed.check_shared_dir(out_dir)
        # Signals are held from here to the last committed save: a stop request is a flag, never an
        # interrupted write.
        with StopRequests() as stop, checkpoint.quiet_async_failures():
            mngr = checkpoint.manager(out_dir, cfg.keep_checkpoints)
            try:
                return _start(cfg, built, task, meta, mngr, stop, loaded)
            finally:
                checkpoint.close(mngr)


def _read_inputs(cfg, out_dir: str, own: bool, starting: bool):
    """(the task with its data, the teachers' meta or None, {input: the step and digest this process read}):
    what this process reads from its own paths, and what the processes then compare."""
    # The data reads what the source gave (tokenizer, labels): from the source when starting, from
    # this run's own checkpoint when resuming a run that started from another.
    read, inherited, teachers = {}, None, None
    if starting:
        step, inherited = init_from.source_meta(cfg)
        read["init_from"] = f"step {step}, meta {distributed.digest(inherited)}"
    elif own and (cfg.init_from or cfg.data.get("tokenizer_from")):
        inherited = checkpoint.peek_meta(out_dir)
    if distill.enabled(cfg):
        teachers, found = distill.teacher_meta(cfg)  # read (and checked) once
        read["distill.teacher"] = f"steps {[s for s, _ in found]}, meta {distributed.digest([m for _, m in found])}"
    inherited = inherited or teachers  # a student reads the teachers' tokens unless a source gave them
    if not own:  # a resumed run reads its own checkpoint's tokenizer, whatever became of the source
        inherited = init_from.with_tokenizer(cfg, inherited)
    task = tasks.load(cfg, inherited)
    read["data"] = f"meta {distributed.digest([task.meta, task.dims, task.baseline, task.extent])}"
    return task, teachers, read


def _start(cfg, built: Setup, task, meta: dict, mngr, stop, loaded) -> dict:
    """Resume this run's own checkpoint, else start from init_from, else fresh; then train."""
    spec = built.spec
    restored = checkpoint.restore_latest(mngr, checkpoint.abstract_like(spec.abstract, spec.shardings),
                                         check_meta=partial(_check_resumable, meta)) if cfg.resume else None
    if restored:
        start, state, _ = restored
        log(f"resuming from step {start} in {cfg.out_dir}" + (" (init_from is used only by a new run)"
                                                                if cfg.init_from else ""))
    else:
        start, state = 0, built.fresh_state()
        if loaded is not None:
            params = jax.jit(init_from.merge, out_shardings=spec.shardings["params"])(state["params"], loaded)
            state = {**state, "params": params}
    if start >= cfg.steps:  # the newest checkpoint was unreadable and an older one suffices
        return {"out_dir": cfg.out_dir, "step": start, "val_loss": _last_val_loss(cfg.out_dir), "stopped_by": None}
    if jax.process_index() == 0:
        OmegaConf.save(cfg, os.path.join(cfg.out_dir, "config.yaml"), resolve=True)
        log(OmegaConf.to_yaml(cfg, resolve=True).rstrip())
    loop = Loop(cfg, built, task, mngr, meta, stop, state=built.runner.put(state), step=start,
                last_ckpt=start or None, known_bad=int(jax.device_get(state["nonfinite"]["count"])))
    return _train(loop)


@dataclass
class Loop:
    """What the loop's phases share: the run's fixed parts, and the bookkeeping that moves with the steps."""
    cfg: Any
    built: Setup
    task: Any
    mngr: Any
    meta: dict
    stop: StopRequests
    state: Any
    step: int
    last_ckpt: int | None
    known_bad: int
    metrics_log: MetricsLog | None = None
    t_run: float = 0.0
    t_last: float = 0.0
    step_last: int = 0
    val_loss: float | None = None


def _call_length(cfg, step: int) -> int:
    """Steps in the call starting at `step`: up to steps_per_call, ending at the next log/eval/ckpt step."""
    every = (cfg.log_every, cfg.eval_every, cfg.ckpt_every)
    next_event = min([cfg.steps] + [(step // e + 1) * e for e in every])
    return min(cfg.steps_per_call, next_event - step)


def _batches_at(loop: Loop, step: int) -> tuple[Any, int]:
    """(The global batches of the call starting at `step`, built on the host; their count). A call ends
    early where the batches' shapes change (data.group_by_length cuts them to lengths), so each step
    runs at its own shape however steps are grouped into calls."""
    k, runner, train_batch = _call_length(loop.cfg, step), loop.built.runner, loop.task.feed.train_batch
    batches = [train_batch(step)]
    for s in range(step + 1, step + k):
        b = train_batch(s)
        if any(b[key].shape != batches[0][key].shape for key in b):
            break
        batches.append(b)
    return (runner.batch(batches[0]) if len(batches) == 1 else runner.stack(batches)), len(batches)


def _evaluate(loop: Loop) -> dict:
    """Validation metrics, logged (core/task.py `validate`)."""
    val = tasks.validate(loop.task, loop.built.runner, loop.state, loop.meta)
    if loop.built.sparsity is not None:  # counted in the params themselves, not taken from the masks
        val["sparsity"] = float(loop.built.sparsity(loop.built.runner.get(loop.state["params"])))
    loop.val_loss = val["val_loss"]
    loop.metrics_log.write(loop.step, {**val, "time_s": time.perf_counter() - loop.t_run})
    log(f"step {loop.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in val.items()))
    return val


def _check_finite(loop: Loop) -> None:
    """Host-side NaN check at log and checkpoint steps only: one scalar, no per-step sync."""
    bad = jax.device_get(loop.built.runner.get(loop.state["nonfinite"]))
    if int(bad["count"]) <= loop.known_bad:
        return
    if loop.cfg.on_nan == "stop":
        where = f"step {loop.last_ckpt} in {loop.cfg.out_dir}" if loop.last_ckpt else "none (the run had not saved yet)"
        raise Diverged(f"non-finite loss or gradients at step {int(bad['last_step'])} (on_nan=stop); "
                       f"last good checkpoint: {where}; lower optim.lr or pass on_nan=skip")
    log(f"skipped {int(bad['count']) - loop.known_bad} non-finite step(s), the last at step "
        f"{int(bad['last_step'])} (on_nan=skip)")
    loop.known_bad = int(bad["count"])


def _log_step(loop: Loop, step_metrics, bar) -> None:
    """The log step's own values (as nanoGPT): a resumed run logs exactly the same curve."""
    row = {k: first(v) for k, v in jax.device_get(step_metrics).items()}  # the only per-log host sync
    now, cfg = time.perf_counter(), loop.cfg
    rate_key = f"{loop.task.unit}_per_s"
    units = (loop.step - loop.step_last) * cfg.batch_size * loop.task.feed.units_per_example
    row[rate_key], row["time_s"] = units / (now - loop.t_last), now - loop.t_run
    loop.metrics_log.write(loop.step, row)
    bar.set_postfix(loss=f"{row['train_loss']:.4f}", **{rate_key: f"{row[rate_key]:.0f}"})
    if bar.disable:
        log(f"step {loop.step}: train_loss {row['train_loss']:.4f}, lr {row['lr']:.2e}, "
            f"grad_norm {row['grad_norm']:.3f}, {row[rate_key]:.0f} {loop.task.unit}/s")
    loop.step_last, loop.t_last = loop.step, now
    _check_finite(loop)


def _checkpoint(loop: Loop) -> None:
    _check_finite(loop)
    loop.metrics_log.flush()
    checkpoint.save(loop.mngr, loop.step, loop.built.runner.get(loop.state), loop.meta)
    loop.last_ckpt = loop.step


def _train(loop: Loop) -> dict:
    cfg, runner, task = loop.cfg, loop.built.runner, loop.task
    n_params = sum(x.size for x in jax.tree.leaves(loop.built.spec.abstract["params"]))
    dp = mesh_lib.data_parallel_size(loop.built.mesh)
    dtype = cfg.model.get("matmul_dtype")  # auto's choice, said once (model/matmul.py)
    matmuls = f" ({resolve_matmul_dtype(dtype)} matmuls)" if dtype else ""
    log(f"{cfg.model.family} ({task.name}): {n_params / 1e6:.2f}M params{matmuls}; {task.summary}; mesh "
        f"{dict(loop.built.mesh.shape)}, global batch {cfg.batch_size} = {cfg.batch_size // dp} per device x {dp} "
        f"devices, out_dir {cfg.out_dir}")
    loop.metrics_log = MetricsLog(cfg.out_dir, loop.step)
    bar = tqdm(total=cfg.steps, initial=loop.step, desc="train", file=sys.stderr, dynamic_ncols=True,
               disable=not (cfg.progress and sys.stderr.isatty() and jax.process_index() == 0))
    loop.t_run = loop.t_last = time.perf_counter()
    loop.step_last = loop.step
    try:
        if loop.task.baseline and loop.step == 0:
            loop.metrics_log.write(0, loop.task.baseline)
            log("baseline: " + ", ".join(f"{k} {v:.4g}" for k, v in loop.task.baseline.items()))
        if cfg.init_from and loop.step == 0:
            _evaluate(loop)  # the starting point's own score, before any update
        batch, n = _batches_at(loop, loop.step)
        while loop.step < cfg.steps:
            loop.state, step_metrics = (runner.train if n == 1 else runner.train_many)(loop.state, batch)
            done = loop.step + n
            stopping = any([loop.stop.should_stop(s) for s in range(loop.step + 1, done + 1)])  # every host asks
            if done < cfg.steps and not stopping:
                batch, n = _batches_at(loop, done)  # built on the host while the device runs the call
            bar.update(done - loop.step)  # n is the next call's by now
            loop.step = done
            final = done == cfg.steps or stopping
            if done % cfg.log_every == 0 or final:
                _log_step(loop, step_metrics, bar)
            if done % cfg.eval_every == 0 or done == cfg.steps:
                _evaluate(loop)
            if done % cfg.ckpt_every == 0 or final:
                _checkpoint(loop)
            if done % cfg.eval_every == 0 or done % cfg.ckpt_every == 0:
                loop.t_last = time.perf_counter()  # throughput counts training time only
            if stopping:
                checkpoint.wait(loop.mngr)
                log(f"stopped by {loop.stop.signal} at step {done}; checkpoint saved in {cfg.out_dir}; "
                    f"rerun the same command to resume")
                return {"out_dir": cfg.out_dir, "step": done, "val_loss": loop.val_loss, "stopped_by": loop.stop.signal}
        checkpoint.wait(loop.mngr)
    finally:
        bar.close()
        loop.metrics_log.close()
    run_arg = shell_arg("out_dir", cfg.out_dir)
    use = {"lm": f"; sample with: python sample.py {run_arg}",
           "mlm": f"; fine-tune from it with: python train.py ... {shell_arg('init_from', cfg.out_dir)}"}.get(
        task.name, "" if cfg.data.kind == "series" else
        f"; predict with: python predict.py {shlex.quote('out_dir=' + cfg.out_dir)}")  # not Hydra: shell quotes
    log(f"done: step {cfg.steps}, val_loss {loop.val_loss:.4f}, {time.perf_counter() - loop.t_run:.1f}s{use}")
    return {"out_dir": cfg.out_dir, "step": cfg.steps, "val_loss": loop.val_loss, "stopped_by": None}
