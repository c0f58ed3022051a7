"""The C++ ops (torch.ops.baichuan.*) called directly with bad arguments raise a RuntimeError that names
the argument, on every device: never a crash. The public Python API validates first (tests/test_<op>.py);
these calls skip it, so they reach the C++ checks (TORCH_CHECK) of the CPU and CUDA kernels.

Each device's calls run in a child process, so a crash (a signal) fails this test with the name of the
call that crashed instead of taking the test session down with it.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import baichuan_kernels as bk

pytestmark = pytest.mark.skipif(not bk.build_info()["extension"], reason="needs the compiled extension")

# name, expression (t = tensor maker on the device, i32 / i64 = int tensors), words the message must name.
# Each call is wrong in exactly one argument.
CASES = [
    ("rms_norm_fwd weight shape", "ops.rms_norm_fwd(t(4, 8), None, t(7), 1e-6)", "weight"),
    ("rms_norm_bwd dy shape", "ops.rms_norm_bwd(t(4, 7), None, t(4, 8), t(8), t(4))", "dy"),
    ("norm_head_weight_fwd 1-D weight", "ops.norm_head_weight_fwd(t(8), 1e-12)", "weight"),
    ("linear_cross_entropy_fwd labels length",
     "ops.linear_cross_entropy_fwd(t(4, 8), t(16, 8), i64(3), True, 0.0, -100, 'mean', 2, True, True)", "labels"),
    ("swiglu_fwd up shape", "ops.swiglu_fwd(t(4, 8), t(4, 9))", "up"),
    ("swiglu_packed_fwd odd last dim", "ops.swiglu_packed_fwd(t(4, 9))", "h"),
    ("apply_rope_fwd cos shape", "ops.apply_rope_fwd(t(1, 3, 2, 8), t(1, 3, 2, 8), t(3, 6), t(3, 8), None)", "cos"),
    ("split_qkv_rope_fwd num_heads", "ops.split_qkv_rope_fwd(t(1, 3, 48), t(3, 8), t(3, 8), None, 5)", "num_heads"),
    ("attention_fwd head dim 24",
     "ops.attention_fwd(t(5, 2, 24), t(5, 2, 24), t(5, 2, 24), i32(0, 5), None, 0.2, True, 5)", "head dim"),
    ("attention_fwd int64 cu_seqlens",
     "ops.attention_fwd(t(5, 2, 64), t(5, 2, 64), t(5, 2, 64), i64(0, 5), None, 0.1, True, 5)", "cu_seqlens"),
    ("decode_attention_fwd head dim 96",
     "ops.decode_attention_fwd(t(2, 4, 96), t(2, 8, 4, 96), t(2, 8, 4, 96), i32(3, 8), None, 0.1)", "head dim"),
    ("decode_attention_fwd int64 cache_seqlens",
     "ops.decode_attention_fwd(t(2, 4, 64), t(2, 8, 4, 64), t(2, 8, 4, 64), i64(3, 8), None, 0.1)",
     "cache_seqlens"),
    ("quant_matmul_fwd bits 3",
     "ops.quant_matmul_fwd(t(2, 256), torch.zeros(8, 256, dtype=torch.int8, device=dev), t(8, dtype=torch.float32),"
     " None, 3, 128)", "bits"),
]
# What only the CUDA kernels refuse (the CPU kernels take these).
CUDA_CASES = [
    ("attention_fwd (CUDA) head dim 32",
     "ops.attention_fwd(t(5, 2, 32), t(5, 2, 32), t(5, 2, 32), i32(0, 5), None, 0.1, True, 5)", "head dim"),
    ("attention_fwd (CUDA) float32",
     "ops.attention_fwd(t(5, 2, 64, dtype=torch.float32), t(5, 2, 64, dtype=torch.float32),"
     " t(5, 2, 64, dtype=torch.float32), i32(0, 5), None, 0.1, True, 5)", "float16 or bfloat16"),
]

CHILD = textwrap.dedent("""
    import sys, torch
    import baichuan_kernels  # registers torch.ops.baichuan
    ops, dev = torch.ops.baichuan, sys.argv[1]
    g = torch.Generator().manual_seed(0)
    def t(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, generator=g).to(dtype).to(dev)
    def i32(*v):
        return torch.tensor(v, dtype=torch.int32, device=dev)
    def i64(*v):
        return torch.tensor(v, dtype=torch.int64, device=dev)
    for line in sys.stdin.read().splitlines():
        name, expr, word = line.split("\\t")
        print("calling", name, flush=True)
        try:
            eval(expr)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            print(("raised " if word in first else "vague  ") + name + ": " + first, flush=True)
        except Exception as exc:
            print("wrong  " + name + ": " + type(exc).__name__ + ": " + str(exc).splitlines()[0], flush=True)
        else:
            print("noerr  " + name, flush=True)
""")


def _run(device: str, cases: list) -> None:
    stdin = "\n".join("\t".join(c) for c in cases)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-c", CHILD, device], input=stdin, capture_output=True, text=True,
                          timeout=300, env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    lines = proc.stdout.splitlines()
    if proc.returncode != 0:
        last = next((ln for ln in reversed(lines) if ln.startswith("calling ")), "before the first call")
        pytest.fail(f"the child process died (exit {proc.returncode}) at: {last}\n{proc.stderr[-2000:]}")
    verdicts = [ln for ln in lines if not ln.startswith("calling ")]
    bad = [ln for ln in verdicts if not ln.startswith("raised ")]
    assert len(verdicts) == len(cases) and not bad, "\n".join(bad or verdicts)


@pytest.mark.gpu_check  # on the GPU image too: is a crash there CUDA's or the toolchain's?
def test_cpu_kernels_raise_clear_errors():
    _run("cpu", CASES)


@pytest.mark.cuda
def test_cuda_kernels_raise_clear_errors():
    if not bk.build_info()["cuda"]:
        pytest.skip("the extension was built without CUDA")
    _run("cuda", CASES + CUDA_CASES)
