"""Serve a run over HTTP: `python serve.py out_dir=runs/NAME [host=127.0.0.1 port=8000 ...]`.

Language models (transformer, RNN) answer OpenAI-compatible `POST /v1/completions`; classifiers and
regressors answer `POST /v1/predict`. `GET /v1/models`, `/health`, `/ready` and `/metrics` always.
The run is loaded once; its programs compile (or load from the compile cache) while `/health`
already answers, and `/ready` turns 200 when they are done. SIGTERM stops accepting, finishes the
requests in flight (at most drain_timeout seconds) and exits 0. Settings: core/config.py ServeConfig.
"""
from core import runtime

if __name__ == "__main__":
    runtime.configure()  # before JAX is imported: core/runtime.py

import os
import signal
import socket
import sys
import threading

import hydra

from core import cli, config
from errors import UserError

config.register()


def check(cfg) -> None:
    if not cfg.out_dir:
        raise UserError("pass out_dir=DIR, the directory of a training run (e.g. out_dir=runs/shakespeare_char_cpu)")
    for key in ("slots", "chunk_tokens", "max_queue", "max_tokens", "max_n", "predict_rows", "max_body_bytes"):
        if cfg[key] <= 0:
            raise UserError(f"{key}={cfg[key]} must be positive")
    if cfg.max_prompt_tokens is not None and cfg.max_prompt_tokens <= 0:
        raise UserError(f"max_prompt_tokens={cfg.max_prompt_tokens} must be positive")
    if cfg.batch_wait_ms < 0 or cfg.drain_timeout < 0:
        raise UserError("batch_wait_ms and drain_timeout must be >= 0")
    if not 0 <= cfg.port <= 65535:
        raise UserError(f"port={cfg.port} must be in 0..65535 (0: any free port)")
    if cfg.cpu_threads is not None and cfg.cpu_threads < 0:
        raise UserError(f"cpu_threads={cfg.cpu_threads} must be >= 0 (0 is one per core)")


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads so a taken port fails at once."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror}); pass another port=N (0: any free "
                        f"one) or host=") from None
    sock.listen(2048)
    return sock


def language_model(cfg, run, service, metrics) -> None:
    """Compile the LM programs and start the scheduler (the warm-up thread's work)."""
    from serving import programs
    from serving.scheduler import Scheduler

    progs, cache, logits_SV = programs.build(run.model, run.state["params"], run.state["rest"], slots=cfg.slots,
                                             chunk=cfg.chunk_tokens, max_prompt=service.limits.max_prompt_tokens)
    codec = run.codec
    service.encode = codec.encode
    service.scheduler = Scheduler(progs, run.state["params"], run.state["rest"], cache, logits_SV, slots=cfg.slots,
                                  decode=codec.decode, max_queue=cfg.max_queue,
                                  wait_s=cfg.batch_wait_ms / 1000, metrics=metrics)
    service.scheduler.start()


def predictor(cfg, run, service, metrics) -> None:
    from serving.predictor import Predictor, to_rows

    p = Predictor(run, max_rows=cfg.predict_rows, max_queue=cfg.max_queue, wait_s=cfg.batch_wait_ms / 1000,
                  metrics=metrics)
    service.to_rows = lambda inputs: to_rows(run, p.kind, inputs)
    service.predictor = p
    p.start()


@hydra.main(config_path="configs", config_name="serve", version_base="1.3")
def main(cfg) -> None:
    try:
        check(cfg)
        runtime.cpu_threads(cfg.cpu_threads)
        runtime.compile_cache(cfg.compile_cache)
        sock = bind(cfg.host, cfg.port)
        import uvicorn

        from core.state import load_run
        from serving import requests as req
        from serving.app import Service, create_app
        from serving.metrics import Metrics
        from serving.predictor import kind_of

        run = load_run(cfg.out_dir, cfg.step)
        if run.task != "lm" and kind_of(run) is None:
            raise UserError(f"{cfg.out_dir} holds a task={run.task} model on data={run.cfg.data.kind}, which this "
                            f"server does not serve (language models, and classifiers/regressors of tables, "
                            f"images or texts)")
        T = getattr(run.model, "block_size", None)
        max_prompt = cfg.max_prompt_tokens or T or 1024
        if T is not None and max_prompt > T:
            raise UserError(f"max_prompt_tokens={max_prompt} exceeds the model's context of {T} tokens")
        api_key = cfg.api_key or os.environ.get("JAXLAB_API_KEY") or None
    except UserError as e:
        cli.fail(e)
    metrics = Metrics()
    service = Service(os.path.basename(os.path.normpath(cfg.out_dir)), run.task, run.cfg.model.family, run.step,
                      metrics, req.Limits(max_prompt, cfg.max_tokens, cfg.max_n), cfg.max_body_bytes, api_key)
    server = uvicorn.Server(uvicorn.Config(create_app(service), log_level="warning", access_log=False,
                                           timeout_graceful_shutdown=cfg.drain_timeout))
    failed = []

    def warm_up():
        try:
            (language_model if run.task == "lm" else predictor)(cfg, run, service, metrics)
        except Exception as e:  # noqa: BLE001 - reported in one line, then the server exits 1
            failed.append(e)
            print(f"error: compiling the model failed: {type(e).__name__}: {e}", file=sys.stderr)
            server.should_exit = True
            return
        metrics.ready()
        service.ready = True
        host, port = sock.getsockname()[:2]
        print(f"ready: serving {service.model_id} (step {run.step}, {run.cfg.model.family}, task={run.task}) on "
              f"http://{host if ':' not in host else f'[{host}]'}:{port}", file=sys.stderr, flush=True)

    host, port = sock.getsockname()[:2]
    print(f"listening on {host}:{port}; compiling {service.model_id}'s programs", file=sys.stderr, flush=True)
    threading.Thread(target=warm_up, name="warm-up", daemon=True).start()
    # uvicorn re-raises the signal that stopped it once it has drained; the handler in place then
    # decides the exit status: this one lets the drained server exit 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    server.run(sockets=[sock])
    for worker in (service.scheduler, service.predictor):
        if worker is not None:
            worker.stop()
    cli.exit_now(1 if failed else 0)


if __name__ == "__main__":
    cli.preflight("serve", sys.argv[1:])
    main()
