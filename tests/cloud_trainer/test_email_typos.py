"""'Did you mean …?' for addresses whose domain is a near miss of a well-known one."""

from __future__ import annotations

import pytest

from cloud_trainer.email_typos import KNOWN_DOMAINS, suggest


@pytest.mark.parametrize(
    ("typed", "meant"),
    [
        ("ana@gmail.con", "ana@gmail.com"),  # the ending
        ("ana@gmial.com", "ana@gmail.com"),  # two letters swapped
        ("ana@gmai.com", "ana@gmail.com"),  # one left out
        ("ana@gmial.con", "ana@gmail.com"),  # the name and the ending
        ("ana@gmail.co", "ana@gmail.com"),  # .co is a country's, but no gmail there
        ("Ana.B@HOTMIAL.COM", "Ana.B@hotmail.com"),  # case: the local part as typed
        ("b@yahooo.com", "b@yahoo.com"),
        ("c@outlok.com", "c@outlook.com"),
        ("d@icloud.co", "d@icloud.com"),
        ("e@me.con", "e@me.com"),  # a short name: its ending is still checked
        ("g@hotmial.co.uk", "g@hotmail.co.uk"),
        ("f@icloud.com.", "f@icloud.com"),
    ],
)
def test_a_near_miss_of_a_well_known_domain_gets_a_suggestion(typed, meant):
    assert suggest(typed) == meant


@pytest.mark.parametrize(
    "typed",
    [
        *(f"x@{d}" for d in KNOWN_DOMAINS),  # every well-known domain is taken as typed
        "x@mail.com",  # one letter from gmail.com, and a real provider
        "x@aon.com",  # one letter from aol.com: a company
        "x@ge.com",  # and from me.com
        "x@example.org",
        "x@uni-bonn.de",
        "x@outlook.de",  # a provider's ending elsewhere: never "corrected"
        "x@hotmail.de",
        "x@yahoo.it",
        "x@yahoo.co.jp",
        "x@yahoo.ca",
        "x@yandex.by",
        "x@foxmail.com",  # two letters from hotmail.com, and real
        "x@GMAIL.COM",  # letter case is no typo
        "x@une.co",
        "not-an-address",
        "",
        "@gmail.con",
    ],
)
def test_a_well_known_or_unrelated_domain_gets_none(typed):
    assert suggest(typed) is None
