"""Run untrusted Python (model-generated code) against tests in a separate, limited process.

    from data import sandbox
    r = sandbox.run_code(code="def add(a, b):\\n    return a + b", tests="assert add(1, 2) == 3")
    r.passed, r.status, r.seconds, r.stderr      # True, "passed", 0.05, ""
    rs = sandbox.run_many(codes=[...], tests=[...], workers=2)
    sandbox.extract_code("Here:\\n```python\\nprint(1)\\n```<end_of_turn>")   # "print(1)\\n"

`code + "\\n" + tests` is written into a fresh scratch directory and run by a new interpreter
(`python -I -S -B`, so no site-packages, no user site, no PYTHON* variables, no .pyc writes) under
a bootstrap passed with `-c` that limits the process and then execs the program. The program
passes when it exits with status 0. Nothing the program does raises in the caller: every failure
is a SandboxResult with passed=False and one of the statuses

    passed    exit status 0
    failed    the program ran and exited non-zero (assertion, exception, syntax error, sys.exit)
    timeout   wall-clock limit (timeout_s + 1 s, then SIGKILL to the process group) or CPU limit
    memory    MemoryError (the address space is limited to memory_mb)
    error     the sandbox blocked an operation, the child died from a signal, or the sandbox
              itself could not run the program

What is defended, and how:
  - Runaway time: RLIMIT_CPU = ceil(timeout_s) (SIGXCPU, then SIGKILL one second later) and a
    wall-clock wait in the parent, after which the whole process group (the child runs in its own
    session) is SIGKILLed and reaped.
  - Memory: RLIMIT_AS = memory_mb, so a huge allocation is a MemoryError, not the OOM killer.
  - Processes: RLIMIT_NPROC = 0, so fork, threads and fork bombs fail for a non-root user; the
    audit hook below refuses fork/exec/spawn/subprocess/system as well.
  - Files: RLIMIT_FSIZE = 1 MB (stderr goes to a file, so it is capped too), RLIMIT_NOFILE = 64,
    RLIMIT_CORE = 0. The limits are set by the bootstrap in the child only, never in the parent,
    and the hook refuses `resource.setrlimit` afterwards so the program cannot raise them.
  - A `sys.addaudithook` hook installed before the program runs raises PermissionError on: any
    `socket.*` event (no network, no DNS), subprocess.Popen, os.system, os.exec*, os.spawn*,
    os.posix_spawn*, os.fork/forkpty, os.kill/killpg, signal.pthread_kill, ctypes.* (and importing
    _ctypes), re-importing _posixsubprocess, os.link/os.symlink, and any open for writing,
    os.remove/rename/rmdir/mkdir/chmod/chown/truncate/utime/xattr, shutil.rmtree on a path whose
    real path (symlinks resolved; fds and dir_fds through /proc/self/fd) is outside the scratch
    directory. Opening a directory outside the scratch dir is refused too, since `os.open(name,
    dir_fd=fd)` reports only the relative name. Reading files (the stdlib) is allowed.
    os.mkfifo, os.mknod, os.pidfd_open and signal.pidfd_send_signal have no audit events; the
    bootstrap replaces them with functions that raise.
  - Environment: PATH, HOME and TMPDIR (the scratch dir), LANG, PYTHONDONTWRITEBYTECODE only;
    cwd is the scratch dir; stdin is /dev/null; stdout is discarded; stderr is kept (last 2 KB).
  - The scratch dir is removed afterwards.

What is not defended:
  - There are no kernel namespaces, seccomp filter, chroot or cgroup: the program sees the real
    filesystem (it may read whatever the user running the trainer may read) and the real network
    stack, held back only by the audit hook.
  - The audit hook is defence in depth on top of the rlimits, not a security boundary: code that
    corrupts interpreter memory (a CPython bug), or that rebuilds the replaced functions, is not
    stopped by it.
  - RLIMIT_NPROC is not enforced by Linux for root (uid 0 in the initial user namespace) or with
    CAP_SYS_RESOURCE/CAP_SYS_ADMIN. Run as root, the only barrier to fork is the audit hook, and
    the file checks are the only barrier to writes a root process may make. Run the trainer as an
    unprivileged user (or in a container) when the code is really untrusted.
  - Threads are not audited; as root they are not limited either (CPU and memory limits still
    cover the whole process).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from data.tokenizer import END_OF_TURN

STDERR_LIMIT = 2048  # characters of stderr kept, the last ones (where the traceback ends)
FILE_LIMIT_BYTES = 1024 * 1024
OPEN_FILES_LIMIT = 64
WALL_GRACE_S = 1.0  # interpreter start-up on a busy machine, on top of timeout_s
PROGRAM_NAME = "program.py"

# Exit statuses the bootstrap uses to tell the parent what happened.
_EXIT_MEMORY = 97
_EXIT_BLOCKED = 98

# Runs in the child as `python -I -S -B -c _BOOTSTRAP program scratch cpu_s memory_mb`. It sets
# the limits, installs the audit hook, then execs the program as __main__. Kept to the stdlib
# modules a bare interpreter already has, plus resource, traceback and _posixsubprocess.
_BOOTSTRAP = r"""
import os, sys, resource, traceback, signal, _posixsubprocess

_program, _scratch = sys.argv[1], sys.argv[2]
_cpu_s, _memory_mb = int(sys.argv[3]), int(sys.argv[4])
sys.argv = [_program]
_MARK = "sandbox: blocked "

def _limit(kind, value):
    resource.setrlimit(kind, (value, value))

resource.setrlimit(resource.RLIMIT_CPU, (_cpu_s, _cpu_s + 1))
_limit(resource.RLIMIT_AS, _memory_mb * 1024 * 1024)
_limit(resource.RLIMIT_FSIZE, FILE_LIMIT_BYTES)
_limit(resource.RLIMIT_NOFILE, OPEN_FILES_LIMIT)
_limit(resource.RLIMIT_CORE, 0)
_limit(resource.RLIMIT_NPROC, 0)

def _blocked(*args, **kwargs):
    raise PermissionError(_MARK + "unaudited call")

# Calls with no audit event: replace them where the program would find them.
for _mod, _names in ((os, ("mkfifo", "mknod", "pidfd_open")),
                     (sys.modules["posix"], ("mkfifo", "mknod", "pidfd_open")),
                     (signal, ("pidfd_send_signal",)),
                     (_posixsubprocess, ("fork_exec",))):
    for _name in _names:
        if hasattr(_mod, _name):
            setattr(_mod, _name, _blocked)

_DENY = frozenset((
    "subprocess.Popen", "os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.fork",
    "os.forkpty", "os.kill", "os.killpg", "signal.pthread_kill", "os.link", "os.symlink",
    "resource.setrlimit", "resource.prlimit", "os.startfile", "pty.spawn", "sys.remote_exec",
))
_DENY_PREFIX = ("socket.", "ctypes.", "_ctypes.")
_DENY_IMPORT = frozenset(("_ctypes", "_posixsubprocess"))
# event -> ((path index, dir_fd index or None), ...)
_PATHS = {
    "os.remove": ((0, 1),), "os.rmdir": ((0, 1),), "os.mkdir": ((0, 2),),
    "os.chmod": ((0, 2),), "os.chown": ((0, 3),), "os.utime": ((0, 3),),
    "os.rename": ((0, 2), (1, 3)), "os.truncate": ((0, None),),
    "os.setxattr": ((0, None),), "os.removexattr": ((0, None),),
    "os.chflags": ((0, None),), "os.lchflags": ((0, None),), "shutil.rmtree": ((0, 1),),
}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_realpath, _join, _isdir, _readlink, _fspath = (
    os.path.realpath, os.path.join, os.path.isdir, os.readlink, os.fspath)

def _fd_path(fd):
    return _readlink("/proc/self/fd/%d" % fd)

def _resolve(path, dir_fd=None):
    if isinstance(path, int):
        return _fd_path(path)
    path = os.fsdecode(_fspath(path))
    if dir_fd is not None and dir_fd >= 0 and not path.startswith("/"):
        path = _join(_fd_path(dir_fd), path)
    return _realpath(path)

def _inside(real):
    return real == _scratch or real.startswith(_scratch + "/")

def _check_open(path, mode, flags):
    if isinstance(path, int) and path in (0, 1, 2):
        return  # our own standard streams
    real = _resolve(path)
    if _inside(real):
        return
    if isinstance(mode, str):
        writing = any(c in mode for c in "wax+")
    else:
        writing = bool((flags or 0) & _WRITE_FLAGS)
    if writing and real != "/dev/null":
        raise PermissionError(_MARK + "write outside the scratch dir: %s" % real)
    if _isdir(real):
        raise PermissionError(_MARK + "opening a directory outside the scratch dir: %s" % real)

def _hook(event, args):
    if event in _DENY or event.startswith(_DENY_PREFIX):
        raise PermissionError(_MARK + event)
    if event == "import" and args[0] in _DENY_IMPORT:
        raise PermissionError(_MARK + "import " + args[0])
    if event == "open":
        try:
            _check_open(*args)
        except PermissionError:
            raise
        except Exception as e:  # cannot tell where it goes: refuse
            raise PermissionError(_MARK + "open (%r)" % (e,)) from None
        return
    spec = _PATHS.get(event)
    if spec is None:
        return
    for path_i, dir_i in spec:
        try:
            dir_fd = args[dir_i] if dir_i is not None and dir_i < len(args) else None
            real = _resolve(args[path_i], dir_fd)
        except Exception as e:
            raise PermissionError(_MARK + "%s (%r)" % (event, e)) from None
        if not _inside(real):
            raise PermissionError(_MARK + "%s outside the scratch dir: %s" % (event, real))

with open(_program, "rb") as _f:
    _source = _f.read()
sys.addaudithook(_hook)
_globals = {"__name__": "__main__", "__file__": _program, "__builtins__": __builtins__}
try:
    exec(compile(_source, _program, "exec"), _globals)
except SystemExit:
    raise
except MemoryError:
    os.write(2, b"MemoryError\n")
    os._exit(97)
except BaseException as e:
    traceback.print_exc()
    sys.stderr.flush()
    os._exit(98 if isinstance(e, PermissionError) and str(e).startswith(_MARK) else 1)
"""
_BOOTSTRAP = _BOOTSTRAP.replace("FILE_LIMIT_BYTES", str(FILE_LIMIT_BYTES)).replace(
    "OPEN_FILES_LIMIT", str(OPEN_FILES_LIMIT)
)


@dataclass(frozen=True)
class SandboxResult:
    passed: bool
    status: str  # "passed" | "failed" | "timeout" | "memory" | "error"
    seconds: float
    stderr: str  # the last STDERR_LIMIT characters


def _status(returncode: int) -> str:
    if returncode == 0:
        return "passed"
    if returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        return "timeout"
    if returncode == _EXIT_MEMORY:
        return "memory"
    if returncode == _EXIT_BLOCKED or returncode < 0:
        return "error"
    return "failed"


def _read_tail(f) -> str:
    size = f.seek(0, os.SEEK_END)
    f.seek(max(0, size - STDERR_LIMIT))
    text = f.read(STDERR_LIMIT).decode("utf-8", errors="replace")
    return text[-STDERR_LIMIT:]


def _kill_group(proc: subprocess.Popen) -> None:
    # Only while the leader is unreaped is its pid (= the group id) surely still ours.
    if proc.returncode is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()


def run_code(
    *,
    code: str,
    tests: str = "",
    timeout_s: float = 2.0,
    memory_mb: int = 256,
    scratch_root: str | None = None,
) -> SandboxResult:
    """Runs `code + "\\n" + tests` in a limited child process; passed means exit status 0."""
    start = time.monotonic()
    scratch = None
    try:
        scratch = os.path.realpath(tempfile.mkdtemp(prefix="sandbox-", dir=scratch_root))
        with open(os.path.join(scratch, PROGRAM_NAME), "w", encoding="utf-8") as f:
            f.write(code + "\n" + tests)
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": scratch,
            "TMPDIR": scratch,
            "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        argv = [sys.executable, "-I", "-S", "-B", "-c", _BOOTSTRAP, PROGRAM_NAME, scratch]
        argv += [str(max(1, math.ceil(timeout_s))), str(int(memory_mb))]
        # stderr goes to an unlinked file, not a pipe, so RLIMIT_FSIZE caps what we hold.
        with tempfile.TemporaryFile(dir=scratch_root) as err:
            proc = subprocess.Popen(
                argv,
                cwd=scratch,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,
                close_fds=True,
            )
            timed_out = False
            try:
                proc.wait(timeout=timeout_s + WALL_GRACE_S)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(proc)
            stderr = _read_tail(err)
        status = "timeout" if timed_out else _status(proc.returncode)
        return SandboxResult(status == "passed", status, time.monotonic() - start, stderr)
    except Exception as e:  # a hostile snippet must never raise in the caller
        message = f"sandbox: {type(e).__name__}: {e}"[-STDERR_LIMIT:]
        return SandboxResult(False, "error", time.monotonic() - start, message)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def run_many(
    *,
    codes: list[str],
    tests: list[str],
    timeout_s: float = 2.0,
    memory_mb: int = 256,
    workers: int = 2,
) -> list[SandboxResult]:
    """run_code over (codes[i], tests[i]) pairs, `workers` child processes at a time, in order."""
    if len(codes) != len(tests):
        raise ValueError(f"{len(codes)} codes but {len(tests)} tests")

    def one(pair: tuple[str, str]) -> SandboxResult:
        return run_code(code=pair[0], tests=pair[1], timeout_s=timeout_s, memory_mb=memory_mb)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(one, zip(codes, tests, strict=True)))


_PYTHON_FENCE = re.compile(r"```[ \t]*(?:python3?|py)[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)
_ANY_FENCE = re.compile(r"```[^\n`]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(completion: str) -> str:
    """The first ```python fenced block (else the first ``` block, else the text) of a completion.

    Everything from the first end-of-turn marker on is dropped first. A fence left open (the
    sample was cut by max_len) runs to the end of the text.
    """
    text = completion.split(END_OF_TURN, 1)[0]
    match = _PYTHON_FENCE.search(text) or _ANY_FENCE.search(text)
    return match.group(1) if match else text
