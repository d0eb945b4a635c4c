"""``import mukv`` caps glibc's malloc arenas before the application's threads take their own
(``mukv/malloc.py``): freed KV buffers then stay in a few heaps instead of one per thread."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import mukv
from mukv.malloc import DEFAULT_ARENA_MAX, ENV_ARENA_MAX, arena_count, arena_max_from_environment

GLIBC = arena_count() is not None

# 24 threads each take a malloc'd buffer at once and report the process's arenas while they hold it.
THREADS = """
import threading, mukv
from mukv.malloc import arena_count
gate = threading.Barrier(25)
def hold():
    kept = [bytearray(1 << 16) for _ in range(4)]  # > 512 bytes: malloc in this thread
    gate.wait(); gate.wait()
threads = [threading.Thread(target=hold) for _ in range(24)]
for t in threads: t.start()
gate.wait(); print(arena_count()); gate.wait()
for t in threads: t.join()
"""


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("MALLOC_ARENA_MAX", ENV_ARENA_MAX)}
    return subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize(("env", "cap"), [
    ({}, DEFAULT_ARENA_MAX),
    ({ENV_ARENA_MAX: "4"}, 4),
    ({ENV_ARENA_MAX: " 1 "}, 1),
    ({ENV_ARENA_MAX: "0"}, None),  # leave glibc's default
    ({"MALLOC_ARENA_MAX": "8"}, None),  # glibc's own variable rules
    ({"MALLOC_ARENA_MAX": "8", ENV_ARENA_MAX: "3"}, None),
])
def test_the_environment_chooses_the_cap(env, cap):
    assert arena_max_from_environment(env) == cap


@pytest.mark.parametrize("raw", ["two", "-1", "1025", "2.5", "0x2"])
def test_a_bad_cap_is_a_clear_error_naming_the_variable(raw):
    with pytest.raises(mukv.ConfigError, match=ENV_ARENA_MAX) as e:
        arena_max_from_environment({ENV_ARENA_MAX: raw})
    assert repr(raw) in str(e.value)


def test_import_mukv_refuses_a_bad_cap():
    r = run_python("import mukv", **{ENV_ARENA_MAX: "lots"})
    assert r.returncode != 0
    assert "ConfigError" in r.stderr and ENV_ARENA_MAX in r.stderr and "'lots'" in r.stderr


@pytest.mark.skipif(not GLIBC, reason="glibc's allocator only")
def test_import_mukv_keeps_threads_in_the_capped_arenas():
    capped = run_python(THREADS)
    assert capped.returncode == 0, capped.stderr
    assert 1 <= int(capped.stdout) <= DEFAULT_ARENA_MAX
    three = run_python(THREADS, **{ENV_ARENA_MAX: "3"})
    assert int(three.stdout) <= 3
    uncapped = run_python(THREADS, **{ENV_ARENA_MAX: "0"})  # glibc: an arena per thread, up to 8 per core
    assert uncapped.returncode == 0, uncapped.stderr
    assert int(uncapped.stdout) > 3
