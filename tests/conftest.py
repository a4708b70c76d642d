"""Session-wide: on a CPU-only machine Triton kernels run in the interpreter. Set before any test
module is imported: @triton.jit picks interpreter mode when a kernel module is first imported,
so the order test files are collected in must not matter."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
