"""Kubernetes label selectors: parsed once, matched often.

EgressPolicy ``podSelector`` and ClusterEgressPolicy ``namespaceSelector`` / ``podSelector``
are standard ``metav1.LabelSelector`` values. They are matched here, as pure logic, both
by the gateway (which learns pods' labels from the identities the operator publishes)
and by ``tidegate check`` offline. Semantics are the API server's: every ``matchLabels``
pair and every ``matchExpressions`` entry must hold; ``{}`` matches everything; an
``In`` / ``NotIn`` without values and an ``Exists`` / ``DoesNotExist`` with values are
rejected (the API server rejects them too), so nothing here is ever silently ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast

Operator = Literal["In", "NotIn", "Exists", "DoesNotExist"]
OPERATORS: tuple[str, ...] = ("In", "NotIn", "Exists", "DoesNotExist")
MAX_SELECTOR_TERMS = 64


class SelectorError(ValueError):
    """A selector the API server would not accept; ``field`` is relative to the selector."""

    def __init__(self, message: str, *, field: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.field = field


@dataclass(frozen=True, slots=True)
class Requirement:
    key: str
    operator: Operator
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        op = self.operator
        if op == "In":
            return self.key in labels and labels[self.key] in self.values
        if op == "NotIn":
            return self.key not in labels or labels[self.key] not in self.values
        if op == "Exists":
            return self.key in labels
        return self.key not in labels

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"key": self.key, "operator": self.operator}
        if self.operator in ("In", "NotIn"):
            out["values"] = sorted(self.values)
        return out


@dataclass(frozen=True, slots=True)
class LabelSelector:
    """A parsed LabelSelector; ``LabelSelector()`` (``{}``) matches every label set."""

    match_labels: tuple[tuple[str, str], ...] = ()
    expressions: tuple[Requirement, ...] = ()

    @property
    def matches_everything(self) -> bool:
        return not self.match_labels and not self.expressions

    def matches(self, labels: Mapping[str, str]) -> bool:
        for key, value in self.match_labels:
            if labels.get(key) != value:
                return False
        return all(r.matches(labels) for r in self.expressions)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.match_labels:
            out["matchLabels"] = dict(self.match_labels)
        if self.expressions:
            out["matchExpressions"] = [r.to_json() for r in self.expressions]
        return out


def parse_selector(raw: object) -> LabelSelector:
    """Validate a LabelSelector mapping (``None`` is not accepted here: callers decide)."""
    if not isinstance(raw, Mapping):
        raise SelectorError(f"must be a mapping, got {type(raw).__name__}")
    unknown = sorted(set(raw) - {"matchLabels", "matchExpressions"})
    if unknown:
        raise SelectorError(
            f"unknown field(s) {', '.join(unknown)} (known: matchExpressions, matchLabels)"
        )
    labels_raw = raw.get("matchLabels") or {}
    if not isinstance(labels_raw, Mapping):
        raise SelectorError("must be a mapping of label to value", field="matchLabels")
    labels: list[tuple[str, str]] = []
    for key, value in labels_raw.items():
        if not isinstance(key, str) or not key:
            raise SelectorError("label keys must be non-empty strings", field="matchLabels")
        if not isinstance(value, str):
            raise SelectorError("must be a string", field=f"matchLabels.{key}")
        labels.append((key, value))
    exprs_raw = raw.get("matchExpressions") or []
    if not isinstance(exprs_raw, list):
        raise SelectorError("must be a list", field="matchExpressions")
    if len(labels) + len(exprs_raw) > MAX_SELECTOR_TERMS:
        raise SelectorError(f"more than {MAX_SELECTOR_TERMS} terms")
    expressions = tuple(_requirement(e, f"matchExpressions[{i}]") for i, e in enumerate(exprs_raw))
    return LabelSelector(tuple(sorted(labels)), expressions)


def _requirement(raw: object, path: str) -> Requirement:
    if not isinstance(raw, Mapping):
        raise SelectorError("must be a mapping", field=path)
    unknown = sorted(set(raw) - {"key", "operator", "values"})
    if unknown:
        raise SelectorError(f"unknown field(s) {', '.join(unknown)}", field=path)
    key = raw.get("key")
    if not isinstance(key, str) or not key:
        raise SelectorError("must be a non-empty string", field=f"{path}.key")
    op = raw.get("operator")
    if op not in OPERATORS:
        raise SelectorError(
            f"{op!r} is not one of {', '.join(OPERATORS)}", field=f"{path}.operator"
        )
    values_raw = raw.get("values")
    values_list = [] if values_raw is None else values_raw
    if not isinstance(values_list, list) or not all(isinstance(v, str) for v in values_list):
        raise SelectorError("must be a list of strings", field=f"{path}.values")
    if op in ("In", "NotIn") and not values_list:
        raise SelectorError(f"operator {op} needs at least one value", field=f"{path}.values")
    if op in ("Exists", "DoesNotExist") and values_list:
        raise SelectorError(f"operator {op} takes no values", field=f"{path}.values")
    return Requirement(key, cast(Operator, op), frozenset(values_list))


def parse_labels(text: str) -> dict[str, str]:
    """``k=v,k2=v2`` (the ``--labels`` flag of ``tidegate check``) into a mapping."""
    out: dict[str, str] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise SelectorError(f"{part!r} is not key=value")
        out[key.strip()] = value.strip()
    return out


__all__ = [
    "LabelSelector",
    "Requirement",
    "SelectorError",
    "parse_labels",
    "parse_selector",
]
