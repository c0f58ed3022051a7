"""The backend registry: auto selection, explicit requests, reasons, and a package without _C."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import baichuan_kernels as bk
from baichuan_kernels import registry
from baichuan_kernels.registry import Backend, Impl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_available_backends_fastest_first():
    got = bk.available_backends("rms_norm")
    order = [b.value for b in registry.FASTEST_FIRST]
    assert got == sorted(got, key=order.index)
    assert got[-1] == "reference"
    assert ("cpu" in got) == (bk.build_info()["extension"])
    assert ("cuda" in got) == (bk.build_info()["cuda"] and torch.cuda.is_available())
    if not torch.cuda.is_available():
        assert ("triton" in got) == registry.TRITON_INTERPRET


def test_build_info():
    info = bk.build_info()
    assert {"extension", "cuda", "cuda_archs"} <= set(info)
    if info["extension"]:
        assert info["version"] == bk.__version__
        assert info["num_threads"] >= 1 and isinstance(info["openmp"], bool)
    else:
        assert "pip install" in info["error"]


def test_auto_on_cpu_tensors_never_picks_the_interpreter():
    x = torch.randn(2, 8)
    chosen = registry.resolve("rms_norm", "auto", (x,), x)
    assert chosen is (Backend.CPU if "cpu" in bk.available_backends("rms_norm") else Backend.REFERENCE)


def test_unknown_backend_and_op():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="backend must be one of"):
        bk.rms_norm(x, torch.ones(8), backend="cudnn")
    with pytest.raises(ValueError, match="unknown op"):
        bk.available_backends("no_such_op")


def test_explicit_backend_lists_reasons_and_alternatives():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError) as info:
        bk.rms_norm(x, torch.ones(8), backend="cuda")
    msg = str(info.value)
    assert "rms_norm: backend 'cuda' cannot run these inputs" in msg
    assert "reference" in msg.split("Backends that can:")[1]


def test_impl_limits_drive_auto_and_explicit():
    calls = []

    def small_only(x):
        calls.append(x.shape)
        return None if x.shape[-1] <= 4 else f"D must be ≤ 4, got {x.shape[-1]}"

    registry.register("toy_op", Impl(Backend.TRITON, small_only), Impl(Backend.CPU, small_only))
    try:
        big = torch.randn(3, 5)
        small = torch.randn(3, 4)
        assert registry.resolve("toy_op", "auto", (big,), big) is Backend.REFERENCE
        if "cpu" in registry.available_backends("toy_op"):
            assert registry.resolve("toy_op", "auto", (small,), small) is Backend.CPU
            with pytest.raises(ValueError, match="D must be ≤ 4, got 5"):
                registry.resolve("toy_op", "cpu", (big,), big)
        assert registry.resolve("toy_op", "reference", (big,), big) is Backend.REFERENCE
        assert calls, "the impl's limits were never consulted"
    finally:
        registry._OPS.pop("toy_op")


def test_mixed_devices_are_refused():
    if not torch.cuda.is_available():
        pytest.skip("needs two devices")
    with pytest.raises(ValueError, match="same device"):
        bk.rms_norm(torch.randn(2, 4), torch.ones(4, device="cuda"))


def _run_python(code: str, env_extra: dict) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_extra)
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_package_works_without_the_extension():
    out = _run_python(
        """
        import sys
        sys.modules["baichuan_kernels._C"] = None  # as if it had never been built
        import torch, baichuan_kernels as bk
        info = bk.build_info()
        assert info["extension"] is False and "pip install --no-build-isolation" in info["error"], info
        assert "cpu" not in bk.available_backends("rms_norm")
        x = torch.randn(3, 8)
        y = bk.rms_norm(x, torch.ones(8))          # auto -> reference
        try:
            bk.rms_norm(x, torch.ones(8), backend="cpu")
        except ValueError as e:
            assert "pip install --no-build-isolation" in str(e), e
        else:
            raise SystemExit("backend='cpu' should have been refused")
        print("ok", tuple(y.shape))
        """,
        {},
    )
    assert out.strip() == "ok (3, 8)"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_triton_needs_the_interpreter_on_cpu():
    out = _run_python(
        """
        import torch, baichuan_kernels as bk
        assert "triton" not in bk.available_backends("rms_norm")
        try:
            bk.rms_norm(torch.randn(2, 4), torch.ones(4), backend="triton")
        except ValueError as e:
            assert "TRITON_INTERPRET=1" in str(e), e
            print("refused")
        """,
        {},
    )
    assert out.strip() == "refused"


@pytest.mark.skipif(not bk.build_info()["extension"], reason="extension not built")
def test_extension_loads_when_imported_first():
    # `import baichuan_kernels` before torch must still load _C (it links against libc10/libtorch).
    out = _run_python("import baichuan_kernels as bk; print(bk.build_info()['extension'])", {})
    assert out.strip() == "True"
