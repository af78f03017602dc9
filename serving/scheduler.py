"""The language-model scheduler: one thread owns JAX and runs continuous batching over S slots.

Requests arrive from the HTTP threads as `Job`s (one `Choice` per prompt x n). Between decode
chunks the scheduler admits waiting choices into free slots (prefilled together), slides full
caches, and drops cancelled or finished choices. Each chunk then decodes K tokens for slots 0..b-1,
the smallest batch bucket that holds every busy slot (new choices take the lowest free one).
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


@dataclass(eq=False)  # compared by identity: its fields hold numpy arrays
class Choice:
    index: int  # the choice's index in the response (prompt index x n + j)
    prompt_P: np.ndarray
    seed: int  # sampled as `sample.py seed=SEED num_samples=1` samples
    key_X: np.ndarray | None = None  # the seed's sampling key data, made on admission (JAX stays on this thread)
    tokens: list = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of text already emitted
    pos: int = 0  # the next cache position to write
    slot: int = -1
    finish: str | None = None


@dataclass(eq=False)
class Job:
    choices: list
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    stop: list
    stream: bool  # emit text as it decodes; else once, when the choice finishes (fewer wake-ups)
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
        self.slots: list[Choice | None] = [None] * slots  # what each slot decodes; None: free
        self.busy = 0  # slots in use
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
                while not self.pending and not self.busy and not self.stopping:
                    self.cond.wait()
                if self.stopping and not self.pending and not self.busy:
                    return
                gather = not self.busy
            if gather and self.wait_s > 0:
                time.sleep(self.wait_s)  # from idle: let concurrent arrivals share the first chunk
            try:
                self._admit()
                if self.busy:
                    self._chunk()
            except Exception as e:  # noqa: BLE001 - one failed chunk fails its requests, not the server
                print(f"error: scheduler: {type(e).__name__}: {e}", file=sys.stderr)
                for c in [c for c in self.slots if c is not None]:
                    self.job_of[id(c)].emit("error", c.index, f"{type(e).__name__}: {e}")
                    self._free(c)

    def _admit(self) -> None:
        """Waiting choices into free slots, oldest job first, prefilled a batch per prompt bucket."""
        taken = []
        with self.cond:
            while self.busy + len(taken) < len(self.slots):
                while self.pending and self.pending[0].cancelled:
                    self.pending.popleft()
                if not self.pending:
                    break
                job = self.pending[0]
                taken.append((job, job.choices[job.admitted]))
                job.admitted += 1
                if job.admitted == len(job.choices):
                    self.pending.popleft()
            self.metrics.queue_depth.set(len(self.pending))
        lengths = sorted({L for _, L in self.p.prefill})
        ks = sorted({k for k, _ in self.p.prefill})
        by_length = {}
        for job, choice in taken:
            choice.key_X = prog.seed_key(self.p, choice.seed)
            by_length.setdefault(prog.bucket_of(len(choice.prompt_P), lengths), []).append((job, choice))
        for L, group in by_length.items():
            while group:
                k = prog.bucket_of(min(len(group), ks[-1]), ks)
                part, group = group[:k], group[k:]
                prompts_kL = np.zeros((k, L), np.int32)
                lengths_k = np.ones(k, np.int32)
                slots_k = np.full(k, len(self.slots), np.int32)  # out of range: padding rows write nothing
                for r, (job, choice) in enumerate(part):
                    P, slot = len(choice.prompt_P), self.slots.index(None)  # the lowest free slot
                    prompts_kL[r, :P], lengths_k[r], slots_k[r] = choice.prompt_P, P, slot
                    choice.pos, choice.slot = P, slot
                    self.slots[slot] = choice
                    self.busy += 1
                    self.job_of[id(choice)] = job
                self.cache, self.logits_SV = self.p.prefill[k, L](self.params, self.rest, self.cache, self.logits_SV,
                                                                  prompts_kL, lengths_k, slots_k)

    def _free(self, choice: Choice) -> None:
        self.slots[choice.slot] = None
        self.busy -= 1
        self.job_of.pop(id(choice))

    def _chunk(self) -> None:
        """K tokens for slots 0..b-1, b the smallest batch bucket past the highest busy slot.

        Free slots below it decode garbage nobody reads: cheaper than moving caches to keep the busy
        ones first, and new choices take the lowest free slot, so the batch shrinks as load falls.
        """
        T = self.p.block_size
        live = [c for c in self.slots if c is not None]
        for c in live:
            if T is not None and c.pos >= T:  # a full cache: keep its last T/2 tokens, as sample.py does
                fed = np.concatenate([c.prompt_P, np.asarray(c.tokens, np.int32)])[-(T // 2):]
                self.cache = self.p.slide(self.params, self.rest, self.cache, fed[None].astype(np.int32),
                                          np.int32(c.slot))
                c.pos = T // 2
        b = prog.bucket_of(live[-1].slot + 1, self.batch_sizes)
        rows = self.slots[:b]
        jobs = [self.job_of[id(c)] if c is not None else None for c in rows]
        pos_b = np.array([c.pos if c else 0 for c in rows], np.int32)
        count_b = np.array([len(c.tokens) if c else 0 for c in rows], np.int32)
        key_bX = np.stack([c.key_X if c else np.zeros_like(live[0].key_X) for c in rows])
        temperature_b = np.array([j.temperature if j else 0.0 for j in jobs], np.float32)
        top_k_b = np.array([j.top_k if j else 0 for j in jobs], np.int32)
        top_p_b = np.array([j.top_p if j else 1.0 for j in jobs], np.float32)
        self.cache, self.logits_SV, tokens_bK = self.p.decode[b](self.params, self.rest, self.cache, self.logits_SV,
                                                                  pos_b, count_b, key_bX, temperature_b, top_k_b,
                                                                  top_p_b)
        tokens_bK = np.asarray(tokens_bK)
        self.metrics.batch_size.observe(len(live))
        now = time.perf_counter()
        for c, job, tokens_K in zip(rows, jobs, tokens_bK):
            if c is None:
                continue
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
        if not c.finish and isinstance(c.text, str):  # a character whose bytes span tokens decodes as U+FFFD
            hold = max(hold, len(c.text) - len(c.text.rstrip("\ufffd")))  # until its last byte comes
        ready = max(c.sent, len(c.text) - hold)
        if ready > c.sent and (job.stream or c.finish):
            job.emit("text", c.index, c.text[c.sent:ready])
            c.sent = ready
        if c.finish:
            job.emit("done", c.index, (c.finish, len(c.tokens)))
            self._free(c)
