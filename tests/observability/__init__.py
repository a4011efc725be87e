"""Dashboards and alerts proved against a real Prometheus.

Reusable pieces for other suites (e.g. tests/e2e against real vLLM):
- prometheus.running_prometheus(targets, rule_files=...) starts Debian's `prometheus` on loopback with a
  generated config (ScrapeTarget(job, "host:port", {"namespace": ..., "pod": ...})) and yields a client
  (query, label_values, rules, alerts, wait_for_targets_up, wait_for);
- checks.panels_without_data(prom, [variables, ...], timeout) evaluates every panel query of the chart's
  dashboards with template variables filled in; checks.alert_rules() lists the chart's alert rules;
- grafana: dashboard files, panels, fill() for $variables, grid rectangles.
"""
