"""Which (device, backend) pairs a test of an op should cover on this machine."""

import pytest
import torch

import baichuan_kernels as bk

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def kernel_backends(op: str, *, exclude: tuple = ()) -> list:
    """pytest params (device, backend) for every non-reference backend usable here, but those in
    ``exclude`` (a backend too narrow for a generic test file, covered by its own file instead)."""
    usable = set(bk.available_backends(op)) - set(exclude)
    params = []
    for device in DEVICES:
        wanted = ("cpu", "triton") if device == "cpu" else ("cuda", "triton")
        for backend in wanted:
            marks = [pytest.mark.cuda] if device == "cuda" else []
            if backend in usable:
                params.append(pytest.param(device, backend, id=f"{device}-{backend}", marks=marks))
    return params
