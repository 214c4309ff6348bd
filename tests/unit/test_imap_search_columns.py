"""SEARCH's columns (mailnode.imap.commands.search._Column): one cached header field of a folder's
messages, case-folded and joined into one string so a substring search is str.find; their answers are
checked against the plain per-value test search.evaluate makes, on random values that hold the
separator, expanding case folds (ß, ﬁ), empty values and absent fields, and after entries are added."""

from __future__ import annotations

import random

import pytest

from mailnode.imap.commands.search import _Column

ALPHABET = ["a", "b", "A", "ß", "SS", "ﬁ", " ", "\x00", "é", "Σ", "ς", "x"]


def _expected(entries: list[tuple[int, str | None]], value: str) -> set[int]:
    wanted = value.casefold()
    return {uid for uid, text in entries if text is not None and wanted in text.casefold()}


def _random_entries(rng: random.Random, count: int) -> list[tuple[int, str | None]]:
    uids = sorted(rng.sample(range(1, count * 3), count))
    return [
        (uid, None if rng.random() < 0.15 else "".join(rng.choice(ALPHABET) for _ in range(rng.randrange(0, 6))))
        for uid in uids
    ]


def _folded(entries: list[tuple[int, str | None]]) -> list[tuple[int, str | None]]:
    return [(uid, None if text is None else text.casefold()) for uid, text in entries]


@pytest.mark.parametrize("seed", range(40))
def test_a_column_finds_what_a_per_value_search_finds(seed: int) -> None:
    rng = random.Random(seed)
    entries = _random_entries(rng, rng.randrange(0, 40))
    column = _Column(_folded(entries))
    assert column.uids == [uid for uid, _ in entries]
    terms = ["", "a", "ss", "ß", "fi", "a\x00", "\x00", " x", "\u03c3", "zz"]  # small sigma: both sigmas fold to it
    terms += ["".join(rng.choice(ALPHABET) for _ in range(rng.randrange(1, 4))) for _ in range(20)]
    for term in terms:
        assert column.matching(term) == _expected(entries, term), repr(term)


def test_entries_added_to_a_column_are_found_and_expunged_ones_dropped() -> None:
    rng = random.Random(7)
    entries = _random_entries(rng, 30)
    first, later = entries[::2], entries[1::2]  # the later ones fall between the first ones' UIDs
    column = _Column(_folded(first)).with_entries(_folded(later), None)
    assert column.uids == [uid for uid, _ in entries]
    assert column.entries() == _folded(entries)
    for term in ["a", "", "ss", "x"]:
        assert column.matching(term) == _expected(entries, term)
    for cut in range(len(entries) + 1):  # messages added with higher UIDs: put after the others
        grown = _Column(_folded(entries[:cut])).with_entries(_folded(entries[cut:]), None)
        assert grown.entries() == _folded(entries)
        assert all(grown.matching(term) == _expected(entries, term) for term in ["a", "", "ss", "x", "\x00"])
    keep = {uid for uid, _ in entries[:10]}
    trimmed = column.with_entries([], keep)
    assert trimmed.uids == sorted(keep)
    assert trimmed.matching("") == _expected(entries[:10], "")


def test_an_empty_column() -> None:
    column = _Column([])
    assert column.matching("a") == set() and column.matching("") == set()
