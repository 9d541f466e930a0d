#!/usr/bin/env python3
"""Checks deploy/grafana/*.json against the metrics each plane registers.

For every dashboard (default: every *.json next to this script):
  - every panel other than a row has a datasource and at least one target
    with an expression (panels inside collapsed rows are checked too);
  - every `gatesvr_*` metric name used in a target expression or in a
    template variable query, with _bucket/_count/_sum stripped, appears as a
    string literal ("name") in the Rust sources of the dashboard's plane (its tag
    `dataplane` or `controlplane`: dataplane/src/**/*.rs or
    controlplane/src/**/*.rs), i.e. is registered there;
  - the control-plane dashboard shows every series of `SERIES` in
    controlplane/src/metrics.rs (the list its unit test holds the registry to);
  - a name used with _bucket/_count/_sum is registered as a histogram
    (HistogramOpts::new("name", ...));
  - every rate()/increase()/irate() range is [$__rate_interval];
  - the `datasource` (prometheus) and `node` template variables exist.

Exits 1 listing every problem. Python 3 standard library only.
Usage: deploy/grafana/check.py [dashboard.json ...]
"""

import json
import pathlib
import re
import sys

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent.parent
SOURCES = {
    "dataplane": REPO / "dataplane" / "src",
    "controlplane": REPO / "controlplane" / "src",
}
# The `node` variable's query per plane: a series every node of that plane has.
NODE_QUERY = {
    "dataplane": "label_values(gatesvr_sessions, instance)",
    "controlplane": "label_values(gatesvr_cp_raft_term, instance)",
}

METRIC_RE = re.compile(r"\b(gatesvr_[a-z0-9_]+)\b")
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")
RANGE_FN_RE = re.compile(r"\b(rate|irate|increase)\s*\(([^()]*(?:\([^()]*\))?[^()]*)\)")


def rust_sources(plane):
    text = []
    for path in sorted(SOURCES[plane].rglob("*.rs")):
        text.append(path.read_text(encoding="utf-8", errors="replace"))
    return "\n".join(text)


def plane_of(dashboard):
    tags = dashboard.get("tags", [])
    planes = [p for p in SOURCES if p in tags]
    return planes[0] if len(planes) == 1 else None


def controlplane_series():
    text = (SOURCES["controlplane"] / "metrics.rs").read_text(encoding="utf-8")
    block = re.search(r"pub const SERIES: &\[&str\] = &\[(.*?)\];", text, re.S)
    return re.findall(r'"(gatesvr_[a-z0-9_]+)"', block.group(1)) if block else []


def panels(dashboard):
    """Every panel, rows' nested panels included, with a display path."""
    for panel in dashboard.get("panels", []):
        yield panel
        for inner in panel.get("panels", []) or []:
            yield inner


def base_name(name):
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)], True
    return name, False


def check(path):
    problems = []
    try:
        dashboard = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return [f"{path}: cannot load: {e}"], set()
    plane = plane_of(dashboard)
    if plane is None:
        return [f"{path}: tag it with exactly one of {sorted(SOURCES)}"], set()
    source = rust_sources(plane)

    used = {}  # metric name as written -> where

    def note(expr, where):
        for name in METRIC_RE.findall(expr):
            used.setdefault(name, where)
        for fn, args in RANGE_FN_RE.findall(expr):
            ranges = re.findall(r"\[([^\]]*)\]", args)
            if not ranges or any(r != "$__rate_interval" for r in ranges):
                problems.append(f"{where}: {fn}() not over [$__rate_interval]: {expr}")

    if dashboard.get("schemaVersion") != 39:
        problems.append(f"schemaVersion is {dashboard.get('schemaVersion')!r}, expected 39")

    variables = {v.get("name"): v for v in dashboard.get("templating", {}).get("list", [])}
    ds = variables.get("datasource")
    if not ds or ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        problems.append("missing template variable `datasource` of type datasource/prometheus")
    node = variables.get("node")
    if not node:
        problems.append("missing template variable `node`")
    for name, var in variables.items():
        query = var.get("query")
        if isinstance(query, dict):
            query = query.get("query", "")
        if var.get("type") == "query" and isinstance(query, str):
            note(query, f"variable {name}")
    if node:
        query = node.get("query")
        query = query.get("query") if isinstance(query, dict) else query
        if query != NODE_QUERY[plane]:
            problems.append(f"variable node: query is {query!r}")

    ids = set()
    for panel in panels(dashboard):
        title = panel.get("title") or f"id {panel.get('id')}"
        where = f"panel {title!r}"
        if panel.get("id") in ids:
            problems.append(f"{where}: duplicate id {panel.get('id')}")
        ids.add(panel.get("id"))
        if "gridPos" not in panel:
            problems.append(f"{where}: no gridPos")
        if panel.get("type") == "row":
            continue
        if not panel.get("datasource"):
            problems.append(f"{where}: no datasource")
        targets = panel.get("targets") or []
        if not targets:
            problems.append(f"{where}: no targets")
        for target in targets:
            if not target.get("datasource"):
                problems.append(f"{where} target {target.get('refId')}: no datasource")
            expr = target.get("expr", "")
            if not expr.strip():
                problems.append(f"{where} target {target.get('refId')}: empty expr")
            note(expr, where)

    unknown = []
    for name, where in sorted(used.items()):
        base, histogram_series = base_name(name)
        if f'"{base}"' not in source:
            # `gatesvr_x_count` could be a real counter: accept the unstripped name too.
            if histogram_series and f'"{name}"' in source:
                continue
            unknown.append(f"{name} (first used in {where})")
            continue
        if histogram_series and not re.search(
            r'HistogramOpts::new\(\s*"' + re.escape(base) + '"', source
        ):
            problems.append(f"{where}: {name} used but {base} is not registered as a histogram")
    if unknown:
        problems.append(f"metrics not registered in {plane}/src/**/*.rs:\n    " + "\n    ".join(unknown))
    if plane == "controlplane":
        shown = {base_name(n)[0] for n in used}
        series = controlplane_series()
        if not series:
            problems.append("SERIES not found in controlplane/src/metrics.rs")
        missing = [s for s in series if s not in shown]
        if missing:
            problems.append("control-plane series not on the dashboard: " + ", ".join(missing))
    return problems, set(used)


def main(argv):
    files = [pathlib.Path(a) for a in argv[1:]] or sorted(HERE.glob("*.json"))
    if not files:
        print("no dashboards found", file=sys.stderr)
        return 1
    failed = False
    for path in files:
        problems, used = check(path)
        if problems:
            failed = True
            print(f"FAIL {path}")
            for p in problems:
                print(f"  {p}")
        else:
            print(f"ok   {path}: {len(used)} metric names, all registered")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
