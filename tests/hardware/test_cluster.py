import textwrap
from pathlib import Path

import pytest

from hetrain.errors import ConfigError
from hetrain.units import GIB
from hetrain.hardware.cluster import cluster_from_dict, cluster_to_dict, load_cluster, parse_cluster

GOOD = textwrap.dedent("""\
    name = "two"

    [[group]]
    name = "a"
    kind = "A100-80GB"
    nodes = 2
    devices_per_node = 4
    intra_node_gbytes_per_s = 300
    inter_node_gbytes_per_s = 100

    [[group]]
    name = "b"
    kind = "mi250x-gcd"
    nodes = 1
    devices_per_node = 8
    intra_node_gbytes_per_s = 100
    inter_node_gbytes_per_s = 50
    inter_node_latency_us = 12
    memory_gib = 60

    [[link]]
    groups = ["a", "b"]
    gbytes_per_s = 25
    """)


def test_parse_good_cluster():
    c = parse_cluster(GOOD, "two.toml")
    assert c.name == "two" and c.devices == 16
    a, b = c.groups
    assert a.kind.name == "A100-80GB" and a.devices == 8
    assert a.intra_node_bytes_per_s == 300e9 and a.inter_node_latency_s == pytest.approx(10e-6)
    assert b.kind.name == "MI250X-GCD" and b.kind.memory_bytes == 60 * GIB
    assert b.inter_node_latency_s == pytest.approx(12e-6)
    assert c.link_between("b", "a").bytes_per_s == 25e9
    assert c.subcluster(["a"]).devices == 8 and not c.subcluster(["a"]).links


def test_dict_round_trip():
    c = parse_cluster(GOOD, "two.toml")
    assert cluster_from_dict(cluster_to_dict(c)) == c


def test_example_mixed_cluster_loads():
    c = load_cluster(Path(__file__).resolve().parents[2] / "configs/clusters/mixed.toml")
    assert len({g.kind.name for g in c.groups}) == 3
    assert c.devices == 1024


def _line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


@pytest.mark.parametrize("old,new,message,line_needle", [
    ('kind = "mi250x-gcd"', 'kind = "MI999"', "unknown device kind 'MI999'", 'kind = "MI999"'),
    ("nodes = 2", "nodes = 0", "nodes must be > 0", "nodes = 0"),
    ("devices_per_node = 4", "devices_per_node = 2.5", "devices_per_node must be an integer", "devices_per_node = 2.5"),
    ('name = "b"', 'name = "a"', "duplicate group name 'a'", 'name = "a"\nkind = "mi'),
    ('groups = ["a", "b"]', 'groups = ["a", "c"]', "unknown group 'c'", 'groups = ["a", "c"]'),
    ("inter_node_latency_us = 12", "inter_node_latncy_us = 12", "did you mean 'inter_node_latency_us'", "latncy"),
    ("memory_gib = 60", "memory_gib = -1", "memory_gib must be > 0", "memory_gib = -1"),
])
def test_errors_name_file_and_line(old, new, message, line_needle):
    text = GOOD.replace(old, new, 1)
    with pytest.raises(ConfigError) as err:
        parse_cluster(text, "bad.toml")
    msg = str(err.value)
    assert message in msg
    first_line = line_needle.split("\n")[0]
    if "\n" in line_needle:  # the second of two equal lines
        idx = text.index(line_needle)
        expected = text[:idx].count("\n") + 1
    else:
        expected = _line_of(text, first_line)
    assert msg.startswith(f"bad.toml:{expected}:"), msg


def test_missing_key_points_at_the_group_header():
    text = GOOD.replace("inter_node_gbytes_per_s = 100\n", "", 1)
    with pytest.raises(ConfigError, match=r"bad.toml:3: group 1 'a': lacks required key 'inter_node_gbytes_per_s'"):
        parse_cluster(text, "bad.toml")


def test_unknown_table_and_invalid_toml():
    with pytest.raises(ConfigError, match=r"bad.toml:3: unknown key or table 'groups' \(did you mean 'group'\?\)"):
        parse_cluster('name = "x"\n\n[[groups]]\nname = "a"\n', "bad.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        parse_cluster("[[group]\n", "bad.toml")
    with pytest.raises(ConfigError, match="no \\[\\[group\\]\\] table"):
        parse_cluster('name = "x"\n', "bad.toml")


def test_link_to_itself_and_second_link_are_errors():
    with pytest.raises(ConfigError, match="to itself"):
        parse_cluster(GOOD.replace('groups = ["a", "b"]', 'groups = ["a", "a"]'), "bad.toml")
    with pytest.raises(ConfigError, match="a second link"):
        parse_cluster(GOOD + '\n[[link]]\ngroups = ["b", "a"]\ngbytes_per_s = 5\n', "bad.toml")


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_cluster("/nonexistent/cluster.toml")


def test_a_label_makes_a_group_a_kind_of_its_own():
    """configs/clusters/local-cpu.toml: two groups of CPU processes that plan and run as two kinds."""
    c = load_cluster(Path(__file__).resolve().parents[2] / "configs/clusters/local-cpu.toml")
    assert [(g.name, g.kind.name, g.catalog_kind, g.devices) for g in c.groups] == [
        ("cpu-a", "cpu-a", "cpu", 2), ("cpu-b", "cpu-b", "cpu", 2)]
    data = cluster_to_dict(c)
    assert [(g["kind"], g["label"]) for g in data["group"]] == [("cpu", "cpu-a"), ("cpu", "cpu-b")]
    assert cluster_from_dict(data) == c
    with pytest.raises(ConfigError, match="label must be a non-empty string"):
        parse_cluster(GOOD.replace('kind = "A100-80GB"', 'kind = "A100-80GB"\nlabel = ""'), "two.toml")
