"""Cluster files: groups of identical nodes, their links, and direct links between groups.

A cluster file is TOML with one `[[group]]` table per set of identical nodes (device kind
from the catalog, devices per node, node count, bandwidth and latency inside a node and
between nodes) and optional `[[link]]` tables declaring a direct device-to-device path
(RDMA) between two groups; traffic between groups without one is relayed through host
memory. This module parses and validates; every error is a ConfigError naming the file and
the line of the offending table or key. It must not decide how traffic is costed: that is
the predictor's job (hetrain.plan.cluster.cost).

Units, as the key names say: bandwidths in GB/s (1e9 bytes) per direction, intra-node
bandwidth per device (what one device can push to its node peers, e.g. NVLink), inter-node
bandwidth per node (the sum of its network adapters), link bandwidth per node, latencies
in microseconds.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import sys
from dataclasses import dataclass, field

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from hetrain.errors import ConfigError
from hetrain.hardware.catalog import DTYPES, DeviceKind, get_kind
from hetrain.units import GIB, GIGA, TERA

_US = 1e-6
_TOP_KEYS = ("name", "description", "group", "link")
_GROUP_REQUIRED = ("name", "kind", "nodes", "devices_per_node", "intra_node_gbytes_per_s",
                   "inter_node_gbytes_per_s")
_GROUP_DEFAULTS = {"intra_node_latency_us": 3.0, "inter_node_latency_us": 10.0}
_GROUP_OVERRIDES = ("memory_gib", "mem_bw_gbytes_per_s", *(f"peak_{d}_tflops" for d in DTYPES))
_GROUP_KEYS = (*_GROUP_REQUIRED, *_GROUP_DEFAULTS, *_GROUP_OVERRIDES, "label")
_LINK_REQUIRED = ("groups", "gbytes_per_s")
_LINK_DEFAULTS = {"latency_us": 10.0}
_LINK_KEYS = (*_LINK_REQUIRED, *_LINK_DEFAULTS)


@dataclass(frozen=True)
class Group:
    """A set of identical nodes."""

    name: str
    kind: DeviceKind
    """Catalog kind, with the file's memory/peak overrides applied."""
    nodes: int
    devices_per_node: int
    intra_node_bytes_per_s: float
    """Per device, per direction, to peers in the same node."""
    inter_node_bytes_per_s: float
    """Per node, per direction, to other nodes (sum of its network adapters)."""
    intra_node_latency_s: float
    inter_node_latency_s: float
    overrides: dict = field(default_factory=dict, compare=False)
    """The catalog overrides as written in the file (memory_gib, peak_*_tflops)."""
    catalog_kind: str = ""
    """The catalog kind's name when the file gives the group a `label` (then kind.name is the
    label, so planner, predictor and runtime treat the group as a kind of its own); '' otherwise."""

    @property
    def devices(self) -> int:
        return self.nodes * self.devices_per_node


@dataclass(frozen=True)
class Link:
    """A direct device-to-device path (RDMA) between two groups."""

    groups: tuple[str, str]
    bytes_per_s: float
    """Per node, per direction."""
    latency_s: float


@dataclass(frozen=True)
class Cluster:
    name: str
    groups: list[Group]
    links: list[Link] = field(default_factory=list)
    description: str = ""

    @property
    def devices(self) -> int:
        return sum(g.devices for g in self.groups)

    def group(self, name: str) -> Group:
        for g in self.groups:
            if g.name == name:
                return g
        raise ConfigError(f"cluster '{self.name}' has no group '{name}'; groups: "
                          f"{', '.join(g.name for g in self.groups)}")

    def link_between(self, a: str, b: str) -> Link | None:
        for link in self.links:
            if set(link.groups) == {a, b}:
                return link
        return None

    def subcluster(self, group_names: list[str]) -> "Cluster":
        """The same cluster restricted to some groups (and the links among them)."""
        keep = set(group_names)
        return Cluster(f"{self.name}[{','.join(group_names)}]",
                       [g for g in self.groups if g.name in keep],
                       [link for link in self.links if set(link.groups) <= keep], self.description)

    def summary(self) -> str:
        lines = [f"cluster {self.name}: {self.devices} devices in {len(self.groups)} groups"]
        for g in self.groups:
            lines.append(f"  {g.name}: {g.nodes} x {g.devices_per_node} {g.kind.name} "
                         f"({g.kind.memory_bytes / GIB:.0f} GiB, "
                         f"{g.kind.peak_flops_per_s() / TERA:.0f} TFLOP/s bf16), "
                         f"intra {g.intra_node_bytes_per_s / GIGA:.0f} GB/s, "
                         f"inter {g.inter_node_bytes_per_s / GIGA:.0f} GB/s per node")
        for link in self.links:
            lines.append(f"  direct link {link.groups[0]} <-> {link.groups[1]}: "
                         f"{link.bytes_per_s / GIGA:.0f} GB/s per node")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Locating tables and keys in the text (tomllib reports no positions for valid TOML).

_HEADER = re.compile(r"^\s*\[\[?\s*([A-Za-z0-9_.\-\"']+)\s*\]\]?")
_KEY = re.compile(r"^\s*([A-Za-z0-9_\-]+|\"[^\"]*\")\s*=")


@dataclass
class _Where:
    """Line numbers (1-based) of the top-level keys and of each array-of-tables entry."""

    top: dict[str, int] = field(default_factory=dict)
    tables: dict[str, list[tuple[int, dict[str, int]]]] = field(default_factory=dict)

    def table(self, kind: str, index: int) -> tuple[int, dict[str, int]]:
        entries = self.tables.get(kind, [])
        return entries[index] if index < len(entries) else (0, {})


def _locate(text: str) -> _Where:
    where, keys = _Where(), None
    for lineno, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        header = _HEADER.match(line)
        if header:
            keys = {}
            where.tables.setdefault(header.group(1).strip("\"'"), []).append((lineno, keys))
            continue
        key = _KEY.match(line)
        if key:
            name = key.group(1).strip('"')
            (where.top if keys is None else keys).setdefault(name, lineno)
    return where


class _Reporter:
    """Builds 'file:line: message' errors for one cluster file."""

    def __init__(self, path: str, where: _Where):
        self.path, self.where = path, where

    def error(self, message: str, table: str | None = None, index: int = 0, key: str | None = None) -> ConfigError:
        if table is None:
            line = self.where.top.get(key or "", 0)
        else:
            header_line, keys = self.where.table(table, index)
            line = keys.get(key, header_line) if key else header_line
        at = f"{self.path}:{line}" if line else self.path
        return ConfigError(f"{at}: {message}")


@dataclass
class _Table:
    """One [[group]] or [[link]] table of the file, for checks that name it and its line."""

    raw: dict
    kind: str
    """"group" or "link"."""
    index: int
    what: str
    """How messages name it: "group 2 'h100'"."""
    rep: _Reporter

    def error(self, message: str, key: str | None = None) -> ConfigError:
        return self.rep.error(f"{self.what}: {message}", self.kind, self.index, key)

    def check_keys(self, allowed: tuple[str, ...], required: tuple[str, ...]) -> None:
        for key in self.raw:
            if key not in allowed:
                near = difflib.get_close_matches(key, allowed, n=1)
                hint = f" (did you mean '{near[0]}'?)" if near else ""
                raise self.error(f"unknown key '{key}'{hint}; valid keys: {', '.join(allowed)}", key)
        for key in required:
            if key not in self.raw:
                raise self.error(f"lacks required key '{key}'")

    def number(self, key: str, integer: bool = False, allow_zero: bool = False) -> float:
        value = self.raw[key]
        ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok_type:
            raise self.error(f"{key} must be {'an integer' if integer else 'a number'}, got {value!r}", key)
        if value < 0 or (value == 0 and not allow_zero):
            raise self.error(f"{key} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}", key)
        return value


def _kind_with_overrides(kind: DeviceKind, raw: dict) -> DeviceKind:
    changes = {}
    if "memory_gib" in raw:
        changes["memory_bytes"] = int(float(raw["memory_gib"]) * GIB)
    if "mem_bw_gbytes_per_s" in raw:
        changes["mem_bw_bytes_per_s"] = float(raw["mem_bw_gbytes_per_s"]) * GIGA
    peaks = dict(kind.peak_flops)
    for d in DTYPES:
        if f"peak_{d}_tflops" in raw:
            peaks[d] = float(raw[f"peak_{d}_tflops"]) * TERA
    if peaks != kind.peak_flops:
        changes["peak_flops"] = peaks
    return dataclasses.replace(kind, **changes) if changes else kind


def _parse_group(raw: dict, index: int, rep: _Reporter) -> Group:
    name = f" '{raw['name']}'" if isinstance(raw.get("name"), str) else ""
    t = _Table(raw, "group", index, f"group {index + 1}{name}", rep)
    t.check_keys(_GROUP_KEYS, _GROUP_REQUIRED)
    if not isinstance(raw["name"], str) or not raw["name"]:
        raise t.error("name must be a non-empty string", "name")
    if not isinstance(raw["kind"], str):
        raise t.error("kind must be a string", "kind")
    try:
        kind = get_kind(raw["kind"])
    except ConfigError as err:
        raise t.error(str(err), "kind") from None
    num = {k: t.number(k, integer=k in ("nodes", "devices_per_node")) for k in _GROUP_REQUIRED[2:]}
    for key, default in _GROUP_DEFAULTS.items():
        num[key] = t.number(key, allow_zero=True) if key in raw else default
    overrides = {k: t.number(k) for k in _GROUP_OVERRIDES if k in raw}
    kind = _kind_with_overrides(kind, overrides)
    catalog_kind = ""
    if "label" in raw:  # a kind of its own, e.g. CPU processes standing in for a second kind
        if not isinstance(raw["label"], str) or not raw["label"]:
            raise t.error("label must be a non-empty string", "label")
        catalog_kind, kind = kind.name, dataclasses.replace(kind, name=raw["label"])
    return Group(
        name=raw["name"],
        kind=kind,
        nodes=int(num["nodes"]),
        devices_per_node=int(num["devices_per_node"]),
        intra_node_bytes_per_s=num["intra_node_gbytes_per_s"] * GIGA,
        inter_node_bytes_per_s=num["inter_node_gbytes_per_s"] * GIGA,
        intra_node_latency_s=num["intra_node_latency_us"] * _US,
        inter_node_latency_s=num["inter_node_latency_us"] * _US,
        overrides=overrides,
        catalog_kind=catalog_kind,
    )


def _parse_link(raw: dict, index: int, names: list[str], rep: _Reporter) -> Link:
    t = _Table(raw, "link", index, f"link {index + 1}", rep)
    t.check_keys(_LINK_KEYS, _LINK_REQUIRED)
    pair = raw["groups"]
    if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(g, str) for g in pair)):
        raise t.error("groups must be a list of two group names", "groups")
    for g in pair:
        if g not in names:
            near = difflib.get_close_matches(g, names, n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            raise t.error(f"names unknown group '{g}'{hint}; groups: {', '.join(names)}", "groups")
    if pair[0] == pair[1]:
        raise t.error(f"joins group '{pair[0]}' to itself; links are between two groups", "groups")
    bw = t.number("gbytes_per_s")
    lat = t.number("latency_us", allow_zero=True) if "latency_us" in raw else _LINK_DEFAULTS["latency_us"]
    return Link((pair[0], pair[1]), bw * GIGA, lat * _US)


def parse_cluster(text: str, path: str = "<cluster>") -> Cluster:
    """A validated Cluster from cluster-file text; `path` only names the file in errors."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None
    rep = _Reporter(path, _locate(text))
    for key in doc:
        if key not in _TOP_KEYS:
            near = difflib.get_close_matches(key, _TOP_KEYS, n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            line = rep.where.top.get(key) or rep.where.table(key, 0)[0]
            at = f"{path}:{line}" if line else path
            raise ConfigError(f"{at}: unknown key or table '{key}'{hint}; a cluster file has "
                              f"[[group]] and [[link]] tables and optional name, description")
    raw_groups = doc.get("group", [])
    if not isinstance(raw_groups, list) or not raw_groups:
        raise ConfigError(f"{path}: no [[group]] table; a cluster needs at least one group of nodes")
    groups: list[Group] = []
    for i, raw in enumerate(raw_groups):
        g = _parse_group(raw, i, rep)
        if any(other.name == g.name for other in groups):
            raise rep.error(f"duplicate group name '{g.name}'; group names must be unique", "group", i, "name")
        groups.append(g)
    names = [g.name for g in groups]
    links: list[Link] = []
    for i, raw in enumerate(doc.get("link", [])):
        link = _parse_link(raw, i, names, rep)
        if any(set(other.groups) == set(link.groups) for other in links):
            raise rep.error(f"a second link between '{link.groups[0]}' and '{link.groups[1]}'",
                            "link", i, "groups")
        links.append(link)
    default_name = os.path.splitext(os.path.basename(path))[0]
    return Cluster(str(doc.get("name", default_name)), groups, links, str(doc.get("description", "")))


def load_cluster(path) -> Cluster:
    """Read and validate a cluster file; ConfigError (with file and line) on any problem."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"cluster file '{path}' does not exist") from None
    except OSError as err:
        raise ConfigError(f"cluster file '{path}' cannot be read: {err.strerror}") from None
    return parse_cluster(text, path)


def cluster_to_dict(cluster: Cluster) -> dict:
    """The cluster as cluster-file data (file units), so a plan carries its hardware with it."""
    groups = []
    for g in cluster.groups:
        groups.append({
            "name": g.name, "kind": g.catalog_kind or g.kind.name, "nodes": g.nodes,
            "devices_per_node": g.devices_per_node,
            "intra_node_gbytes_per_s": g.intra_node_bytes_per_s / GIGA,
            "inter_node_gbytes_per_s": g.inter_node_bytes_per_s / GIGA,
            "intra_node_latency_us": g.intra_node_latency_s / _US,
            "inter_node_latency_us": g.inter_node_latency_s / _US,
            **g.overrides,
            **({"label": g.kind.name} if g.catalog_kind else {}),
        })
    links = [{"groups": list(link.groups), "gbytes_per_s": link.bytes_per_s / GIGA,
              "latency_us": link.latency_s / _US} for link in cluster.links]
    return {"name": cluster.name, "description": cluster.description, "group": groups, "link": links}


def cluster_from_dict(doc: dict, path: str = "<plan>") -> Cluster:
    """Inverse of cluster_to_dict, with the same validation as a file."""
    rep = _Reporter(path, _Where())
    groups = [_parse_group(raw, i, rep) for i, raw in enumerate(doc["group"])]
    names = [g.name for g in groups]
    links = [_parse_link(raw, i, names, rep) for i, raw in enumerate(doc.get("link", []))]
    return Cluster(doc.get("name", "cluster"), groups, links, doc.get("description", ""))
