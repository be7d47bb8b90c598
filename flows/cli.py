"""`turbo-batch` command line: validate, run, report, expand.

Exit codes of `run` and `validate`: 0 every valid row succeeded (or, for validate, every row is
valid); 1 some row failed or was invalid (good rows' outputs are still written); 2 the manifest
cannot be read (or, for run, the local Prefect API server did not start).

`run` starts its own Prefect API server as a child process that dies with it (see
flows/local_server.py) unless PREFECT_API_URL names one; `--gpus N` runs the shards on N worker
processes, one per GPU (flows/local_worker.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

# Columns that can be given as run parameters (CLI options); a manifest cell wins over them.
RUN_PARAM_OPTIONS = ("model", "resolution", "aspect_ratio", "num_frames", "num_steps", "seed",
                     "sigma_max", "attention_type", "sla_topk", "quant_linear", "fps")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="turbo-batch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(required=True, metavar="COMMAND",
                           help="one of these; `turbo-batch COMMAND --help` lists its options")

    v = sub.add_parser("validate", help="check a manifest and list every bad row")
    _manifest_options(v)
    v.set_defaults(func=cmd_validate)

    r = sub.add_parser("run", help="run a manifest end to end on this machine")
    _manifest_options(r)
    dest = r.add_mutually_exclusive_group()
    dest.add_argument("--out", help="local output folder (default ./out)")
    dest.add_argument("--sink", help="s3://bucket/prefix (R2: set R2_ACCOUNT_ID, R2_ACCESS_KEY_ID, "
                                     "R2_SECRET_ACCESS_KEY)")
    r.add_argument("--checkpoints", help="checkpoints folder (default $CHECKPOINTS_DIR or ./checkpoints)")
    r.add_argument("--max-rows-per-shard", type=int, default=25, metavar="N",
                   help="at most N rows in one shard, the unit of work one GPU takes at a time (default 25)")
    r.add_argument("--gpus", type=_positive_int, metavar="N",
                   help="GPU worker processes, one per GPU, pinned with CUDA_VISIBLE_DEVICES "
                        "(default: 1, or the visible GPU count when several)")
    r.add_argument("--engine-socket", metavar="PATH",
                   help="generate on a running engine service (python -m service.server --socket PATH), "
                        "whose models stay warm between runs, instead of loading them in this process")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--keep-work", action="store_true",
                   help="keep each row's work folder (frames, fetched inputs) instead of removing it")
    r.set_defaults(func=cmd_run)

    rep = sub.add_parser("report", help="print the summary of a finished run")
    rep.add_argument("location", help="output folder, metrics.parquet, or s3://bucket/prefix")
    rep.add_argument("--all", action="store_true", dest="all_runs",
                     help="every run in the sink merged by row, newest status first (default: the latest run)")
    rep.set_defaults(func=cmd_report)

    e = sub.add_parser("expand", help="expand a prompt template YAML into a manifest CSV")
    e.add_argument("template",
                   help="template YAML: a prompt with {variables} and their values; one row per combination")
    e.add_argument("-o", "--output", required=True, help="manifest CSV to write (overwritten)")
    e.set_defaults(func=cmd_expand)
    return p


def configure_local_prefect() -> None:
    """Settings for a self-contained local run on the CLI's own Prefect API server (set before
    it starts; the server and the GPU worker processes inherit them).

    Quiet logs; no telemetry writes racing SQLite; the task-run recorder writes in batches of
    200 instead of one by one, which takes the ephemeral server from ~40 % of one core to a
    fraction of that while rows run (it shares the machine with the work).
    """
    for key, value in {
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
        "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "200",
        "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_READ_BATCH_SIZE": "200",
    }.items():
        os.environ.setdefault(key, value)


def _manifest_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("manifest", help="CSV or Parquet, local path or s3:// URI")
    p.add_argument("--strict", action="store_true", help="refuse the whole batch on any bad row")
    p.add_argument("--allow-https", action="store_true", help="accept https:// input URLs")
    p.add_argument("--ignore-unknown", action="store_true",
                   help="ignore columns that are not manifest columns (with a warning) instead of "
                        "refusing the manifest")
    sets = {
        "model": "model preset: wan2.1-t2v-1.3b, wan2.1-t2v-14b or tiny-t2v (default: by mode)",
        "resolution": "output resolution: 480p or 720p (default: the model's)",
        "aspect_ratio": "aspect ratio: 16:9, 9:16, 1:1, 4:3 or 3:4 (default 16:9)",
        "num_frames": "frames to generate: 4k+1 between 1 and 125, e.g. 33 or 81 (default 81)",
        "num_steps": "sampling steps: 1, 2, 3 or 4 (default 4)",
        "seed": "random seed: an integer in [0, 2^63) (default 0)",
        "sigma_max": "the sampler's starting noise level: a positive number (default 80)",
        "attention_type": "self-attention backend: original, sla, sagesla or auto (default auto)",
        "sla_topk": "fraction of attention blocks sparse attention keeps, in (0, 1] (default 0.1)",
        "quant_linear": "DiT weights: auto (bf16 file if present, else -quant), true (int8) or false (bf16)",
        "fps": "output frame rate: an integer 1..60 (default 16)",
    }
    params = p.add_argument_group("run parameters",
                                  "each sets its column for the rows that leave it empty; a manifest cell wins")
    for name in RUN_PARAM_OPTIONS:
        params.add_argument("--" + name.replace("_", "-"), dest=name,
                            help=sets.get(name, f"the {name} column"))
    params.add_argument("--steps", dest="num_steps", help=argparse.SUPPRESS)


def _run_params(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k in RUN_PARAM_OPTIONS if getattr(args, k, None) is not None}


def _read(args: argparse.Namespace):
    """Read and validate once (local inputs decoded); `run` hands this copy to the batch."""
    from tasks.manifest import ManifestFileError, ManifestRowsError, read_manifest
    from tasks.manifest_errors import count_rows
    try:
        return read_manifest(args.manifest, run_params=_run_params(args), strict=args.strict,
                             allow_https=args.allow_https, ignore_unknown=args.ignore_unknown)
    except ManifestFileError as e:
        print(f"turbo-batch: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except ManifestRowsError as e:
        for err in e.errors:
            print(f"invalid {err}", file=sys.stderr)
        print(f"turbo-batch: --strict: {count_rows(e.errors)}, nothing was run", file=sys.stderr)
        raise SystemExit(1) from None


def cmd_validate(args: argparse.Namespace) -> int:
    m = _read(args)
    for w in m.warnings:
        print(f"warning: {w}", file=sys.stderr)
    for err in m.errors:
        print(f"invalid {err}")
    print(m.counts())                 # "4 valid rows, 29 invalid rows (33 errors)"
    return 1 if m.errors else 0


def cmd_run(args: argparse.Namespace) -> int:
    import time
    started = time.monotonic()      # for the wall time in the last line
    m = _read(args)
    for w in m.warnings:
        print(f"warning: {w}", file=sys.stderr)
    for err in m.errors:
        print(f"invalid {err}", file=sys.stderr)
    if m.errors:
        print(f"turbo-batch: {m.counts()}", file=sys.stderr)
    sink = args.sink or str(Path(args.out or "out").resolve())
    configure_local_prefect()
    if args.keep_work:
        os.environ["TURBO_KEEP_WORK"] = "1"     # read by each shard, in this process or a worker
    if args.engine_socket:                      # read by flows.shard.new_engine, like a worker's setting
        if args.gpus and args.gpus > 1:
            print("turbo-batch: --engine-socket runs on that one service's GPU; leave out --gpus",
                  file=sys.stderr)
            return 2
        os.environ["TURBO_ENGINE_SOCKET"] = str(Path(args.engine_socket).resolve())
    from flows import interrupt
    from flows.local_server import LocalServerError, local_api_server

    # First Ctrl-C/SIGTERM: finish the running rows, start no more, write metrics, exit 130.
    interrupt.arm()
    # Our own API server (unless PREFECT_API_URL names one): a child the kernel kills with us,
    # where Prefect's ephemeral one outlives a killed CLI. Started before any Prefect client.
    try:
        with local_api_server():
            result = _run_batch(args, m, sink)
    except LocalServerError as e:
        print(f"turbo-batch: {e}\nhint: set PREFECT_API_URL to use a running Prefect server",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:                   # a second Ctrl-C: the running rows were abandoned
        print("turbo-batch: interrupted; rows that finished are in the sink", file=sys.stderr)
        return 130
    from tasks.text import shown
    for line in result.get("problems", []):      # rows that failed or were refused while running
        print(f"{'invalid' if ': fetch: ' in line else 'failed'} {shown(line, limit=2000)}",
              file=sys.stderr)
    print(f"metrics: {result['metrics']['parquet']}")
    # Last line, one line: what happened and what it cost.
    print(f"turbo-batch: {result['rows']} rows: {result['succeeded']} succeeded, {result['skipped']} skipped, "
          f"{result['failed']} failed, {result['invalid']} invalid; "
          f"{result['gpu_seconds']:.1f} {result.get('engine_label', 'GPU-s')}; "
          f"wall {time.monotonic() - started:.1f} s")
    if interrupt.requested():
        return 130
    return 0 if result["failed"] == 0 and result["invalid"] == 0 else 1


def _run_batch(args: argparse.Namespace, m: Any, sink: str) -> dict[str, Any]:
    import tempfile

    from flows import progress
    from flows.batch import batch_flow

    bar = _ProgressBar(len(m.rows), enabled=not args.no_progress and sys.stderr.isatty())
    unsubscribe = progress.subscribe(bar.advance)
    try:
        with tempfile.TemporaryDirectory(prefix="turbo-run-") as work:
            # The manifest was read and validated once, above; the batch takes that copy.
            validated = m.save(Path(work) / "manifest.json")
            return batch_flow(manifest=str(args.manifest), sink=sink, run_params=_run_params(args),
                              strict=args.strict, allow_https=args.allow_https,
                              checkpoints_dir=args.checkpoints, validated=str(validated),
                              max_rows_per_shard=args.max_rows_per_shard, gpus=args.gpus)
    finally:
        unsubscribe()
        bar.close()


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


def cmd_report(args: argparse.Namespace) -> int:
    import polars as pl

    from tasks.metrics import summary_markdown
    from tasks.runs import read_run_metrics
    from tasks.upload import sink_from_uri
    try:
        if args.location.endswith(".parquet") and not args.location.startswith("s3://"):
            df = pl.read_parquet(args.location)
        else:
            df = read_run_metrics(sink_from_uri(args.location), all_runs=args.all_runs)
    except (OSError, FileNotFoundError) as e:
        print(f"turbo-batch: no metrics at {args.location}: {e}", file=sys.stderr)
        return 2
    print(summary_markdown(df, title=f"turbo-batch run: {args.location}"), end="")
    return 0


def cmd_expand(args: argparse.Namespace) -> int:
    from prompts.templates import TemplateError, expand_template, write_manifest_csv
    try:
        rows = expand_template(Path(args.template))
    except TemplateError as e:
        print(f"turbo-batch: {e}", file=sys.stderr)
        return 2
    write_manifest_csv(rows, Path(args.output))
    print(f"{len(rows)} row(s) written to {args.output}")
    return 0


class _ProgressBar:
    """rich progress bar on stderr (rich comes with Prefect); silent when not a terminal.

    While it is live, every log handler that writes to a terminal (the CLI's own, Prefect's
    console handlers) writes through the bar's console instead, so its lines (Prefect's banners,
    a row's traceback) land whole above the bar instead of inside it, and stay there once the
    bar closes; close() gives the handlers their streams back.
    """

    def __init__(self, total: int, enabled: bool):
        self.counts: dict[str, int] = {}
        self._progress = None
        self._rerouted: list[tuple[logging.StreamHandler[Any], Any]] = []
        if enabled and total:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
            self._progress = Progress(TextColumn("rows"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), TextColumn("{task.description}"),
                                      console=Console(stderr=True), transient=False)
            self._task = self._progress.add_task("", total=total)
            self._progress.start()
            self._reroute_terminal_logging()

    def _reroute_terminal_logging(self) -> None:
        from rich.file_proxy import FileProxy
        assert self._progress is not None
        for handler in self._terminal_handlers():
            stream = handler.stream
            proxy = FileProxy(self._progress.console, stream)   # whole lines, printed above the bar
            handler.setStream(proxy)
            if hasattr(handler, "console"):      # Prefect's handler prints through its own rich Console
                handler.console.file = proxy
            self._rerouted.append((handler, stream))

    @staticmethod
    def _terminal_handlers() -> list[logging.StreamHandler[Any]]:
        loggers = [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values()
                                          if isinstance(lg, logging.Logger))]
        found: list[logging.StreamHandler[Any]] = []
        for lg in loggers:
            for handler in lg.handlers:
                if (isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
                        and handler not in found):
                    try:
                        tty = bool(handler.stream.isatty())
                    except (AttributeError, OSError, ValueError):
                        tty = False
                    if tty:
                        found.append(handler)
        return found

    def advance(self, row_id: str, status: str) -> None:
        self.counts[status] = self.counts.get(status, 0) + 1
        if self._progress is not None:
            desc = " ".join(f"{k} {v}" for k, v in sorted(self.counts.items()))
            self._progress.update(self._task, advance=1, description=desc)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        for handler, stream in self._rerouted:
            handler.setStream(stream)
            if hasattr(handler, "console"):
                handler.console.file = stream
        self._rerouted.clear()


if __name__ == "__main__":
    sys.exit(main())
