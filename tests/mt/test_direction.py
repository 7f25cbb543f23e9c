"""lass_sparse.mt.direction: parsing, round trips, errors, zero-shot / English-centric helpers."""

from __future__ import annotations

import dataclasses

import pytest

from lass_sparse.mt import Direction, english_centric_directions, zero_shot_directions


@pytest.mark.parametrize("text", ["en-de", "de-en", "zh-ar", "eng-deu", "pt-ast"])
def test_parse_round_trips(text):
    d = Direction.parse(text)
    assert str(d) == text
    assert Direction.parse(str(d)) == d
    assert Direction.parse(d) is d  # already parsed
    src, tgt = d  # unpacks like a pair
    assert (src, tgt) == (d.src, d.tgt) == tuple(text.split("-"))


@pytest.mark.parametrize("text", ["en-en", "en", "en_de", "EN-DE", "en-de-fr", "e-de",
                                  "english-de", " en-de", "en-de\n", "", "en--de"])
def test_parse_rejects_what_is_not_a_direction(text):
    with pytest.raises(ValueError, match=r"not a translation direction: .* \(expected like "
                                         r"'en-de'\)"):
        Direction.parse(text)


def test_parse_rejects_non_strings():
    with pytest.raises(ValueError, match="not a translation direction: None"):
        Direction.parse(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"not a translation direction: \('en', 'de'\)"):
        Direction.parse(("en", "de"))  # type: ignore[arg-type]


def test_constructor_checks_its_fields():
    assert str(Direction("en", "de")) == "en-de"
    with pytest.raises(ValueError, match="src must be a language code .* got 'EN'"):
        Direction("EN", "de")
    with pytest.raises(ValueError, match="tgt must be a language code .* got 'de-fr'"):
        Direction("en", "de-fr")
    with pytest.raises(ValueError, match="src and tgt must differ, got 'de' for both"):
        Direction("de", "de")


def test_frozen_hashable_and_distinct_from_its_reverse():
    d = Direction.parse("en-de")
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.src = "fr"  # type: ignore[misc]
    assert d.reverse() == Direction("de", "en") and d.reverse().reverse() == d
    assert d != d.reverse() and len({d, d.reverse(), Direction("en", "de")}) == 2
    assert d != "en-de"  # a Direction is not its string


def test_english_centric_and_zero_shot():
    assert Direction.parse("en-de").is_english_centric()
    assert Direction.parse("de-en").is_english_centric()
    assert not Direction.parse("en-de").is_zero_shot()
    zs = Direction.parse("de-fr")
    assert zs.is_zero_shot() and not zs.is_english_centric()
    assert zs.via() == (Direction("de", "en"), Direction("en", "fr"))
    assert Direction.parse("en-fr").is_zero_shot(pivot="de")
    assert Direction.parse("en-fr").via("de") == (Direction("en", "de"), Direction("de", "fr"))
    with pytest.raises(ValueError, match="en-de is not zero-shot"):
        Direction.parse("en-de").via()


def test_direction_lists():
    assert zero_shot_directions(["de", "fr", "zh"]) == ["de-fr", "de-zh", "fr-de", "fr-zh",
                                                         "zh-de", "zh-fr"]
    assert zero_shot_directions(["de"]) == []
    assert english_centric_directions(["de", "en", "fr"]) == ["en-de", "de-en", "en-fr", "fr-en"]
    with pytest.raises(ValueError, match="language code"):
        zero_shot_directions(["de", "French"])
