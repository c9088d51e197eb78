"""The demo model's corpus (demo/training/corpus.py): what its held-out figures rest on.

- the held-out split is its own: the capitals it asks the weather of never appear in a training
  conversation's tool call, and `heldout()` gives exactly `build()`'s held-out conversations;
- training teaches a copy, not a lookup: most weather calls and shopping items of training come from
  the name pools (names.toml), each a single token of the real vocabulary, drawn afresh for each
  conversation — too many to learn by heart in the one epoch it trains (run 5).
"""

from __future__ import annotations

import json
from collections import Counter

import pytest

from qwen35.demo.training import corpus as C
from qwen35.demo.training.names import BLOCKED, load


@pytest.fixture(scope="module")
def split():
    return C.build(0, n_train=3000)


def calls(sample) -> list[tuple[str, dict]]:
    return [(c["function"]["name"], c["function"]["arguments"]) for m in sample.messages
            for c in m.get("tool_calls") or []]


def test_the_held_out_cities_are_never_called_in_training(split):
    train, held = split
    world = C.World(0)
    called = {args["city"] for s in train for name, args in calls(s) if name == "get_weather"}
    assert not called & set(world.weather_heldout)
    asked = {args["city"] for s in held for name, args in calls(s) if name == "get_weather"}
    assert asked <= set(world.weather_heldout)


def test_the_held_out_split_alone_is_that_of_the_whole_build(split):
    _, held = split
    alone = C.heldout(0)
    assert [(s.kind, s.messages, s.images, s.think) for s in alone] == [(s.kind, s.messages, s.images, s.think) for s in held]


def test_training_calls_mostly_name_places_and_items_from_the_pools(split):
    train, _ = split
    towns, items = load()
    pool_towns, pool_items = set(towns), set(items)
    cities = [args["city"] for s in train for name, args in calls(s) if name == "get_weather"]
    from_pool = [c for c in cities if c in pool_towns or all(w in pool_towns for w in c.split(" "))]
    assert len(from_pool) / len(cities) > 0.55
    assert max(Counter(from_pool).values()) <= 6  # no name is seen often enough to be learnt as a call
    listed = [i for s in train for name, args in calls(s) if name == "add_to_shopping_list" for i in args["items"]]
    assert sum(i in pool_items for i in listed) / len(listed) > 0.6


def test_the_pools_are_single_clean_words_outside_the_fact_table():
    towns, items = load()
    assert len(set(towns)) == len(towns) == 1500 and len(set(items)) == len(items) == 800
    capitals = {w for country, capital in C.CAPITALS for w in (country + " " + capital).split()}
    assert not capitals & set(towns) and not set(C.ITEMS) & set(items)
    assert all(w.isalpha() and w.isascii() and not BLOCKED.search(w) for w in towns + items)
    assert all(w[0].isupper() for w in towns) and all(w.islower() for w in items)


def test_every_tool_call_of_training_is_valid_json_for_its_tool(split):
    train, _ = split
    params = {t["function"]["name"]: t["function"]["parameters"] for t in C.TOOLS}
    for s in train:
        for name, args in calls(s):
            assert set(params[name]["required"]) <= set(args) <= set(params[name]["properties"]), (name, args)
            json.dumps(args)
