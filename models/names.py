"""Model names: what every command that takes a checkpoint directory or a GGUF file takes instead.

Three spellings, the ones the tools people compare us with use:
- a Hugging Face repo id, `Qwen/Qwen3.5-4B`, with a revision (`@<branch, tag or commit>`) and a
  profile (`:q4_k_m`), as mlx-lm's --hf-path and llama.cpp's -hf take them;
- a repo of GGUF files, `unsloth/Qwen3.5-4B-GGUF:Q4_K_M`, where the tag picks the file (llama.cpp's -hf);
- a short name from releases.toml, `qwen3.5:4b` (Ollama's spelling), with a profile as
  `qwen3.5:4b:q4_k_m` or `qwen3.5:4b-q4_k_m`.

An existing path always wins over a name, so a directory that happens to look like `owner/name` is
still read as a directory and nothing goes near the network.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

try:
    import tomllib  # novermin  (guarded: tests/test_python_versions.py checks the rest needs only 3.10)
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from .errors import ModelError

RELEASES_FILE = Path(__file__).resolve().parent / "releases.toml"
# owner/name as the Hub allows them (letters, digits, '-', '_', '.'), then @revision, then :tag.
_REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[^:\s]+))?(?::(?P<tag>[\w.-]+))?$")


@dataclass(frozen=True)
class ModelName:
    repo: str  # owner/name on the Hub
    revision: str | None = None  # None: the repo's default branch
    tag: str | None = None  # a profile (a checkpoint repo) or a quantization type (a GGUF repo); None: fit it

    def __str__(self) -> str:
        return self.repo + (f"@{self.revision}" if self.revision else "") + (f":{self.tag}" if self.tag else "")

    def with_tag(self, tag: str | None) -> "ModelName":
        return replace(self, tag=tag)

    @property
    def label(self) -> str:
        """The repo's own name, as messages say it (`Qwen3.5-9B`)."""
        return self.repo.split("/")[-1]


@lru_cache(maxsize=1)
def releases() -> dict[str, dict[str, str]]:
    """{family: {size: repo id}} from releases.toml, families and sizes lower case."""
    data = tomllib.loads(RELEASES_FILE.read_text(encoding="utf-8"))
    return {family.lower(): {size.lower(): repo for size, repo in sizes.items()} for family, sizes in data.items()}


def short_names() -> list[str]:
    return [f"{family}:{size}" for family, sizes in releases().items() for size in sizes]


def parse(text: str) -> ModelName | None:
    """The name `text` spells, or None when it is not spelled as a name (then it is a path).
    A short name of an unknown family or size is a ModelError: it was meant as a name."""
    text = text.strip()
    short = _parse_short(text)
    if short is not None:
        return short
    match = _REPO_ID.match(text)
    if match is None or text.startswith(("./", "../", "/", "~")):
        return None
    return ModelName(match["repo"], match["revision"], match["tag"].lower() if match["tag"] else None)


def _parse_short(text: str) -> ModelName | None:
    family, colon, rest = text.partition(":")
    if not colon or "/" in text:
        return None
    sizes = releases().get(family.lower())
    if sizes is None:
        if re.fullmatch(r"[A-Za-z][\w.]*:[\w.:-]+", text) and not Path(text).exists():
            raise ModelError(f"unknown model name {text!r}: qwen35 knows {', '.join(short_names())}, "
                             "or give a Hugging Face repo id (owner/name)")
        return None
    size, tag = _split_size(rest.lower(), sizes)
    if size is None:
        raise ModelError(f"{family} has no release {rest!r}; its releases: "
                         f"{', '.join(f'{family}:{s}' for s in sizes)}")
    return ModelName(sizes[size], None, tag)


def _split_size(rest: str, sizes: dict[str, str]) -> tuple[str | None, str | None]:
    """`4b` → (4b, None); `4b:q4_k_m` and `4b-q4_k_m` → (4b, q4_k_m); `35b-a3b` is a size of its own."""
    for size in sorted(sizes, key=len, reverse=True):
        if rest == size:
            return size, None
        if rest.startswith(size) and rest[len(size)] in ":-" and len(rest) > len(size) + 1:
            return size, rest[len(size) + 1:]
    return None, None


def short_name_of(repo: str) -> str | None:
    """`Qwen/Qwen3.5-4B` → `qwen3.5:4b`, for listings; None for a repo outside the table."""
    for family, sizes in releases().items():
        for size, known in sizes.items():
            if known.lower() == repo.lower():
                return f"{family}:{size}"
    return None
