"""The `qwen35` command: parses arguments and dispatches; the work lives in convert/, runtime/ and demo/."""

from __future__ import annotations

import sys

import click

from .convert import ConvertError
from .models import ModelError
from .runtime import ChatError


class _Group(click.Group):
    """Turns a user mistake (ConvertError, ChatError) into one line on stderr and a non-zero exit status."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (ConvertError, ModelError) as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except ChatError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=_Group)
@click.version_option(package_name="qwen35")
def main():
    """Qwen3.5 checkpoints to GGUF, and offline chat over llama.cpp."""


def _speculative_options(fn):
    """--mtp/--no-mtp, --speculative MODE and --draft N: speculative decoding with the model's own MTP head."""
    fn = click.option("--draft", "draft_tokens", type=click.IntRange(1, 8), default=3, show_default=True,
                      help="Tokens the MTP head drafts per step.")(fn)
    fn = click.option("--draft-vocab", type=click.IntRange(min=0), default=32768, show_default=True,
                      help="Drafts choose among this many most frequent tokens (a fraction of the cost of the "
                           "whole vocabulary; the model still checks every token against all of it). "
                           "0: the whole vocabulary.")(fn)
    fn = click.option("--speculative", type=click.Choice(["auto", "mtp", "off"]), default=None,
                      help="auto (the default): draft with the model's MTP head only where it measures faster "
                           "than plain decoding (timing its own steps, remembered for the next load; where drafting "
                           "does not pay it decodes plainly); mtp: always (= --mtp); off: never (= --no-mtp).")(fn)
    return click.option("--mtp/--no-mtp", "mtp", default=None,
                        help="Always draft with the model's MTP head, or never (default: --speculative auto).")(fn)


def _speculative(mtp: bool | None, speculative: str | None, default: str | None = "auto") -> str | None:
    chosen = {"mtp" if mtp else "off"} if mtp is not None else set()
    if speculative is not None:
        chosen.add(speculative)
    if len(chosen) > 1:
        raise click.UsageError(f"--{'mtp' if mtp else 'no-mtp'} and --speculative {speculative} disagree: give one")
    return chosen.pop() if chosen else default


def _yes_option(fn):
    return click.option("-y", "--yes", is_flag=True,
                        help="Pull a model name missing from the store without asking.")(fn)


def _on_terminal() -> bool:
    return sys.stdin.isatty() and sys.stderr.isatty()


def _model_path(model: str, n_ctx: int, yes: bool, cache_ram: int | None = None) -> tuple[str, str | None]:
    """A GGUF path for MODEL (a path, or a name from the store, pulled first if missing) and its mmproj;
    a profile fitted to a chat at `n_ctx` with `cache_ram` bytes of checkpoints (default: run's)."""
    from .models.store import resolve

    confirm = (lambda question: click.confirm(question, default=True, err=True)) if _on_terminal() else None
    path, mmproj = resolve(model, n_ctx=n_ctx, assume_yes=yes, confirm=confirm, cache_ram=cache_ram)
    return path, str(mmproj) if mmproj else None


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
@click.option("--mmproj-type", type=click.Choice(["f32", "f16", "bf16", "q8_0"]), default="f16", show_default=True,
              help="Type of the vision tower's file, <model>-mmproj-<TYPE>.gguf, written beside the model.")
@click.option("--no-mmproj", is_flag=True, help="Leave out the vision tower (no mmproj file).")
@click.option("--force", is_flag=True, help="Overwrite existing output files.")
def convert(checkpoint_dir, qtypes, output, imatrix, threads, dry_run, no_mtp, mmproj_type, no_mmproj, force):
    """Convert a Hugging Face Qwen3.5 CHECKPOINT_DIR to GGUF (and its vision tower to an mmproj GGUF).
    CHECKPOINT_DIR may be a repo id (Qwen/Qwen3.5-4B[@rev][:profile]) or a name (qwen3.5:4b): it is
    downloaded into the Hugging Face cache first, unless it is there already."""
    from pathlib import Path

    from .convert.pipeline import Conversion, terminal_progress
    from .models.names import parse

    name = None if Path(checkpoint_dir).exists() else parse(checkpoint_dir)
    if name is not None:
        from .models.store import checkpoint

        if name.tag and click.get_current_context().get_parameter_source("qtypes") != \
                click.core.ParameterSource.COMMANDLINE:
            qtypes = [name.tag]  # the name's profile, unless -q says otherwise
        checkpoint_dir = str(checkpoint(name, list(qtypes), output))
    conversion = Conversion(checkpoint_dir, qtypes, output, mtp=not no_mtp, force=force, imatrix=imatrix,
                            dry_run=dry_run, mmproj=None if no_mmproj else mmproj_type,
                            name=name.label if name else None)
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
@_yes_option
def info(gguf_file, yes):
    """Describe a GGUF file (or a model name's, from the store): architecture, layers, tensors, tokenizer."""
    from .convert.info import describe

    path, _ = _model_path(gguf_file, 4096, yes)
    click.echo(describe(path))


@main.command()
@click.option("--dir", "workdir", default="qwen35-demo", show_default=True, type=click.Path(path_type=str),
              help="Where the demo checkpoint and its GGUF go.")
def demo(workdir):
    """Convert the tiny trained demo model (shipped in the package) and talk with it: facts, tools, images."""
    from pathlib import Path

    from .convert.info import describe
    from .convert.pipeline import terminal_progress
    from .demo.walkthrough import build, converse, heldout_accuracy

    ckpt, outputs = build(Path(workdir), progress=terminal_progress())
    click.echo(f"demo checkpoint: {ckpt} (qwen35-demo: Qwen3.5's structure and vocabulary, trained on a tiny world)")
    for out in outputs:
        click.echo(f"wrote {out.path} ({out.type_name}, {out.size / 1e6:,.1f} MB) in {out.seconds:.1f} s")
    gguf = outputs[0].path
    click.echo("\n" + describe(gguf))
    click.echo(f"\n$ qwen35 run {gguf}   # greedy, thinking off; the tools are the demo's own")
    converse(gguf, click.echo)
    click.echo(f"\nA toy: it knows only its small world (50 capitals, three tools, coloured shapes). On questions\n"
               f"it was not trained on {heldout_accuracy()}\n(demo/training/README.md). Go on with:\n"
               f"  qwen35 run {gguf}        # chat here (/image PATH to show a picture)\n"
               f"  qwen35 serve {gguf}      # the chat page and the OpenAI-compatible API on 127.0.0.1:8080")


@main.command()
@click.argument("model", type=click.Path(path_type=str))
@click.option("-p", "--prompt", help="Answer this prompt and exit (text piped on stdin works too).")
@click.option("--json", "as_json", is_flag=True, help="One-shot answer as JSON: reasoning, content, tool_calls, stats.")
@click.option("--think/--no-think", default=None, help="Reason before answering. Default: the model template's.")
@click.option("--hide-thinking", is_flag=True, help="Do not show the reasoning.")
@click.option("--system", help="System prompt.")
@click.option("--temp", type=click.FloatRange(min=0),
              help="Sampling temperature (0: greedy). Default: the GGUF's recommendation.")
@click.option("--top-k", type=click.IntRange(min=0), help="Top-k sampling. Default: the GGUF's recommendation.")
@click.option("--top-p", type=click.FloatRange(0, 1), help="Top-p sampling. Default: the GGUF's recommendation.")
@click.option("--min-p", type=click.FloatRange(0, 1), help="Min-p sampling. Default: the GGUF's recommendation.")
@click.option("--repeat-penalty", type=click.FloatRange(min=0, min_open=True), help="Repetition penalty (1: off).")
@click.option("--presence-penalty", type=float, help="Presence penalty (0: off).")
@click.option("--seed", type=int, help="Sampling seed. Default: random.")
@click.option("--max-tokens", type=click.IntRange(min=1), help="Longest reply, reasoning included. Default: no limit.")
@click.option("-c", "--ctx-size", type=click.IntRange(min=64), default=4096, show_default=True, help="Context tokens.")
@click.option("-t", "--threads", type=click.IntRange(min=1), help="CPU threads. Default: performance cores (the fast kind, on a CPU that mixes core types).")
@click.option("--force", is_flag=True, help="Load even if the memory estimate says it will not fit.")
@click.option("--adapt-threads/--fixed-threads", default=True, show_default=True,
              help="Run on fewer threads while other programs keep cores busy, back up when they leave.")
@click.option("--resume", is_flag=True, help="Take up the last conversation with this model (kept on disk as it goes).")
@click.option("--image", "images", multiple=True, type=click.Path(path_type=str),
              help="Show the model this image (JPEG, PNG, WebP, BMP, GIF) with the prompt (the first message, "
                   "interactive). Repeatable.")
@click.option("--video", type=click.Path(path_type=str),
              help="Show the model this video with the prompt: a video file (needs ffmpeg) or a directory of its "
                   "frames sampled at 2 a second.")
@click.option("--mmproj", type=click.Path(path_type=str),
              help="The vision tower's GGUF. Default: <name>-mmproj-<TYPE>.gguf beside MODEL, as `qwen35 convert` "
                   "writes it.")
@click.option("--image-max-tokens", type=click.IntRange(min=8),
              help="Most tokens an image becomes (larger ones are scaled down): detail against time on a CPU. "
                   "Default: 1024.")
@_speculative_options
@_yes_option
@click.option("--verbose", is_flag=True, help="Show llama.cpp's log, its CPU features and where the weights went.")
def run(model, prompt, as_json, think, hide_thinking, system, temp, top_k, top_p, min_p, repeat_penalty,
        presence_penalty, seed, max_tokens, ctx_size, threads, force, adapt_threads, resume, images, video, mmproj,
        image_max_tokens, mtp, speculative, draft_tokens, draft_vocab, yes, verbose):
    """Chat with MODEL: interactive on a terminal, one answer with -p or stdin. MODEL is a GGUF file or a
    model name: qwen3.5:4b, a Hugging Face repo (Qwen/Qwen3.5-4B[@rev][:profile]) or a repo of GGUF files
    (owner/repo-GGUF:Q4_K_M); a name missing from the model store is pulled first (`qwen35 pull`)."""
    from .runtime.frontends.run import run as run_chat

    model, found_mmproj = _model_path(model, ctx_size, yes)
    mmproj = mmproj or found_mmproj
    options = dict(n_ctx=ctx_size, threads=threads, think=think, seed=seed, system=system, force=force,
                   adapt_threads=adapt_threads,
                   verbose=verbose, temp=temp, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty,
                   presence_penalty=presence_penalty, max_tokens=max_tokens, mmproj=mmproj,
                   speculative=_speculative(mtp, speculative), draft_tokens=draft_tokens, draft_vocab=draft_vocab)
    if image_max_tokens is not None:
        options["image_max_tokens"] = image_max_tokens
    sys.exit(run_chat(model, prompt=prompt, as_json=as_json, hide_thinking=hide_thinking, session_options=options,
                      resume=resume, images=list(images), video=video))


def _thread_counts(value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        counts = [int(part) for part in value.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise click.BadParameter(f"{value!r} is not a thread count or a comma-separated list of them (1,2,4)")
    return counts


@main.command()
@click.argument("model", type=click.Path(path_type=str))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Beyond this machine only with --api-key.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="Port (0: any free one).")
@click.option("--api-key", envvar="QWEN35_API_KEY", help="Require this bearer key (or set QWEN35_API_KEY).")
@click.option("-c", "--ctx-size", type=click.IntRange(min=64), default=8192, show_default=True, help="Context tokens.")
@click.option("--cache-ram", type=click.IntRange(min=0), default=2048, show_default=True,
              help="MiB of model-state checkpoints kept for returning conversations.")
@click.option("--queue", "queue_size", type=click.IntRange(min=1), default=16, show_default=True,
              help="Requests that may wait for the model; more are answered 429.")
@click.option("-t", "--threads", type=click.IntRange(min=1), help="CPU threads. Default: performance cores (the fast kind, on a CPU that mixes core types).")
@click.option("--adapt-threads/--fixed-threads", default=True, show_default=True,
              help="Run on fewer threads while other programs keep cores busy, back up when they leave.")
@click.option("--force", is_flag=True, help="Load even if the memory estimate says it will not fit.")
@click.option("--mmproj", type=click.Path(path_type=str),
              help="The vision tower's GGUF, for image_url parts. Default: <name>-mmproj-<TYPE>.gguf beside MODEL.")
@click.option("--image-max-tokens", type=click.IntRange(min=8), help="Most tokens an image becomes. Default: 1024.")
@click.option("--no-ui", is_flag=True, help="Serve the API alone: no chat page at /, no conversations API.")
@_speculative_options
@_yes_option
@click.option("--verbose", is_flag=True, help="Show llama.cpp's log.")
def serve(model, host, port, api_key, ctx_size, cache_ram, queue_size, threads, adapt_threads, force, mmproj,
          image_max_tokens, no_ui, mtp, speculative, draft_tokens, draft_vocab, yes, verbose):
    """Serve MODEL (a GGUF file or a model name, as `qwen35 run` takes it) over an OpenAI-compatible HTTP
    API, with a chat page at / (needs `pip install 'qwen35[serve]'`)."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise ChatError("qwen35 serve needs starlette and uvicorn: pip install 'qwen35[serve]'") from None
    from .runtime.frontends.server import serve as run_server

    model, found_mmproj = _model_path(model, ctx_size, yes, cache_ram << 20)
    mmproj = mmproj or found_mmproj
    options = dict(n_ctx=ctx_size, threads=threads, adapt_threads=adapt_threads, cache_ram=cache_ram << 20,
                   force=force, verbose=verbose, mmproj=mmproj, speculative=_speculative(mtp, speculative),
                   draft_tokens=draft_tokens, draft_vocab=draft_vocab)
    if image_max_tokens is not None:
        options["image_max_tokens"] = image_max_tokens
    run_server(model, host=host, port=port, api_key=api_key, session_options=options, queue_size=queue_size,
               ui=not no_ui)


@main.command()
@click.argument("model", type=click.Path(path_type=str))
@click.option("-p", "--n-prompt", type=click.IntRange(min=1), default=512, show_default=True,
              help="Prompt tokens (pp).")
@click.option("-n", "--n-gen", type=click.IntRange(min=2), default=128, show_default=True,
              help="Generated tokens (tg).")
@click.option("-r", "--repetitions", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("-t", "--threads", callback=lambda ctx, param, value: _thread_counts(value),
              help="CPU threads, or a comma-separated sweep (1,2,4) that says which was fastest. "
                   "Default: performance cores.")
@click.option("--json", "as_json", is_flag=True, help="JSON instead of a markdown table.")
@click.option("--force", is_flag=True, help="Load even if the memory estimate says it will not fit.")
@_speculative_options
@_yes_option
def bench(model, n_prompt, n_gen, repetitions, threads, as_json, force, mtp, speculative, draft_tokens, draft_vocab,
          yes):
    """Prompt-processing and generation speed of the chat runtime on MODEL (a GGUF file or a model name),
    and its peak memory; with an MTP head (unless --no-mtp), generation with and without speculative
    decoding, and its acceptance."""
    from .runtime.frontends.bench import bench as run_bench, format_json, format_markdown

    model, _ = _model_path(model, 4096, yes)
    # (Neither flag: runtime.bench measures both ways when the GGUF has an MTP head.)
    result = run_bench(model, n_prompt=n_prompt, n_gen=n_gen, repetitions=repetitions, threads=threads, force=force,
                       speculative=_speculative(mtp, speculative, default=None), draft_tokens=draft_tokens,
                       draft_vocab=draft_vocab)
    click.echo(format_json(result) if as_json else format_markdown(result))


@main.command()
@click.argument("name")
@click.option("-c", "--ctx-size", type=click.IntRange(min=64), default=4096, show_default=True,
              help="The context to fit the profile to (without :profile in NAME).")
def pull(name, ctx_size):
    """Download NAME (qwen3.5:4b, Qwen/Qwen3.5-4B[@rev][:profile], owner/repo-GGUF:Q4_K_M) and convert it
    into the model store, at the best profile that fits this machine unless NAME gives one."""
    from .models.names import parse
    from .models.store import pull as pull_model

    parsed = parse(name)
    if parsed is None:
        raise click.UsageError(f"{name!r} is not a model name (qwen3.5:4b, owner/repo[@rev][:profile])")
    pull_model(parsed, n_ctx=ctx_size)


@main.command("list")
@click.option("-c", "--ctx-size", type=click.IntRange(min=64), default=4096, show_default=True,
              help="The context the memory column is for.")
def list_models(ctx_size):
    """The models in the store: name, profile, size, context, vision, MTP, and the memory each needs for a
    chat at the default context on this machine."""
    from .models.listing import table

    click.echo(table(ctx_size))


@main.command()
@click.argument("name")
def rm(name):
    """Remove NAME from the model store (every stored profile of it, or only NAME's :profile)."""
    from .models.names import parse
    from .models.store import remove

    parsed = parse(name)
    if parsed is None:
        raise click.UsageError(f"{name!r} is not a model name (qwen3.5:4b, owner/repo[:profile])")
    gone = remove(parsed)
    if not gone:
        raise ModelError(f"{name} is not in the model store (`qwen35 list` shows what is)")
    for entry in gone:
        click.echo(f"removed {entry.repo}:{entry.profile}")


if __name__ == "__main__":
    main()
