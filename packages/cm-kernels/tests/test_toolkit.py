"""The CUDA toolkit search and the build decision (src/cm_kernels/_build_config.py), on fake
toolkits made of shell scripts and empty files, so they behave the same on any machine; and once
on this machine's real toolkit when there is one (CI has nvcc)."""

import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from cm_kernels import _build_config as cfg


def fake_toolkit(root: Path, version="13.0", headers=True, cudart=True) -> Path:
    """<root>/bin/nvcc answering --version and --dryrun like the real one, include/, lib/."""
    (root / "bin").mkdir(parents=True)
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text(
        "#!/bin/sh\n"
        'case "$1" in\n'
        f'  --version) echo "Cuda compilation tools, release {version}, V{version}.1" ;;\n'
        f'  --dryrun) echo "#\\$ TOP={root}/bin/.." >&2 ;;\n'
        "esac\n"
    )
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IEXEC)
    if headers:
        (root / "include").mkdir()
        (root / "include" / "cuda_runtime_api.h").write_text("")
    if cudart:
        (root / "lib").mkdir()
        (root / "lib" / "libcudart.so").write_text("")
    return nvcc


def wrapper(folder: Path, target: Path) -> Path:
    """An `nvcc` that is a small script calling the real one (as /usr/local/bin/nvcc here)."""
    folder.mkdir(parents=True)
    script = folder / "nvcc"
    script.write_text(f'#!/bin/sh\nexec {target} "$@"\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No CUDA_* variables, PATH without any nvcc, no nvidia wheels, torch a CUDA 13.0 build."""
    for var in ("CUDA_HOME", "CUDA_PATH", "CM_KERNELS_CUDA", "CM_KERNELS_SKIP_CUDA", "CM_KERNELS_CUDA_ARCHS"):
        monkeypatch.delenv(var, raising=False)
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", f"{empty}:/usr/bin:/bin")
    monkeypatch.setattr(cfg, "_nvidia_wheel_dirs", lambda: [])
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    real = cfg._candidates
    # Keep the machine's own /usr/local/cuda* out of these tests.
    monkeypatch.setattr(cfg, "_candidates", lambda: [c for c in real() if not c[0].startswith("/usr/local/cuda")])
    return monkeypatch


def test_wrapper_script_on_path_leads_to_the_real_toolkit(clean_env, tmp_path):
    real = fake_toolkit(tmp_path / "cuda-13.0")
    script = wrapper(tmp_path / "usr-local-bin", real)
    clean_env.setenv("PATH", f"{script.parent}:{os.environ['PATH']}")
    toolkit, _ = cfg.find_toolkit()
    assert toolkit is not None
    assert Path(toolkit.home) == (tmp_path / "cuda-13.0").resolve()  # not usr-local-bin/..
    assert toolkit.version == "13.0" and "TOP=" in toolkit.found_by
    assert toolkit.include_dirs == () and toolkit.cudart_dir == ""


def test_explicit_cuda_home_is_the_only_candidate(clean_env, tmp_path):
    fake_toolkit(tmp_path / "good")
    clean_env.setenv("PATH", f"{tmp_path / 'good' / 'bin'}:{os.environ['PATH']}")
    clean_env.setenv("CUDA_HOME", str(tmp_path / "nothing-here"))
    toolkit, notes = cfg.find_toolkit()
    assert toolkit is None
    assert len(notes) == 1 and "CUDA_HOME=" in notes[0] and "no nvcc" in notes[0]


def test_major_version_mismatch_is_refused(clean_env, tmp_path):
    fake_toolkit(tmp_path / "cuda-12", version="12.4")
    clean_env.setenv("CUDA_HOME", str(tmp_path / "cuda-12"))
    toolkit, notes = cfg.find_toolkit()
    assert toolkit is None and "nvcc 12.4 cannot build for torch's CUDA 13.0" in notes[0]


def test_headers_and_cudart_from_an_nvidia_wheel(clean_env, tmp_path):
    fake_toolkit(tmp_path / "bare", headers=False, cudart=False)
    wheel = tmp_path / "site" / "nvidia" / "cu13"
    (wheel / "include").mkdir(parents=True)
    (wheel / "include" / "cuda_runtime_api.h").write_text("")
    (wheel / "lib").mkdir()
    (wheel / "lib" / "libcudart.so.13").write_text("")
    clean_env.setattr(cfg, "_nvidia_wheel_dirs", lambda: [wheel])
    clean_env.setenv("CUDA_HOME", str(tmp_path / "bare"))
    toolkit, _ = cfg.find_toolkit()
    assert toolkit.include_dirs == (str(wheel / "include"),)
    assert toolkit.cudart_dir == str(wheel / "lib")
    # Only a versioned libcudart.so.13: linking -lcudart goes through a libcudart.so symlink.
    dirs = cfg.link_dirs(toolkit, tmp_path / "shim")
    assert dirs == [str(tmp_path / "shim")]
    assert (tmp_path / "shim" / "libcudart.so").resolve() == (wheel / "lib" / "libcudart.so.13").resolve()


def test_toolkit_without_headers_anywhere_is_refused(clean_env, tmp_path):
    fake_toolkit(tmp_path / "noheaders", headers=False)
    clean_env.setenv("CUDA_HOME", str(tmp_path / "noheaders"))
    toolkit, notes = cfg.find_toolkit()
    assert toolkit is None and "cuda_runtime_api.h" in notes[0]


def test_modes(clean_env, tmp_path):
    assert cfg.requested_mode() == "auto"
    clean_env.setenv("CM_KERNELS_SKIP_CUDA", "1")
    assert cfg.requested_mode() == "0"
    assert cfg.cuda_decision().reason == "CUDA kernels not built: CM_KERNELS_SKIP_CUDA=1"
    clean_env.setenv("CM_KERNELS_CUDA", "1")  # the newer variable wins
    assert cfg.requested_mode() == "1"
    clean_env.setenv("CM_KERNELS_CUDA", "maybe")
    with pytest.raises(ValueError, match="CM_KERNELS_CUDA must be auto, 0 or 1"):
        cfg.requested_mode()


def test_decision_when_nothing_is_usable(clean_env, tmp_path):
    clean_env.setenv("CUDA_HOME", str(tmp_path / "missing"))
    decision = cfg.cuda_decision()
    assert not decision.with_cuda and decision.mode == "auto"
    assert "no usable CUDA 13.0 toolkit" in decision.reason and "CUDA_HOME=" in decision.reason
    clean_env.setenv("CM_KERNELS_CUDA", "1")
    with pytest.raises(cfg.CudaBuildError, match="CM_KERNELS_CUDA=1 but no usable CUDA 13.0 toolkit"):
        cfg.cuda_decision()
    clean_env.setattr(torch.version, "cuda", None)
    with pytest.raises(cfg.CudaBuildError, match="CPU build"):
        cfg.cuda_decision()


def test_a_toolkit_that_fails_the_test_build_is_not_used(clean_env, tmp_path):
    # The fake nvcc compiles nothing (no probe_cu.o appears), so the test build fails at the link.
    fake_toolkit(tmp_path / "fake")
    clean_env.setenv("CUDA_HOME", str(tmp_path / "fake"))
    decision = cfg.cuda_decision(probe_dir=tmp_path / "probe")
    assert not decision.with_cuda and "failed a test build" in decision.reason


def test_build_info_text_round_trips(clean_env, tmp_path):
    tk = cfg.Toolkit("/opt/cuda", "/opt/cuda/bin/nvcc", "13.0", found_by="test")
    decision = cfg.Decision(True, "CUDA kernels built for sm_90", "1", tk)
    ns: dict = {}
    exec(cfg.build_info_text(decision, ["90"]), ns)
    assert ns["WITH_CUDA"] is True and ns["CUDA_ARCHS"] == ("90",) and ns["CUDA_MODE"] == "1"
    assert ns["CUDA_HOME"] == "/opt/cuda" and ns["NVCC_VERSION"] == "13.0"
    cfg.write_atomic(tmp_path / "info.py", "X = 1\n")
    assert (tmp_path / "info.py").read_text() == "X = 1\n" and len(list(tmp_path.glob(".info.py.*"))) == 0


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on this machine")
def test_this_machines_toolkit_passes_the_test_build(tmp_path):
    """On a machine with nvcc (CI), the search finds a toolkit matching torch's CUDA and the test
    build of a kernel library succeeds with it."""
    if torch.version.cuda is None:
        pytest.skip("torch is a CPU build: no CUDA toolkit is looked for")
    toolkit, notes = cfg.find_toolkit()
    assert toolkit is not None, notes
    assert cfg.probe(toolkit, ["80"], tmp_path) is None
    assert (tmp_path / "probe.so").is_file()
