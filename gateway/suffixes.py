"""Where a wildcard may stop: the Public Suffix List, private section included.

``*.P`` is only safe when everything below ``P`` belongs to one owner. That fails when
``P`` is a public suffix (``co.uk``, ``github.io``, ``herokuapp.com``: each label below
is someone else's site) and when ``P`` is *above* one (``*.amazonaws.com`` covers every
customer's bucket under ``s3.amazonaws.com``). The list comes from the maintained
``publicsuffixlist`` package, which bundles it (no network fetch at run time); its ICANN
and private sections are both honoured.
"""

from __future__ import annotations

import functools

import publicsuffixlist
from publicsuffixlist import PublicSuffixList


class Suffixes:
    """Answers "may a wildcard stand at ``*.P``?" from the bundled Public Suffix List."""

    def __init__(self) -> None:
        self._psl = PublicSuffixList(accept_unknown=True)
        above: set[str] = set()
        with open(publicsuffixlist.PSLFILE, "rb") as source:
            for raw in source:
                rule = raw.decode("utf-8", "replace").split(" ")[0].strip().lower()
                if not rule or rule.startswith("//") or rule.startswith("!"):
                    continue
                try:
                    rule = publicsuffixlist.encode_idn(rule)
                except (UnicodeError, ValueError):
                    continue
                if rule.startswith("*."):  # every label below the rest is a public suffix
                    rule = rule[2:]
                    above.add(rule)
                labels = rule.split(".")
                for i in range(1, len(labels)):
                    above.add(".".join(labels[i:]))
        self._above = frozenset(above)

    def is_public(self, name: str) -> bool:
        return bool(self._psl.is_public(name))

    def registrable(self, name: str) -> str | None:
        """The registrable domain (public suffix plus one label), or None for a suffix."""
        found = self._psl.privatesuffix(name)
        return str(found) if found else None

    def wildcard_allowed(self, parent: str) -> bool:
        """True when ``*.parent`` stays inside one registrable domain."""
        return (
            parent.count(".") >= 1
            and not self.is_public(parent)
            and parent not in self._above
            and self.registrable(parent) is not None
        )


@functools.lru_cache(maxsize=1)
def default_suffixes() -> Suffixes:
    return Suffixes()
