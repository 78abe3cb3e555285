"""The ``bnfold`` command: a thin layer over the library. Every command turns a
``BnfoldError`` into one line on stderr and exit code 2 (never a traceback)."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from bnfold.errors import BnfoldError

REPO_ROOT = Path(__file__).resolve().parent
DEFAULT_DATA = REPO_ROOT / "data" / "names.txt"
DEFAULT_MODELS = REPO_ROOT / "models"


def clear_errors(fn):
    """Report BnfoldError (and Ctrl-C) as a single line, with a non-zero exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BnfoldError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


def print_json(obj: dict) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True))


positive = click.IntRange(min=1)


def train_options(fn):
    """Options shared by ``train`` and ``train-fold``: one definition, two commands."""
    options = [
        click.option(
            "--data",
            type=click.Path(path_type=Path),
            default=DEFAULT_DATA,
            show_default=True,
            help="Words file, one word per line (UTF-8).",
        ),
        click.option(
            "--out",
            type=click.Path(path_type=Path),
            default=DEFAULT_MODELS,
            show_default=True,
            help="Output directory.",
        ),
        click.option(
            "--preset",
            type=click.Choice(["fast", "lecture"]),
            default="fast",
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
        click.option("--n-embd", type=positive, default=10, show_default=True),
        click.option("--n-hidden", type=positive, default=100, show_default=True),
        click.option(
            "--n-layers",
            type=positive,
            default=5,
            show_default=True,
            help="Hidden Linear-BN-Tanh blocks.",
        ),
        click.option(
            "--block-size",
            type=positive,
            default=3,
            show_default=True,
            help="Context length in characters.",
        ),
        click.option("--seed", type=click.IntRange(min=0), default=42, show_default=True),
        click.option("--json", "as_json", is_flag=True, help="Print a JSON summary."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bnfold")
def main() -> None:
    """Train a BatchNorm MLP, fold its BatchNorms, verify, export to ONNX, sample, serve."""


def run_training(
    data, out, preset, steps, batch_size, lr, n_embd, n_hidden, n_layers, block_size, seed, quiet
):
    """Train and save ``OUT/bn.pt``; returns (checkpoint path, summary dict)."""
    from bnfold.pipeline import train_to_checkpoint

    return train_to_checkpoint(
        data_path=data,
        out_dir=out,
        preset=preset,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        n_embd=n_embd,
        n_hidden=n_hidden,
        n_layers=n_layers,
        block_size=block_size,
        seed=seed,
        progress=None if not quiet else False,
    )


@main.command()
@train_options
@clear_errors
def train(
    data, out, preset, steps, batch_size, lr, n_embd, n_hidden, n_layers, block_size, seed, as_json
):
    """Train the BatchNorm MLP and write OUT/bn.pt."""
    path, summary = run_training(
        data,
        out,
        preset,
        steps,
        batch_size,
        lr,
        n_embd,
        n_hidden,
        n_layers,
        block_size,
        seed,
        quiet=as_json,
    )
    if as_json:
        print_json(summary)
    else:
        click.echo(format_train_summary(summary, path))


def format_train_summary(s: dict, path: Path) -> str:
    note = "  (interrupted: saved the last completed step)" if s["interrupted"] else ""
    return (
        f"trained {s['preset']} preset: {s['steps']} steps in {s['seconds']:.1f} s, "
        f"{s['params']:,} parameters{note}\n"
        f"loss (eval mode)  train {s['train_loss']:.4f}  dev {s['dev_loss']:.4f}  "
        f"test {s['test_loss']:.4f}\n"
        f"wrote {path}"
    )


if __name__ == "__main__":
    main()
