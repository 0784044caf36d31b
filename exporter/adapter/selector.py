"""Kubernetes label selectors (``labelSelector=app=bert,tier in (a,b),!canary``), parsed and matched.

The grammar of k8s.io/apimachinery/pkg/labels: equality (``=``, ``==``, ``!=``), set-based
(``in``, ``notin``), existence (``key``) and non-existence (``!key``), joined by commas. Pure.

Bounded: a selector is at most ``MAX_SELECTOR_BYTES`` long and ``MAX_REQUIREMENTS`` requirements,
checked before any term is parsed, and each term is matched in linear time (whitespace is taken
possessively, so no run of blanks is ever re-split: Python's ``re`` holds the GIL while it
backtracks, and a quadratic match stalls every thread of the process).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

# A qualified label key ([prefix/]name) and a label value, as the API validates them.
_KEY = r"(?:[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_VALUE = r"(?:[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?"
# Matched against a stripped term with fullmatch; every quantifier over blanks is possessive.
_TERM = re.compile(
    rf"(?:(?P<not>!)\s*+(?P<nkey>{_KEY})"
    rf"|(?P<key>{_KEY})(?:\s*+(?P<op>==|=|!=)\s*+(?P<value>{_VALUE})"
    rf"|\s++(?P<setop>in|notin)\s*+\((?P<values>[^()]*+)\))?)"
)
# An HPA's selector is a few requirements; these bound what one request can make the adapter (pod
# matching) and Prometheus (an external metric's matchers) do.
MAX_SELECTOR_BYTES = 4096
MAX_REQUIREMENTS = 50


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


def parse_selector(
    text: str, max_bytes: int = MAX_SELECTOR_BYTES, max_requirements: int = MAX_REQUIREMENTS
) -> Selector:
    """An empty selector matches everything. The bounds are checked before any term is parsed."""
    if len(text) > max_bytes:
        raise SelectorError(f"a label selector of at most {max_bytes} characters is served")
    terms = _split_terms(text)
    if len(terms) > max_requirements:
        raise SelectorError(f"a label selector of at most {max_requirements} requirements is served")
    requirements = []
    for term in terms:
        found = _TERM.fullmatch(term.strip())
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
