"""Kernel tests: Triton's interpreter on CPU-only machines (small shapes), native on CUDA."""
import json
import os
import subprocess
import sys
import types

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first @triton.jit

import triton  # noqa: E402,F401  (after TRITON_INTERPRET)

from vllm_dms.engine.arena import ArenaLayout, cdiv  # noqa: E402
from vllm_dms.worker.kernels.arena_ops import arena_init, arena_state  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Runs in a fresh interpreter without TRITON_INTERPRET (jit functions must be real JITFunctions).
_COMPILE_SCRIPT = r"""
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
for mod, name, types, cx in json.loads(sys.stdin.read()):
    fn = getattr(importlib.import_module(mod), name)
    sig = {a: "constexpr" if a in cx else types.get(a, "i32") for a in fn.arg_names}
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

    specs: list of (module, kernel, {arg: type} for args that are not i32, {constexpr: value}).
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


# ---------------------------------------------------------------- shared helpers (via `kit`)
def make_layout(H=2, D=32, P=4, W=4, S=6, max_len=64, num_blocks=None, elem=1) -> ArenaLayout:
    lay = ArenaLayout(num_layers=1, num_kv_heads=H, head_dim=D, block_size=P, window=W,
                      max_num_seqs=S, max_model_len=max_len, num_blocks=1, elem_bytes=elem)
    if num_blocks is None:  # state blocks + room for every slot's worst-case rows
        num_blocks = lay.first_data_block + S * cdiv(max_len, P) + 2
    lay = ArenaLayout(**{**lay.__dict__, "num_blocks": num_blocks})
    while lay.first_data_block >= lay.num_blocks:  # state region grew with num_blocks
        lay = ArenaLayout(**{**lay.__dict__, "num_blocks": lay.num_blocks + 1})
    return lay


def new_arena(layout: ArenaLayout, device) -> torch.Tensor:
    kv = torch.zeros(layout.num_blocks, layout.page_bytes, dtype=torch.uint8, device=device)
    arena_init(kv.view(-1), layout)
    return kv


def check_pages_conserved(kv, layout):
    """Free stack + all rows' pages == every data sub-page exactly once."""
    st = arena_state(kv.view(-1), layout)
    top = int(st.free_top[0])
    used = list(st.free_stack[:top].cpu().tolist())
    npg = st.row_npages.cpu()
    for s in range(layout.num_slots):
        for h in range(layout.num_kv_heads):
            used += st.row_pages[s, h, :int(npg[s, h])].cpu().tolist()
    assert sorted(used) == list(range(layout.first_data_subpage,
                                      layout.num_blocks * layout.num_kv_heads))


def quantize_like_store(x: torch.Tensor, elem_bytes: int) -> torch.Tensor:
    """What the arena gives back for x, in fp32: e4m3fn(clamp(x, +-448)) or bf16(x)."""
    if elem_bytes == 1:
        return x.float().clamp(-448.0, 448.0).to(torch.float8_e4m3fn).float()
    return x.to(torch.bfloat16).float()


@pytest.fixture
def kit() -> types.SimpleNamespace:
    return types.SimpleNamespace(make_layout=make_layout, new_arena=new_arena,
                                 check_pages_conserved=check_pages_conserved,
                                 quantize_like_store=quantize_like_store)


def pytest_collection_modifyitems(config, items):
    # Triton's interpreter turns 0-d numpy arrays into loop bounds: NumPy >= 1.25 warns each time
    here = os.path.dirname(os.path.abspath(__file__))
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.filterwarnings(
                "ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning"))
