"""The CPU facts every benchmark records, read from /proc/cpuinfo."""

from splitwise_local.hardware import cpu as machine


def test_model_and_flags_come_from_cpuinfo(tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\nmodel name\t: AMD EPYC 7B13\n"
        "flags\t\t: fpu sse avx2 fma avx512f amx_bf16\n"
    )
    monkeypatch.setattr(machine, "CPUINFO", info)
    machine.cpu_model.cache_clear()
    machine.isa_flags.cache_clear()
    try:
        assert machine.cpu_model() == "AMD EPYC 7B13"
        assert machine.isa_flags() == ("avx2", "fma", "avx512f", "amx_bf16")
        assert machine.describe() == "AMD EPYC 7B13 [avx2 fma avx512f amx_bf16]"
    finally:
        machine.cpu_model.cache_clear()
        machine.isa_flags.cache_clear()


def test_this_machine_is_described():
    assert machine.cpu_model()
    assert set(machine.isa_flags()) <= set(machine.ISA_FLAGS)
