"""Run logs: metrics.jsonl (one JSON object per line, every line has `step`) and TensorBoard events.

TensorBoard files are written with tensorboardX's event writer, which needs no TensorFlow, from this
thread: its SummaryWriter queues events for a thread of its own, and `flush()` does not wait for that
queue, so a run killed after a checkpoint could lose events the checkpoint covers. On resume, lines and
events past the restored step are dropped, so a killed-and-resumed run reads as one clean curve.
"""
import json
import math
import os
import time

import jax
from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto.event_pb2 import Event, SessionLog
from tensorboardX.summary import scalar


class MetricsLog:
    """Appends metric rows; only process 0 writes."""

    def __init__(self, out_dir: str, resume_step: int):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.tb = None
        if not self.enabled:
            return
        _truncate_after(self.path, resume_step)
        os.makedirs(os.path.join(out_dir, "tb"), exist_ok=True)
        self.tb = EventsWriter(os.path.join(out_dir, "tb", "events"))
        if resume_step:  # TensorBoard hides the earlier files' events from this step on (SummaryWriter's purge_step)
            self._event(resume_step + 1, session_log=SessionLog(status=SessionLog.START))

    def _event(self, step: int, **fields) -> None:
        self.tb.write_event(Event(wall_time=time.time(), step=int(step), **fields))

    def write(self, step: int, row: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _plain(v) for k, v in row.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)):
                self._event(step, summary=scalar(k, v))

    def flush(self) -> None:
        """Make every event so far durable (called with each checkpoint, so a killed run loses none it keeps)."""
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _plain(v):
    v = v.item() if hasattr(v, "item") else v
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _truncate_after(path: str, step: int) -> None:
    """Keep only rows with step <= `step` (all of them go when a run starts at 0)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        rows = [line for line in f if line.strip()]
    keep = [r for r in rows if _step_of(r) is not None and _step_of(r) <= step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)


def _step_of(line: str):
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def read(path: str) -> list[dict]:
    """All rows of a metrics.jsonl file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
