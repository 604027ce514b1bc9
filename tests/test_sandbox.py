"""Sandbox: right and wrong code, and hostile snippets that must fail without harming the host."""

import os
import resource
import subprocess
import time

import pytest

from data import sandbox

TIMEOUT_S = 1.0


def run(code, tests="", tmp_path=None, **kwargs):
    return sandbox.run_code(
        code=code, tests=tests, timeout_s=TIMEOUT_S, scratch_root=str(tmp_path), **kwargs
    )


def scratch_dirs(root):
    return [p for p in os.listdir(root) if p.startswith("sandbox-")]


def test_correct_code_passes(tmp_path):
    parent_limits = [resource.getrlimit(k) for k in (resource.RLIMIT_NPROC, resource.RLIMIT_AS)]
    r = run("def add(a, b):\n    return a + b", "assert add(2, 3) == 5", tmp_path)
    assert (r.passed, r.status, r.stderr) == (True, "passed", "")
    assert scratch_dirs(tmp_path) == []
    # The limits are set in the child only.
    assert [resource.getrlimit(k) for k in (resource.RLIMIT_NPROC, resource.RLIMIT_AS)] == (
        parent_limits
    )


def test_wrong_code_fails(tmp_path):
    r = run("def add(a, b):\n    return a - b", "assert add(2, 3) == 5", tmp_path)
    assert (r.passed, r.status) == (False, "failed")
    assert "AssertionError" in r.stderr
    assert scratch_dirs(tmp_path) == []


def test_syntax_error_fails(tmp_path):
    r = run("def add(a, b)\n    return a + b", "assert add(2, 3) == 5", tmp_path)
    assert (r.passed, r.status) == (False, "failed")
    assert "SyntaxError" in r.stderr


def test_stdlib_imports_and_scratch_writes_work(tmp_path):
    code = (
        "import collections, fractions, heapq, itertools, json, math, os, re, shutil\n"
        "open('a.txt', 'w').write('x')\n"
        "os.mkdir('d')\n"
        "open('d/b.txt', 'w').write('y')\n"
        "shutil.rmtree('d')\n"
        "assert open('a.txt').read() == 'x'\n"
    )
    assert run(code, "", tmp_path).passed


def test_infinite_loop_times_out(tmp_path):
    start = time.monotonic()
    r = run("while True:\n    pass", "", tmp_path)
    assert (r.passed, r.status) == (False, "timeout")
    assert time.monotonic() - start < TIMEOUT_S + 2
    assert scratch_dirs(tmp_path) == []


def test_sleep_is_killed_at_wall_clock(tmp_path):
    start = time.monotonic()
    r = run("import time\ntime.sleep(60)", "", tmp_path)
    assert (r.passed, r.status) == (False, "timeout")
    assert time.monotonic() - start < TIMEOUT_S + 2


def test_fork_bomb_fails_and_host_is_fine(tmp_path):
    r = run("import os\nwhile True:\n    os.fork()", "", tmp_path)
    assert not r.passed
    assert r.status == "error", r
    assert "blocked os.fork" in r.stderr
    subprocess.run(["true"], check=True)
    assert scratch_dirs(tmp_path) == []


def test_subprocess_is_blocked(tmp_path):
    r = run("import subprocess\nsubprocess.run(['true'])", "", tmp_path)
    assert (r.passed, r.status) == (False, "error")
    assert "blocked subprocess.Popen" in r.stderr


def test_huge_allocation_is_a_memory_error(tmp_path):
    r = run("x = bytearray(10 * 1024**3)", "", tmp_path)
    assert (r.passed, r.status) == (False, "memory")


@pytest.mark.parametrize(
    "code",
    [
        'import socket\nsocket.create_connection(("127.0.0.1", 22), timeout=1)',
        'import socket\ns = socket.socket()\ns.connect(("127.0.0.1", 22))',
        'import urllib.request\nurllib.request.urlopen("http://example.com", timeout=1)',
    ],
)
def test_network_is_blocked(tmp_path, code):
    r = run(code, "", tmp_path)
    assert not r.passed
    assert "blocked socket." in r.stderr


def test_writes_outside_scratch_are_blocked(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    target = outside / "written.txt"
    sentinel = outside / "sentinel.txt"
    sentinel.write_text("keep")
    attempts = [
        f"open({str(target)!r}, 'w').write('x')",
        f"import os\nos.close(os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT))",
        f"import os\nos.remove({str(sentinel)!r})",
        f"import os\nos.rename({str(sentinel)!r}, 'stolen.txt')",
        f"import shutil\nshutil.rmtree({str(outside)!r})",
        f"import os\nos.chmod({str(sentinel)!r}, 0o777)",
        f"import os\nos.symlink({str(sentinel)!r}, 'link')\nopen('link', 'w').write('x')",
        # os.open with dir_fd reports only the relative name; the directory open is refused.
        f"import os\nfd = os.open({str(outside)!r}, os.O_RDONLY)\n"
        "os.close(os.open('written.txt', os.O_WRONLY | os.O_CREAT, dir_fd=fd))",
        f"import os\nfd = os.open({str(sentinel)!r}, os.O_RDONLY)\nos.truncate(fd, 0)",
        f"import os\nos.mkfifo({str(outside / 'fifo')!r})",
    ]
    for code in attempts:
        r = run(code, "", tmp_path)
        assert not r.passed, code
        assert "sandbox: blocked" in r.stderr, (code, r.stderr)
    assert sorted(p.name for p in outside.iterdir()) == ["sentinel.txt"]
    assert sentinel.read_text() == "keep"
    assert sentinel.stat().st_mode & 0o777 != 0o777
    assert scratch_dirs(tmp_path) == []


def test_limits_cannot_be_raised_and_stderr_is_capped(tmp_path):
    r = run("import resource\nresource.setrlimit(resource.RLIMIT_CPU, (100, 100))", "", tmp_path)
    assert "blocked resource.setrlimit" in r.stderr
    r = run("import sys\nwhile True:\n    sys.stderr.write('x' * 10000)", "", tmp_path)
    assert not r.passed
    assert len(r.stderr) <= sandbox.STDERR_LIMIT


def test_run_many_keeps_order():
    results = sandbox.run_many(
        codes=["x = 1", "x = 2", "while True:\n    pass"],
        tests=["assert x == 1", "assert x == 1", ""],
        timeout_s=TIMEOUT_S,
        workers=2,
    )
    assert [r.status for r in results] == ["passed", "failed", "timeout"]


def test_extract_code():
    assert (
        sandbox.extract_code("Sure:\n```python\nx = 1\n```\nmore\n```python\ny\n```") == "x = 1\n"
    )
    assert sandbox.extract_code("```\nx = 2\n```") == "x = 2\n"
    assert sandbox.extract_code("```text\nno\n```\n```py\nx = 3\n```") == "x = 3\n"
    assert sandbox.extract_code("x = 4<end_of_turn>trailing") == "x = 4"
    assert sandbox.extract_code("```python\nx = 5\n<end_of_turn>```") == "x = 5\n"
    assert sandbox.extract_code("```python\nx = 6\n") == "x = 6\n"  # cut by max_len
