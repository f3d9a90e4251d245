"""Check PromQL with promtool: the PrometheusRule's rules, their unit tests, and any other
expression (prometheus-adapter queries, dashboard panels) wrapped into a throwaway rule file.

Example:
    >>> adapter_query_to_promql("sum by (<<.GroupBy>>) (rate(x{<<.LabelMatchers>>}[2m]))")
    'sum by (pod) (rate(x{namespace="segserve"}[2m]))'
    >>> grafana_to_promql('rate(x{namespace="$namespace"}[$__rate_interval])')
    'rate(x{namespace="segserve"}[5m])'
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path

import yaml

from k8s.tools.toolchain import require

RULES_FILE_NAME = "segserve.rules.yaml"
# Words in PromQL that are not metric names (functions, keywords, aggregations).
_PROMQL_WORDS = frozenset(
    "sum avg min max count stddev stdvar topk bottomk quantile count_values group by without on "
    "ignoring group_left group_right and or unless bool offset rate irate increase delta idelta "
    "deriv changes resets abs ceil floor round clamp clamp_min clamp_max histogram_quantile "
    "label_replace label_join vector scalar time timestamp sort sort_desc absent absent_over_time "
    "avg_over_time min_over_time max_over_time sum_over_time count_over_time last_over_time "
    "quantile_over_time predict_linear exp ln log2 log10 sqrt inf nan le".split()
)


def rules_from_prometheusrule(obj: dict) -> dict:
    """The plain Prometheus rule file a PrometheusRule's ``spec`` stands for."""
    return {"groups": obj["spec"]["groups"]}


def run_promtool(args: list[str], cwd: Path | None = None) -> tuple[bool, str]:
    """(ok, combined output) of ``promtool <args>``."""
    done = subprocess.run(
        [str(require("promtool")), *args], cwd=cwd, capture_output=True, text=True
    )
    return done.returncode == 0, (done.stdout + done.stderr).strip()


def check_rules(rules: dict, test_files: Iterable[Path] = ()) -> list[str]:
    """``promtool check rules`` then ``promtool test rules``; problems, empty when all pass.

    Test files name ``segserve.rules.yaml`` in ``rule_files``; they run beside a copy of it.
    """
    problems = []
    with tempfile.TemporaryDirectory(prefix="segserve-rules-") as tmp:
        path = Path(tmp) / RULES_FILE_NAME
        path.write_text(yaml.safe_dump(rules, sort_keys=False))
        ok, out = run_promtool(["check", "rules", str(path)])
        if not ok:
            problems.append(f"PrometheusRule: promtool check rules failed:\n{out}")
        for test in test_files:
            shutil.copy2(test, Path(tmp) / test.name)
            ok, out = run_promtool(["test", "rules", test.name], cwd=Path(tmp))
            if not ok:
                problems.append(f"PrometheusRule: promtool test rules {test} failed:\n{out}")
    return problems


def adapter_query_to_promql(query: str) -> str:
    """prometheus-adapter's Go template with its placeholders filled in."""
    return query.replace("<<.GroupBy>>", "pod").replace(
        "<<.LabelMatchers>>", 'namespace="segserve"'
    )


def grafana_to_promql(expr: str) -> str:
    """A Grafana panel query with its variables filled in."""
    return expr.replace("$__rate_interval", "5m").replace("$namespace", "segserve")


def check_expressions(named: dict[str, str]) -> list[str]:
    """PromQL syntax of each ``{where: expr}``, via promtool on recording rules."""
    if not named:
        return []
    rules = [{"record": f"check:expr_{i}", "expr": e} for i, e in enumerate(named.values())]
    with tempfile.TemporaryDirectory(prefix="segserve-promql-") as tmp:
        path = Path(tmp) / "exprs.yaml"
        path.write_text(yaml.safe_dump({"groups": [{"name": "check", "rules": rules}]}))
        ok, out = run_promtool(["check", "rules", str(path)])
    if ok:
        return []
    bad = [w for i, w in enumerate(named) if f"expr_{i}" in out or f"{i}:" in out]
    return [f"PromQL in {', '.join(bad) or 'adapter/dashboard'} does not parse:\n{out}"]


def metric_names(expr: str) -> set[str]:
    """Metric names an expression reads (``{__name__=~"A|B"}`` alternatives included).

    >>> sorted(metric_names('sum by (le) (rate(a_bucket{x="y"}[5m])) / on() b'))
    ['a_bucket', 'b']
    >>> sorted(metric_names('rate({__name__=~"Requests(2|5)XX"}[5m])'))
    ['Requests2XX', 'Requests5XX']
    """
    names = set()
    for group in re.findall(r'__name__=~"([^"]+)"', expr):
        prefix, alts, suffix = re.match(r"^(\w*)\(([^)]*)\)(\w*)$", group).groups()
        names |= {f"{prefix}{a}{suffix}" for a in alts.split("|")}
    stripped = re.sub(r'"[^"]*"', '""', expr)  # drop label values
    stripped = re.sub(r"\{[^}]*\}", "", stripped)  # drop matchers
    stripped = re.sub(r"\[[^\]]*\]", "", stripped)  # drop ranges
    stripped = re.sub(
        r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", stripped
    )
    for word in re.findall(r"(?<![\w:.$])([a-zA-Z_][a-zA-Z0-9_:]*)(?![\w(]*\()", stripped):
        if word not in _PROMQL_WORDS and not re.fullmatch(r"\d*e\d+", word):
            names.add(word)
    return names
