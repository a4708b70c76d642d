"""Kernel tests: Triton's interpreter on CPU-only machines (small shapes), native on CUDA."""
import json
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first @triton.jit

import triton  # noqa: E402,F401  (after TRITON_INTERPRET)

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Runs in a fresh interpreter without TRITON_INTERPRET (jit functions must be real JITFunctions).
_COMPILE_SCRIPT = r"""
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
for mod, name, sig, cx in json.loads(sys.stdin.read()):
    fn = getattr(importlib.import_module(mod), name)
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=cx)
    triton.compile(src, target=GPUTarget("cuda", 90, 32))
    print("compiled", name, cx)
"""


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture
def compile_sm90():
    """Compile jit kernels for sm_90 offline (no GPU needed): catches what the interpreter
    accepts but the real compiler rejects (loop-carried types, pointer casts, dot shapes).

    specs: list of (module, kernel name, {arg: type string or "constexpr"}, {constexpr: value}).
    """
    def run(specs):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
        res = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], input=json.dumps(specs),
                             capture_output=True, text=True, env=env, timeout=300)
        if res.returncode != 0 and "ptxas" in res.stderr and "not found" in res.stderr.lower():
            pytest.skip("no ptxas in this Triton install")
        assert res.returncode == 0, res.stderr[-4000:]
    return run


def arg_types(names: str, ty: str) -> dict:
    """'a b c' -> {'a': ty, 'b': ty, 'c': ty} (signature shorthand for compile_sm90 specs)."""
    return {n: ty for n in names.split()}
