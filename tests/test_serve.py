"""serve.py over real HTTP on 127.0.0.1: OpenAI completions, batching, bad requests, auth, drain, predict."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from openai import APIStatusError, OpenAI

from conftest import ROOT, compose, devices_env, run_cli

DEBUG_T = 16  # the debug experiment's context: 40 new tokens slide it twice


class Server:
    """`python serve.py ARGS port=0` in a subprocess; its URL once its log says ready."""

    def __init__(self, *args, env=None, timeout=180):
        env = devices_env(**(env or {}))
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), *args, "port=0"], cwd=ROOT,
                                     env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        self.log, ready = [], threading.Event()

        def drain():
            for line in self.proc.stderr:
                self.log.append(line)
                if line.startswith("ready:"):
                    ready.set()
            ready.set()

        threading.Thread(target=drain, daemon=True).start()
        ready.wait(timeout)
        found = re.search(r"http://[\d.]+:\d+", "".join(self.log))
        assert found and self.proc.poll() is None, "".join(self.log)
        self.url = found.group(0)

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.url}/metrics").text
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


@pytest.fixture(scope="module")
def lm(trained_run):
    server = Server(f"out_dir={trained_run}", "slots=4", "chunk_tokens=4", "max_n=4",
                    "max_body_bytes=4096")
    yield server
    assert server.stop() == 0


def client(server, key="none"):
    return OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)


def sample_cli(run_dir, prompt, n, **options):
    args = [f"out_dir={run_dir}", f"prompt='{prompt}'", "num_samples=1", f"max_new_tokens={n}"]
    out = run_cli("sample.py", *args, *[f"{k}={v}" for k, v in options.items()])
    assert out.returncode == 0, out.stderr
    return out.stdout[len(prompt):].removesuffix("\n")


def test_completions_equal_sample_py_token_for_token(lm, trained_run):
    """Greedy and seeded sampling, past two context slides, through the official client."""
    for options in ({"temperature": 0}, {"temperature": 0.8, "seed": 5, "top_p": 0.9, "top_k": 20}):
        extra = {k: options[k] for k in ("top_k",) if k in options}  # ours, beyond OpenAI's fields
        got = client(lm).completions.create(model="run", prompt="The king", max_tokens=40, extra_body=extra,
                                            **{k: v for k, v in options.items() if k not in extra})
        expected = sample_cli(trained_run, "The king", 40, **options)
        assert got.choices[0].text == expected and got.choices[0].finish_reason == "length"
        assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (8, 40)


def test_streaming_yields_the_non_streaming_text(lm):
    c = client(lm)
    whole = c.completions.create(model="run", prompt="Good", max_tokens=30, temperature=1.0, seed=11, n=2)
    pieces = {0: "", 1: ""}
    finish = {}
    for chunk in c.completions.create(model="run", prompt="Good", max_tokens=30, temperature=1.0, seed=11, n=2,
                                      stream=True):
        for ch in chunk.choices:
            pieces[ch.index] += ch.text
            finish[ch.index] = ch.finish_reason or finish.get(ch.index)
    assert [pieces[i] for i in (0, 1)] == [ch.text for ch in whole.choices]
    assert finish == {0: "length", 1: "length"} and whole.choices[0].text != whole.choices[1].text
    # several prompts: the choice with index k uses seed + k, the same prompt twice samples twice
    twice = c.completions.create(model="run", prompt=["Good", "Good"], max_tokens=30, temperature=1.0, seed=11)
    assert [ch.text for ch in twice.choices] == [ch.text for ch in whole.choices]


def test_a_stop_string_ends_the_choice_and_is_not_returned(lm):
    c = client(lm)
    free = c.completions.create(model="run", prompt="The", max_tokens=40, temperature=0).choices[0].text
    stop = free[10:12]
    got = c.completions.create(model="run", prompt="The", max_tokens=40, temperature=0, stop=[stop, "@@"])
    assert got.choices[0].text == free[:free.index(stop)] and got.choices[0].finish_reason == "stop"
    assert got.usage.completion_tokens == free.index(stop) + len(stop)  # characters are tokens here


def test_concurrent_requests_share_batches_and_each_gets_its_own_answer(lm):
    c = client(lm)
    alone = [c.completions.create(model="run", prompt="Thou", max_tokens=24, temperature=1.0, seed=s).choices[0].text
             for s in range(8)]
    batches_before = lm.metric("serve_batch_size_count"), lm.metric("serve_batch_size_sum")
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda s: c.completions.create(model="run", prompt="Thou", max_tokens=24,
                                                                 temperature=1.0, seed=s).choices[0].text, range(8)))
    assert together == alone
    chunks = lm.metric("serve_batch_size_count") - batches_before[0]
    sequences = lm.metric("serve_batch_size_sum") - batches_before[1]
    assert sequences / chunks > 1.5  # 8 requests x 6 chunks each, in fewer chunks than 48


BAD = [  # (body, status, words the message must hold)
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    ({"prompt": "a", "max_tokens": -3}, 400, "max_tokens=-3"),
    ({"prompt": "a", "max_tokens": 10 ** 9}, 400, "max_tokens"),
    ({"prompt": "a", "max_tokens": "ten"}, 400, "integer"),
    ({"prompt": "a", "temperature": -0.5}, 400, "temperature"),
    ({"prompt": "a", "top_p": 0}, 400, "top_p"),
    ({"prompt": "a", "top_p": 1.5}, 400, "top_p"),
    ({"prompt": "a€"}, 400, "'€'"),
    ({"prompt": ""}, 400, "empty"),
    ({"prompt": []}, 400, "prompt"),
    ({"max_tokens": 3}, 400, "prompt"),
    ({"prompt": "a", "n": 50}, 400, "n=50"),
    ({"prompt": ["a", "b", "c"], "n": 2}, 400, "at most 4"),
    ({"prompt": "a", "stop": 3}, 400, "stop"),
    ({"prompt": "a", "logprobs": 2}, 400, "logprobs"),
    ({"prompt": "a", "frobnicate": 1}, 400, "frobnicate"),
    ({"prompt": "a" * 17}, 400, "17 tokens"),
    ({"prompt": "a", "model": "gpt-4"}, 404, "gpt-4"),
    ({"prompt": "a" * 5000}, 413, "bytes"),
    (b"[" * 2000 + b"]" * 2000, 400, "nested too deeply"),
    ({"prompt": "a", "top_k": 2 ** 31}, 400, "top_k"),
    ({"prompt": "a", "seed": 2 ** 31 - 1, "n": 2}, 400, "seed"),
]


@pytest.mark.parametrize("body,status,words", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_requests_get_a_clear_4xx_and_the_server_keeps_serving(lm, body, status, words):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{lm.url}/v1/completions", content=content, headers={"content-type": "application/json"})
    assert r.status_code == status and words in r.json()["error"]["message"], r.text
    assert httpx.post(f"{lm.url}/v1/completions", json={"prompt": "a", "max_tokens": 2}).status_code == 200


def test_unknown_routes_methods_and_the_predict_route_of_an_lm_are_4xx(lm):
    assert httpx.get(f"{lm.url}/v2/nothing").status_code == 404
    slash = httpx.post(f"{lm.url}/v1/completions/", json={"prompt": "a"})
    assert slash.status_code == 404 and "/v1/completions" in slash.json()["error"]["message"]
    assert httpx.get(f"{lm.url}/v1/completions").status_code == 405
    r = httpx.post(f"{lm.url}/v1/predict", json={"inputs": [1]})
    assert r.status_code == 404 and "/v1/completions" in r.json()["error"]["message"]


def test_models_health_ready_and_metrics(lm):
    assert httpx.get(f"{lm.url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{lm.url}/ready").status_code == 200
    (model,) = client(lm).models.list().data
    assert model.id == "run" and model.task == "lm" and model.step == 20
    text = httpx.get(f"{lm.url}/metrics").text
    for name in ("serve_requests_total", "serve_request_latency_seconds_bucket", "serve_generated_tokens_total",
                 "serve_queue_depth", "serve_batch_size_bucket", "serve_time_to_first_token_seconds_bucket"):
        assert name in text


def test_a_client_that_disconnects_cancels_its_generation(lm):
    before = lm.metric("serve_generated_tokens_total")
    with httpx.stream("POST", f"{lm.url}/v1/completions", json={"prompt": "a", "max_tokens": 4000, "stream": True,
                                                               "temperature": 1.0}) as r:
        next(r.iter_lines())
    time.sleep(1.0)
    mid = lm.metric("serve_generated_tokens_total")
    time.sleep(0.5)
    assert lm.metric("serve_generated_tokens_total") == mid < before + 4000


def test_nothing_compiles_after_start_up(lm):
    """Runs after the others in this module (pytest keeps file order): every shape was compiled at start-up."""
    assert lm.metric('serve_compiles_total{phase="serving"}') == 0
    assert lm.metric('serve_compiles_total{phase="startup"}') > 0


def test_auth_queue_limit_and_sigterm_drain(trained_run):
    server = Server(f"out_dir={trained_run}", "slots=1", "max_queue=1", "chunk_tokens=2",
                    env={"JAXLAB_API_KEY": "sesame"})
    try:
        with pytest.raises(APIStatusError) as e:
            client(server, "wrong").completions.create(model="run", prompt="a", max_tokens=2)
        assert e.value.status_code == 401
        assert httpx.get(f"{server.url}/health").status_code == 200  # probes need no key
        ok = client(server, "sesame")
        assert ok.completions.create(model="run", prompt="a", max_tokens=2).choices[0].finish_reason == "length"

        def long(n):
            try:
                return ok.completions.create(model="run", prompt="a", max_tokens=n, temperature=1.0).usage
            except APIStatusError as err:
                return err.status_code

        with ThreadPoolExecutor(4) as pool:
            base, deadline = server.metric("serve_generated_tokens"), time.time() + 60
            first = pool.submit(long, 1000)
            # Only once it decodes has it left the queue: otherwise the next one may find the queue full.
            while server.metric("serve_generated_tokens") == base and time.time() < deadline:
                time.sleep(0.01)
            rest = list(pool.map(long, [1000] * 3))  # one waits, the rest find the queue full
            answers = [first.result(), *rest]
        assert 429 in answers and sum(a != 429 for a in answers) >= 2

        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(long, 4000)
            time.sleep(0.2)
            assert server.stop() == 0  # drained: the request in flight still finished
            assert pending.result().completion_tokens == 4000
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{server.url}/health")
    finally:
        server.proc.kill()


def test_cli_mistakes_are_one_line_errors(tmp_path, trained_run):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = run_cli("serve.py", f"out_dir={empty}")
    assert out.returncode == 2 and "holds no checkpoints" in out.stderr and len(out.stderr.splitlines()) == 1
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        out = run_cli("serve.py", f"out_dir={trained_run}", f"port={taken.getsockname()[1]}")
    assert out.returncode == 2 and "cannot listen" in out.stderr and len(out.stderr.splitlines()) == 1
    out = run_cli("serve.py", f"out_dir={trained_run}", "slots=0")
    assert out.returncode == 2 and "slots=0" in out.stderr
    out = run_cli("serve.py", f"out_dir={trained_run}", "cpu_threads=-1")
    assert out.returncode == 2 and "cpu_threads=-1 must be >= 0" in out.stderr


def scheduled(model, prompts, n_tokens, samplings, *, slots=4, chunk=3):
    """Per sampling setting, the tokens the server's scheduler makes for `prompts` submitted at once, in-process."""
    from flax import nnx

    from serving import programs
    from serving.metrics import Metrics
    from serving.scheduler import Choice, Job, Scheduler

    _, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
    progs, cache, logits_SV = programs.build(model, params, rest, slots=slots, chunk=chunk, max_prompt=8)
    scheduler = Scheduler(progs, params, rest, cache, logits_SV, slots=slots, decode=list, max_queue=8, wait_s=0,
                          metrics=Metrics())
    done = threading.Semaphore(0)
    scheduler.start()
    out = []
    for sampling in samplings:
        jobs = [Job([Choice(0, np.asarray(p, np.int32), seed)], n_tokens, stop=[], stream=False,
                    emit=lambda kind, i, payload: done.release() if kind == "done" else None, **sampling)
                for seed, p in enumerate(prompts)]
        for job in jobs:
            scheduler.submit(job)
        for _ in jobs:
            assert done.acquire(timeout=120)
        out.append([job.choices[0].tokens for job in jobs])
    scheduler.stop()
    return out, (params, rest)


@pytest.mark.parametrize("stop", [[], ["本b"]])
def test_streamed_text_holds_back_a_character_until_its_last_byte_token(stop):
    """Byte-level BPE can split one character over tokens: the stream must not send U+FFFD for it."""
    from serving.scheduler import Choice, Job, Scheduler

    scheduler = Scheduler.__new__(Scheduler)  # _report alone: no programs, no thread
    scheduler.decode_text, scheduler._free = (lambda tokens: bytes(tokens).decode("utf-8", "replace")), (lambda c: None)
    sent = []
    choice = Choice(0, np.zeros(1, np.int32), 0)
    job = Job([choice], 100, 1.0, 0, 1.0, stop, True, lambda kind, i, payload: sent.append((kind, payload)))
    for byte in "a日本bc\u00e9".encode():  # one token per byte
        choice.tokens.append(byte)
        scheduler._report(choice, job)
        if choice.finish:
            break
    texts = [payload for kind, payload in sent if kind == "text"]
    assert "".join(texts) == ("a日" if stop else "a日本bcé") and "\ufffd" not in "".join(texts)
    assert len(texts) >= 2  # streamed as it decodes, not at the end
    assert sent[-1] == ("done", ("stop", 8)) if stop else all(kind == "text" for kind, _ in sent)


@pytest.mark.parametrize("family", ["rnn", "transformer"])
def test_the_scheduler_equals_the_scan_sampler_for_each_family_and_mixed_prompt_lengths(family):
    """The RNN's carry, and the transformer's reference attention (the GPU/TPU path), batched over slots."""
    import jax
    from flax import nnx

    from core.sampler import compile_generate
    from model import build

    overrides = ["model=rnn", "model.d_hidden=32", "model.n_layers=1"] if family == "rnn" else \
        ["+experiment=debug", "model.attention=reference"]
    model = build(compose(overrides).model, {"vocab_size": 32}, rngs=nnx.Rngs(0))
    prompts = [[1, 2, 3], [4] * 7]  # different lengths in one batch; 21 tokens slide the context twice
    samplings = [{"temperature": 0.0, "top_k": 0, "top_p": 1.0}, {"temperature": 1.0, "top_k": 5, "top_p": 0.8}]
    got, (params, rest) = scheduled(model, prompts, 21, samplings)
    for sampling, tokens_per_prompt in zip(samplings, got):
        generate = compile_generate(nnx.graphdef(model), max_new_tokens=21, **sampling)
        for seed, (prompt, tokens) in enumerate(zip(prompts, tokens_per_prompt)):
            expected = generate(params, rest, np.asarray([prompt], np.int32), jax.random.key(seed))
            assert tokens == np.asarray(expected)[0].tolist(), (family, sampling, seed)
