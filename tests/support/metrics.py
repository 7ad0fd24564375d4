"""Reading a process's Prometheus /metrics the way Prometheus does."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape_families(port: int) -> tuple[set[str], Samples]:
    """The metric families (by their catalog name: counters with `_total`) and every sample the port serves."""
    response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    response.raise_for_status()
    families, samples = set(), {}
    for family in text_string_to_metric_families(response.text):
        families.add(family.name + ("_total" if family.type == "counter" else ""))
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return families, samples


def scrape(port: int) -> Samples:
    """Every sample the port serves, keyed by (name, labels)."""
    return scrape_families(port)[1]


def value(samples: Samples, name: str, **labels: str) -> float:
    """The one sample with exactly these labels (0 when absent)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(value for (sample, found), value in samples.items() if sample == name and wanted <= found)
