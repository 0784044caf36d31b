"""Kubernetes label selectors (``labelSelector=app=bert,tier in (a,b),!canary``), parsed and matched.

The grammar of k8s.io/apimachinery/pkg/labels: equality (``=``, ``==``, ``!=``), set-based
(``in``, ``notin``), existence (``key``) and non-existence (``!key``), joined by commas. Pure.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

# A qualified label key ([prefix/]name) and a label value, as the API validates them.
_KEY = r"(?:[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_VALUE = r"(?:[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?"
_TERM = re.compile(
    rf"^\s*(?:(?P<not>!)\s*(?P<nkey>{_KEY})"
    rf"|(?P<key>{_KEY})\s*(?:(?P<op>==|=|!=)\s*(?P<value>{_VALUE})"
    rf"|\s+(?P<setop>in|notin)\s*\((?P<values>[^()]*)\))?)\s*$"
)


class SelectorError(ValueError):
    """The selector does not parse; the message names the part that does not."""


@dataclass(frozen=True)
class Requirement:
    key: str
    operator: str  # "in", "notin", "exists", "!exists"
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator == "exists":
            return self.key in labels
        if self.operator == "!exists":
            return self.key not in labels
        if self.operator == "in":
            return labels.get(self.key) in self.values
        return labels.get(self.key) not in self.values  # notin also matches a missing key


@dataclass(frozen=True)
class Selector:
    requirements: tuple[Requirement, ...]

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(r.matches(labels) for r in self.requirements)


def parse_selector(text: str) -> Selector:
    """An empty selector matches everything."""
    requirements = []
    for term in _split_terms(text):
        found = _TERM.match(term)
        if not found:
            raise SelectorError(f"unable to parse requirement: {term.strip()!r}")
        if found.group("not"):
            requirements.append(Requirement(found.group("nkey"), "!exists"))
        elif found.group("op"):
            operator = "notin" if found.group("op") == "!=" else "in"
            requirements.append(Requirement(found.group("key"), operator, frozenset({found.group("value")})))
        elif found.group("setop"):
            values = [v.strip() for v in found.group("values").split(",")]
            if any(not re.fullmatch(_VALUE, v) for v in values):
                raise SelectorError(f"invalid label value in {term.strip()!r}")
            requirements.append(Requirement(found.group("key"), found.group("setop"), frozenset(values)))
        else:
            requirements.append(Requirement(found.group("key"), "exists"))
    return Selector(tuple(requirements))


def _split_terms(text: str) -> list[str]:
    """Splits on commas outside parentheses; an empty term is an error."""
    if not text.strip():
        return []
    terms, depth, start = [], 0, 0
    for index, char in enumerate(text):
        depth += (char == "(") - (char == ")")
        if char == "," and depth == 0:
            terms.append(text[start:index])
            start = index + 1
    terms.append(text[start:])
    if any(not term.strip() for term in terms):
        raise SelectorError(f"empty requirement in {text!r}")
    return terms
