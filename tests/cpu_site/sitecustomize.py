"""Applies tests/cpu_engine.py at interpreter start when VLLM_DMS_CPU_ENGINE=1 (tests only).

Put this directory and tests/ on PYTHONPATH of a `vllm serve` process: its API server and its
engine-core process (forked or spawned) then run dms_fp8 on the CPU like an in-process engine.
"""
import os

if os.environ.get("VLLM_DMS_CPU_ENGINE") == "1":
    import cpu_engine

    cpu_engine.apply()
