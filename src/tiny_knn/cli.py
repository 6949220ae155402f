"""The command line: argparse -> the public API. Data (the result path) on stdout; progress, notes,
warnings and errors on stderr. Exit 0 on success, 2 on bad input, 1 on an unexpected failure, 130 on
Ctrl-C, 143 on SIGTERM (an interrupted run keeps its checkpoint: the same command continues it)."""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import signal
import sys
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, NoReturn

from .api import __version__, compute_topk, prepare_search
from .distributed import SHARD_MODES
from .errors import TinyKnnError, TinyKnnWarning, is_disk_full
from .merge import merge_results
from .metrics import DEFAULT_METRIC, METRICS
from .options import DEFAULT_PRECISION, PRECISION_CHOICES, SearchOptions
from .plan import DEFAULT_K, format_bytes, parse_size
from .recall import SCORE_TOLERANCE, recall_at_k
from .results import FORMATS

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _size(text: str) -> int:
    try:
        value = parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive size, got {text!r}")
    return value


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: ...)" only where there is a default the help text does not already give."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default in (None, False) or "default" in text:
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tiny-knn",
        description="Exact top-K nearest neighbours of every query among every document (dot product by "
        "default; cosine or squared L2 with --metric). Both inputs are streamed from disk, so they may be "
        "larger than RAM or GPU memory. The result's path is printed on stdout.",
        epilog="A run of several query batches keeps a checkpoint beside the output (OUT.checkpoint/); if it is "
        "interrupted, the same command continues where it stopped. The output never replaces an input, nor a "
        "folder tiny-knn did not write; while a run writes OUT it holds OUT.lock, and a second run on the same "
        "OUT stops at once. Range mode: --min-score T (ip, cosine) or --max-distance T (l2) returns every pair within "
        "the radius (--k, only when given, keeps at most k per query, the best), as parquet rows query, doc, score or "
        "an npy folder in CSR form. Other commands: 'tiny-knn dedup --help' de-duplicates a corpus (every pair within "
        "a threshold, joined into groups); 'tiny-knn merge --help' makes one result of results over consecutive "
        "slices of the docs; 'tiny-knn recall --help' measures a result against an exact one; 'tiny-knn demo --help' "
        "generates a synthetic corpus, searches it and verifies the answer. Exit codes: 0 success, 2 bad input "
        "or options, 1 unexpected failure, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM). Environment: "
        "TINY_KNN_PRODUCT=screen|kernel|torch|torch-bf16 forces the CPU's estimator (which product picks the pairs "
        "to score exactly; never the answer): by default each is timed on a sample of the data at the first search "
        "of its kind and the fastest is kept in ~/.cache/tiny-knn (TINY_KNN_CACHE_DIR), as --dry-run shows; "
        "TINY_KNN_PRODUCT=triton forces the GPU's screen (opt-in: not yet checked on a GPU; on the CPU only under "
        "TRITON_INTERPRET=1); "
        "TINY_KNN_NO_KERNEL=1 and TINY_KNN_NO_TRITON=1 turn the compiled CPU kernel and the "
        "Triton GPU kernel off; TINY_KNN_DIST_TIMEOUT sets torchrun's collective timeout (seconds); "
        "TINY_KNN_DEBUG=1 prints a traceback with unexpected errors.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument(
        "queries",
        metavar="QUERIES.pt",
        help="queries: .pt, .npy, .safetensors, .fvecs/.bvecs, .h5/.hdf5, .parquet, .arrow (Arrow IPC, as Hugging "
        "Face datasets caches it), FILE:KEY (a tensor, HDF5 dataset, or parquet/Arrow list<float> column), or a "
        "directory/glob of shards",
    )
    parser.add_argument("docs", metavar="DOCS.pt", help="docs, in any of the same formats, with the same dim")
    parser.add_argument(
        "--k",
        type=_positive_int,
        help=f"neighbours per query (clamped to D; default: {DEFAULT_K}); in range mode only when given: at most k "
        "pairs per query, the best",
    )
    parser.add_argument(
        "--min-score",
        type=float,
        metavar="T",
        help="range mode (ip, cosine): every pair whose exact score is >= T (T rounded to float32 first), each "
        "query's in ascending doc order; parquet or npy (CSR: offsets, indices, scores) output; runs on the CPU",
    )
    parser.add_argument(
        "--max-distance",
        type=float,
        metavar="T",
        help="range mode (l2): every pair whose exact squared distance is <= T, as --min-score",
    )
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when CUDA is available")
    parser.add_argument(
        "--metric",
        choices=METRICS,
        default=DEFAULT_METRIC,
        help="ip: dot product, highest first; cosine: on rows scaled to unit length as they are read; "
        "l2: squared Euclidean distance, smallest first, re-scored exactly",
    )
    parser.add_argument(
        "--precision",
        choices=PRECISION_CHOICES,
        default=DEFAULT_PRECISION,
        help="exact: every score is tiny-knn's one exact score (on the CPU: the same bytes on every machine, "
        "whatever product estimated it); bf16-unsafe: bfloat16 products as they are, not exact (ip, cosine); "
        "fp32 and bf16, older names, mean exact",
    )
    parser.add_argument(
        "--exclude-self",
        action="store_true",
        help="QUERIES and DOCS are the same file: leave each query's own row out (by index, so duplicates stay)",
    )
    parser.add_argument(
        "--output-path",
        metavar="OUT.pt",
        help="result path (default: top{k}_{queries}_x_{docs}.pt, or the --format's suffix, beside the queries)",
    )
    _add_format(parser)
    parser.add_argument(
        "--query-ids",
        metavar="FILE",
        help="one id per query row (a text file, or a column of a parquet/Arrow file: FILE.parquet:COLUMN); "
        "recorded and used by parquet/trec",
    )
    parser.add_argument("--doc-ids", metavar="FILE", help="one id per doc row, likewise")
    parser.add_argument(
        "--exclude-pairs",
        metavar="FILE",
        help="(query, doc) pairs never returned, e.g. hard-negative mining's positives: one 'QUERY DOC' pair a line "
        "(row numbers, or ids with --query-ids/--doc-ids), or TREC qrels lines 'qid iteration docid relevance' "
        "(every pair listed, whatever its relevance); a query left with fewer than k docs is padded with doc -1",
    )
    parser.add_argument(
        "--max-memory",
        type=_size,
        metavar="SIZE",
        help="memory budget: GPU memory on CUDA (the host's buffers then take 60%% of free RAM as their own budget), "
        "RAM on CPU, e.g. 512MB or 8GiB (default: 60%% of what is free)",
    )
    parser.add_argument(
        "--batch-size", type=_positive_int, metavar="N", help="queries per pass over the docs (default: planned)"
    )
    parser.add_argument("--chunk-size", type=_positive_int, metavar="N", help="docs per chunk (default: planned)")
    parser.add_argument(
        "--dry-run", action="store_true", help="check the inputs, print the plan (sizes, passes, bytes, memory), exit"
    )
    parser.add_argument(
        "--shard",
        choices=SHARD_MODES,
        default="auto",
        help="under torchrun: split the docs between ranks (each reads its share; rank 0 merges) or the queries "
        "(each reads all docs); auto weighs rank 0's merge against reading the docs on every rank",
    )
    parser.add_argument(
        "--restart", action="store_true", help="discard the checkpoint of an interrupted run instead of continuing it"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar, notes or warnings on stderr")
    parser.add_argument("--version", action="version", version=f"tiny-knn {__version__}")
    return parser


def _add_format(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--format",
        choices=FORMATS,
        help="pt: the dict of tensors (default); npy: a directory of indices.npy, scores.npy, meta.json; "
        "parquet: rows of query, rank, doc, score (needs pyarrow); trec: a TREC run file; ground truth for ANN "
        "benchmarks: ivecs (OUT.ivecs of neighbours, OUT.fvecs of scores beside it) or bigann (big-ann-benchmarks' "
        "binary file) (default: from the --output-path suffix .parquet/.trec/.run/.ivecs, else pt)",
    )


def build_merge_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tiny-knn merge",
        description="Merges the results of searches with the same queries, metric and k over consecutive slices "
        "of the docs, given in doc order (part i's doc 0 follows the last doc of part i - 1), into the result of "
        "one search over all the docs: the same indices and scores, byte for byte. Only blocks of rows of the parts "
        "are in memory at once. The merged result's path is printed on stdout.",
        epilog="Parts are pt results, npy result folders, or parquet results written without ids, that record "
        "format_version, requested_k, doc_count and queries_fingerprint (results of older versions: search "
        "again). Parts that differ in queries, metric, requested k, precision or format version are refused. "
        "The output is checked and locked as a search's (never an input; OUT.lock).",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("parts", nargs="+", metavar="PART", help="results over consecutive slices of the docs")
    parser.add_argument("--output-path", metavar="OUT", required=True, help="where to write the merged result")
    _add_format(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bar, notes or warnings on stderr")
    return parser


def build_recall_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tiny-knn recall",
        description="Recall@K of the neighbours in RUN against the exact ones in GT, printed on stdout: by ids "
        "(the share of RUN's first K that are among GT's first K) and, where both files carry scores, by "
        f"ann-benchmarks' rule (a returned neighbour counts when its score is within {SCORE_TOLERANCE:g} of GT's "
        "K-th score). Each is the mean over the queries.",
        epilog="RUN and GT may be tiny-knn results (pt, an npy folder, parquet written without ids), .ivecs files "
        "(scores from the .fvecs of the same name beside them, if any) or big-ann-benchmarks' binary ground "
        "truth, from any tool.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("run", metavar="RUN", help="the result to measure")
    parser.add_argument("truth", metavar="GT", help="the exact neighbours of the same queries")
    parser.add_argument("--k", type=_positive_int, help="neighbours that count (default: RUN's k)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI; returns the exit code (tests call this in-process)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:
        from .demo import main as demo_main

        return demo_main(argv[1:])
    if argv[:1] == ["merge"]:
        merging = build_merge_parser().parse_args(argv[1:])
        return _run(
            merging.quiet,
            lambda: merge_results(
                merging.parts, merging.output_path, output_format=merging.format, progress=not merging.quiet
            ),
        )
    if argv[:1] == ["recall"]:
        measuring = build_recall_parser().parse_args(argv[1:])
        return _run(False, lambda: recall_at_k(measuring.run, measuring.truth, measuring.k).describe())
    if argv[:1] == ["dedup"]:
        from .dedup import build_parser as dedup_parser
        from .dedup import run as run_dedup

        deduping = dedup_parser().parse_args(argv[1:])
        return _run(deduping.quiet, lambda: run_dedup(deduping))
    args = build_parser().parse_args(argv)
    options = _search_options(args)
    if args.min_score is not None or args.max_distance is not None:
        from .range_output import run_command

        return _run(args.quiet, lambda: run_command(args, options))
    args.k = DEFAULT_K if args.k is None else args.k
    if args.dry_run:
        return _run(args.quiet, lambda: _describe_plan(args, options))
    return _run(
        args.quiet,
        lambda: compute_topk(
            args.queries,
            args.docs,
            k=args.k,
            out_path=args.output_path,
            progress=not args.quiet,
            output_format=args.format,
            query_ids=args.query_ids,
            doc_ids=args.doc_ids,
            restart=args.restart,
            shard=args.shard,
            exclude_pairs=args.exclude_pairs,
            **options.compute_topk_keywords(),
        ),
    )


def _run(quiet: bool, run) -> int:  # type: ignore[no-untyped-def]
    """Runs `run` with the library's notes and warnings on stderr (unless quiet) and SIGTERM stopping it; prints
    what it returns on stdout."""
    _show_notes(quiet=quiet)
    with warnings.catch_warnings(), _stop_signals():
        warnings.simplefilter("ignore" if quiet else "always", TinyKnnWarning)
        warnings.showwarning = _show_warning
        return _run_reporting_errors(run)


def console_main() -> NoReturn:
    """The `tiny-knn` command (and `python -m tiny_knn`): main(), then exit.

    Freezing the garbage collector spares its collections over every object torch created at import: the
    interpreter's last one took 0.4 s of each run here, 0.1 s frozen (benchmarks/RESULTS.md), and those during
    the search another 0.1 s of CPU time (frozen once the imports are done, as here).
    """
    gc.freeze()
    code = main()
    gc.freeze()
    sys.exit(code)


def _search_options(args: argparse.Namespace) -> SearchOptions:
    """The options that shape the plan, read from the command line once: the search and --dry-run take the
    same (results on disk, as compute_topk keeps them)."""
    return SearchOptions(
        force_cpu=args.cpu,
        max_memory=args.max_memory,
        batch_size=args.batch_size,
        chunk_size=args.chunk_size,
        metric=args.metric,
        exclude_self=args.exclude_self,
        precision=args.precision,
        results_on_disk=True,
    )


def _describe_plan(args: argparse.Namespace, options: SearchOptions) -> str:
    """The plan as text, without searching."""
    id_paths = {role: path for role, path in (("query", args.query_ids), ("doc", args.doc_ids)) if path is not None}
    prepared = prepare_search(args.queries, args.docs, args.k, options, id_paths, args.exclude_pairs)
    opened, plan = prepared.inputs, prepared.plan
    queries, docs, excluded = opened.queries, opened.docs, opened.excluded
    read = format_bytes(docs.nbytes * plan.doc_passes)
    pairs = []
    if excluded is not None:
        pairs = [f"excluded: {excluded.docs.size} pairs, at most {excluded.widest()} for one query"]
    return "\n".join(
        [
            *plan.describe(),
            *pairs,
            f"reads: queries {format_bytes(queries.nbytes)} once, docs {format_bytes(docs.nbytes)} "
            f"x {plan.doc_passes} pass(es) = {read}",
        ]
    )


def _run_reporting_errors(run) -> int:  # type: ignore[no-untyped-def]
    try:
        path = run()
    except TinyKnnError as exc:
        print(f"tiny-knn: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("tiny-knn: interrupted; no result was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except _Terminated:
        print("tiny-knn: terminated; no result was written", file=sys.stderr)
        return EXIT_TERMINATED
    except OSError as exc:
        if not is_disk_full(exc):
            return _unexpected(exc)
        print(f"tiny-knn: error: the disk is full ({exc.strerror}); free some space and run again", file=sys.stderr)
        return EXIT_BAD_INPUT  # the environment's fault, not a bug
    except Exception as exc:
        return _unexpected(exc)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, only rank 0 speaks for the job
        try:
            print(path, flush=True)
        except OSError as exc:  # stdout full or closed: the result is written all the same
            print(f"tiny-knn: error: the result was written to {path}, but its path could not be printed "
                  f"({exc.strerror or exc})", file=sys.stderr)  # fmt: skip
            return EXIT_BAD_INPUT
    return EXIT_OK


def _unexpected(exc: Exception) -> int:
    """One line for a failure that is tiny-knn's fault (or the traceback, with TINY_KNN_DEBUG set)."""
    if os.environ.get("TINY_KNN_DEBUG"):
        raise exc
    print(
        f"tiny-knn: unexpected failure: {type(exc).__name__}: {exc} "
        "(no result was written; set TINY_KNN_DEBUG=1 for a traceback)",
        file=sys.stderr,
    )
    return EXIT_FAILURE


def _show_notes(quiet: bool) -> None:
    """The library's notes (resuming, what an interrupted run kept) as 'tiny-knn: ...' lines on stderr."""
    logger = logging.getLogger("tiny_knn")
    if not any(isinstance(handler, _StderrHandler) for handler in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("tiny-knn: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.ERROR if quiet else logging.INFO)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to sys.stderr as it is at each note, not as it was when main() first ran in this process."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


@contextlib.contextmanager
def _stop_signals() -> Iterator[None]:
    """SIGTERM stops the run like Ctrl-C does (at once, keeping the checkpoint), exiting 143. Either stops it
    once: later SIGTERMs and SIGINTs (`timeout` signals the process and then its group; a second Ctrl-C) are
    ignored until the process exits, so that they neither interrupt the first one's unwinding (where a
    generator's cleanup could only print the exception) nor kill the process before it has said why it stopped."""
    stopped = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopped
        for other in caught:
            signal.signal(other, signal.SIG_IGN)
        stopped = True
        raise _Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()

    caught = [signal.SIGTERM]
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where SIGINT is ignored (nohup, &)
        caught.append(signal.SIGINT)
    try:
        previous = {signum: signal.signal(signum, stop) for signum in caught}
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        if not stopped:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # type: ignore[no-untyped-def]
    print(f"tiny-knn: warning: {message}", file=sys.stderr)
