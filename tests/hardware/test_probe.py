from hetrain.hardware.probe import MachineInfo, probe


def test_probe_describes_this_machine():
    info = probe()
    assert isinstance(info, MachineInfo)
    assert info.host_ram_bytes > 2**28
    assert 0 < info.host_ram_available_bytes <= info.host_ram_bytes
    assert 1 <= info.physical_cores <= info.logical_cores
    assert info.torch_threads >= 1
    for acc in info.accelerators:
        assert acc.memory_bytes > 0
    assert "host RAM" in info.summary()
