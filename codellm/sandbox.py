"""Run untrusted programs (model-written code) one fresh process tree at a time, with documented limits.

    sandbox = Sandbox(workers=2)
    with sandbox.workspace() as ws:            # a private temp dir; blocks while all workers are busy
        ws.write("prog.py", source)
        outcome = ws.run(["/usr/bin/python3", "prog.py"], Limits(cpu_seconds=3))

Each run is `prlimit -- unshare ... -- sh PRELUDE -- argv`, started in a new session:
- rlimits: CPU seconds, memory (address space, or data segment for runtimes that reserve huge address
  ranges such as the JVM, V8 and Mono), processes, file size, open files, no core files;
- namespaces (`unshare`): no network (a fresh network namespace has only a down loopback), a PID
  namespace whose init is the prelude shell (when it ends the kernel kills every process left inside,
  including grandchildren that called setsid), a mount namespace with a fresh /proc and small private
  tmpfs over /tmp, /var/tmp and /dev/shm; the work dir is bind-mounted at /dev/shm/w;
- when the caller is root the program runs as an unprivileged uid of its own (one per worker slot, so
  the process limit and `kill` cannot reach anything else); otherwise a user namespace maps the caller;
- a scrubbed environment (PATH, HOME=work dir, LANG), stdin closed unless given, output capped;
- a wall-clock deadline (a multiple of the CPU limit, so a loaded machine slows a program down without
  failing it) after which the whole process group is killed.
Namespaces are probed once; when unavailable the run falls back to rlimits + process group only and
`Sandbox.isolation` says so (the eval summary records it).

What this does NOT protect against: kernel exploits and side channels; reading world-readable host files
(as root, the slot uid sees the filesystem with "other" permissions: it reads what anyone may read and
writes only world-writable places outside /tmp, /var/tmp and /dev/shm); CPU, memory bandwidth and disk
contention with other workers; a program that deliberately searches its own interpreter for the verdict
nonce. As a non-root caller ("userns" mode) the program keeps the caller's file permissions: it can read
and write the caller's files. Concurrent sandboxes of one machine share the slot uids, hence their
process limit. Without namespaces (no `unshare`, or no user namespaces for a non-root caller) there is no
network, PID or tmpfs isolation at all. Run evaluations as root in a container or VM; for adversarial
code add gVisor or a VM per run.
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import selectors
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

UID_BASE = 1_600_000  # unprivileged uids for worker slots when running as root (no /etc/passwd entry needed)
MAX_OUTPUT = 1 << 20  # a run printing more than this in total is killed (output bomb)

# As root, in the new namespaces: private tmpfs for the shared writable places, the work dir bound
# inside one, then the program as the slot's uid (a child, so this shell stays the PID namespace init).
PRELUDE = """set -e
mount -t tmpfs -o size={tmpfs},mode=1777 tmpfs /dev/shm
mkdir /dev/shm/w
mount --bind "$1" /dev/shm/w
mount -t tmpfs -o size={tmpfs},mode=1777 tmpfs /tmp
mount -t tmpfs -o size={tmpfs},mode=1777 tmpfs /var/tmp
cd /dev/shm/w
uid=$2
shift 2
set +e
if [ -n "$uid" ]; then
  setpriv --reuid="$uid" --regid="$uid" --clear-groups --no-new-privs -- "$@"
else
  "$@"
fi
exit $?
"""


@dataclass(frozen=True)
class Limits:
    cpu_seconds: float = 3.0
    wall_seconds: float | None = None  # default: wall_factor × cpu_seconds + 2
    wall_factor: float = 3.0
    memory_mb: int = 2048
    memory_rlimit: str = "as"  # "as" (address space) | "data" (JVM, node, mono reserve huge PROT_NONE ranges)
    processes: int = 128  # threads count too (RLIMIT_NPROC)
    file_size_mb: int = 32
    open_files: int = 256
    output_bytes: int = 8192  # kept per stream in the outcome
    tmpfs_mb: int = 64

    @property
    def wall(self) -> float:
        return self.wall_seconds or self.wall_factor * self.cpu_seconds + 2


@dataclass
class Outcome:
    exit_code: int | None  # None when the run was killed by us (deadline, output bomb)
    signal: int | None  # the signal that ended the program, when known
    timed_out: bool
    duration: float
    cpu_seconds: float
    stdout: str
    stderr: str
    stdout_tail: str  # the last bytes of stdout (where a nonce printed after the tests lands)
    output_overflow: bool = False
    error: str | None = None  # the sandbox itself failed (status sandbox_error)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out and self.error is None


@dataclass(frozen=True)
class Isolation:
    mode: str  # "root" (namespaces + uid per worker) | "userns" (namespaces, caller's uid) | "none"
    note: str

    @property
    def network(self) -> bool:
        return self.mode != "none"

    def as_dict(self) -> dict:
        return {"mode": self.mode, "network_namespace": self.network, "pid_namespace": self.network,
                "private_tmp": self.network, "unprivileged_uid": self.mode == "root", "note": self.note}


class Sandbox:
    def __init__(self, workers: int | None = None, isolate: bool = True):
        self.workers = workers or usable_cores()
        self._isolate = isolate
        self._slots: queue.Queue[int] = queue.Queue()
        for slot in range(self.workers):
            self._slots.put(slot)
        self._lock, self._isolation = threading.Lock(), None
        self._root = Path(tempfile.mkdtemp(prefix="codellm-sandbox-"))
        os.chmod(self._root, 0o711)  # slot uids may enter their own dir, not list the others
        self.close = weakref.finalize(self, shutil.rmtree, self._root, ignore_errors=True)

    @property
    def isolation(self) -> Isolation:
        """What this machine allows, probed once (the first caller probes, the others wait)."""
        with self._lock:
            if self._isolation is None:
                self._isolation = self._detect()
            return self._isolation

    def _detect(self) -> Isolation:
        if not self._isolate:
            return Isolation("none", "isolation disabled by the caller")
        if shutil.which("unshare") is None or shutil.which("prlimit") is None:
            return Isolation("none", "util-linux unshare/prlimit not found: no network, PID or tmpfs isolation")
        modes = ["root"] if os.geteuid() == 0 else []
        for mode in [*modes, "userns"]:
            if self._probe(mode):
                return Isolation(mode, "network, PID and mount namespaces" +
                                 (", one unprivileged uid per worker" if mode == "root" else ", caller's uid"))
        return Isolation("none", "unshare failed (no privileges or user namespaces): NO network isolation")

    def _probe(self, mode: str) -> bool:
        with self.workspace(mode) as ws:
            out = ws.run(["sh", "-c", "echo ok"], Limits(cpu_seconds=5))
        return out.ok and out.stdout.strip() == "ok"

    @contextlib.contextmanager
    def workspace(self, mode: str | None = None) -> Iterator[Workspace]:
        mode = mode or self.isolation.mode  # probe first (it takes a slot): never while holding one
        slot = self._slots.get()
        uid = UID_BASE + slot if mode == "root" else None
        path = Path(tempfile.mkdtemp(dir=self._root))
        try:
            if uid is not None:
                os.chown(path, uid, uid)
            yield Workspace(path, mode, uid)
        finally:
            shutil.rmtree(path, ignore_errors=True)
            self._slots.put(slot)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class Workspace:
    path: Path
    mode: str
    uid: int | None

    def write(self, name: str, text: str) -> Path:
        target = self.path / name
        target.write_text(text)
        if self.uid is not None:
            os.chown(target, self.uid, self.uid)
        return target

    def remove(self, name: str) -> None:
        (self.path / name).unlink(missing_ok=True)

    def run(self, argv: list[str], limits: Limits, stdin: bytes = b"", env: dict | None = None) -> Outcome:
        """Run argv in the work dir; stdin is written up front (small inputs), env adds to the scrubbed one."""
        start = time.monotonic()
        try:
            proc = subprocess.Popen(self._command(argv, limits), cwd=self.path, env=self._env() | (env or {}),
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    start_new_session=True, close_fds=True)
        except OSError as e:
            return Outcome(None, None, False, 0.0, 0.0, "", "", "", error=f"cannot start {argv[0]}: {e}")
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.write(stdin)
        proc.stdin.close()
        streams, timed_out, overflow = _Capture(limits.output_bytes), False, False
        deadline = start + limits.wall
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ, "stdout")
            sel.register(proc.stderr, selectors.EVENT_READ, "stderr")
            while sel.get_map():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    timed_out = True
                    break
                for key, _ in sel.select(min(remaining, 1.0)):
                    chunk = os.read(key.fd, 65536)
                    if not chunk:
                        sel.unregister(key.fileobj)
                    elif not streams.add(key.data, chunk):
                        overflow = True
                if overflow:
                    break
        reaped = None if timed_out or overflow else _reap(proc.pid, deadline)
        if reaped is None:
            timed_out = timed_out or not overflow
            _kill_group(proc.pid)
            reaped = os.wait4(proc.pid, 0)
        _kill_group(proc.pid)  # anything left in the group (without namespaces) must not outlive the run
        _, status, usage = reaped
        proc.returncode = os.waitstatus_to_exitcode(status)
        proc.stdout.close()
        proc.stderr.close()
        cpu = usage.ru_utime + usage.ru_stime
        code, sig = self._exit(proc.returncode)
        if sig in (signal.SIGXCPU,) or (sig == signal.SIGKILL and cpu >= limits.cpu_seconds):
            timed_out = True
        killed = timed_out or overflow
        return Outcome(None if killed else code, sig, timed_out, time.monotonic() - start, cpu,
                       streams.text("stdout"), streams.text("stderr"), streams.tail(), overflow)

    def _command(self, argv: list[str], limits: Limits) -> list[str]:
        cpu = math.ceil(limits.cpu_seconds)
        memory = limits.memory_mb << 20
        rlimits = [f"--cpu={cpu}:{cpu + 1}", f"--{limits.memory_rlimit}={memory}", f"--nproc={limits.processes}",
                   f"--fsize={limits.file_size_mb << 20}", f"--nofile={limits.open_files}", "--core=0"]
        if self.mode == "none":
            return ["prlimit", *rlimits, "--", *argv]
        if self.mode == "userns":  # the caller's own processes count against RLIMIT_NPROC too
            rlimits[2] = f"--nproc={limits.processes + _tasks_of(os.getuid())}"
        ns = ["--user", "--map-root-user"] if self.mode == "userns" else []
        prelude = PRELUDE.format(tmpfs=f"{limits.tmpfs_mb}m")
        return ["prlimit", *rlimits, "--", "unshare", *ns, "--net", "--pid", "--fork", "--kill-child",
                "--mount-proc", "--", "sh", "-c", prelude, "sh", str(self.path), str(self.uid or ""), *argv]

    def _env(self) -> dict[str, str]:
        home = "/dev/shm/w" if self.mode != "none" else str(self.path)
        return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "TMPDIR": "/tmp", "LANG": "C.UTF-8",
                "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}

    def _exit(self, returncode: int) -> tuple[int, int | None]:
        """(exit code, signal): through the prelude shell a signal death reads as 128 + signal."""
        if returncode < 0:
            return returncode, -returncode
        if self.mode != "none" and returncode > 128:
            return returncode, returncode - 128
        return returncode, None


class _Capture:
    """The first `limit` bytes of each stream, the tail of stdout, and the total against MAX_OUTPUT."""

    def __init__(self, limit: int):
        self.limit, self.total = limit, 0
        self.head = {"stdout": bytearray(), "stderr": bytearray()}
        self.last = bytearray()

    def add(self, name: str, chunk: bytes) -> bool:
        self.total += len(chunk)
        head = self.head[name]
        head += chunk[: max(0, self.limit - len(head))]
        if name == "stdout":
            self.last = (self.last + chunk)[-1024:]
        return self.total <= MAX_OUTPUT

    def text(self, name: str) -> str:
        return self.head[name].decode("utf-8", "replace")

    def tail(self) -> str:
        return self.last.decode("utf-8", "replace")


def _reap(pid: int, deadline: float):
    """wait4 the finished (or finishing) run until the deadline; None if it is still running then."""
    while True:
        reaped = os.wait4(pid, os.WNOHANG)
        if reaped[0] == pid:
            return reaped
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.001)


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _tasks_of(uid: int) -> int:
    """Threads the user already runs (RLIMIT_NPROC counts them all)."""
    count = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if entry.stat().st_uid == uid:
                    count += len(os.listdir(f"/proc/{entry.name}/task"))
    return count


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
