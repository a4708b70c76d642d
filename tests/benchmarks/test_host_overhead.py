"""benchmarks/host_overhead.py drives both schedulers to steady decoding (tiny sizes)."""
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import host_overhead as ho  # noqa: E402


def test_both_schedulers_reach_steady_decode_and_are_timed():
    model = ho.ts.model_dir(tempfile.mkdtemp())
    for kind in ("stock", "dms"):
        times = ho.step_times(kind, running=3, steps=4, model=model)
        assert len(times) == 4 and all(t > 0 for t in times), (kind, times)
