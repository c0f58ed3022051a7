"""Helpers of the numerics tests (tests/test_numerics*.py): the float64-reference contract for results
that may hold NaN/±inf, and running an op where a GPU backend may decline the inputs."""

import pytest
import torch

from baichuan_kernels.testing import assert_within_reference_error, poisoned_outputs
from _backends import kernel_backends


def assert_contract(actual, same, exact64, name, inf_may_be_nan=False):
    """``actual`` (a backend) and ``same`` (the same-dtype reference) against ``exact64`` (float64).
    ``inf_may_be_nan``: the backend may give NaN where the reference gives ±inf (see quant_matmul)."""
    expected = exact64.detach().cpu().to(actual.dtype)
    for who, t in (("", actual), (" (same-dtype reference)", same)):
        t = t.detach().cpu()
        assert t.shape == expected.shape and t.dtype == expected.dtype, f"{name}{who}: {t.shape} {t.dtype}"
        if inf_may_be_nan and not who:
            bad = t.isfinite() != expected.isfinite()
            assert not bad.any(), f"{name}: non-finite pattern differs at {bad.nonzero()[:5].tolist()}"
            continue
        bad_nan = t.isnan() != expected.isnan()
        assert not bad_nan.any(), f"{name}{who}: NaN pattern differs at {bad_nan.nonzero()[:5].tolist()}"
        inf = expected.isinf()
        bad_inf = (t.isinf() != inf) | (inf & (t != expected))
        assert not bad_inf.any(), f"{name}{who}: ±inf pattern differs at {bad_inf.nonzero()[:5].tolist()}"
    fin = expected.isfinite()
    if fin.any():
        assert_within_reference_error(actual.detach().cpu()[fin], same.detach().cpu()[fin],
                                      exact64.detach().cpu()[fin], name=name)


def run(device, op, *args, **kwargs):
    """``op(*args, **kwargs)`` with poisoned outputs. On a GPU a backend may decline inputs it does not
    support (e.g. fp32 or a gradient on the CUDA attention kernels): that skips, it is no finding."""
    try:
        with poisoned_outputs():
            return op(*args, **kwargs)
    except ValueError as exc:
        if device != "cpu" and "cannot run these inputs" in str(exc):
            pytest.skip(str(exc))
        raise


def leaves(*tensors, dtype=None):
    """Fresh leaf copies requiring grad (float64 when dtype is given)."""
    return [t.detach().to(dtype or t.dtype).requires_grad_() for t in tensors]


def assert_grads_contract(outs, inputs, dy, names, tag):
    """The gradients of (kernel, same-dtype reference, float64 reference) outputs ``outs`` w.r.t. the
    matching tuples in ``inputs``, for upstream gradient ``dy``, each held to :func:`assert_contract`."""
    got = torch.autograd.grad(outs[0], inputs[0], dy.to(outs[0].device))
    same = torch.autograd.grad(outs[1], inputs[1], dy)
    exact = torch.autograd.grad(outs[2], inputs[2], dy.double())
    for n, g, s, e in zip(names, got, same, exact):
        assert_contract(g, s, e, f"{tag} {n}")


def backends(op):
    """Every backend of ``op`` here: the reference (it must obey the contract too) and the kernels."""
    return [pytest.param("cpu", "reference", id="reference")] + kernel_backends(op)
