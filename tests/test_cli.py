"""`vllm-dms inspect` through the installed console script (a real subprocess)."""
import json
import os
import shutil
import subprocess
import sys

import pytest

FIX = os.path.join(os.path.dirname(__file__), "fixtures")


def _script():
    here = os.path.join(os.path.dirname(sys.executable), "vllm-dms")
    path = here if os.path.exists(here) else shutil.which("vllm-dms")
    if path is None:
        pytest.fail("console script vllm-dms not installed: pip install -e . first")
    return path


def run(*args):
    return subprocess.run([_script(), *args], capture_output=True, text=True, timeout=60)


def test_inspect_nvidia_ok():
    r = run("inspect", os.path.join(FIX, "ckpt_nvidia_qwen3"))
    assert r.returncode == 0, r.stderr
    cfg = json.loads(r.stdout)
    assert (cfg["arch"], cfg["window"], cfg["decision_shift"]) == ("qwen3", 512, 1)


def test_inspect_fastdms_ok():
    r = run("inspect", os.path.join(FIX, "ckpt_fastdms_llama"))
    assert r.returncode == 0, r.stderr
    cfg = json.loads(r.stdout)
    assert (cfg["arch"], cfg["window"], cfg["decision_shift"]) == ("llama", 256, 0)


def test_inspect_hf_overrides():
    r = run("inspect", os.path.join(FIX, "ckpt_nvidia_qwen3"), "--hf-overrides",
            '{"dms_decision_shift": 0}')
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["decision_shift"] == 0


def test_inspect_no_dms_fields_fails_naming_them():
    r = run("inspect", os.path.join(FIX, "ckpt_plain_qwen3"))
    assert r.returncode != 0 and r.stdout == ""
    for field in ("dms_window_size", "dms_alpha_scale", "dms_initial_alpha_offset", "dms_cr"):
        assert field in r.stderr


def test_inspect_separate_alpha_fails_naming_it():
    r = run("inspect", os.path.join(FIX, "ckpt_separate_alpha"))
    assert r.returncode != 0 and "dms_separate_alpha" in r.stderr


def test_inspect_refuses_a_head_dim_serve_refuses():
    # head_dim 72 passes DMSConfig's shape rule but not the kernels': serve's check refuses it
    r = run("inspect", os.path.join(FIX, "ckpt_nvidia_qwen3"), "--hf-overrides",
            '{"head_dim": 72}')
    assert r.returncode != 0 and r.stdout == "" and "head_dim=72" in r.stderr


def _fp16_copy(tmp_path, **extra):
    d = tmp_path / "ckpt"
    shutil.copytree(os.path.join(FIX, "ckpt_nvidia_qwen3"), d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "torch_dtype": "float16", **extra}))
    return str(d)


def test_inspect_refuses_a_float16_checkpoint_unless_served_as_bf16(tmp_path):
    d = _fp16_copy(tmp_path)
    r = run("inspect", d)
    assert r.returncode != 0 and "--dtype" in r.stderr and "torch_dtype float16" in r.stderr
    r = run("inspect", d, "--dtype", "bfloat16")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["arch"] == "qwen3"


def test_inspect_refuses_checkpoint_kv_scales_naming_the_field(tmp_path):
    d = _fp16_copy(tmp_path, torch_dtype="bfloat16", quantization_config={
        "quant_method": "modelopt", "quant_algo": "FP8", "kv_cache_quant_algo": "FP8"})
    r = run("inspect", d)
    assert r.returncode != 0 and "quantization_config.kv_cache_quant_algo" in r.stderr


def test_no_subcommand_is_an_error():
    r = run()
    assert r.returncode != 0 and "inspect" in r.stderr


def test_ci_runs_exactly_the_readme_test_command():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    readme = open(os.path.join(root, "README.md")).read()
    ci = [ln.strip() for ln in open(os.path.join(root, ".ci", "run"))
          if ln.strip() and not ln.lstrip().startswith("#")]
    assert ci[-1] == "python -m pytest -q tests"
    assert f"```bash\n{ci[-1]}\n```" in readme
