"""Counters, gauges and histograms for the series every request updates, without prometheus_client's locks.

prometheus_client guards each value with a threading.Lock, so that threads may share a child. The gateway
updates these series only from its event loop, so a plain add is enough: an inc is a fifth of the cost, and a
histogram's observe one bisect instead of a loop over the buckets and two locked adds. A scrape sees each
number whole (the GIL), as it does with prometheus_client, whose histogram is not read under one lock either.

Each family is a registry collector that exports exactly what prometheus_client's class of the same kind
exports: the same sample names, labels, `le` strings and `_created` series (off when the environment sets
PROMETHEUS_DISABLE_CREATED_SERIES, as for prometheus_client's own).
"""

from __future__ import annotations

import math
import os
import time
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import Generic, TypeVar

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString


def _created_series() -> bool:
    return os.environ.get("PROMETHEUS_DISABLE_CREATED_SERIES", "False").lower() not in ("true", "1", "t")


class CounterChild:
    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        self.value += amount


class GaugeChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount


class HistogramChild:
    __slots__ = ("_bounds", "counts", "created", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self.counts = [0] * len(bounds)  # per bucket, not cumulative
        self.sum = 0.0
        self.created = time.time()

    def observe(self, amount: float) -> None:
        # the first bound >= amount: the bucket `le` counts it in (the bounds end with +Inf)
        self.counts[bisect_left(self._bounds, amount)] += 1
        self.sum += amount


Child = TypeVar("Child", CounterChild, GaugeChild, HistogramChild)
Family = TypeVar("Family", bound=Metric)


class _Family(Collector, Generic[Child, Family]):
    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], Child] = {}
        self._created = _created_series()
        registry.register(self)

    def labels(self, *values: str) -> Child:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes {len(self.labelnames)} label values, got {len(values)}")
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._new_child()
        return child

    def items(self) -> list[tuple[tuple[str, ...], Child]]:
        """Every child with its label values."""
        return list(self._children.items())

    def remove(self, *values: str) -> None:
        """Stop exporting the child with these label values (KeyError if there is none)."""
        del self._children[values]

    def describe(self) -> Iterator[Metric]:
        """The family without samples: the registry learns its names and refuses a duplicate at once."""
        yield self._family()

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for values, child in list(self._children.items()):
            self._add(family, values, child)
        yield family

    def _family(self) -> Family:
        raise NotImplementedError

    def _new_child(self) -> Child:
        raise NotImplementedError

    def _add(self, family: Family, values: tuple[str, ...], child: Child) -> None:
        raise NotImplementedError


class LoopCounter(_Family[CounterChild, CounterMetricFamily]):
    def _new_child(self) -> CounterChild:
        return CounterChild()

    def _family(self) -> CounterMetricFamily:
        return CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def _add(self, family: CounterMetricFamily, values: tuple[str, ...], child: CounterChild) -> None:
        family.add_metric(values, child.value, created=child.created if self._created else None)


class LoopGauge(_Family[GaugeChild, GaugeMetricFamily]):
    def _new_child(self) -> GaugeChild:
        return GaugeChild()

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def _add(self, family: GaugeMetricFamily, values: tuple[str, ...], child: GaugeChild) -> None:
        family.add_metric(values, child.value)


class LoopHistogram(_Family[HistogramChild, HistogramMetricFamily]):
    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        registry: CollectorRegistry,
        buckets: Sequence[float],
    ) -> None:
        bounds = sorted(float(bound) for bound in buckets)
        if not bounds or bounds[-1] != math.inf:
            bounds.append(math.inf)
        self._bounds = tuple(bounds)
        self._le = tuple(floatToGoString(bound) for bound in bounds)  # type: ignore[no-untyped-call]
        super().__init__(name, documentation, labelnames, registry)

    def _new_child(self) -> HistogramChild:
        return HistogramChild(self._bounds)

    def _family(self) -> HistogramMetricFamily:
        return HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def _add(self, family: HistogramMetricFamily, values: tuple[str, ...], child: HistogramChild) -> None:
        cumulative = 0
        buckets = []
        for le, count in zip(self._le, list(child.counts), strict=True):
            cumulative += count
            buckets.append((le, float(cumulative)))
        family.add_metric(values, buckets, child.sum)
        if self._created:
            family.samples.append(
                Sample(self.name + "_created", dict(zip(self.labelnames, values, strict=True)), child.created)
            )
