""" "Did you mean …@gmail.com?": the address typos staff make on a tablet, caught while
the attendee is still at the booth.

A mistyped domain (``gmail.con``, ``hotmial.com``) is a valid address, and most relays
accept it and bounce it hours later, when the attendee has gone. A few dozen webmail
domains take most attendees' addresses; one that is a letter or two away from one of
them, and is not one of them itself, is far more likely a typo than a real domain. The
staff are asked, with the attendee in front of them, and keep the address as typed
with one tap when it was right (a company's ``aon.com`` is not ``aol.com``).

No network: nothing here looks the domain up.
"""

from __future__ import annotations

# The webmail domains most attendees use, most used first (a tie between two
# suggestions goes to the earlier). Every domain listed is accepted as typed, so a real
# provider one letter from another (mail.com, email.com, ymail.com) belongs here too.
KNOWN_DOMAINS: tuple[str, ...] = (
    "gmail.com",
    "outlook.com",
    "hotmail.com",
    "yahoo.com",
    "icloud.com",
    "live.com",
    "msn.com",
    "aol.com",
    "proton.me",
    "protonmail.com",
    "me.com",
    "mac.com",
    "googlemail.com",
    "gmx.de",
    "gmx.net",
    "gmx.com",
    "web.de",
    "t-online.de",
    "yahoo.co.uk",
    "hotmail.co.uk",
    "btinternet.com",
    "yahoo.fr",
    "hotmail.fr",
    "orange.fr",
    "free.fr",
    "laposte.net",
    "libero.it",
    "hotmail.it",
    "yahoo.es",
    "hotmail.es",
    "yahoo.de",
    "comcast.net",
    "att.net",
    "verizon.net",
    "qq.com",
    "163.com",
    "126.com",
    "naver.com",
    "mail.ru",
    "yandex.ru",
    "yandex.com",
    "rediffmail.com",
    "uol.com.br",
    "bol.com.br",
    "mail.com",
    "email.com",
    "ymail.com",
    "rocketmail.com",
    "zoho.com",
    "fastmail.com",
    "hey.com",
    "tutanota.com",
    "posteo.de",
    "foxmail.com",
    "sina.com",
    "hanmail.net",
    "daum.net",
    "seznam.cz",
    "wp.pl",
    "o2.pl",
    "interia.pl",
    "abv.bg",
    "inbox.ru",
    "bk.ru",
    "list.ru",
    "rambler.ru",
)
_KNOWN = frozenset(KNOWN_DOMAINS)


# Slips on the way to .com/.net/.org. Most are no country's; .co and .cm are, but no
# provider listed here has mail under them. A provider's real endings elsewhere
# (hotmail.de, yahoo.co.jp) are never touched: the name must then be a near miss.
BAD_ENDINGS: dict[str, str] = {
    **dict.fromkeys(
        ("con", "cmo", "ocm", "vom", "xom", "comm", "cpm", "cim", "coom", "om", "c", "co", "cm"),
        "com",
    ),
    **dict.fromkeys(("nte", "ner", "nwt", "met"), "net"),
    **dict.fromkeys(("ogr", "orgg", "prg"), "org"),
}


def suggest(email: str) -> str | None:
    """The address with its domain corrected, when the domain looks like a typo of a
    well-known one; else None (the domain is well known, or not close to any).

    Two kinds of slip, each checked with the other part of the domain exact, so that a
    provider's real domains in other countries are never "corrected":
    - a known provider with an ending no domain has (``gmail.con``, ``yahoo.comm``);
    - a near miss of a provider's name with one of its real endings (``gmial.com``).
    """
    local, at, domain = (email or "").strip().rpartition("@")
    if not at or not local or not domain:
        return None
    typed = domain.lower().rstrip(".")
    if typed in _KNOWN:
        # Letter case is no typo; a trailing dot is (some relays refuse it).
        return None if not domain.endswith(".") else f"{local}@{domain.rstrip('.')}"
    name, _, ending = typed.partition(".")
    ending = BAD_ENDINGS.get(ending, ending)
    if f"{name}.{ending}" in _KNOWN:
        return f"{local}@{name}.{ending}"
    best, best_d = None, None
    for known in KNOWN_DOMAINS:
        known_name, _, known_ending = known.partition(".")
        # Short names (aol, msn, me, gmx) are a letter from real companies' (aon, ge).
        if known_ending != ending or len(known_name) < 4:
            continue
        limit = 1 if len(known_name) <= 5 else 2  # gmial, yahooo; hotmial, outlok
        d = _distance(name, known_name, limit)
        if 0 < d <= limit and (best_d is None or d < best_d):
            best, best_d = known, d
    return f"{local}@{best}" if best else None


def _distance(a: str, b: str, limit: int) -> int:
    """Edits (insert, delete, substitute, swap two neighbours) from a to b, or limit + 1
    once it is certain to exceed ``limit``."""
    if abs(len(a) - len(b)) > limit:
        return limit + 1
    prev2: list[int] = []
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        row = [i] + [0] * len(b)
        for j, cb in enumerate(b, 1):
            cost = 0 if ca == cb else 1
            row[j] = min(prev[j] + 1, row[j - 1] + 1, prev[j - 1] + cost)
            if i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb:
                row[j] = min(row[j], prev2[j - 2] + 1)
        if min(row) > limit:
            return limit + 1
        prev2, prev = prev, row
    return prev[-1]
