"""The demo model's corpus (demo/training/corpus.py): what its held-out figures rest on.

- the held-out split is its own: the capitals it asks the weather of never appear in a training
  conversation's tool call, and `heldout()` gives exactly `build()`'s held-out conversations;
- every tool call of training is well-formed for its tool;
- the real cities the weather calls of training use besides the made-up towns are none of the capitals.
"""

from __future__ import annotations

import json

import pytest

from qwen35.demo.training import corpus as C


@pytest.fixture(scope="module")
def split():
    return C.build(0, n_train=3000)


def calls(sample) -> list[tuple[str, dict]]:
    return [(c["function"]["name"], c["function"]["arguments"]) for m in sample.messages
            for c in m.get("tool_calls") or []]


def weather_cities(samples) -> set[str]:
    """The cities the weather calls of `samples` ask about."""
    return {args["city"] for s in samples for name, args in calls(s) if name == "get_weather"}


def test_the_held_out_cities_are_never_called_in_training(split):
    train, held = split
    world = C.World(0)
    called = weather_cities(train)
    assert called and not called & set(world.weather_heldout)
    asked = weather_cities(held)
    assert asked and asked <= set(world.weather_heldout)


def test_the_real_cities_of_training_are_no_capital_and_reach_the_calls(split):
    capitals = [cap for _, cap in C.CAPITALS]
    assert len(set(C.OTHER_CITIES)) == len(C.OTHER_CITIES)
    # not a capital, nor a name holding one or held in one ("Lima" in a "Limassol")
    assert not [(o, c) for o in C.OTHER_CITIES for c in capitals if c in o or o in c]
    train, _ = split
    called = weather_cities(train)
    assert len(called & set(C.OTHER_CITIES)) > 100
    assert any(" " in city for city in called & set(C.OTHER_CITIES))


def test_the_held_out_split_alone_is_that_of_the_whole_build(split):
    _, held = split
    alone = C.heldout(0)
    assert [(s.kind, s.messages, s.images, s.think) for s in alone] == [(s.kind, s.messages, s.images, s.think) for s in held]


def test_every_tool_call_of_training_is_valid_json_for_its_tool(split):
    train, _ = split
    params = {t["function"]["name"]: t["function"]["parameters"] for t in C.TOOLS}
    for s in train:
        for name, args in calls(s):
            assert set(params[name]["required"]) <= set(args) <= set(params[name]["properties"]), (name, args)
            json.dumps(args)


def test_other_shares_change_the_training_mix_and_never_the_held_out_split():
    train, held = C.build(0, n_train=600, shares={"image": 1.0, "count": 0.0})
    kinds = [s.kind for s in train[:600]]  # (build adds every country's facts after the drawn ones)
    assert "count" not in kinds
    assert kinds.count("image") > 600 * 1.0 / (1.0 + sum(C.KINDS.values()) - C.KINDS["image"] - C.KINDS["count"]) * 0.8
    assert [s.messages for s in held] == [s.messages for s in C.heldout(0)]
    with pytest.raises(ValueError, match="unknown kind"):
        C.build(0, n_train=10, shares={"pictures": 0.5})
    with pytest.raises(ValueError, match="0 or more"):
        C.mix({"image": -1.0})
    with pytest.raises(ValueError, match="some above 0"):
        C.mix({k: 0.0 for k in C.KINDS})


def test_fresh_conversations_draw_new_towns_and_pictures_and_keep_the_held_out_splits(split):
    train, held = split
    fresh = C.fresh(10_001, 600)
    base, new = C.World(0), C.World(10_001)
    assert len(set(new.towns) - set(base.towns)) > 300  # (of 400: short ones of two syllables may meet)
    cities = weather_cities(fresh)
    held_cities = set(base.weather_heldout)
    assert cities and not cities & held_cities and cities & set(new.towns)
    amounts = {a["amount"] for s in fresh for _, a in calls(s) if "amount" in a}
    assert amounts and not amounts & set(base.amounts_heldout)
    seen = {png for s in train + held for png in s.images}
    pictures = C.fresh(10_001, 200, kinds=C.IMAGE_KINDS)
    assert {s.kind for s in pictures} == set(C.IMAGE_KINDS)
    assert not seen & {png for s in pictures for png in s.images}
    asked = {s.messages[0]["content"][1]["text"] for s in train if s.kind in C.IMAGE_KINDS}
    assert {s.messages[0]["content"][1]["text"] for s in pictures} <= asked
    assert [s.images for s in C.fresh(10_001, 5, kinds=C.IMAGE_KINDS)] == [s.images for s in pictures[:5]]
    with pytest.raises(ValueError, match="held-out"):
        C.fresh(1000, 5)


def test_a_spelling_answer_gives_the_name_then_its_letters_word_by_word():
    world = C.World(0)
    world.rng.random = lambda: 0.0  # the capitals' share of the draws
    world.rng.choice = lambda seq: "Addis Ababa" if "Addis Ababa" in seq else seq[0]  # (and the first phrasing)
    sample = world.spell("train", think=False)
    assert sample.messages == [{"role": "user", "content": "How do you spell Addis Ababa?"},
                               {"role": "assistant", "content": "Addis Ababa is spelt A-d-d-i-s A-b-a-b-a."}]


def test_spelling_is_off_by_default_and_never_held_out():
    train, held = C.build(0, n_train=300, shares={"spell": 0.5})
    assert 60 < sum(s.kind == "spell" for s in train) < 150  # a third of the 300 drawn
    assert "spell" not in {s.kind for s in held} and "spell" not in {s.kind for s in C.build(0, n_train=300)[0]}
    capitals = {cap for _, cap in C.CAPITALS}
    spelt = {s.answer["name"] for s in train if s.kind == "spell"}
    assert spelt & capitals and spelt & set(C.OTHER_CITIES) and spelt & set(C.World(0).towns)
