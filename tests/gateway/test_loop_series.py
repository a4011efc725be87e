"""The loop series export exactly what prometheus_client's own classes export for the same updates."""

from __future__ import annotations

import math
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from gateway.loop_series import LoopCounter, LoopGauge, LoopHistogram

BUCKETS = (0.005, 0.01, 0.1, 1, 2.5, 60)
CREATED = re.compile(rb"(_created\{[^}]*\}) \S+")
LABELS = st.sampled_from([("a", "x"), ("a", "y"), ("b", "x")])


def exposition(registry: CollectorRegistry) -> bytes:
    """Both formats, with the creation timestamps (which differ between the two objects) blanked out."""
    return CREATED.sub(rb"\1 T", generate_latest(registry) + generate_openmetrics(registry))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(LABELS, st.floats(min_value=0, max_value=1e4, allow_nan=False)), max_size=40))
def test_histogram_exports_what_prometheus_client_does(observations: list[tuple[tuple[str, str], float]]) -> None:
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    reference = Histogram("h_seconds", "help text", ["m", "r"], buckets=BUCKETS, registry=theirs)
    loop = LoopHistogram("h_seconds", "help text", ["m", "r"], ours, buckets=BUCKETS)
    for labels, value in observations:
        reference.labels(*labels).observe(value)
        loop.labels(*labels).observe(value)
    assert exposition(ours) == exposition(theirs)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(LABELS, st.floats(min_value=0, max_value=1e6, allow_nan=False)), max_size=40))
def test_counter_exports_what_prometheus_client_does(increments: list[tuple[tuple[str, str], float]]) -> None:
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    reference = Counter("c", "help text", ["m", "r"], registry=theirs)
    loop = LoopCounter("c", "help text", ["m", "r"], ours)
    for labels, amount in increments:
        reference.labels(*labels).inc(amount)
        loop.labels(*labels).inc(amount)
    assert exposition(ours) == exposition(theirs)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(LABELS, st.booleans()), max_size=40))
def test_gauge_exports_what_prometheus_client_does(moves: list[tuple[tuple[str, str], bool]]) -> None:
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    reference = Gauge("g", "help text", ["m", "r"], registry=theirs)
    loop = LoopGauge("g", "help text", ["m", "r"], ours)
    for labels, up in moves:
        for gauge in (reference.labels(*labels), loop.labels(*labels)):
            if up:
                gauge.inc()
            else:
                gauge.dec()
    assert exposition(ours) == exposition(theirs)


def test_histogram_bucket_edges_count_as_prometheus_does() -> None:
    """`le` is inclusive: a value equal to a bound is in that bucket; past the last bound, only in +Inf."""
    registry = CollectorRegistry()
    child = LoopHistogram("h", "h", ["m"], registry, buckets=(1, 2)).labels("x")
    for value in (1.0, 2.0, 2.5, math.inf):
        child.observe(value)
    text = generate_latest(registry).decode()
    assert 'h_bucket{le="1.0",m="x"} 1.0' in text
    assert 'h_bucket{le="2.0",m="x"} 2.0' in text
    assert 'h_bucket{le="+Inf",m="x"} 4.0' in text
    assert 'h_count{m="x"} 4.0' in text


def test_counter_refuses_a_negative_increment_and_label_count_is_checked() -> None:
    counter = LoopCounter("c", "c", ["m"], CollectorRegistry())
    with pytest.raises(ValueError, match="non-negative"):
        counter.labels("x").inc(-1)
    with pytest.raises(ValueError, match="1 label values"):
        counter.labels("x", "y")
    assert counter.labels("x") is counter.labels("x")


def test_created_series_follow_prometheus_clients_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROMETHEUS_DISABLE_CREATED_SERIES", "true")
    registry = CollectorRegistry()
    LoopCounter("c", "c", ["m"], registry).labels("x").inc()
    LoopHistogram("h", "h", ["m"], registry, buckets=(1,)).labels("x").observe(0.5)
    text = generate_latest(registry)
    assert b"c_total" in text
    assert b"h_count" in text
    assert b"_created" not in text


def test_a_name_registered_twice_is_refused() -> None:
    registry = CollectorRegistry()
    LoopCounter("c", "c", ["m"], registry)
    with pytest.raises(ValueError, match="Duplicated"):
        Counter("c", "c", ["m"], registry=registry)
