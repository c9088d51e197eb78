"""The `qwen35` command: parses arguments and dispatches; the work lives in convert/ and runtime/."""

from __future__ import annotations

import sys

import click

from .convert import ConvertError


class _Group(click.Group):
    """Turns a user mistake (ConvertError) into one line on stderr and exit status 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ConvertError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=_Group)
@click.version_option(package_name="qwen35")
def main():
    """Qwen3.5 checkpoints to GGUF, and offline chat over llama.cpp."""


@main.command()
@click.argument("checkpoint_dir", type=click.Path(path_type=str))
@click.option("-q", "--type", "qtypes", multiple=True, default=["bf16"], show_default=True,
              help="Output type: f32, bf16, f16, q8_0. Repeat for several files from one read.")
@click.option("-o", "--output", type=click.Path(path_type=str),
              help="Output file (one type) or directory (several). Default: ./<model>-<TYPE>.gguf")
@click.option("--no-mtp", is_flag=True, help="Leave out the multi-token-prediction head.")
@click.option("--force", is_flag=True, help="Overwrite existing output files.")
def convert(checkpoint_dir, qtypes, output, no_mtp, force):
    """Convert a Hugging Face Qwen3.5 CHECKPOINT_DIR to GGUF."""
    from .convert import convert as run_convert
    from .convert.pipeline import terminal_progress

    for out in run_convert(checkpoint_dir, qtypes, output, mtp=not no_mtp, force=force, progress=terminal_progress()):
        click.echo(f"wrote {out.path} ({out.type_name.upper()}, {out.size / 1e6:,.1f} MB) in {out.seconds:.1f} s")


@main.command()
@click.argument("gguf_file", type=click.Path(path_type=str))
def info(gguf_file):
    """Describe a GGUF file: architecture, layers, tensors, tokenizer."""
    from .convert.info import describe

    click.echo(describe(gguf_file))


@main.command()
@click.option("--dir", "workdir", default="qwen35-demo", show_default=True, type=click.Path(path_type=str),
              help="Where the demo checkpoint and its GGUF go.")
def demo(workdir):
    """Build a tiny random-weight Qwen3.5 checkpoint (real vocabulary), convert it, describe the GGUF."""
    from pathlib import Path

    from .convert.demo import run_demo
    from .convert.info import describe
    from .convert.pipeline import terminal_progress

    ckpt, outputs = run_demo(Path(workdir), progress=terminal_progress())
    click.echo(f"demo checkpoint: {ckpt} (random weights, real Qwen3.5 structure and vocabulary)")
    for out in outputs:
        click.echo(f"wrote {out.path} ({out.type_name.upper()}, {out.size / 1e6:,.1f} MB) in {out.seconds:.1f} s\n")
        click.echo(describe(out.path))


if __name__ == "__main__":
    main()
