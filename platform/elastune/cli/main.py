"""`elastune run | tune | validate | schema | data prepare | ckpt ... | runs ls | report | submit | status | logs | stop | list`.

Exit codes: 0 success, 1 training failed, 2 bad input (spec, arguments, files, a checkpoint root
another run holds or whose checkpoint belongs to another model), 3 no Ray Jobs API at the
address, 4 the cluster refused the credentials, 5 trained to the end but the final state could not
be made durable, 130 / 143 stopped by SIGINT / SIGTERM (the newest step made durable first). User
mistakes print their explanation and no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from elastune.errors import ElastuneError

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
EXIT_NOT_DURABLE = 5  # trained to its stop, but the final state could not be made durable


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="elastune", description="Elastic PyTorch training on Ray with an exact global batch at any world size."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run",
        help="train a job (embedded local Ray, or --address)",
        description="Train a job spec. Resumes from the newest checkpoint at checkpoint.path unless --fresh.",
    )
    run.add_argument("job", help="job spec YAML")
    run.add_argument("--workers", type=_positive, help="fixed number of workers (sets scaling.min_workers = max_workers)")
    run.add_argument(
        "--max-steps", type=_positive, help="stop after this many steps in all; the schedule keeps the spec's horizon"
    )
    run.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else an embedded local Ray)")
    run.add_argument("--fresh", action="store_true", help="delete this job's checkpoints and start over")
    run.add_argument("--verbose", action="store_true", help="show Ray's own and the workers' logs")
    run.set_defaults(handler=cmd_run)

    tune = sub.add_parser(
        "tune",
        help="population-based search over the job's schedule (its tune: section)",
        description="Search the job's schedule with population-based training on Ray Tune (docs/tuning.md). "
        "Resumes the newest unfinished search of the same spec (its driver died) unless --fresh.",
    )
    tune.add_argument("job", help="job spec YAML with a tune: section")
    tune.add_argument("--fresh", action="store_true", help="start a new search even if an unfinished one of this spec exists")
    tune.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else an embedded local Ray)")
    tune.add_argument("--verbose", action="store_true", help="show Ray Tune's own progress and Ray's logs")
    tune.set_defaults(handler=cmd_tune)

    validate = sub.add_parser("validate", help="check a job spec without running it")
    validate.add_argument("job", help="job spec YAML")
    validate.set_defaults(handler=cmd_validate)

    schema = sub.add_parser("schema", help="print the JSON Schema of job specs")
    schema.add_argument(
        "--crd", action="store_true", help="print the ElastuneJob CustomResourceDefinition (YAML) made from it instead"
    )
    schema.set_defaults(handler=cmd_schema)

    data = sub.add_parser("data", help="dataset tools")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    prep = data_sub.add_parser(
        "prepare",
        help="turn text, JSONL or Parquet into a token-window dataset",
        description="Prepare a byte-token window dataset (Arrow + manifest.json).",
    )
    src = prep.add_mutually_exclusive_group(required=True)
    src.add_argument("--source", nargs="+", help="'stdlib' or files, folders, globs of .txt/.jsonl/.parquet")
    src.add_argument("--job", help="prepare what this job spec's data section says")
    prep.add_argument("--output", help="dataset folder (required with --source)")
    prep.add_argument("--window", type=_positive, default=65, help="tokens per sample (default 65)")
    prep.add_argument("--format", choices=["auto", "text", "jsonl", "parquet"], default="auto")
    prep.add_argument("--text-field", default="text", help="JSONL field / Parquet column with the text")
    prep.add_argument("--max-bytes", type=_positive, help="read at most this many bytes of source")
    prep.add_argument(
        "--tokenizer",
        default="bytes",
        help="bytes (default), bpe (trained on the source; needs --vocab-size) or a tokenizer.json path",
    )
    prep.add_argument("--vocab-size", type=_positive, help="token ids a bpe tokenizer trains, e.g. 4096")
    prep.add_argument(
        "--eval-fraction", type=_fraction, help="share of documents held out for evaluation, in (0, 0.5] (default: none)"
    )
    prep.set_defaults(handler=cmd_data_prepare)

    from elastune.cli import ckpt, jobs, runs

    ckpt.add_parser(sub)
    runs.add_parser(sub)
    jobs.add_parser(sub)
    return parser


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer; give a whole number >= 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is below 1; give a whole number >= 1")
    return value


def _fraction(text: str) -> float:
    from elastune.data.split import fraction_problem

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; give a share of the documents, e.g. 0.05") from None
    if problem := fraction_problem(value):
        raise argparse.ArgumentTypeError(f"{value} {problem}")
    return value


def cmd_run(args: argparse.Namespace) -> int:
    from elastune.spec import load_spec, spec_dir_of
    from elastune.submit.package import REQUIRE_ENV, installed_versions, mismatches

    require = os.environ.get(REQUIRE_ENV)
    if require:  # a submitted job: the cluster must have the versions it was submitted with
        wrong = mismatches(require, installed_versions())
        if wrong:
            raise ElastuneError(
                f"this cluster has {'; '.join(wrong)}: the job would train with other numerics; give the cluster's "
                f"image those versions, or submit from an environment that matches the cluster"
            )
    overrides: dict = {}
    if args.workers is not None:
        overrides |= {"scaling.min_workers": args.workers, "scaling.max_workers": args.workers}
    if args.max_steps is not None:
        # Stopping early must not bend the schedule: it keeps spanning the spec's own budget, so a
        # run cut short and resumed later follows the same lr curve as one that never stopped.
        job = load_spec(args.job)
        if job.batch.adaptive is not None:
            from elastune.errors import SpecError

            raise SpecError(
                f"--max-steps ({args.max_steps}) cannot stop a job with batch.adaptive: its steps depend on the batches "
                f"it chooses; lower stop.max_samples in the spec instead (keep schedule.horizon_samples at "
                f"{job.horizon_samples} so the schedule does not bend)"
            )
        overrides |= {"stop.max_steps": args.max_steps, "stop.max_samples": None, "schedule.horizon_samples": job.horizon_samples}
    spec = load_spec(args.job, overrides)
    # torch and Ray are imported only once the spec is known good: a mistake is told in a moment.
    from rich.console import Console

    from elastune.train.driver import run_job

    console = Console(soft_wrap=True)
    outcome = run_job(spec, spec_dir_of(args.job), address=args.address, fresh=args.fresh, console=console, verbose=args.verbose)
    line, code = run_ending(outcome, args.job)
    if line:
        console.print(line, highlight=False)
    return code


def run_ending(outcome, job: str) -> tuple[str, int]:
    """The last line `elastune run` prints for an outcome (train.outcome.RunOutcome), and its exit code."""
    from elastune.train.stopping import exit_code

    durable = f"step {outcome.durable_step}" if outcome.durable_step is not None else "none yet"
    where = f"Run directory: {outcome.run_dir}"
    if outcome.status == "complete":  # the driver said why, and how to train on
        return "", EXIT_OK
    if outcome.status == "succeeded":
        loss = f"{outcome.final_loss:.4f}" if outcome.final_loss is not None else "n/a"
        return (
            f"Done: step {outcome.steps}, {outcome.samples_seen:,} samples, loss {loss}, {outcome.seconds:.1f} s. {where}",
            EXIT_OK,
        )
    if outcome.status == "not_durable":
        return (
            f"[red]Trained to step {outcome.steps}, but its final state is not durable[/red]: {outcome.error}. The newest "
            f"durable checkpoint at {outcome.uri} is {durable}: fix the store and run `elastune run {job}` again to train "
            f"from there. {where}",
            EXIT_NOT_DURABLE,
        )
    if outcome.status == "stopped":
        return (
            f"Stopped at step {outcome.steps} ({outcome.samples_seen:,} samples); newest durable checkpoint: {durable} at "
            f"{outcome.uri}. Resume with `elastune run {job}`. {where}",
            exit_code(outcome.signal),
        )
    return f"[red]Training failed[/red]: {outcome.error}\n{where}", EXIT_FAILED


def cmd_tune(args: argparse.Namespace) -> int:
    from elastune.spec import load_spec, spec_dir_of

    spec = load_spec(args.job)
    from elastune.tune.population import check_search

    check_search(spec)  # a bad search is told before torch and Ray are imported
    from rich.console import Console

    from elastune.tune.driver import run_tune

    console = Console(soft_wrap=True)
    outcome = run_tune(spec, spec_dir_of(args.job), address=args.address, console=console, verbose=args.verbose, fresh=args.fresh)
    if outcome.status == "succeeded":
        console.print(f"Done in {outcome.seconds:.1f} s. Search directory: {outcome.tune_dir}", highlight=False)
        return EXIT_OK
    console.print(f"[red]Search failed[/red]: {outcome.error}\nSearch directory: {outcome.tune_dir}", highlight=False)
    return EXIT_FAILED


def cmd_validate(args: argparse.Namespace) -> int:
    from elastune.batch_plan import batch_plan
    from elastune.spec import load_spec

    spec = load_spec(args.job)
    low = batch_plan(spec.batch.global_batch_size, spec.batch.micro_batch_size, spec.scaling.min_workers)
    high = batch_plan(spec.batch.global_batch_size, spec.batch.micro_batch_size, spec.scaling.max_workers)
    print(f"{args.job}: valid job '{spec.name}'")
    print(f"  {low.describe()}")
    if high.world_size != low.world_size:
        print(f"  {high.describe()}")
    a = spec.batch.adaptive
    steps = (
        f"at most {spec.max_steps} steps (the batch adapts, {a.min or spec.batch.global_batch_size} to {a.max})"
        if a is not None and not a.decrease
        else "a number of steps the adaptive batch decides"
        if a is not None
        else f"{spec.max_steps} steps"
    )
    print(
        f"  stops after {spec.budget_samples:,} samples, {steps}; schedule {spec.schedule.name} over "
        f"{spec.horizon_samples:,} samples"
    )
    return EXIT_OK


def cmd_schema(args: argparse.Namespace) -> int:
    if args.crd:
        from elastune.kube.crd import crd_yaml

        print(crd_yaml(), end="")
        return EXIT_OK
    from elastune.spec import json_schema

    print(json.dumps(json_schema(), indent=2))
    return EXIT_OK


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from rich.console import Console

    from elastune.data.prepare import prepare
    from elastune.data.progress_bar import preparing
    from elastune.spec import load_spec

    if args.job:
        data = load_spec(args.job).data
        if data.source is None:
            raise ElastuneError(
                f"{args.job}: data.source is not set, so there is nothing to prepare; set data.source or use --source"
            )
        source, output, window, fmt, field, max_bytes, held = (
            data.source,
            data.path,
            data.window,
            data.format,
            data.text_field,
            data.max_bytes,
            data.eval_fraction,
        )
        tokenizer, vocab_size = data.tokenizer, data.vocab_size
    else:
        if not args.output:
            raise ElastuneError("--output is required with --source; give the dataset folder to write")
        source = args.source[0] if args.source == ["stdlib"] else args.source
        output, window, fmt, field, max_bytes = args.output, args.window, args.format, args.text_field, args.max_bytes
        held, tokenizer, vocab_size = args.eval_fraction, args.tokenizer, args.vocab_size
    with preparing(Console(stderr=True)) as on_progress:
        manifest = prepare(source, output, window, fmt, field, max_bytes, held, tokenizer, vocab_size, on_progress)
    heldout = f", {manifest.eval_count:,} held out for evaluation" if manifest.eval_fraction else ""
    print(
        f"Prepared {manifest.count:,} samples of {manifest.window} tokens ({manifest.tokenizer}, vocabulary "
        f"{manifest.vocab_size:,}){heldout} at "
        f"{output} (content sha256 {manifest.content_hash[:16]}...)"
    )
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ElastuneError as exc:
        print(f"error: {exc.message}" if exc.user_error else f"failed: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        sys.stdout = open(os.devnull, "w")
        return EXIT_OK
    except OSError as exc:  # a disk or a store that failed under a command: say which, no traceback
        print(f"failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
