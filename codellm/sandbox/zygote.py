"""The sandbox's fork server, one per worker slot: `python -s -S -c <this file> FD` (FD: a SOCK_SEQPACKET socket).

It never runs untrusted code itself. For each request (JSON, with the run's stdin/stdout/stderr pipes passed
as file descriptors) it forks a run and answers {"pid"}, then {"status", "cpu", "error"} once the run is over:

    A (new session; dies with this server)
      unshare(net, pid, mount, ipc, uts [, user]); mounts private; tmpfs on /dev/shm, /tmp, /var/tmp;
      the work dir bound at /dev/shm/w
      B = PID 1 of the new namespace (root; dies with A): fresh /proc, then forks C, reaps everything,
          and on C's exit kills whatever C left in the namespace; exits with C's status (128 + signal)
          C: stdio = the pipes (fd 3: the verdict channel, when asked for), every other descriptor closed,
             rlimits, cwd, scrubbed env, the slot uid
             (no groups, no new privileges), then execs argv, or runs the Python source in this forked
             interpreter (no new interpreter to start: the main saving per program).

Mode "none" (no namespaces): A is C. A request {"kill": id} kills the run's process group; the group is also
killed once A has exited (before it is reaped, so its pid cannot have been reused). Setup failures before
the program starts reach the server through a pipe that C closes before running anything untrusted.
"""

import atexit
import builtins
import ctypes
import errno
import gc
import json
import os
import resource
import select
import signal
import socket
import sys
import time

# Modules that programs under test often import and that hold no per-process state (no random seeds, which a
# fork would share): imported once here, so that every forked program finds them loaded.
PRELOADED = ("bisect", "collections", "functools", "hashlib", "heapq", "itertools", "math", "re", "string", "typing")
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 0x1, 0x2, 0x4, 0x8, 0x20
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE, MS_RELATIME = 0x400, 0x800, 0x1000, 0x4000, 0x40000, 0x200000
ST_RELATIME, MNT_DETACH = 0x1000, 2
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "ppc64le": 203, "s390x": 217, "riscv64": 41}.get(os.uname().machine, -1)
PR_SET_PDEATHSIG, PR_SET_SECCOMP, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 22, 36, 38
SECCOMP_MODE_FILTER = 2
SETUP_FAILED = 125

libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
libc.unshare.argtypes = [ctypes.c_int]
libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source, target: str, fstype, flags: int, data=None) -> None:
    enc = lambda s: s.encode() if s is not None else None
    _check(libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


def _die_with_parent(alive) -> None:
    """SIGKILL when the parent dies; `alive()` tells whether it died before the prctl."""
    _check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PDEATHSIG)")
    if not alive():
        raise OSError("the parent process died during setup")


def _open(fd: int) -> bool:
    """Whether a pipe's write end is still held (by the parent): its read end has no EOF."""
    os.set_blocking(fd, False)
    try:
        return os.read(fd, 1) != b""
    except BlockingIOError:
        return True


def _code(status: int) -> int:
    """A wait status as a shell reports it: the exit code, or 128 + the signal."""
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


def _start(req: dict, fds: list[int], err_w: int):
    """In the forked run (A): set up and return the Python source to run in the program's process (C) only;
    every other process of the run ends in os._exit."""
    os.setsid()
    server_pid = req["server"]
    _die_with_parent(lambda: os.getppid() == server_pid)
    mode = req["mode"]
    if mode == "none":
        return _program(req, fds)
    for procs in req.get("cgroups", ()):  # the whole run's memory and process count, capped together
        with open(procs, "w") as f:
            f.write(str(os.getpid()))
    uid, gid = os.getuid(), os.getgid()
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
    _check(libc.unshare(flags | (CLONE_NEWUSER if mode == "userns" else 0)), "unshare")
    if mode == "userns":  # root inside maps to the caller outside
        for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing mounted here propagates to the host
    if not req.get("root"):  # the host's root, with private tmpfs over /dev/shm, /tmp and /var/tmp
        tmpfs = f"size={req['tmpfs_mb']}m,mode=1777"
        _mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, tmpfs)
        os.mkdir("/dev/shm/w")
        _mount(req["path"], "/dev/shm/w", None, MS_BIND)  # before /tmp is covered: the work dir may live there
        for target in ("/tmp", "/var/tmp"):
            _mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, tmpfs)
    life_r, life_w = os.pipe()  # B's parent is outside its PID namespace (getppid() is 0): watch a pipe instead
    if os.fork() == 0:  # B, PID 1 of the new namespace
        os.close(life_w)
        _die_with_parent(lambda: _open(life_r))
        os.close(life_r)
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        host_dir = None
        if req.get("root"):
            host_dir = os.open(req["path"], os.O_RDONLY | os.O_DIRECTORY)
            _minimal_root(req)
        c = os.fork()
        if c == 0:
            return _program(req, fds)
        for fd in (*fds, err_w):
            os.close(fd)
        status = 0
        while True:
            try:
                pid, st = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            if pid == c:
                status = _code(st)
                if os.getpid() == 1:  # only ever as the init of a PID namespace: this kills that namespace only
                    try:
                        os.kill(-1, signal.SIGKILL)
                    except ProcessLookupError:  # nothing left
                        pass
        if host_dir is not None and req.get("keep"):
            _copy_back(host_dir, req["uid"])
        os._exit(status)
    for fd in (*fds, err_w, life_r):
        os.close(fd)
    _, st = os.waitpid(-1, 0)
    os._exit(_code(st))


def _locked(path: str) -> int:
    """The mount flags of `path` that a read-only remount must keep (a user namespace may not drop them)."""
    flags = os.statvfs(path).f_flag
    keep = [(os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV), (os.ST_NOEXEC, MS_NOEXEC)]
    keep += [(os.ST_NOATIME, MS_NOATIME), (os.ST_NODIRATIME, MS_NODIRATIME), (ST_RELATIME, MS_RELATIME)]
    return sum(ms for st, ms in keep if flags & st)


def _minimal_root(req: dict) -> None:
    """In B, the init of the run's namespaces: make a new root holding only the read-only `binds` (the
    interpreters and toolchains, /etc), empty over each of `hide`, a few devices, this namespace's /proc and
    one size-limited tmpfs for everything writable (the work dir, /tmp, /var/tmp, /dev/shm); pivot into it and
    drop the host's root. The work dir's files are copied in: the program never sees the host's folder."""
    new = req["root"]
    _mount("tmpfs", new, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
    for path in req["binds"]:
        target = new + path
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if os.path.islink(path):
            os.symlink(os.readlink(path), target)
            continue
        if os.path.isdir(path):
            os.makedirs(target, exist_ok=True)
        else:
            open(target, "w").close()
        _mount(path, target, None, MS_BIND | MS_REC)
        _mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | _locked(path))
    for path in req["hide"]:
        if os.path.isdir(new + path):
            _mount("tmpfs", new + path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV, "size=4k,mode=755")
    dev = new + "/dev"
    os.mkdir(dev)
    _mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "size=64k,mode=755")
    for name in ("null", "zero", "full", "random", "urandom"):
        open(f"{dev}/{name}", "w").close()
        _mount(f"/dev/{name}", f"{dev}/{name}", None, MS_BIND)
    for name, to in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1")):
        os.symlink(to, f"{dev}/{name}")
    os.symlink("/proc/self/fd/2", f"{dev}/stderr")
    run = new + "/.run"  # the run's one writable filesystem, bound where programs write
    os.mkdir(run)
    _mount("tmpfs", run, "tmpfs", MS_NOSUID | MS_NODEV, f"size={req['tmpfs_mb']}m,mode=755")
    for sub, target in (("shm", "/dev/shm"), ("tmp", "/tmp"), ("vartmp", "/var/tmp")):
        os.mkdir(f"{run}/{sub}", 0o1777)
        os.chmod(f"{run}/{sub}", 0o1777)
        os.makedirs(new + target, exist_ok=True)
        _mount(f"{run}/{sub}", new + target, None, MS_BIND)
    work = f"{new}/dev/shm/w"
    os.mkdir(work, 0o700)
    owner = req["uid"] if req["uid"] is not None else os.getuid()
    os.chown(work, owner, owner)
    for entry in os.scandir(req["path"]):
        if entry.is_file(follow_symlinks=False):
            _copy(entry.path, f"{work}/{entry.name}", entry.stat().st_mode & 0o777, owner)
    os.mkdir(new + "/proc")
    _mount("/proc", new + "/proc", None, MS_BIND | MS_REC)
    os.chdir(new)
    _check(libc.syscall(SYS_PIVOT_ROOT, b".", b"."), "pivot_root")
    _check(libc.umount2(b".", MNT_DETACH), "umount the host's root")
    os.chdir("/")
    _check(libc.umount2(b"/.run", MNT_DETACH), "umount /.run")
    _mount(None, "/", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


def _copy(src, dst, mode: int, owner: int, dir_fd=None) -> None:
    """Copy a regular file (never following a link at either end)."""
    fin = os.open(src, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        fout = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode, dir_fd=dir_fd)
        try:
            while chunk := os.read(fin, 1 << 20):
                os.write(fout, chunk)
            os.fchown(fout, owner, owner)
        finally:
            os.close(fout)
    finally:
        os.close(fin)


def _copy_back(host_dir: int, uid) -> None:
    """After a build step (everyone else in the namespace is dead): its files back to the host's work dir, which
    the next step of the same program copies in again. Bounded by the run's tmpfs."""
    owner = uid if uid is not None else os.getuid()
    for entry in os.scandir("/dev/shm/w"):
        if entry.is_file(follow_symlinks=False):
            _copy(entry.path, entry.name, entry.stat().st_mode & 0o777, owner, dir_fd=host_dir)


# System calls a test program never needs, refused with EPERM by a seccomp filter (x86-64 numbers): new
# namespaces (unshare, setns, clone with a CLONE_NEW* flag), ptrace and reading other processes' memory,
# kernel keyrings, mounts, BPF, perf events, userfaultfd, io_uring (it bypasses the filter), module loading.
DENIED = {
    "ptrace": 101, "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161, "unshare": 272, "setns": 308,
    "add_key": 248, "request_key": 249, "keyctl": 250, "kexec_load": 246, "init_module": 175, "delete_module": 176,
    "open_by_handle_at": 304, "process_vm_readv": 310, "process_vm_writev": 311, "finit_module": 313,
    "perf_event_open": 298, "bpf": 321, "userfaultfd": 323, "io_uring_setup": 425, "io_uring_enter": 426,
    "io_uring_register": 427, "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432,
    "fspick": 433, "mount_setattr": 442,
}  # fmt: skip
CLONE, CLONE3, NEW_NAMESPACES = 56, 435, 0x7E020000
AUDIT_ARCH_X86_64, X32_BIT = 0xC000003E, 0x40000000


def _seccomp() -> bool:
    """Install the filter (x86-64 only; False elsewhere). clone3 answers ENOSYS, so libc falls back to clone,
    whose flags the filter can read."""
    if os.uname().machine != "x86_64":
        return False
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    allow, eperm, enosys = 0x7FFF0000, 0x00050000 | errno.EPERM, 0x00050000 | errno.ENOSYS
    prog = [(ld, 0, 0, 4), (jeq, 1, 0, AUDIT_ARCH_X86_64), (ret, 0, 0, eperm), (ld, 0, 0, 0)]
    prog += [(jge, 0, 1, X32_BIT), (ret, 0, 0, eperm)]
    for nr in DENIED.values():
        prog += [(jeq, 0, 1, nr), (ret, 0, 0, eperm)]
    prog += [(jeq, 0, 1, CLONE3), (ret, 0, 0, enosys)]
    prog += [(jeq, 0, 3, CLONE), (ld, 0, 0, 16), (jset, 0, 1, NEW_NAMESPACES), (ret, 0, 0, eperm), (ret, 0, 0, allow)]

    class Filter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]

    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Filter))]

    filters = (Filter * len(prog))(*[Filter(*f) for f in prog])
    fprog = Program(len(prog), filters)
    _check(libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0), "prctl(SECCOMP)")
    return True


def _program(req: dict, fds: list[int]):
    """C: become the program. Returns the Python source to run, or execs (never returns)."""
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    for name, soft, hard in req["rlimits"]:
        resource.setrlimit(getattr(resource, name), (soft, hard))
    os.chdir(req["cwd"])
    if req["uid"] is not None:
        uid = req["uid"]
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
    if req.get("seccomp"):
        _seccomp()
    os.environ.clear()
    os.environ.update(req["env"])
    server.detach()
    os.closerange(len(fds), 1 << 20)  # the server socket, the setup-error pipe, anything else inherited
    if req.get("python") is not None:
        return req["python"]
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):  # Python ignores these; an exec'd program must not inherit that
        signal.signal(sig, signal.SIG_DFL)
    argv = req["argv"]
    try:
        os.execvpe(argv[0], argv, req["env"])
    except OSError as e:
        os.write(2, f"codellm sandbox: cannot run {argv[0]}: {e.strerror}\n".encode())
        os._exit(127 if e.errno == errno.ENOENT else 126)


def _send(message: dict) -> None:
    server.send(json.dumps(message).encode())


def _wait(pid: int, run_id: int):
    """Wait for the run's first process, serving kill requests; kill its group before reaping it."""
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):  # Linux < 5.3: no kill requests, the run ends by its rlimits
        pidfd = None
    if pidfd is not None:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        poller.register(server, select.POLLIN)
        while not any(fd == pidfd for fd, _ in poller.poll()):
            message = server.recv(1 << 16)
            if not message or json.loads(message).get("kill") == run_id:
                _kill(pid)
            if not message:  # the harness is gone: end the run, then this server
                os.waitpid(pid, 0)
                os._exit(0)
        os.close(pidfd)
        _kill(pid)  # A has exited but is not reaped yet: its pid still names its own group
    _, status, usage = os.wait4(pid, 0)
    return status, usage


def _reap(wait: bool) -> None:
    """Reap what a killed run left: its namespace's init (B) comes back to this server (a subreaper) and exits
    only once every process of the namespace has (at most a few seconds). Without namespaces, only the dead."""
    deadline = time.monotonic() + 5
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            if not wait or time.monotonic() > deadline:
                return
            time.sleep(0.001)


def _kill(pid: int) -> None:
    for send in (os.killpg, os.kill):
        try:
            send(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def serve():
    """Answer requests until the harness closes the socket; returns only in a forked Python program."""
    while True:
        message, fds, _, _ = socket.recv_fds(server, 1 << 20, 4)
        if not message:
            os._exit(0)
        req = json.loads(message)
        if "kill" in req:  # for a run that ended while the harness asked: its status is already on the way
            for fd in fds:
                os.close(fd)
            continue
        err_r, err_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                return _start(req, fds, err_w)
            except BaseException as e:  # noqa: BLE001 (setup failed: report it, never return to the loop)
                try:
                    os.write(err_w, f"{type(e).__name__}: {e}".encode())
                finally:
                    os._exit(SETUP_FAILED)
        for fd in (*fds, err_w):
            os.close(fd)
        _send({"id": req["id"], "pid": pid})
        status, usage = _wait(pid, req["id"])
        _reap(wait=req["mode"] != "none")
        os.set_blocking(err_r, False)
        try:
            error = os.read(err_r, 4096).decode("utf-8", "replace")
        except BlockingIOError:
            error = ""
        os.close(err_r)
        _send({"id": req["id"], "status": status, "cpu": usage.ru_utime + usage.ru_stime, "error": error or None})


def _become(source: str, main=sys.modules["__main__"], argv=sys.argv, builtins=builtins):
    """The forked program's process: __main__ emptied, as `python -c source` would start it."""
    namespace = vars(main)
    namespace.clear()  # this server's globals (what runs after this gets its names as default arguments)
    namespace.update(
        {
            "__name__": "__main__",
            "__doc__": None,
            "__package__": None,
            "__spec__": None,
            "__annotations__": {},
            "__builtins__": builtins,
        }
    )
    argv[:] = ["-c"]
    return source, namespace


def _run(source, namespace, sys=sys, os=os, atexit=atexit) -> None:
    """Run the program and exit as the interpreter would (traceback or SystemExit, threads joined, atexit
    handlers, stdout flushed, status 120 if that fails) but without its teardown, which costs more than the
    three forks of a run."""
    status = 0
    try:
        exec(compile(source, "<string>", "exec"), namespace)
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        if not isinstance(e.code, int) and e.code is not None:
            print(e.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 (what the interpreter prints for an uncaught exception)
        kind, value, tb = sys.exc_info()
        value = value.with_traceback(tb.tb_next)  # from the program's first frame, not this function's
        sys.excepthook(kind, value, value.__traceback__)
        status = 1
    try:
        if "threading" in sys.modules:
            sys.modules["threading"]._shutdown()  # non-daemon threads finish first
    except BaseException:  # noqa: BLE001
        pass
    atexit._run_exitfuncs()
    try:
        sys.stdout.flush()
    except BaseException:  # noqa: BLE001
        status = 120
    try:
        sys.stderr.flush()
    except BaseException:  # noqa: BLE001
        pass
    os._exit(status & 0xFF)


for name in PRELOADED:
    __import__(name)
if sys.path and sys.path[0] == "":  # as -P would: the program's directory is not on the import path
    del sys.path[0]
server = socket.socket(fileno=int(sys.argv[1]))
libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # a killed run's orphans are reaped here (`_reap`)
gc.freeze()  # what is loaded now stays out of the collector: forked programs share it without copying
_run(*_become(serve()))
