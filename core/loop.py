"""The training loop: one function for every model family and task.

It wires config -> mesh -> data -> state (fresh or restored) -> the jitted step, and keeps the
host out of the device's way: the next batch is built while the step runs, and metrics are
fetched only at log steps. It stops cleanly on SIGTERM/SIGINT (checkpoint, exit 0) and on a
non-finite loss (on_nan=stop), and never writes a checkpoint holding a NaN.
"""
import os
import shutil
import sys
import time
from functools import partial

import jax
from omegaconf import OmegaConf
from tqdm import tqdm

import model as models
from core import checkpoint, config, distributed, mesh as mesh_lib, metrics, task as tasks
from core.errors import Diverged, UserError
from core.metrics import MetricsLog
from core.preempt import StopRequests
from core.state import state_spec
from core.step import compile_steps, first


def log(msg: str) -> None:
    """Progress and status go to stderr (stdout is kept for results), from process 0 only."""
    if jax.process_index() == 0:
        tqdm.write(msg, file=sys.stderr)


def resolve_out_dir(cfg) -> str:
    return os.path.abspath(os.path.expanduser(cfg.out_dir or os.path.join("runs", cfg.name)))


def _refuse_harmful_changes(saved: dict, current: dict) -> list[str]:
    """The harmless keys changed since the checkpoint; a change that alters training is an error."""
    harmful, harmless = config.diff(saved, current)
    if harmful:
        keys = ", ".join(harmful[:6]) + (f" and {len(harmful) - 6} more" if len(harmful) > 6 else "")
        raise UserError(f"this run's config differs from its checkpoint in {keys}; "
                        f"restore those values, or pass out_dir= (new run) or resume=false (start afresh)")
    return harmless


def _check_resumable(current_meta: dict, saved_meta: dict) -> None:
    harmless = _refuse_harmful_changes(saved_meta["config"], current_meta["config"])
    if saved_meta.get("vocab") != current_meta.get("vocab"):
        raise UserError("the data's vocabulary differs from the checkpoint's; train on the same data "
                        "or pass out_dir= for a new run")
    changed = sorted(k for k in saved_meta if k != "config" and saved_meta[k] != current_meta.get(k))
    if changed:
        raise UserError(f"the data differs from the checkpoint's ({', '.join(changed)}); train on the same data "
                        f"or pass out_dir= for a new run")
    if harmless:
        log(f"resuming with changed {', '.join(harmless)}")


def _prepare_out_dir(out_dir: str, fresh: bool) -> None:
    """Create out_dir (clearing an old run if `fresh`) and prove it is writable, before any compile."""
    if jax.process_index() != 0:
        return
    try:
        os.makedirs(out_dir, exist_ok=True)
        if fresh:
            for name in ("checkpoints", "tb", "metrics.jsonl"):
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


def _finished_step(cfg, out_dir: str):
    """The step of a run that already reached `steps` (checked before any data is loaded), else None."""
    if not cfg.resume or not os.path.isdir(checkpoint.ckpt_dir(out_dir)):
        return None
    mngr = checkpoint.manager(out_dir, read_only=True)
    try:
        step = mngr.latest_step()
        if step is None or step < cfg.steps:
            return None
        saved = checkpoint.read_meta(mngr, step)["config"]
    except Exception:  # noqa: BLE001 - a damaged checkpoint: the full restore path reports it
        return None
    finally:
        mngr.close()
    _refuse_harmful_changes(saved, OmegaConf.to_container(cfg, resolve=True))
    return step


def _last_val_loss(out_dir: str):
    path = os.path.join(out_dir, "metrics.jsonl")
    rows = [r for r in metrics.read(path) if "val_loss" in r] if os.path.exists(path) else []
    return rows[-1]["val_loss"] if rows else None


def run(cfg) -> dict:
    """Train as the composed config says; returns {"out_dir", "step", "val_loss", "stopped_by"}."""
    config.check(cfg)
    models.check_task(cfg.model.family, tasks.TASK_OF_DATA[cfg.data.kind], cfg.data.kind)
    distributed.initialize(cfg.distributed)
    cfg.out_dir = out_dir = resolve_out_dir(cfg)
    mesh = mesh_lib.make_mesh(cfg.mesh)
    mesh_lib.check_batch(cfg.batch_size, mesh, cfg.optim.grad_accum)
    done = _finished_step(cfg, out_dir)
    if done is not None:
        log(f"run in {out_dir} is already at step {done} (steps={cfg.steps}); raise steps= to train further")
        return {"out_dir": out_dir, "step": done, "val_loss": _last_val_loss(out_dir), "stopped_by": None}
    task = tasks.load(cfg)
    spec = state_spec(cfg, task.dims, mesh)
    meta = {"config": OmegaConf.to_container(cfg, resolve=True), "task": task.kind, "dims": task.dims, **task.meta}
    _prepare_out_dir(out_dir, fresh=not cfg.resume)
    distributed.check_shared_dir(out_dir)

    mngr = checkpoint.manager(out_dir, cfg.keep_checkpoints)
    try:
        restored = checkpoint.restore_latest(mngr, checkpoint.abstract_like(spec.abstract, spec.shardings),
                                             check_meta=partial(_check_resumable, meta)) if cfg.resume else None
        if restored:
            start, state, _ = restored
            log(f"resuming from step {start} in {out_dir}")
        else:
            start, state = 0, jax.jit(spec.make_state, out_shardings=spec.shardings)()
        if start >= cfg.steps:  # the newest checkpoint was unreadable and an older one suffices
            return {"out_dir": out_dir, "step": start, "val_loss": _last_val_loss(out_dir), "stopped_by": None}
        if jax.process_index() == 0:
            OmegaConf.save(cfg, os.path.join(out_dir, "config.yaml"), resolve=True)
            log(OmegaConf.to_yaml(cfg, resolve=True).rstrip())
        with StopRequests() as stop:
            return _train(cfg, mngr, mesh, task, spec, meta, start, state, stop)
    finally:
        checkpoint.wait(mngr)
        mngr.close()


def _evaluate(runner, state, task) -> dict:
    """Validation metrics: each batch's means weighted by its count of real examples."""
    totals, weight = {}, 0.0
    for i in range(task.eval_count):
        rows, n = task.eval_batch(i)
        for k, v in jax.device_get(runner.evaluate(state, runner.batch(rows))).items():
            totals[k] = totals.get(k, 0.0) + first(v) * n
        weight += n
    return {f"val_{k}": v / weight for k, v in totals.items()}


def _train(cfg, mngr, mesh, task, spec, meta, start, state, stop) -> dict:
    out_dir, B = cfg.out_dir, cfg.batch_size
    n_params = sum(x.size for x in jax.tree.leaves(spec.abstract["params"]))
    dp = mesh_lib.data_parallel_size(mesh)
    log(f"{cfg.model.family} ({task.kind}): {n_params / 1e6:.2f}M params; {task.summary}; mesh {dict(mesh.shape)}, "
        f"global batch {B} = {B // dp} per device x {dp} devices, out_dir {out_dir}")

    runner = compile_steps(mesh, spec.shardings, graphdef=spec.graphdef, tx=spec.tx, loss_fn=task.loss_fn,
                           lr_fn=spec.lr_fn, seed=cfg.seed, grad_accum=cfg.optim.grad_accum, parallel=cfg.parallel)

    def call_length(step: int) -> int:
        """Steps in the call starting at `step`: up to steps_per_call, ending at the next log/eval/ckpt step."""
        every = (cfg.log_every, cfg.eval_every, cfg.ckpt_every)
        next_event = min([cfg.steps] + [(step // e + 1) * e for e in every])
        return min(cfg.steps_per_call, next_event - step)

    def batches_at(step: int):
        """The global batches of the call starting at `step`, built on the host."""
        k = call_length(step)
        if k == 1:
            return runner.batch(task.train_batch(step))
        return runner.stack([task.train_batch(s) for s in range(step, step + k)])

    rate_key = f"{task.unit}_per_s"

    last_ckpt = start if start else None
    known_bad = int(jax.device_get(state["nonfinite"]["count"]))
    state = runner.put(state)

    def check_finite() -> None:
        """Host-side NaN check at log and checkpoint steps only: one scalar, no per-step sync."""
        nonlocal known_bad
        bad = jax.device_get(runner.get(state["nonfinite"]))
        if int(bad["count"]) > known_bad:
            if cfg.on_nan == "stop":
                where = f"step {last_ckpt} in {out_dir}" if last_ckpt else "none (the run had not saved yet)"
                raise Diverged(f"non-finite loss or gradients at step {int(bad['last_step'])} (on_nan=stop); "
                               f"last good checkpoint: {where}; lower optim.lr or pass on_nan=skip")
            log(f"skipped {int(bad['count']) - known_bad} non-finite step(s), the last at step "
                f"{int(bad['last_step'])} (on_nan=skip)")
            known_bad = int(bad["count"])

    metrics_log = MetricsLog(out_dir, start)
    bar = tqdm(total=cfg.steps, initial=start, desc="train", file=sys.stderr, dynamic_ncols=True,
               disable=not (cfg.progress and sys.stderr.isatty() and jax.process_index() == 0))
    t_run = t_last = time.perf_counter()
    step_last, val_loss, done = start, None, start
    step, batch = start, batches_at(start)
    try:
        while step < cfg.steps:
            n_steps = call_length(step)
            state, step_metrics = (runner.train if n_steps == 1 else runner.train_many)(state, batch)
            done = step + n_steps
            stopping = any([stop.should_stop(s) for s in range(step + 1, done + 1)])  # every host sees every id
            if done < cfg.steps and not stopping:
                batch = batches_at(done)  # built on the host while the device runs the call
            bar.update(n_steps)
            step = done
            final = done == cfg.steps or stopping
            if done % cfg.log_every == 0 or final:
                # The log step's own values (as nanoGPT): a resumed run logs exactly the same curve.
                row = {k: first(v) for k, v in jax.device_get(step_metrics).items()}  # the only host sync
                now = time.perf_counter()
                row[rate_key] = (done - step_last) * B * task.units_per_example / (now - t_last)
                row["time_s"] = now - t_run
                metrics_log.write(done, row)
                bar.set_postfix(loss=f"{row['train_loss']:.4f}", **{rate_key: f"{row[rate_key]:.0f}"})
                if bar.disable:
                    log(f"step {done}: train_loss {row['train_loss']:.4f}, lr {row['lr']:.2e}, "
                        f"grad_norm {row['grad_norm']:.3f}, {row[rate_key]:.0f} {task.unit}/s")
                step_last, t_last = done, now
                check_finite()
            if done % cfg.eval_every == 0 or done == cfg.steps:
                val = _evaluate(runner, state, task)
                val_loss = val["val_loss"]
                metrics_log.write(done, {**val, "time_s": time.perf_counter() - t_run})
                log(f"step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in val.items()))
            if done % cfg.ckpt_every == 0 or final:
                check_finite()
                checkpoint.save(mngr, done, runner.get(state), meta)
                last_ckpt = done
            if done % cfg.eval_every == 0 or done % cfg.ckpt_every == 0:
                t_last = time.perf_counter()  # tokens/s counts training time only
            if stopping:
                checkpoint.wait(mngr)
                log(f"stopped by {stop.signal} at step {done}; checkpoint saved in {out_dir}; "
                    f"rerun the same command to resume")
                return {"out_dir": out_dir, "step": done, "val_loss": val_loss, "stopped_by": stop.signal}
    finally:
        bar.close()
        metrics_log.close()
    log(f"done: step {cfg.steps}, val_loss {val_loss:.4f}, {time.perf_counter() - t_run:.1f}s; "
        f"sample with: python sample.py out_dir={out_dir}")
    return {"out_dir": out_dir, "step": cfg.steps, "val_loss": val_loss, "stopped_by": None}
