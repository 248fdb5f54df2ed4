"""The compiled extension's cache of large CPU output buffers (csrc/cpu_cache.h): reuse, the rule
that cached plus live bytes never exceed the live peak, the controls, and that reused buffers give
the same values as fresh ones."""

import io
import os
import subprocess
import sys

import pytest
import torch
from test_flat_optim import _call, _inputs, _step

from sophon_fast import _backend, cpu_cache
from sophon_fast.ops import flat_optim as ops
from sophon_fast.reference import flat_optim as reference

pytestmark = [
    pytest.mark.ext,
    pytest.mark.skipif(_backend.extension() is None, reason="compiled extension unavailable"),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the cache is linux-only"),
]

MIB = 1 << 20
BLOCK = 2 * MIB  # buffers are rounded up to whole huge pages
N = MIB + 3  # float32: 4 MiB + 12 B, just over the 4 MiB threshold -> one 6 MiB block


def _blocks(n, dtype=torch.float32):
    size = n * torch.empty((), dtype=dtype).element_size()
    return -(-size // BLOCK) * BLOCK


@pytest.fixture(autouse=True)
def _fresh_cache():
    cpu_cache.set_limit(None)
    cpu_cache.empty()
    yield
    cpu_cache.set_limit(None)
    cpu_cache.empty()


def _momentum(n, seed=0):
    params, grad, states = _inputs("momentum", n, torch.float32, seed=seed)
    with _backend.use_backend("cpu"):
        return _call(ops, "momentum", params, grad, states, _step(3, torch.float32))


@pytest.mark.parametrize("update", ("momentum", "adam", "rmsprop_centered"))
def test_reused_buffers_hold_exactly_the_fresh_result(update):
    """The second call gets the first call's freed buffers back (hits) and, now that they are
    mapped, writes them with streamed stores: values must equal the reference both times."""
    params, grad, states = _inputs(update, N, torch.float32)
    step = _step(3, torch.float32)
    expected = _call(reference, update, params, grad, states, step)
    before = cpu_cache.stats()
    for round_ in range(2):
        with _backend.use_backend("cpu"):
            got = _call(ops, update, params, grad, states, step)
        for i, e in enumerate(expected):
            assert got[i].shape == e.shape and got[i].is_contiguous()
            torch.testing.assert_close(got[i], e, rtol=2e-6, atol=1e-6)
        if round_ == 0:
            del got  # back to the cache
    after = cpu_cache.stats()
    assert after["misses"] - before["misses"] == len(expected)
    assert after["hits"] - before["hits"] == len(expected)
    assert after["live_bytes"] - before["live_bytes"] == len(expected) * _blocks(N)


def test_small_outputs_bypass_the_cache():
    before = cpu_cache.stats()
    out = _momentum(1000)
    assert len(out) == 2
    after = cpu_cache.stats()
    assert after["misses"] == before["misses"] and after["hits"] == before["hits"]


def test_cached_plus_live_never_exceeds_the_live_peak():
    """Mixed sizes: every state must keep live + cached <= peak, and a request that sets a new live
    high drops the cache first."""
    held = []
    base = cpu_cache.stats()["live_bytes"]  # buffers other tests still hold

    def check():
        s = cpu_cache.stats()
        assert s["live_bytes"] + s["cached_bytes"] <= s["peak_bytes"], s
        return s

    for n in (N, 2 * N, N, 3 * N):
        held.append(_momentum(n))
        check()
    peak = check()["peak_bytes"]
    assert peak - base == 2 * sum(_blocks(n) for n in (N, 2 * N, N, 3 * N))
    held.clear()  # everything back in the cache
    s = check()
    assert s["live_bytes"] == base and s["cached_bytes"] == peak - base
    # Reuse of a cached size is a hit and keeps the cache within bounds.
    held.append(_momentum(2 * N))
    s = check()
    assert s["cached_bytes"] == peak - base - 2 * _blocks(2 * N)
    # A size never seen that sets a new live high unmaps the cache first.
    held.append(_momentum(40 * N))
    s = check()
    assert s["cached_bytes"] == 0
    assert s["peak_bytes"] == s["live_bytes"] == base + 2 * (_blocks(2 * N) + _blocks(40 * N))


def test_limit_zero_caches_nothing_and_empty_unmaps():
    out = _momentum(N)
    del out
    assert cpu_cache.stats()["cached_bytes"] == 2 * _blocks(N)
    cpu_cache.set_limit(0)  # trims what exceeds the new cap
    s = cpu_cache.stats()
    assert s["cached_bytes"] == 0 and s["limit_bytes"] == 0
    out = _momentum(N)  # with the cache off, outputs come from torch's allocator
    assert cpu_cache.stats()["live_bytes"] == s["live_bytes"]
    del out
    cpu_cache.set_limit(None)
    out = _momentum(N)
    del out
    cpu_cache.set_limit(7)  # room for one 6 MiB block, not two
    assert cpu_cache.stats()["cached_bytes"] == _blocks(N)
    cpu_cache.empty()
    assert cpu_cache.stats()["cached_bytes"] == 0


@pytest.mark.parametrize("bad", (-1, 1.5, "8", True))
def test_set_limit_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="whole number of MiB"):
        cpu_cache.set_limit(bad)


def test_cached_tensors_behave_as_ordinary_cpu_tensors():
    new_params, new_buf = _momentum(N)
    expected = new_params.clone()
    buffer = io.BytesIO()
    torch.save(new_params, buffer)
    buffer.seek(0)
    assert torch.equal(torch.load(buffer), expected)
    new_buf.resize_(3 * N)  # grows through the cache's allocator: the old values are copied
    assert torch.equal(new_buf[:N], _momentum(N)[1])
    assert torch.equal(new_params.mul_(2), 2 * expected)
    live = cpu_cache.stats()["live_bytes"]
    new_buf.untyped_storage().resize_(0)  # nothing mapped for an empty storage
    assert cpu_cache.stats()["live_bytes"] == live - _blocks(3 * N)


def _run(env_value):
    code = (
        "import torch, sophon_fast as sf\n"
        "from sophon_fast import cpu_cache\n"
        f"n = {N}\n"
        "p = torch.randn(n); out = sf.flat_momentum_step(p, p, p, torch.tensor(3.0), 0.1, 0.9)\n"
        "del out\n"
        "s = cpu_cache.stats(); print(s['limit_bytes'], s['cached_bytes'])\n"
    )
    env = {**os.environ, "SOPHON_FAST_CPU_CACHE_MB": env_value}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.split(), done.stderr


def test_environment_variable_caps_or_disables_the_cache():
    assert _run("0")[0] == ["0", "0"]
    assert _run("100")[0] == [str(100 * MIB), str(2 * _blocks(N))]
    values, stderr = _run("lots")
    assert values == ["-1", str(2 * _blocks(N))]
    assert "SOPHON_FAST_CPU_CACHE_MB=lots is not a whole number" in stderr


def test_without_the_extension_everything_is_a_no_op(monkeypatch):
    monkeypatch.setattr(_backend, "extension", lambda: None)
    assert set(cpu_cache.stats().values()) == {0}
    cpu_cache.empty()
    cpu_cache.set_limit(3)


def _child_uses_the_cache(queue):
    torch.set_num_threads(1)  # as DataLoader workers do: libgomp's pool does not survive fork
    before = cpu_cache.stats()["misses"] + cpu_cache.stats()["hits"]
    out = _momentum(N)
    after = cpu_cache.stats()["misses"] + cpu_cache.stats()["hits"]
    queue.put((after - before, len(out)))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_can_use_the_cache():
    """The cache's lock is held across fork (pthread_atfork) and released on both sides: a forked
    worker allocates through it, and the parent still can afterwards."""
    import multiprocessing

    out = _momentum(N)
    del out  # the child inherits two cached blocks
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_uses_the_cache, args=(queue,))
    child.start()
    child.join(60)
    assert child.exitcode == 0, "the forked child failed or hung"
    assert queue.get(timeout=5) == (2, 2)
    assert len(_momentum(N)) == 2
