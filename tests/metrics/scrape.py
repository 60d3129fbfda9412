"""Reading a /metrics answer: every sample by name and labels."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(text_or_samples, name: str, **labels: str) -> float | None:
    found = samples(text_or_samples) if isinstance(text_or_samples, str) else text_or_samples
    return found.get((name, frozenset(labels.items())))


def sample_names(text: str) -> set[str]:
    return {name for name, _ in samples(text)}
