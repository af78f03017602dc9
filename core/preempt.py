"""Stop requests: SIGTERM (preemption) and SIGINT become a flag the loop checks between steps.

The loop then saves a checkpoint at the current step and exits cleanly. Further signals while
that save runs only set the flag again, so they cannot interrupt (and corrupt) the save.
With several processes, every host must stop at the same step: JAX's preemption sync point
(set up by `jax.distributed.initialize`) agrees on it; a local signal alone would not.
"""
import os
import signal
import threading

import jax

# train.py exits right after a stop, so it then ignores these signals: one during the interpreter's
# teardown, which puts Python-level handlers back to the default, would end it with 143 instead of 0.
# Code calling run() itself gets its own handlers back.
IGNORE_AFTER_STOP = False


class StopRequests:
    """Context manager: installs the handlers, restores the previous ones on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal = None
        self._previous = {}

    def __enter__(self):
        # Under jax.distributed the runtime's own SIGTERM handler feeds the preemption sync point, so
        # every host stops at one step; a Ctrl-C is turned into that SIGTERM, never an exception that
        # would leave the other hosts waiting in a collective.
        handlers = {signal.SIGINT: self._as_sigterm} if jax.process_count() > 1 else \
            {sig: self._handle for sig in self.SIGNALS}
        if threading.current_thread() is threading.main_thread():
            for sig, handler in handlers.items():
                self._previous[sig] = signal.signal(sig, handler)
        return self

    def _as_sigterm(self, signum, frame):
        self._handle(signum, frame)
        os.kill(os.getpid(), signal.SIGTERM)

    def __exit__(self, *exc):
        ignore = self.signal is not None and IGNORE_AFTER_STOP
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_IGN if ignore else handler)
        return False

    def _handle(self, signum, frame):
        self.signal = self.signal or signal.Signals(signum).name

    def should_stop(self, step: int) -> bool:
        """True when this step is where every process stops (call it at every step, on every host)."""
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(step):
                self.signal = self.signal or "preemption"  # SIGINT where it was this host's Ctrl-C
                return True
            return False
        return self.signal is not None
