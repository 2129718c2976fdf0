"""
The observability docs stay true: C{docs/prometheus.yml} and the Grafana
dashboard C{docs/grafana/txmesh-mesh.json} parse, every dashboard
expression is PromQL Prometheus accepts (checked with C{promtool} when it
is installed), and every metric the dashboard queries or
C{docs/observability.md} names is one txmesh exports, as read from the
proxy's and the pilot's own registries.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from typing import Any

import yaml
from twisted.internet.task import Clock
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from txmesh.config.model import NodeConfig
from txmesh.filters.tracing import TracingFactory
from txmesh.observability.metrics import ProxyMetrics
from txmesh.pilot.metrics import PilotMetrics

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")
DASHBOARD = os.path.join(DOCS, "grafana", "txmesh-mesh.json")
SCRAPE_CONFIG = os.path.join(DOCS, "prometheus.yml")
GUIDE = os.path.join(DOCS, "observability.md")

# What Grafana substitutes before a query reaches Prometheus.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h",
    "$reporter": "destination", "$destination_service": ".*",
}

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_RANGE = re.compile(r"\[[^\]]*\]")
_IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
                       "unless", "offset", "inf", "nan"})
_MENTION = re.compile(r"\b(?:istio|txmesh)_[a-z0-9_]*[a-z0-9]\b")


def exported() -> tuple[set[str], set[str]]:
    """
    @return: the sample names a query can use (C{_total}, C{_bucket}...)
        and the family names, of a proxy's and a pilot's registries.
    """
    samples, families = set(), set()
    proxy = ProxyMetrics(NodeConfig())
    # The filters' own counters too: the tracing filter's, once it reports.
    tracing = TracingFactory(client=object())
    tracing.reporter("http://collector:9411/api/v2/spans", tracing.parse_config({}).reporter, Clock())
    proxy.watch(filter_factories=lambda: [tracing])
    for registry in (proxy.registry, PilotMetrics().registry):
        for family in registry.collect():
            families.add(family.name)
            suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
                        "summary": ("_sum", "_count")}.get(family.type, ("",))
            samples.update(family.name + suffix for suffix in suffixes)
    return samples, families


def expressions(dashboard: dict[str, Any]) -> Iterator[str]:
    """
    @return: every PromQL expression of the dashboard's panels (rows
        included) and query variables.
    """
    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    for panel in panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            yield target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            text = query["query"] if isinstance(query, dict) else query
            match = re.fullmatch(r"label_values\((.*?)(?:,\s*\w+)?\)", text)
            if match:
                yield match.group(1)


def substituted(expr: str) -> str:
    for name, value in sorted(GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(name, value)
    return expr


def metric_names(expr: str) -> set[str]:
    """
    @return: the metric names a PromQL expression selects: identifiers
        left once strings, label matchers, groupings and ranges are gone
        that are neither functions, keywords nor numbers.
    """
    text = _STRING.sub('""', substituted(expr))
    text = _MATCHERS.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    text = _RANGE.sub(" ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        name = match.group()
        rest = text[match.end():].lstrip()
        if rest.startswith("(") or name.lower() in _KEYWORDS:
            continue
        names.add(name)
    return names


class PromQLExtractionTests(SynchronousTestCase):
    """
    L{metric_names} finds metric names, not functions or labels.
    """

    def test_names(self) -> None:
        self.assertEqual(
            metric_names('histogram_quantile(0.99, sum(rate(a_bucket{x="y{"}[$__rate_interval])) by (le, svc)) '
                         "/ on (svc) group_left b_total > bool 0"),
            {"a_bucket", "b_total"})


class DashboardTests(SynchronousTestCase):
    """
    C{docs/grafana/txmesh-mesh.json}.
    """

    def setUp(self) -> None:
        with open(DASHBOARD, encoding="utf-8") as f:
            self.dashboard = json.load(f)

    def test_grafana_dashboard_shape(self) -> None:
        """
        A dashboard with a title, uid and panels, whose data source is a
        Prometheus data source variable used by every panel.
        """
        d = self.dashboard
        self.assertEqual((d["uid"], d["title"]), ("txmesh-mesh", "txmesh mesh"))
        self.assertIsInstance(d["schemaVersion"], int)
        [datasource] = [v for v in d["templating"]["list"] if v["type"] == "datasource"]
        self.assertEqual(datasource["query"], "prometheus")
        ids = [p["id"] for p in d["panels"]]
        self.assertEqual(len(ids), len(set(ids)))
        for panel in d["panels"]:
            if panel["type"] == "row":
                continue
            self.assertEqual(panel["datasource"], {"type": "prometheus", "uid": "${" + datasource["name"] + "}"},
                             panel["title"])
            self.assertTrue(panel["targets"], panel["title"])
            self.assertEqual(set(panel["gridPos"]), {"x", "y", "w", "h"})

    def test_panels_asked_for(self) -> None:
        """
        Request rate, success rate, latency quantiles, TCP bytes and the
        pilot's proxies, pushes, NACKs and push latency all have a panel.
        """
        text = "\n".join(expressions(self.dashboard))
        for needle in ("istio_requests_total", 'response_code!~"5.."', "histogram_quantile(0.5,",
                       "histogram_quantile(0.9,", "histogram_quantile(0.99,",
                       "istio_request_duration_milliseconds_bucket", "istio_tcp_sent_bytes_total",
                       "istio_tcp_received_bytes_total", "txmesh_pilot_proxies_connected",
                       "txmesh_pilot_pushes_total", "txmesh_pilot_nacks_total",
                       "txmesh_pilot_push_duration_seconds_bucket"):
            self.assertIn(needle, text)

    def test_metrics_exported(self) -> None:
        """
        Every metric the dashboard queries is an C{istio_*} or C{txmesh_*}
        sample name a txmesh proxy or pilot exports.
        """
        samples, _ = exported()
        used = set()
        for expr in expressions(self.dashboard):
            used |= metric_names(expr)
        self.assertTrue(used)
        self.assertEqual({n for n in used if not n.startswith(("istio_", "txmesh_"))}, set())
        self.assertEqual(used - samples, set(), f"exported: {sorted(samples)}")

    def test_promql_valid(self) -> None:
        """
        Prometheus' own parser (C{promtool check rules}) accepts every
        expression, Grafana's variables substituted.
        """
        promtool = shutil.which("promtool")
        if promtool is None:
            raise SkipTest("promtool is not installed (apt-get install prometheus)")
        rules = [{"record": f"txmesh:dashboard:{i}", "expr": substituted(expr)}
                 for i, expr in enumerate(expressions(self.dashboard))]
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp, True)
        path = os.path.join(tmp, "rules.yml")
        with open(path, "w", encoding="utf-8") as f:
            yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, f)
        done = subprocess.run([promtool, "check", "rules", path], capture_output=True, text=True, timeout=30,
                              check=False)
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)


class ScrapeConfigTests(SynchronousTestCase):
    """
    C{docs/prometheus.yml}.
    """

    def setUp(self) -> None:
        with open(SCRAPE_CONFIG, encoding="utf-8") as f:
            self.config = yaml.safe_load(f)

    def test_jobs(self) -> None:
        """
        Sidecars are scraped at C{/stats/prometheus} and pilots at
        C{/metrics}, both statically and from C{file_sd} files.
        """
        jobs = {job["job_name"]: job for job in self.config["scrape_configs"]}
        paths = {name: job["metrics_path"] for name, job in jobs.items()}
        self.assertEqual(set(paths.values()), {"/stats/prometheus", "/metrics"})
        for path in ("/stats/prometheus", "/metrics"):
            kinds = {k for name, job in jobs.items() if paths[name] == path for k in job
                     if k.endswith("_sd_configs") or k == "static_configs"}
            self.assertEqual(kinds, {"static_configs", "file_sd_configs"}, path)

    def test_promtool_accepts(self) -> None:
        """
        C{promtool check config} accepts it (its file_sd files need not
        exist).
        """
        promtool = shutil.which("promtool")
        if promtool is None:
            raise SkipTest("promtool is not installed (apt-get install prometheus)")
        done = subprocess.run([promtool, "check", "config", SCRAPE_CONFIG], capture_output=True, text=True,
                              timeout=30, check=False)
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)


class GuideTests(SynchronousTestCase):
    """
    C{docs/observability.md}.
    """

    def test_named_metrics_exported(self) -> None:
        """
        Every C{istio_*} and C{txmesh_*} name the guide mentions is an
        exported family or sample name.
        """
        samples, families = exported()
        with open(GUIDE, encoding="utf-8") as f:
            named = set(_MENTION.findall(f.read()))
        self.assertEqual(named - samples - families, set())

    def test_pilot_table_complete(self) -> None:
        """
        The pilot metrics table lists every family a pilot exports.
        """
        with open(GUIDE, encoding="utf-8") as f:
            text = f.read()
        table = text[text.index("## Pilot metrics"):]
        table = table[:table.index("\n\n", table.index("|"))]
        for family in PilotMetrics().registry.collect():
            name = family.name + ("_total" if family.type == "counter" else "")
            self.assertIn(f"`{name}`", table)
