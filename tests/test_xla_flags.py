"""XLA-CPU compiles a batch-1 decode loop into one function (core/xla_flags.py) and the sampler unrolls to suit."""
import os

import jax
import jax.numpy as jnp
from flax import nnx

from conftest import ROOT
from core import xla_flags
from core.sampler import compile_generate, decode_unroll
from test_model import V, tiny_model


def test_apply_adds_the_threshold_once_and_keeps_the_users_flags(monkeypatch):
    monkeypatch.setattr(xla_flags, "_backend_started", lambda: False)
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert xla_flags.apply(env)
    assert env["XLA_FLAGS"] == ("--xla_force_host_platform_device_count=8 --xla_backend_extra_options="
                                f"xla_cpu_small_while_loop_byte_threshold={xla_flags.SMALL_LOOP_BYTES}")
    assert not xla_flags.apply(env)  # once
    assert xla_flags.small_loop_bytes(env) == xla_flags.SMALL_LOOP_BYTES
    mine = {"XLA_FLAGS": "--xla_backend_extra_options=xla_cpu_small_while_loop_byte_threshold=4096"}
    assert not xla_flags.apply(mine) and xla_flags.small_loop_bytes(mine) == 4096  # the user's value wins
    assert xla_flags.small_loop_bytes({}) == xla_flags.XLA_DEFAULT
    fresh = {}
    assert xla_flags.apply(fresh) and fresh["XLA_FLAGS"].startswith("--xla_backend_extra_options=")


def test_apply_leaves_xla_flags_alone_once_jax_has_started():
    jax.devices()  # this process's backend is up: XLA read its flags already
    env = {}
    assert not xla_flags.apply(env) and env == {}
    assert not xla_flags.cpu_threads(1, env) and env == {}


def test_cpu_threads_sizes_the_pool_unless_the_user_did(monkeypatch):
    monkeypatch.setattr(xla_flags, "_backend_started", lambda: False)
    env = {}
    assert xla_flags.cpu_threads(1, env) and env == {"PJRT_NPROC": "1"} and xla_flags.cpu_thread_count(env) == 1
    assert not xla_flags.cpu_threads(3, env) and env == {"PJRT_NPROC": "1"}  # set once; the first value stays
    fresh = {}
    assert not xla_flags.cpu_threads(0, fresh) and fresh == {}  # 0: XLA's default, one per core
    assert xla_flags.cpu_thread_count(fresh) == len(os.sched_getaffinity(0))
    for mine in ({"PJRT_NPROC": "4"}, {"NPROC": "4"}):  # a value the user set wins
        assert not xla_flags.cpu_threads(1, mine) and xla_flags.cpu_thread_count(mine) == 4


def test_every_entry_point_applies_the_flags_before_jax_starts():
    for script in ("train.py", "sample.py", os.path.join("benchmarks", "run.py"), os.path.join("tests", "conftest.py")):
        with open(os.path.join(ROOT, script)) as f:
            source = f.read()
        assert "xla_flags.apply()" in source, script
        first_jax = min(i for i in (source.find("import jax"), source.find("config.register()")) if i >= 0)
        assert source.index("xla_flags.apply()") < first_jax, script


def test_batch_1_decode_loop_compiles_to_one_function_and_is_not_unrolled():
    """The speed path the CPU sampler relies on: if a JAX upgrade drops the option, this fails."""
    model = tiny_model()
    assert xla_flags.small_loop_bytes() == xla_flags.SMALL_LOOP_BYTES  # conftest applied it, as train.py does
    assert decode_unroll(model, model.init_cache(1), 1) == 1
    assert decode_unroll(model, model.init_cache(2), 2) == 4  # multi-row matmuls: run kernel by kernel
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    gen = compile_generate(graphdef, max_new_tokens=model.block_size + 3, temperature=1.0)
    text = gen.lower(params, rest, jnp.zeros((1, 2), jnp.int32), jax.random.key(0)).compile().as_text()
    assert 'xla_cpu_small_call="true"' in text
    assert int(gen(params, rest, jnp.zeros((1, 2), jnp.int32), jax.random.key(0)).max()) < V
