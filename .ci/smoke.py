"""Smoke test of an installed baichuan_kernels (CI, install stage): run it from a folder OUTSIDE the
sources, so that the installed package is what is imported.

Asserts that the compiled extension ``_C`` is loaded, then calls every public op once on the CPU —
with ``backend="cpu"`` (the C++ kernel) wherever ``available_backends`` lists it, and the gradients
of the ops that have a backward — and compares each output with ``backend="reference"``. This only
proves that the build is whole and wired up; numerics are proven by tests/.

    python .ci/smoke.py [--expect-path PREFIX]   # PREFIX: where baichuan_kernels must be imported from
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

import baichuan_kernels as bk

TOL = dict(rtol=1e-4, atol=1e-5)  # fp32 CPU kernel vs fp32 reference, small shapes


def backend_of(op: str) -> str:
    backends = bk.available_backends(op)
    return "cpu" if "cpu" in backends else "reference"


def close(name, got, want):
    got = got if isinstance(got, (tuple, list)) else (got,)
    want = want if isinstance(want, (tuple, list)) else (want,)
    assert len(got) == len(want), f"{name}: {len(got)} outputs, reference gives {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        if g is None and w is None:
            continue
        torch.testing.assert_close(g, w, **TOL, msg=lambda m: f"{name} output {i}: {m}")


def run(name, fn, *inputs, grad=False):
    """fn(*inputs, backend=...) with the op's CPU kernel and with the reference; grads too."""
    backend = backend_of(name)
    results = {}
    for b in dict.fromkeys((backend, "reference")):
        xs = [x.detach().clone().requires_grad_(grad and x.is_floating_point()) if torch.is_tensor(x) else x
              for x in inputs]
        out = fn(*xs, backend=b)
        grads = []
        if grad:
            outs = out if isinstance(out, (tuple, list)) else (out,)
            g = torch.Generator().manual_seed(1)
            loss = sum((o * torch.randn(o.shape, generator=g)).sum() for o in outs if o is not None and o.requires_grad)
            loss.backward()
            grads = [x.grad for x in xs if torch.is_tensor(x) and x.requires_grad]
        results[b] = (out, grads)
    close(name, *(results[b][0] for b in (backend, "reference")))
    if grad:
        close(f"{name} grad", results[backend][1], results["reference"][1])
    print(f"[smoke] {name:22s} backend={backend}{' fwd+bwd' if grad else ''}: ok")
    return name


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--expect-path", help="baichuan_kernels must be imported from under this folder")
    args = ap.parse_args()

    where = os.path.dirname(os.path.abspath(bk.__file__))
    info = bk.build_info()
    print(f"[smoke] baichuan_kernels {bk.__version__} from {where}; torch {torch.__version__}")
    print(f"[smoke] build_info: { {k: v for k, v in info.items() if k != 'parallel_info'} }")
    assert info.get("extension"), f"baichuan_kernels._C is not loaded: {info.get('error')}"
    if args.expect_path:
        assert where.startswith(os.path.abspath(args.expect_path)), f"imported from {where}, not {args.expect_path}"

    torch.manual_seed(0)
    r = lambda *s: torch.randn(*s)  # noqa: E731  (fp32, CPU)
    B, T, H, Dh, D, V = 2, 5, 4, 16, 64, 97
    done = []
    done.append(run("rms_norm", bk.rms_norm, r(B, T, D), r(D), grad=True))
    done.append(run("swiglu", bk.swiglu, r(B, T, 24), r(B, T, 24), grad=True))
    done.append(run("rope_cos_sin", lambda T_, Dh_, backend: bk.rope_cos_sin(T_, Dh_, backend=backend), T, Dh))
    cos, sin = bk.rope_cos_sin(T, Dh)
    done.append(run("apply_rope", lambda q, k, backend: bk.apply_rope(q, k, cos, sin, backend=backend),  # no cos/sin grads
                    r(B, T, H, Dh), r(B, T, H, Dh), grad=True))
    done.append(run("apply_rope_", bk.apply_rope_, r(B, T, H, Dh), r(B, T, H, Dh), cos, sin))
    done.append(run("split_qkv_rope", lambda qkv, backend: bk.split_qkv_rope(qkv, cos, sin, num_heads=H, backend=backend),
                    r(B, T, 3 * H * Dh), grad=True))
    done.append(run("alibi_slopes", lambda h, backend: bk.alibi_slopes(h, backend=backend), H))
    slopes = bk.alibi_slopes(H)
    done.append(run("attention", lambda q, k, v, backend: bk.attention(q, k, v, alibi_slopes=slopes, backend=backend),
                    r(B, T, H, Dh), r(B, T, H, Dh), r(B, T, H, Dh), grad=True))
    done.append(run("decode_attention", bk.decode_attention, r(B, 1, H, Dh), r(B, 9, H, Dh), r(B, 9, H, Dh),
                    torch.tensor([9, 4], dtype=torch.int32)))
    done.append(run("norm_head_weight", bk.norm_head_weight, r(V, D), grad=True))
    labels = torch.randint(0, V, (B * T,))
    done.append(run("linear_cross_entropy",
                    lambda h, w, y, backend: bk.linear_cross_entropy(h, w, y, z_loss_weight=2e-4, backend=backend),
                    r(B * T, D), r(V, D), labels, grad=True))
    w = r(48, 256)
    done.append(run("quantize_weight", lambda w_, backend: bk.dequantize_weight(bk.quantize_weight(w_, bits=8, backend=backend)), w))
    for bits in (8, 4):
        qw = bk.quantize_weight(w, bits=bits, group_size=128)
        done.append(run("dequantize_weight", lambda backend: bk.dequantize_weight(qw, backend=backend)))
        done.append(run("quant_matmul", lambda x, backend: bk.quant_matmul(x, qw, backend=backend), r(3, 256)))

    public = {n for n in bk.__all__ if n not in ("build_info", "available_backends", "QuantizedWeight")}
    missing = public - set(done)
    assert not missing, f"the smoke test does not call {sorted(missing)}: add them to .ci/smoke.py"
    cpu_ops = sorted({n for n in done if backend_of(n) == "cpu"})
    print(f"[smoke] all {len(public)} public ops called; C++ CPU kernels: {cpu_ops}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
