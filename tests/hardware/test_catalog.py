import pytest

from hetrain.errors import ConfigError
from hetrain.hardware.catalog import get_kind, load_catalog, match_torch_name, parse_catalog
from hetrain.units import GIB

REQUIRED_KINDS = ["V100", "A100-40GB", "A100-80GB", "H100-SXM", "H100-PCIe", "H200", "L40S",
                  "RTX-4090", "MI250X", "MI300X", "Ascend-910B", "cpu"]


def test_catalog_covers_required_kinds_with_sources():
    catalog = load_catalog()
    for name in REQUIRED_KINDS:
        kind = catalog[name]
        assert kind.source, name
        assert kind.memory_bytes > 0 and kind.mem_bw_bytes_per_s > 0 and kind.host_link_bytes_per_s > 0
        assert kind.collective_backend in ("nccl", "rccl", "hccl", "gloo")
        assert kind.peak_flops_per_s("bf16") > 0


def test_dense_datasheet_figures():
    a100 = get_kind("A100-80GB")
    assert a100.memory_bytes == 80 * GIB
    assert a100.peak_flops_per_s("bf16") == pytest.approx(312e12)
    assert a100.peak_flops_per_s("fp32") == pytest.approx(19.5e12)
    assert get_kind("H100-SXM").peak_flops_per_s("bf16") == pytest.approx(989.4e12)  # not 1,979 (sparse)
    assert get_kind("MI300X").collective_backend == "rccl"
    assert get_kind("Ascend-910B").collective_backend == "hccl"
    assert get_kind("cpu").collective_backend == "gloo"


def test_bf16_falls_back_to_fp16_on_v100_and_missing_dtype_is_an_error():
    v100 = get_kind("V100")
    assert "bf16" not in v100.peak_flops
    assert v100.peak_flops_per_s("bf16") == v100.peak_flops["fp16"]
    with pytest.raises(ConfigError, match="no published fp32 peak"):
        get_kind("Ascend-910B").peak_flops_per_s("fp32")


def test_lookup_is_case_insensitive():
    assert get_kind("h100-sxm").name == "H100-SXM"


def test_unknown_kind_lists_known_and_suggests_nearest():
    with pytest.raises(ConfigError) as err:
        get_kind("A100-80G")
    msg = str(err.value)
    assert "unknown device kind 'A100-80G'" in msg
    assert "did you mean 'A100-80GB'" in msg
    assert "known kinds: V100, A100-40GB" in msg


def test_load_catalog_returns_a_fresh_dict():
    a = load_catalog()
    a.pop("V100")
    assert "V100" in load_catalog()


@pytest.mark.parametrize("torch_name,kind", [
    ("NVIDIA A100-SXM4-80GB", "A100-80GB"), ("NVIDIA A100-PCIE-40GB", "A100-40GB"),
    ("NVIDIA H100 80GB HBM3", "H100-SXM"), ("NVIDIA H100 PCIe", "H100-PCIe"),
    ("NVIDIA H200", "H200"), ("NVIDIA GeForce RTX 4090", "RTX-4090"), ("Tesla V100-SXM2-32GB", "V100"),
    ("AMD Instinct MI250X", "MI250X-GCD"), ("AMD Instinct MI300X", "MI300X"), ("NVIDIA L40S", "L40S"),
])
def test_torch_names_map_to_kinds(torch_name, kind):
    assert match_torch_name(torch_name).name == kind


def test_unrecognised_torch_name_maps_to_none():
    assert match_torch_name("Some Future Accelerator") is None


def test_parse_catalog_rejects_incomplete_tables():
    with pytest.raises(ConfigError, match="lacks"):
        parse_catalog('[X]\nvendor = "v"\n')
    with pytest.raises(ConfigError, match="collective_backend"):
        parse_catalog('[X]\nvendor="v"\nmemory_gib=1\nmem_bw_gbytes_per_s=1\nhost_link_gbytes_per_s=1\n'
                      'collective_backend="mpi"\nsource="s"\npeak_bf16_tflops=1\n')
