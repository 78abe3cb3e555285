"""The ``bnfold`` command: a thin layer over the library. Every command turns a
``BnfoldError`` into one line on stderr and exit code 2 (never a traceback)."""

from __future__ import annotations

import contextlib
import functools
import os
import shlex
import sys
import time
from pathlib import Path

import click

from bnfold.api import DEFAULT_MODELS
from bnfold.errors import BnfoldError, TrainingInterrupted
from bnfold.io import jsonsafe
from bnfold.mlp.config import DEFAULT_MODEL, DEFAULT_PRESET, PRESETS, TrainConfig
from bnfold.mlp.data import DEFAULT_WORDS
from bnfold.sampling.engine import DEFAULT_ENGINE, DEFAULT_TABLE_BYTES, ENGINES, MAX_TABLE_BYTES
from bnfold.sampling.options import BOUNDS, DEFAULT_BATCH, SampleOptions
from bnfold.serve.settings import LOG_LEVELS, ServeSettings
from bnfold.verify.domain import DEFAULT_MAX_EXHAUSTIVE, DEFAULT_SAMPLE_SIZE, MAX_SAMPLE_SIZE

SAMPLE = SampleOptions()  # the sampling defaults, stated once (in SampleOptions)
MAX_TABLE_MB = MAX_TABLE_BYTES >> 20  # sample --table-mb: the table engine's own bound

WORDS_DEFAULT_TEXT = "the packaged names.txt"


def echo_error(message: str, hint: str | None = None) -> None:
    """The one format of every user-facing error: ``error: ...`` (plus ``hint: ...``)."""
    click.echo(f"error: {message}", err=True)
    if hint:
        click.echo(f"hint: {hint}", err=True)


def clear_errors(fn):
    """Report BnfoldError (and Ctrl-C) as a single line (plus a hint), exit code 2; a
    command run with ``--json`` also prints ``{"error": ..., "hint": ...}`` on stdout."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BnfoldError as e:
            if kwargs.get("as_json"):
                print_json({"error": str(e), "hint": e.hint})
            echo_error(str(e), e.hint)
            sys.exit(2)
        except TrainingInterrupted as e:
            click.echo(str(e), err=True)
            sys.exit(130)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


def _show_one_line(e: click.UsageError, file=None) -> None:
    """A usage error as ``error: ...`` plus a hint, instead of click's 4-line block."""
    command = e.ctx.command_path if e.ctx is not None else "bnfold"
    echo_error(e.format_message(), hint=f"see '{command} --help'")


@contextlib.contextmanager
def _one_line_usage_errors():
    try:
        yield
    except click.UsageError as e:
        # `bnfold` alone shows the help (click's NoArgsIsHelpError), not an error
        if type(e).__name__ != "NoArgsIsHelpError":
            e.show = functools.partial(_show_one_line, e)  # click's main() calls e.show()
        raise


class BnfoldGroup(click.Group):
    """The ``bnfold`` group: every usage error (unknown command or option, bad value) is
    one ``error:`` line and a hint, exit code 2, like every other bad input."""

    def make_context(self, *args, **kwargs) -> click.Context:
        with _one_line_usage_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: click.Context):
        with _one_line_usage_errors():
            return super().invoke(ctx)


def command_line(ctx: click.Context) -> str:
    """The command as a user would retype it: ``bnfold NAME`` plus every option that was
    given explicitly (not left at its default), whatever ``sys.argv`` looks like."""
    words = ["bnfold", ctx.info_name or ""]
    for param in ctx.command.params:
        source = ctx.get_parameter_source(param.name)
        if source in (None, click.core.ParameterSource.DEFAULT) or param.name not in ctx.params:
            continue
        value, flag = ctx.params[param.name], param.opts[0]
        if getattr(param, "is_flag", False):
            words += [flag] if value else []
        else:
            words += [flag, str(value)]
    return shlex.join(words)


def shipped_model() -> Path:
    """The default MODEL of `sample` and `serve`: ./models/folded.onnx in the current folder
    (in a checkout of the repository, the shipped model)."""
    model = DEFAULT_MODELS / "folded.onnx"
    if not model.exists():
        raise BnfoldError(
            f"no MODEL given and {model} (the default: the shipped model in a checkout) is"
            " missing in the current folder",
            hint="pass a .onnx or .pt file, or make ./models with `bnfold train-fold`",
        )
    return model


def print_json(obj: dict) -> None:
    """Valid JSON on stdout: a NaN or infinite number (e.g. the log-probability of a name
    the model gives probability 0 at temperature 1) is written as null."""
    click.echo(jsonsafe.dumps(obj, indent=2, sort_keys=True))


def show(result, as_json: bool) -> None:
    """An API result as its command prints it: ``str(result)``, or with ``--json`` its
    ``to_dict()``."""
    if as_json:
        print_json(result.to_dict())
    else:
        click.echo(str(result))


positive = click.IntRange(min=1)


def words_options(help_text: str, default: Path | None, show_default: str | bool = True):
    """``--words FILE`` (the one name of the words file in every command) and its old name
    ``--data``, kept hidden for scripts written before (the command merges the two)."""

    def decorate(fn):
        fn = click.option("--data", "data_alias", type=click.Path(path_type=Path),
                          hidden=True, help="Deprecated name of --words.")(fn)  # fmt: skip
        return click.option(
            "--words",
            type=click.Path(path_type=Path),
            default=default,
            show_default=WORDS_DEFAULT_TEXT if show_default is True else show_default,
            help=help_text,
        )(fn)

    return decorate


def merge_words(words: Path | None, data_alias: Path | None) -> Path | None:
    """``--words``, or the deprecated ``--data`` when only that was given."""
    return words if data_alias is None else data_alias


def stacked(*options):
    """One decorator applying ``options`` in order (the first is the first in ``--help``)."""

    def decorate(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate


# the model's shape: each option's default is DEFAULT_MODEL's (bnfold.mlp.config, no torch)
SHAPE_HELP = {
    "n_embd": "Embedding dimensions per character.",
    "n_hidden": "Neurons per hidden layer.",
    "n_layers": "Hidden Linear-BN-Tanh blocks.",
    "block_size": "Context length in characters.",
}
shape_options = stacked(
    *(
        click.option(
            "--" + name.replace("_", "-"),
            type=positive,
            default=getattr(DEFAULT_MODEL, name),
            show_default=True,
            help=text,
        )
        for name, text in SHAPE_HELP.items()
    )
)

# Options shared by ``train`` and ``train-fold``: one definition, two commands.
train_options = stacked(
    words_options("Training words file, one word per line (UTF-8).", DEFAULT_WORDS),
    click.option(
        "--out",
        type=click.Path(path_type=Path),
        default=DEFAULT_MODELS,
        show_default="./models",
        help="Output directory (relative to the current folder).",
    ),
    click.option(
        "--preset",
        type=click.Choice(sorted(PRESETS)),
        default=DEFAULT_PRESET,
        show_default=True,
        help="Training recipe.",
    ),
    click.option("--steps", type=positive, help="Override the preset's step count."),
    click.option("--batch-size", type=positive, help="Override the preset's batch size."),
    click.option(
        "--lr",
        type=click.FloatRange(min=0, min_open=True),
        help="Override the preset's peak learning rate.",
    ),
    shape_options,
    click.option(
        "--seed",
        type=click.IntRange(min=0),
        default=TrainConfig().seed,
        show_default=True,
        help="Random seed (weights and batches): the same seed repeats the run.",
    ),
    click.option(
        "--threads",
        type=click.IntRange(min=0),
        help="torch threads for training; 0 = as many cores as are free (up to 2), the"
        " preset's default for `fast`. The number used is recorded in the checkpoint:"
        " pass it to repeat a run bit for bit.",
    ),
    click.option(
        "--report",
        type=click.Path(path_type=Path, file_okay=False),
        default=None,
        help="Record training diagnostics and write a report (figures, index.html,"
        " diagnostics.json) to this directory; read it back with `bnfold report DIR`.",
    ),
    click.option(
        "--calibrate",
        is_flag=True,
        help="After training, set every BatchNorm's running statistics to those of the"
        " whole training set (the lecture's calibration pass) and report how far they"
        " moved and the dev loss before and after.",
    ),
    click.option("--json", "as_json", is_flag=True, help="Print a JSON summary."),
)


@click.group(cls=BnfoldGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bnfold")
def main() -> None:
    """Train a BatchNorm MLP, fold its BatchNorms, verify, export to ONNX, sample, serve."""


def wall_seconds() -> float:
    """Seconds since this process started (interpreter start-up and imports included)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.monotonic() - _IMPORTED  # where /proc is missing: since cli was imported


_IMPORTED = time.monotonic()


def pipeline_train_args(options: dict) -> dict:
    """Map the shared training options to ``train_fold.train_to_checkpoint`` keywords."""
    options = dict(options)
    options["data_path"] = merge_words(options.pop("words"), options.pop("data_alias"))
    return options


@main.command()
@train_options
@clear_errors
def train(out, report, as_json, **train_args):
    """Train the BatchNorm MLP and write OUT/bn.pt."""
    from bnfold import api

    args = pipeline_train_args(train_args)
    run = api.train(
        args.pop("data_path"), out, report=report, progress=False if as_json else None, **args
    )
    wall = round(wall_seconds(), 2)
    if as_json:
        print_json({**run.to_dict(), "wall_seconds": wall})
    else:
        click.echo(str(run))
        click.echo(f"wall time {wall:.1f} s (process start to exit)")


@main.command()
@click.argument("report_dir", metavar="DIR", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the verdict's numbers as JSON.")
@clear_errors
def report(report_dir, as_json):
    """Print a short verdict on a training report written by `train --report DIR`:
    worst saturation, weights whose update:data ratio stays far from 1e-3, dead neurons."""
    from bnfold import api

    result = api.report(report_dir)
    show(result, as_json)


def _shapes(ctx, param, values) -> dict[str, tuple[int, ...]]:
    """``--shape x=1x3x224x224`` (repeatable) as ``{"x": (1, 3, 224, 224)}``."""
    from bnfold.verify.onnx import parse_shape

    try:
        return dict(parse_shape(v) for v in values)
    except BnfoldError as e:
        raise click.BadParameter(str(e).removeprefix("--shape "), ctx, param) from None


shape_option = click.option(
    "--shape",
    "shapes",
    multiple=True,
    callback=_shapes,
    metavar="NAME=D1xD2x...",
    help="ONNX only, repeatable: the shape of graph input NAME's random inputs, e.g."
    " x=1x3x224x224  [default: the declared shape, dynamic dims as a real input's: batch"
    " 2 and 3, images 224x224]",
)


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    help="Output directory (default: the checkpoint's folder).",
)
@click.option(
    "--tolerance",
    type=click.FloatRange(min=0),
    default=None,
    help="Explicit override: largest allowed absolute |logit difference| between ONNX"
    " Runtime and torch  [default: what float32 rounding explains, judged against the BN"
    " network in float64]",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
@clear_errors
def export(checkpoint, out, tolerance, as_json):
    """Export CHECKPOINT (bn.pt) to OUT/bn.onnx (with its BatchNorm nodes) and
    OUT/folded.onnx (BNs folded), after checking both in ONNX Runtime against torch on every
    possible context."""
    from bnfold import api

    result = api.export(checkpoint, out=out, tolerance=tolerance)
    show(result, as_json)


@main.command()
@click.option(
    "--models",
    type=click.Path(path_type=Path),
    default=DEFAULT_MODELS,
    show_default="./models",
    help="Directory with bn.pt (and folded.pt, bn.onnx, folded.onnx; made if missing).",
)
@click.option(
    "--repeats",
    type=positive,
    default=20_000,
    show_default=True,
    help="Single-example calls timed per network.",
)
@click.option(
    "--names",
    "n_names",
    type=positive,
    default=20_000,
    show_default=True,
    help="Names drawn for the batched names/s figure.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@clear_errors
def bench(models, repeats, n_names, as_json):
    """Benchmark torch BN, torch folded, ONNX BN and ONNX folded on one thread: p50/p99
    single-example latency, rows/s at batch 1024, names/s, and the ratios between them."""
    from bnfold.pipeline.bench import format_bench, run_bench

    result = run_bench(models, repeats=repeats, n_names=n_names, progress=not as_json)
    if as_json:
        print_json(result)
    else:
        click.echo(format_bench(result))


# --- fold / verify / train-fold ---------------------------------------------------------


# Verification options shared by ``fold``, ``verify`` and ``train-fold``.
verify_options = stacked(
    click.option(
        "--tolerance",
        type=click.FloatRange(min=0),
        help="Explicit override: largest allowed absolute logit difference  [default:"
        " what float32 rounding explains: judged against a float64 evaluation of the"
        " BN network (or, for two folded files, of the reference's own parameters),"
        " plus the parameter test; a bound from the logits' magnitude only when no"
        " float64 evaluation exists]",
    ),
    click.option(
        "--max-exhaustive",
        type=positive,
        default=DEFAULT_MAX_EXHAUSTIVE,
        show_default=True,
        help="Check every context when vocab^block_size is at most this; otherwise a"
        " seeded random sample plus every dev/test context.",
    ),
)


# `fold` and `verify`: the training words, whose dev/test contexts join a sampled check
contexts_words_option = words_options(
    "Training words file: its dev/test contexts join the check when the domain is"
    " sampled (unused when every context is checked).",
    DEFAULT_WORDS,
)


inputs_option = click.option(
    "--inputs",
    type=click.Path(path_type=Path),
    default=None,
    help="ONNX only: .npz with one array per graph input to verify on  [default: the"
    " whole domain of a bnfold model, else seeded random inputs from the declared shapes]",
)


@main.command()
@click.argument("checkpoint", metavar="MODEL", type=click.Path(path_type=Path))
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Folded file to write  [default: folded.pt next to a checkpoint; for MODEL.onnx,"
    " MODEL.folded.onnx]",
)
@verify_options
@contexts_words_option
@inputs_option
@shape_option
@click.option("--json", "as_json", is_flag=True, help="Print the fold and verification as JSON.")
@clear_errors
def fold(checkpoint, out, tolerance, max_exhaustive, words, data_alias, inputs, shapes, as_json):
    """Fold every BatchNorm of MODEL (a bnfold .pt checkpoint, or any .onnx model) into its
    neighbouring layers, verify, write the result.

    Exit code 1 (and nothing written) when verification fails; 2 for a bad input,
    including an ONNX file with no BatchNormalization node (nothing to fold). A torch
    module, a state_dict or a TorchScript file is refused with the routes that work (the
    Python API, or an ONNX export that keeps the BatchNorms)."""
    from bnfold import api

    result = api.fold(
        checkpoint,
        out,
        inputs=inputs,
        shapes=shapes,
        tolerance=tolerance,
        max_exhaustive=max_exhaustive,
        words=merge_words(words, data_alias),
        progress=False if as_json else None,  # None: stage lines on a terminal
    )
    show(result, as_json)
    if not result.passed:
        sys.exit(1)


@main.command("verify")
@click.argument("reference", type=click.Path(path_type=Path))
@click.argument("candidate", type=click.Path(path_type=Path))
@verify_options
@click.option(
    "--float64-reference",
    type=click.Path(path_type=Path),
    default=None,
    help="BatchNorm checkpoint evaluated in float64 as ground truth  [default: a side that"
    " is a BN .pt, else the source a folded .pt records, else a side that is a bn.onnx"
    " (run in double by ONNX Runtime), else the reference's own parameters in double]",
)
@click.option(
    "--sample-size",
    type=click.IntRange(min=1, max=MAX_SAMPLE_SIZE),
    default=DEFAULT_SAMPLE_SIZE,
    show_default=True,
    help="Random contexts checked when the domain is too large to check them all.",
)
@click.option(
    "--seed",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Seed of the random contexts or inputs (when not every input is checked).",
)
@contexts_words_option
@inputs_option
@shape_option
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@clear_errors
def verify_command(
    reference,
    candidate,
    tolerance,
    max_exhaustive,
    float64_reference,
    sample_size,
    seed,
    words,
    data_alias,
    inputs,
    shapes,
    as_json,
):
    """Prove CANDIDATE computes the same logits as REFERENCE (.pt or .onnx) over every
    context (or a large sample); for two ONNX models that are not both bnfold's, the same
    outputs on the same inputs. Exit code 1 when it does not."""
    from bnfold import api

    result = api.verify(
        reference,
        candidate,
        inputs=inputs,
        shapes=shapes,
        tolerance=tolerance,
        max_exhaustive=max_exhaustive,
        sample_size=sample_size,
        seed=seed,
        float64_reference=float64_reference,
        words=merge_words(words, data_alias),
        progress=not as_json,
    )
    show(result, as_json)
    if not result.passed:
        sys.exit(1)


@main.command("train-fold")
@train_options
@verify_options
@clear_errors
def train_fold(as_json, tolerance, max_exhaustive, **train_args):
    """The main job: train the BN MLP, fold every BatchNorm, verify over the whole input
    domain, export both networks to ONNX and write a model card (OUT/README.md); ends with
    one summary table. Exit code 1 when verification fails."""
    from bnfold.pipeline.train_fold import run_main_job

    out = train_args.pop("out")
    report = train_args.pop("report") or Path(out) / "report"
    result = run_main_job(
        out,
        tolerance=tolerance,
        max_exhaustive=max_exhaustive,
        command=command_line(click.get_current_context()),
        report_dir=report,
        progress=False if as_json else None,
        **pipeline_train_args(train_args),
    )
    wall = round(wall_seconds(), 2)
    if as_json:
        print_json({**result.to_dict(), "wall_seconds": wall})
    else:
        click.echo(result.format())
        click.echo(f"\nwall time {wall:.1f} s (process start to exit)")
    if not result.passed:
        sys.exit(1)


# --- sample -----------------------------------------------------------------------------

# `sample` and `serve` label names against the model's training words
words_option = words_options(
    "The model's training words file, for the train/dev/test/new labels  [default: the"
    " packaged names.txt when the model was trained on it; otherwise `sample` prints no"
    " labels]",
    None,
    show_default=False,
)

# `sample` and `serve` draw names through the same engines
engine_option = click.option(
    "--engine",
    type=click.Choice(ENGINES),
    default=DEFAULT_ENGINE,
    show_default=True,
    help="table: each context's next-token row computed once and kept; network: the model"
    " every step (the reference). Same names either way.",
)


def sample_option(*flags: str, help: str, number: type = int):
    """A sampling option, its flag last in ``flags``: its default is SampleOptions', its
    range (of ``number``s) the sampler's BOUNDS, each stated once there."""
    name = flags[-1].removeprefix("--").replace("-", "_")
    default, b = getattr(SAMPLE, name), BOUNDS[name]
    if number is float:
        kind = click.FloatRange(b.lo, b.hi, min_open=b.lo_open)
    else:
        kind = click.IntRange(b.lo, b.hi)
    return click.option(
        *flags, type=kind, default=default, show_default=default is not None, help=help
    )


@main.command()
@click.argument("model", required=False, type=click.Path(path_type=Path))
@sample_option("-n", "--count", help="Names to sample.")
@sample_option("--seed", help="Random seed.")
@sample_option("--temperature", number=float, help="0 = greedy (argmax).")
@sample_option("--top-k", help="Sample only among the K most likely tokens.")
@sample_option("--top-p", number=float, help="Nucleus sampling: the smallest set of mass >= P.")
@click.option("--prefix", default="", help="Start every name with these characters.")
@sample_option("--min-length", help="Characters, prefix included.")
@sample_option("--max-length", help="Characters, prefix included.")
@click.option("--new-only", is_flag=True, help="Only names in none of train / dev / test.")
@words_option
@click.option("-v", "--verbose", is_flag=True, help="Columns: name, label, log-probability.")
@click.option(
    "--batch-size",
    type=positive,
    default=DEFAULT_BATCH,
    show_default=True,
    help="Names in flight per step (speed only: never changes the names).",
)
@engine_option
@click.option(
    "--table-mb",
    type=positive,
    default=DEFAULT_TABLE_BYTES >> 20,
    show_default=True,
    help=f"Memory cap of the table engine's stored rows, in MiB, at most {MAX_TABLE_MB}"
    " (past it, rows are evicted).",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="One JSON document (model, options, then the names streamed one per line).",
)
@clear_errors
def sample(model, words, data_alias, verbose, batch_size, engine, table_mb, as_json, **options):
    """Sample names from MODEL (.onnx or .pt; default: ./models/folded.onnx).

    The same model, seed and options give the same names whatever --batch-size and
    --engine. The log-probability is the model's, at temperature 1, of the whole name and
    its end token. Names are written as they are sampled (memory stays bounded).
    """
    from bnfold.api import choose_labeler, words_header
    from bnfold.runtime.infer import load_predictor
    from bnfold.sampling.sample import SampleOptions, iter_names, write_json, write_text

    model = model or shipped_model()
    words = merge_words(words, data_alias)
    predictor = load_predictor(model)
    opts = SampleOptions(**options).check(predictor.vocab)
    if table_mb > MAX_TABLE_MB:  # refused before a byte is allocated, not by a MemoryError
        raise BnfoldError(f"table-mb must be at most {MAX_TABLE_MB:,} MiB, got {table_mb:,}")
    labeler, note = None, ""
    if verbose or as_json or opts.new_only:
        labeler, note = choose_labeler(predictor, words)
        if note:
            click.echo(f"note: {note}", err=True)
    names = iter_names(
        predictor,
        opts,
        labeler,
        engine=engine,
        batch_size=batch_size,
        table_bytes=table_mb << 20,
    )
    out = sys.stdout
    try:
        if as_json:
            header = {
                "model": str(model),
                "model_sha256": predictor.sha256,
                "backend": predictor.backend,
                "engine": engine,
                "seed": opts.seed,
                "options": opts.to_dict(),
                "words": words_header(labeler, note),
            }
            write_json(out, header, names)
        else:
            write_text(out, names, verbose)
        out.flush()
    except BrokenPipeError:  # the reader stopped (`| head`): stop quietly, as SIGPIPE would
        _discard_stdout()
        sys.exit(141)
    except OSError as e:  # a full disk: say so, and drop the unwritten rest
        _discard_stdout()
        raise BnfoldError(f"cannot write the names to standard output: {e.strerror or e}") from None


def _discard_stdout() -> None:
    """Point file descriptor 1 at /dev/null, so the interpreter's final flush of what could
    not be written succeeds quietly instead of printing a second error."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # no real fd (e.g. under a test runner)
        pass


# --- serve ------------------------------------------------------------------------------


def setting_option(flag: str, help: str, type: click.ParamType = positive):
    """A limit of `serve`: its default is the ServeSettings field of the flag's name."""
    default = getattr(ServeSettings, flag.removeprefix("--").replace("-", "_"))
    return click.option(flag, type=type, default=default, show_default=True, help=help)


@main.command()
@click.argument("model", required=False, type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8000,
    show_default=True,
    help="TCP port to listen on (0: any free port).",
)
@click.option(
    "--workers",
    type=positive,
    default=1,
    show_default=True,
    help="Worker processes; each loads its own ONNX Runtime session (one thread).",
)
@words_option
@setting_option("--max-count", help="Names per request cap.")
@setting_option(
    "--queue-size",
    help="Requests admitted at once per worker (waiting or running); beyond: 429.",
)
@setting_option(
    "--deadline",
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds a request may take before it is answered 504.",
)
@setting_option("--max-body", help="Request body bytes.")
@click.option(
    "--batching",
    type=click.Choice(["on", "off"]),
    default="on",
    show_default=True,
    help="on: run every request's rows in one forward step; off: one request at a time.",
)
@setting_option("--max-rows", help="Rows per forward step.")
@engine_option
@setting_option(
    "--memory-mb",
    help="Memory of all sampling engines together, per worker (see README, Reliability).",
)
@click.option(
    "--log-level",
    type=click.Choice(LOG_LEVELS),
    default="info",
    show_default=True,
    help="uvicorn's log level.",
)
@click.option(
    "--access-log",
    is_flag=True,
    default=ServeSettings.access_log,
    help="Log one line per request (client, request line, status) on stdout, whatever"
    " --log-level is.",
)
@click.option(
    "--allowed-hosts",
    metavar="NAMES",
    help="Host header names answered, comma-separated (* = any, *.example.com = a domain);"
    " others get 400. Default: the --host address (loopback: also localhost, 127.0.0.1,"
    " [::1]; 0.0.0.0 or ::: this machine's names and addresses).",
)
@clear_errors
def serve(model, host, port, workers, words, data_alias, max_count, queue_size, deadline,
          max_body, batching, max_rows, engine, memory_mb, log_level, access_log,
          allowed_hosts):  # fmt: skip
    """Serve names over HTTP from MODEL (default: ./models/folded.onnx).

    \b
    /              a web page: every sampling option, the names
    /v1/names      GET (query string) or POST (JSON body): sample names
    /v1/model      the loaded model: vocabulary, sizes, verification
    /docs          the API's interactive docs (Swagger UI, works offline)
    /openapi.json  the API's OpenAPI schema
    /metrics       Prometheus metrics
    /livez         200 while the process is alive
    /readyz        200 once the model is loaded and warmed up
    """
    from bnfold.serve import check_port, load_model, run_server
    from bnfold.serve.settings import default_allowed_hosts, parse_allowed_hosts

    model = model or shipped_model()
    words = merge_words(words, data_alias) or DEFAULT_WORDS
    if allowed_hosts is None:
        hosts = default_allowed_hosts(host)
    else:
        hosts = parse_allowed_hosts(allowed_hosts)
    settings = ServeSettings(
        model=str(Path(model).resolve()),
        words=str(Path(words).resolve()),
        max_count=max_count,
        queue_size=queue_size,
        deadline=deadline,
        max_body=max_body,
        batching=batching == "on",
        max_rows=max_rows,
        engine=engine,
        memory_mb=memory_mb,
        table_mb=min(ServeSettings.table_mb, memory_mb),
        access_log=access_log,
        allowed_hosts=hosts,
    ).check()
    check_port(host, port)  # one clear line, before the model is loaded
    load_model(settings)  # fail here, with one clear line, rather than in every worker
    click.echo(
        f"serving {model} on http://{host}:{port}/ ({workers} worker(s); Host: {', '.join(hosts)})",
        err=True,
    )
    run_server(settings, host=host, port=port, workers=workers, log_level=log_level)


if __name__ == "__main__":
    main()
