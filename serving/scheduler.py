"""The language-model scheduler: one thread owns JAX and runs continuous batching over S slots.

Requests arrive from the HTTP threads as `Job`s (one `Choice` per prompt x n). Between decode
chunks the scheduler admits waiting choices into free slots (a batch-1 prefill each), slides full
caches, and drops cancelled or finished choices, moving the last live slot into the hole so the live
ones stay in slots 0..n-1. Each chunk then decodes K tokens for the smallest batch bucket b >= n.
So a sequence joins and leaves the batch at chunk boundaries (every K tokens), never waiting for the
others; all shapes are compiled at start-up (serving/programs.py).
"""
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from serving import programs as prog


class QueueFull(Exception):
    """More jobs wait than the server's max_queue: the client should retry later (HTTP 429)."""


@dataclass(eq=False)  # identity, not field equality: a choice is found in the live list by itself
class Choice:
    index: int  # the choice's index in the response (prompt index x n + j)
    prompt_P: np.ndarray
    seed: int  # sampled as `sample.py seed=SEED num_samples=1` samples
    key_X: np.ndarray | None = None  # the seed's sampling key data, made on admission (JAX stays on this thread)
    tokens: list = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of text already emitted
    pos: int = 0  # the next cache position to write
    finish: str | None = None


@dataclass(eq=False)
class Job:
    choices: list
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    stop: list
    emit: Callable  # emit(kind, index, payload): "text" (delta), "done" ((finish_reason, tokens)), "error" (message)
    cancelled: bool = False
    admitted: int = 0  # choices already given a slot
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None


class Scheduler:
    def __init__(self, programs: prog.Programs, params, rest, cache, logits_SV, *, slots: int, decode: Callable,
                 max_queue: int, wait_s: float, metrics):
        self.p, self.params, self.rest, self.cache, self.logits_SV = programs, params, rest, cache, logits_SV
        self.batch_sizes = prog.buckets(slots)
        self.decode_text, self.max_queue, self.wait_s, self.metrics = decode, max_queue, wait_s, metrics
        self.live: list[Choice] = []  # slot i holds live[i]
        self.job_of: dict[int, Job] = {}  # id(choice) -> its job
        self.pending: deque[Job] = deque()
        self.cond = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="scheduler", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Finish what is admitted or waiting, then end the thread."""
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join()

    def submit(self, job: Job) -> None:
        with self.cond:
            if len(self.pending) >= self.max_queue:
                raise QueueFull(f"{len(self.pending)} requests are already waiting (max_queue={self.max_queue}); "
                                f"retry later")
            self.pending.append(job)
            self.metrics.queue_depth.set(len(self.pending))
            self.cond.notify()

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.pending and not self.live and not self.stopping:
                    self.cond.wait()
                if self.stopping and not self.pending and not self.live:
                    return
                gather = not self.live
            if gather and self.wait_s > 0:
                time.sleep(self.wait_s)  # from idle: let concurrent arrivals share the first chunk
            try:
                self._admit()
                if self.live:
                    self._chunk()
            except Exception as e:  # noqa: BLE001 - one failed chunk fails its requests, not the server
                print(f"error: scheduler: {type(e).__name__}: {e}", file=sys.stderr)
                for c in list(self.live):
                    self.job_of[id(c)].emit("error", c.index, f"{type(e).__name__}: {e}")
                    self._free(c)

    def _admit(self) -> None:
        """Waiting choices into free slots, oldest job first; cancelled jobs leave the queue."""
        slots = self.batch_sizes[-1]
        while len(self.live) < slots:
            with self.cond:
                while self.pending and self.pending[0].cancelled:
                    self.pending.popleft()
                if not self.pending:
                    break
                job = self.pending[0]
                choice = job.choices[job.admitted]
                job.admitted += 1
                if job.admitted == len(job.choices):
                    self.pending.popleft()
                self.metrics.queue_depth.set(len(self.pending))
            choice.key_X = prog.seed_key(self.p, choice.seed)
            slot, P = len(self.live), len(choice.prompt_P)
            L = prog.bucket_of(P, sorted(self.p.prefill))
            prompt_1L = np.zeros((1, L), np.int32)
            prompt_1L[0, :P] = choice.prompt_P
            self.cache, self.logits_SV = self.p.prefill[L](self.params, self.rest, self.cache, self.logits_SV,
                                                           prompt_1L, np.int32(P), np.int32(slot))
            choice.pos = P
            self.live.append(choice)
            self.job_of[id(choice)] = job

    def _free(self, choice: Choice) -> None:
        """Drop a choice's slot; the last live slot moves into it so the live ones stay first."""
        i, last = self.live.index(choice), len(self.live) - 1
        if i != last:
            self.cache, self.logits_SV = self.p.move(self.cache, self.logits_SV, np.int32(last), np.int32(i))
            self.live[i] = self.live[last]
        self.live.pop()
        self.job_of.pop(id(choice))

    def _chunk(self) -> None:
        T = self.p.block_size
        for slot, c in enumerate(self.live):
            if T is not None and c.pos >= T:  # a full cache: keep its last T/2 tokens, as sample.py does
                fed = np.concatenate([c.prompt_P, np.asarray(c.tokens, np.int32)])[-(T // 2):]
                self.cache = self.p.slide(self.params, self.rest, self.cache, fed[None].astype(np.int32),
                                          np.int32(slot))
                c.pos = T // 2
        n = len(self.live)
        b = prog.bucket_of(n, self.batch_sizes)
        jobs = [self.job_of[id(c)] for c in self.live]
        pad = b - n
        pos_b = np.array([c.pos for c in self.live] + [0] * pad, np.int32)
        count_b = np.array([len(c.tokens) for c in self.live] + [0] * pad, np.int32)
        key_bX = np.stack([c.key_X for c in self.live] + [np.zeros_like(self.live[0].key_X)] * pad)
        temperature_b = np.array([j.temperature for j in jobs] + [0.0] * pad, np.float32)
        top_k_b = np.array([j.top_k for j in jobs] + [0] * pad, np.int32)
        top_p_b = np.array([j.top_p for j in jobs] + [1.0] * pad, np.float32)
        self.cache, self.logits_SV, tokens_bK = self.p.decode[b](self.params, self.rest, self.cache, self.logits_SV,
                                                                  pos_b, count_b, key_bX, temperature_b, top_k_b,
                                                                  top_p_b)
        tokens_bK = np.asarray(tokens_bK)
        self.metrics.batch_size.observe(n)
        now = time.perf_counter()
        for c, job, tokens_K in zip(list(self.live), jobs, tokens_bK):
            if job.cancelled:
                self._free(c)
                continue
            valid = prog.valid_steps(self.p, c.pos)
            c.pos += valid
            new = tokens_K[:min(valid, job.max_tokens - len(c.tokens))].tolist()
            c.tokens.extend(new)
            self.metrics.tokens.inc(len(new))
            if job.first_token is None and new:
                job.first_token = now
                self.metrics.first_token.observe(now - job.submitted)
            self._report(c, job)

    def _report(self, c: Choice, job: Job) -> None:
        """Emit the choice's new text (holding back what may begin a stop string) and finish it if done."""
        c.text = self.decode_text(c.tokens)
        cut, end = min(((i, i + len(s)) for i, s in ((c.text.find(s), s) for s in job.stop) if i >= 0),
                       default=(-1, 0))
        if cut >= 0:  # the tokens that count are those up to the one that completed the stop string
            c.tokens = c.tokens[:next(k for k in range(1, len(c.tokens) + 1)
                                      if len(self.decode_text(c.tokens[:k])) >= end)]
            c.text, c.finish = c.text[:cut], "stop"
        elif len(c.tokens) >= job.max_tokens:
            c.finish = "length"
        hold = 0 if c.finish or not job.stop else max(map(len, job.stop)) - 1
        ready = max(c.sent, len(c.text) - hold)
        if ready > c.sent:
            job.emit("text", c.index, c.text[c.sent:ready])
            c.sent = ready
        if c.finish:
            job.emit("done", c.index, (c.finish, len(c.tokens)))
            self._free(c)
