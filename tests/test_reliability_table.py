"""tests/reliability_table.py: a GPU run's results replace the CPU run's GPU skips."""
import reliability_table as rt


def test_gpu_results_replace_gpu_skips_and_failures_count():
    cpu = {"tests/reliability/test_a.py::t1": "passed",
           "tests/reliability/test_a.py::t2[x]": "skipped-gpu",
           "tests/reliability/test_a.py::t2[y]": "skipped-gpu",
           "tests/reliability/test_a.py::t3": "skipped-gpu"}
    gpu = {"tests/reliability/test_a.py::t2[x]": "passed",
           "tests/reliability/test_a.py::t2[y]": "failed"}
    cases = rt.merge_gpu(cpu, gpu)
    where, result, found = rt.row_result(["rel/test_a.py::t1", "rel/test_a.py::t2",
                                          "rel/test_a.py::t3"], cases)
    assert len(found) == 4 and where == "CPU + GPU"
    assert result == "CPU: 1 passed; GPU: 1 passed, 1 FAILED; GPU: 1 not run", result
    assert rt.row_result(["rel/test_a.py::t2[x]"], cases)[1] == "GPU: 1 passed"
