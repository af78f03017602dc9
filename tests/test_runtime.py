"""Process-wide settings (core/runtime.py): XLA_FLAGS, thread pool, compile cache, applied by the mains only."""
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from conftest import ROOT
from core import runtime, sampler
from core.sampler import compile_generate
from test_model import V, tiny_model


def test_apply_adds_the_threshold_once_and_keeps_the_users_flags(monkeypatch):
    monkeypatch.setattr(runtime, "_backend_started", lambda: False)
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert runtime.apply(env)
    assert env["XLA_FLAGS"] == ("--xla_force_host_platform_device_count=8 --xla_backend_extra_options="
                                f"xla_cpu_small_while_loop_byte_threshold={runtime.SMALL_LOOP_BYTES}")
    assert not runtime.apply(env)  # once
    assert runtime.small_loop_bytes(env) == runtime.SMALL_LOOP_BYTES
    mine = {"XLA_FLAGS": "--xla_backend_extra_options=xla_cpu_small_while_loop_byte_threshold=4096"}
    assert not runtime.apply(mine) and runtime.small_loop_bytes(mine) == 4096  # the user's value wins
    assert runtime.small_loop_bytes({}) == runtime.XLA_DEFAULT
    fresh = {}
    assert runtime.apply(fresh) and fresh["XLA_FLAGS"].startswith("--xla_backend_extra_options=")


def test_apply_leaves_runtime_alone_once_jax_has_started():
    jax.devices()  # this process's backend is up: XLA read its flags already
    env = {}
    assert not runtime.apply(env) and env == {}
    assert not runtime.cpu_threads(1, env) and env == {}


def test_cpu_threads_sizes_the_pool_unless_the_user_did(monkeypatch):
    monkeypatch.setattr(runtime, "_backend_started", lambda: False)
    env = {}
    assert runtime.cpu_threads(1, env) and env == {"PJRT_NPROC": "1"} and runtime.cpu_thread_count(env) == 1
    assert not runtime.cpu_threads(3, env) and env == {"PJRT_NPROC": "1"}  # set once; the first value stays
    fresh = {}
    assert not runtime.cpu_threads(0, fresh) and fresh == {}  # 0: XLA's default, one per core
    assert runtime.cpu_thread_count(fresh) == len(os.sched_getaffinity(0))
    for mine in ({"PJRT_NPROC": "4"}, {"NPROC": "4"}):  # a value the user set wins
        assert not runtime.cpu_threads(1, mine) and runtime.cpu_thread_count(mine) == 4


def test_every_entry_point_configures_the_process_before_jax_starts_and_library_code_never_does():
    for script in ("train.py", "sample.py", os.path.join("benchmarks", "run.py")):
        with open(os.path.join(ROOT, script)) as f:
            source = f.read()
        assert 'if __name__ == "__main__":\n    runtime.configure()' in source, script
        first_jax = min(i for i in (source.find("import jax"), source.find("config.register()")) if i >= 0)
        assert source.index("runtime.configure()") < first_jax, script
    for folder in ("core", "model", "data", "tasks"):
        for name in os.listdir(os.path.join(ROOT, folder)):
            if name.endswith(".py") and name != "runtime.py":
                source = open(os.path.join(ROOT, folder, name)).read()
                assert "runtime.configure(" not in source and "os.environ[" not in source, f"{folder}/{name}"


def test_batch_1_decode_loop_compiles_to_one_function():
    """The speed path the CPU sampler relies on: if a JAX upgrade drops the option, this fails."""
    model = tiny_model()
    assert runtime.small_loop_bytes() == runtime.SMALL_LOOP_BYTES  # conftest applied it, as train.py does
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def one_function_loops(batch):  # while loops XLA-CPU runs as one function, in the decode program
        prompt_BP, key = jnp.zeros((batch, 2), jnp.int32), jax.random.key(0)
        state, _ = jax.jit(lambda p, r: sampler.start(nnx.merge(graphdef, p, r), prompt_BP, key))(params, rest)
        decode = jax.jit(lambda p, r, s, n: sampler.decode(nnx.merge(graphdef, p, r), s, key, n, chunk=8))
        return decode.lower(params, rest, state, 8).compile().as_text().count('xla_cpu_small_call="true"')

    # both window loops (the rest of the first window, the windows after a slide); batch 2 has 2-row
    # matmuls, run kernel by kernel
    assert one_function_loops(1) == one_function_loops(2) + 2
    gen = compile_generate(graphdef, max_new_tokens=model.block_size + 3, temperature=1.0)
    assert int(gen(params, rest, np.zeros((1, 2), np.int32), jax.random.key(0)).max()) < V


def test_sampling_compiles_the_same_programs_for_any_number_of_new_tokens():
    """One decode program driven by a loop whose length is data: 1, 40 or 5,000 tokens (slides
    included) compile (or load) the same two programs, so the persistent cache serves every length."""
    model = tiny_model()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    prompt_BP, key = np.zeros((2, 1), np.int32), jax.random.key(0)
    programs = []

    def listen(event, seconds, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":  # a compile, or a load from the cache
            programs.append(kwargs.get("fun_name"))

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        per_length = {}
        for n in (1, 40, 5000):
            programs.clear()
            tokens_BN = compile_generate(graphdef, max_new_tokens=n, temperature=1.0)(params, rest, prompt_BP, key)
            assert tokens_BN.shape == (2, n)
            per_length[n] = list(programs)
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert per_length[1] == per_length[40] == per_length[5000] == ["jit(start_program)", "jit(decode_program)"], \
        per_length


def test_compile_cache_is_used_by_a_second_process_and_gives_the_same_result(tmp_path):
    """`compile_cache=DIR` fills DIR on the first run; the second loads from it (JAX counts the hit), bitwise
    the same. `off` writes nothing; an unwritable directory or a corrupt entry is a warning, never a failure."""
    import subprocess
    import sys

    code = ("import sys; from core import runtime; runtime.compile_cache(sys.argv[1]); import jax, jax.numpy as jnp; "
            "hits = []; jax.monitoring.register_event_listener(lambda e, **k: hits.append(e) if 'cache_hits' in e "
            "else None); f = jax.jit(lambda x: jnp.sin(x) @ x.T + 1.5); print(f(jnp.ones((64, 64))).sum().item()); "
            "print(len(hits))")
    # No JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS: compile_cache itself keeps programs that compile fast.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))
           and k != "XLA_FLAGS"}

    def run(where, **extra):
        proc = subprocess.run([sys.executable, "-c", code, str(where)], cwd=ROOT, env={**env, **extra},
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout.split(), proc.stderr

    cache = tmp_path / "cache"
    (first, hits_first), _ = run(cache)
    (second, hits_second), _ = run(cache)
    assert first == second  # bitwise the same result
    assert os.listdir(cache) and hits_first == "0" and int(hits_second) > 0  # compiled, then loaded
    (off, _), _ = run("off", HOME=str(tmp_path / "home"))
    assert off == first and not (tmp_path / "home").exists()
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    (bad, _), stderr = run(blocked / "cache")
    assert bad == first and "compiling without it" in stderr
    for name in os.listdir(cache):  # every entry damaged: JAX warns, compiles again, and the result stands
        path = cache / name
        if path.is_file():
            path.write_bytes(b"\0not an executable" * 8)
    (damaged, hits_damaged), stderr = run(cache)
    assert damaged == first and hits_damaged == "0" and "Error reading persistent compilation cache" in stderr


def test_sizing_a_model_from_its_config_does_not_start_jax():
    """sample.py sizes the model before it sizes XLA-CPU's thread pool, which JAX reads when it starts."""
    import subprocess
    import sys

    code = ("import sys; sys.path.insert(0, '.'); from core import config; config.register(); "
            "from hydra import compose, initialize_config_dir; from core.state import model_bytes; "
            "from core import runtime\n"
            "with initialize_config_dir(config_dir=config.CONFIG_DIR, version_base='1.3'):\n"
            "    cfg = compose(config_name='train', overrides=['+experiment=shakespeare_char_cpu'])\n"
            "print(model_bytes(cfg, {'vocab_size': 65}), runtime._backend_started())")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    size, started = proc.stdout.split()
    assert int(size) > 1_000_000 and started == "False"
