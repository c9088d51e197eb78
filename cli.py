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
              help="Type or profile (f32, bf16, q8_0, q4_k_m, q4_k_m-hybrid, edge-arm, … or a .toml path). "
                   "Repeat for several files from one read; `qwen35 profiles` lists them.")
@click.option("-o", "--output", type=click.Path(path_type=str),
              help="Output file (one type) or directory (several). Default: ./<model>-<TYPE>.gguf")
@click.option("--imatrix", type=click.Path(path_type=str), help="Importance matrix (llama.cpp's imatrix GGUF).")
@click.option("--threads", type=int, help="Quantization threads. Default: physical cores.")
@click.option("--dry-run", is_flag=True, help="Print the per-tensor plan and file sizes; write nothing.")
@click.option("--no-mtp", is_flag=True, help="Leave out the multi-token-prediction head.")
@click.option("--force", is_flag=True, help="Overwrite existing output files.")
def convert(checkpoint_dir, qtypes, output, imatrix, threads, dry_run, no_mtp, force):
    """Convert a Hugging Face Qwen3.5 CHECKPOINT_DIR to GGUF."""
    from .convert.pipeline import Conversion, terminal_progress

    conversion = Conversion(checkpoint_dir, qtypes, output, mtp=not no_mtp, force=force, imatrix=imatrix,
                            dry_run=dry_run)
    if dry_run:
        click.echo(conversion.describe_plan())
        return
    for out in conversion.run(threads, terminal_progress()):
        click.echo(f"wrote {out.path} ({out.type_name}, {out.size / 1e6:,.1f} MB) in {out.seconds:.1f} s")


@main.command("profiles")
def list_profiles():
    """List the quantization profiles that ship with qwen35."""
    from .convert import profiles

    for name in profiles.available():
        click.echo(f"{name:<16} {profiles.load(name).description}")


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
        click.echo(f"wrote {out.path} ({out.type_name}, {out.size / 1e6:,.1f} MB) in {out.seconds:.1f} s\n")
        click.echo(describe(out.path))


if __name__ == "__main__":
    main()
