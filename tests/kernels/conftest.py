"""Fixtures of the kernel tests: fresh copies of the Triton kernel modules compiled for Triton's CPU interpreter."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Iterator
from types import ModuleType

import pytest


def interpreted_module(name: str) -> Iterator[ModuleType]:
    """Import a fresh copy of the module ``name`` with ``TRITON_INTERPRET=1`` and install it for the duration.

    Triton reads ``TRITON_INTERPRET`` when ``@triton.jit`` decorates a kernel, i.e. when the module is imported.
    The fresh copy replaces ``sys.modules[name]`` and the parent package's attribute until the generator is
    closed, so an earlier or later import of the compiled module is never affected.

    Args:
        name: dotted module name, e.g. ``osstune.kernels.mxfp4``.
    """
    pytest.importorskip("triton", reason="the kernel tests run Triton's interpreter")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "1")
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        patch.setitem(sys.modules, name, module)
        package, _, leaf = name.rpartition(".")
        patch.setattr(importlib.import_module(package), leaf, module, raising=False)
        yield module


@pytest.fixture(scope="module")
def swiglu_kernels() -> Iterator[ModuleType]:
    """``osstune.kernels.swiglu_triton`` running in the interpreter (what ``clamp_swiglu(use_triton=True)`` uses)."""
    yield from interpreted_module("osstune.kernels.swiglu_triton")


@pytest.fixture(scope="module")
def mxfp4_kernels() -> Iterator[ModuleType]:
    """``osstune.kernels.mxfp4`` running in the interpreter."""
    yield from interpreted_module("osstune.kernels.mxfp4")


@pytest.fixture(scope="module")
def moe_kernels() -> Iterator[ModuleType]:
    """``osstune.kernels.moe_triton`` running in the interpreter (what ``use_triton=True`` uses)."""
    yield from interpreted_module("osstune.kernels.moe_triton")


@pytest.fixture(scope="module")
def cross_entropy_kernels() -> Iterator[ModuleType]:
    """``osstune.kernels.cross_entropy_triton`` running in the interpreter (what ``use_triton=True`` uses)."""
    yield from interpreted_module("osstune.kernels.cross_entropy_triton")
