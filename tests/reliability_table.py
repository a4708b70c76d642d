"""Refresh the Where / Result columns of the C.4 table in tests/README.md from a JUnit XML run.

    python -m pytest -q tests --junitxml=/tmp/junit.xml
    python tests/reliability_table.py /tmp/junit.xml            # prints the table and counts
    python tests/reliability_table.py /tmp/junit.xml --write    # and rewrites tests/README.md
    python tests/reliability_table.py /tmp/junit.xml --gpu benchmarks/results/junit-gpu-*.xml

--gpu adds the JUnit files of `pytest -m gpu` runs on a GPU machine: their results replace the
CPU run's "needs a GPU" skips of the same tests.

The Tests column is the input: `file::name` entries (`rel/` = tests/reliability/, other paths
under tests/). `name` matches that test and its parametrizations; a name ending in `_` is a prefix;
`$` at the end means that exact name only (`name[param]` one parametrization); an empty name
means the whole file. A skipped test
counts as GPU only when pytest's skip message says it needs a GPU / CUDA.
"""
from __future__ import annotations

import argparse
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

README = Path(__file__).parent / "README.md"
ROW = re.compile(r"^\| (\d+) \| (.*?) \| (.*?) \| (.*?) \| (.*?) \|$")


def junit_cases(path: str) -> dict[str, str]:
    """nodeid-like 'tests/x/test_y.py::name[param]' -> passed | failed | skipped-gpu | skipped."""
    out = {}
    for tc in ET.parse(path).iter("testcase"):
        file = tc.get("classname", "").replace(".", "/") + ".py"
        state = "passed"
        for child in tc:
            if child.tag in ("failure", "error"):
                state = "failed"
            elif child.tag == "skipped":
                msg = (child.get("message", "") + (child.text or "")).lower()
                state = "skipped-gpu" if ("cuda" in msg or "gpu" in msg) else "skipped"
        name = tc.get("name", "").split("@")[0]  # xdist --dist loadgroup appends @group
        out[f"{file}::{name}"] = state
    return out


def merge_gpu(cases: dict[str, str], gpu: dict[str, str]) -> dict[str, str]:
    """A GPU run's passed / failed tests become gpu-passed / gpu-failed."""
    out = dict(cases)
    out.update({n: f"gpu-{s}" for n, s in gpu.items() if s in ("passed", "failed")})
    return out


def matches(entry: str, cases: dict[str, str]) -> list[str]:
    file, _, name = entry.partition("::")
    file = "tests/reliability/" + file[4:] if file.startswith("rel/") else "tests/" + file
    hits = []
    for nodeid in cases:
        f, _, n = nodeid.partition("::")
        if f != file:
            continue
        base = n.split("[", 1)[0]
        if (not name or n == name or (name.endswith("$") and base == name[:-1])
                or (name.endswith("_") and n.startswith(name))
                or (not name.endswith(("$", "_")) and base == name)):
            hits.append(nodeid)
    return hits


def row_result(entries: list[str], cases: dict[str, str]) -> tuple[str, str, set[str]]:
    found = {n for e in entries for n in matches(e, cases)}
    count = lambda s: sum(cases[n] == s for n in found)  # noqa: E731
    cpu, gpu, failed, other = count("passed"), count("skipped-gpu"), count("failed"), count("skipped")
    gpu_ok, gpu_bad = count("gpu-passed"), count("gpu-failed")
    where = " + ".join(w for w, k in (("CPU", cpu + failed + other),
                                      ("GPU", gpu + gpu_ok + gpu_bad)) if k)
    parts = []
    if cpu or failed or other:
        parts.append(f"CPU: {cpu} passed" + (f", {failed} FAILED" if failed else "")
                     + (f", {other} skipped" if other else ""))
    if gpu_ok or gpu_bad:
        parts.append(f"GPU: {gpu_ok} passed" + (f", {gpu_bad} FAILED" if gpu_bad else ""))
    if gpu:
        parts.append(f"GPU: {gpu} not run")
    return where or "none", "; ".join(parts) or "no test found", found


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("junit")
    ap.add_argument("--gpu", nargs="*", default=[], help="JUnit files of GPU runs")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    cases = junit_cases(args.junit)
    for path in args.gpu:
        cases = merge_gpu(cases, junit_cases(path))
    lines, rows, all_found = README.read_text().splitlines(), 0, set()
    for i, line in enumerate(lines):
        m = ROW.match(line)
        if not m:
            continue
        num, scenario, tests, _, _ = m.groups()
        entries = re.findall(r"`([^`]+)`", tests)
        where, result, found = row_result(entries, cases)
        all_found |= found
        rows += bool(found)
        lines[i] = f"| {num} | {scenario} | {tests} | {where} | {result} |"
        print(lines[i])
    states = [cases[n] for n in all_found]
    print(f"\nscenarios with a test: {rows}; distinct tests: {len(all_found)}; CPU passed: "
          f"{states.count('passed')}; failed: {states.count('failed')}; GPU passed: "
          f"{states.count('gpu-passed')}; GPU failed: {states.count('gpu-failed')}; GPU not run: "
          f"{states.count('skipped-gpu')}; whole run: {len(cases)} tests, "
          f"{sum(s in ('passed', 'gpu-passed') for s in cases.values())} passed")
    if args.write:
        README.write_text("\n".join(lines) + "\n")
    return 1 if {"failed", "gpu-failed"} & set(states) else 0


if __name__ == "__main__":
    sys.exit(main())
