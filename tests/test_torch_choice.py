"""tools/torch_choice.py: which torch build ``make setup`` installs, decided for every kind of machine without
installing anything (pip's resolution and the index's reachability are stand-ins), plus the files that use it."""

import importlib.util
import os
import stat
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("torch_choice", REPO / "tools" / "torch_choice.py")
tc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tc)

PIN = "torch==2.13.0"


def choose(gpus=(), found=("2.13.0", "files.pythonhosted.org"), cpu_index_up=False, machine="Linux-x86_64",
           user_set=False, index=""):
    calls = []

    def resolve(spec, index=None):
        calls.append(index)
        return ("2.13.0+cpu", tc.CPU_INDEX) if index else found

    return tc.choose(PIN, index, user_set, list(gpus), machine, resolve, lambda url: cpu_index_up), calls


def test_the_users_choice_wins_and_is_not_probed():
    (args, line), calls = choose(user_set=True, index="https://example.org/simple")
    assert args == ["--index-url", "https://example.org/simple", PIN] and "your choice" in line and calls == []


def test_a_gpu_gets_pypis_cuda_build():
    (args, line), _ = choose(gpus=["NVIDIA H100 80GB HBM3"])
    assert args == [PIN] and "CUDA build" in line and "H100" in line


def test_a_gpu_is_warned_when_a_configured_wheel_folder_would_give_the_cpu_build():
    (args, line), _ = choose(gpus=["NVIDIA H100"], found=("2.13.0+cpu", "/opt/wheels"))
    assert args == [PIN] and f"TORCH_INDEX={tc.CUDA_INDEX}" in line


def test_no_gpu_and_a_local_cpu_wheel_keeps_it():
    (args, line), _ = choose(found=("2.13.0+cpu", "/opt/wheels"))
    assert args == [PIN] and "CPU build" in line and "2.13.0+cpu from /opt/wheels" in line


def test_no_gpu_and_the_cpu_index_reachable_uses_it():
    (args, line), calls = choose(cpu_index_up=True)
    assert args == ["--index-url", tc.CPU_INDEX, PIN] and "CPU wheel index" in line and calls == [None, tc.CPU_INDEX]


def test_no_gpu_and_nothing_but_pypi_says_what_it_costs_and_how_to_avoid_it():
    (args, line), _ = choose()
    assert args == [PIN] and "about 6 GB" in line and "make setup TORCH=" in line and "TORCH_INDEX=" in line


def test_pypis_wheel_is_the_cpu_build_off_linux_x86_64():
    (args, line), _ = choose(machine="Darwin-arm64", found=("2.13.0", "files.pythonhosted.org"))
    assert args == [PIN] and "CPU build" in line


def test_gpu_names_from_nvidia_smi(tmp_path, monkeypatch):
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-1234)'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert tc.gpu_names() == ["NVIDIA H100 80GB HBM3"]
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    assert tc.gpu_names() == []


@pytest.mark.parametrize("origin, expected", [("file", False), ("command line", True), ("environment", True)])
def test_main_reads_makes_origin(monkeypatch, capsys, origin, expected):
    seen = {}
    monkeypatch.setattr(tc, "choose", lambda spec, index, user_set, *rest: (seen.update(user_set=user_set) or
                                                                            ([spec], "torch: x")))
    monkeypatch.setattr(tc, "gpu_names", list)
    monkeypatch.setenv("TORCH_ORIGIN", origin)
    monkeypatch.setenv("TORCH", "torch==2.12.0")
    assert tc.main() == 0 and seen["user_set"] is expected
    out = capsys.readouterr()
    assert out.out.strip() == "torch==2.12.0" and out.err.strip() == "torch: x"


def test_makefile_and_environment_follow_the_rule():
    makefile = (REPO / "Makefile").read_text()
    assert "tools/torch_choice.py" in makefile and "TORCH_INDEX" in makefile
    pip = yaml.safe_load((REPO / "environment.yml").read_text())["dependencies"][-1]["pip"]
    assert pip.index(f"--extra-index-url {tc.CPU_INDEX}") < pip.index(PIN)
