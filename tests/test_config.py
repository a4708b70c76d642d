"""DMSConfig validation on the checkpoint fixtures (pure Python: no vLLM import)."""
import json
import os
import shutil
from types import SimpleNamespace

import pytest

from vllm_dms.engine.config import (DMSConfig, DMSConfigError, check_serving, dms_config_from_vllm,
                                    has_dms_fields, kv_scale_field, served_dtype)

FIX = os.path.join(os.path.dirname(__file__), "fixtures")


def ckpt(name):
    return os.path.join(FIX, name)


def test_nvidia_qwen3():
    c = DMSConfig.from_checkpoint(ckpt("ckpt_nvidia_qwen3"))
    assert (c.arch, c.num_layers, c.num_q_heads, c.num_kv_heads, c.head_dim) == ("qwen3", 2, 4, 2, 32)
    assert (c.window, c.alpha_scale, c.alpha_offset, c.target_cr) == (512, 100.0, 5.0, 8.0)
    assert c.decision_shift == 1 and c.group == 2
    assert c.source.endswith("config.json")


def test_fastdms_llama():
    c = DMSConfig.from_checkpoint(ckpt("ckpt_fastdms_llama"))
    assert (c.arch, c.num_q_heads, c.num_kv_heads, c.head_dim) == ("llama", 4, 1, 32)
    assert (c.window, c.alpha_scale, c.alpha_offset, c.target_cr) == (256, 100.0, 5.0, 8.0)
    assert c.decision_shift == 0
    assert c.source.endswith("dms_metadata.json")


@pytest.mark.parametrize("name, needles", [
    ("ckpt_plain_qwen3", ["not a DMS checkpoint", "dms_window_size", "dms_alpha_scale",
                          "dms_initial_alpha_offset", "dms_cr", "dms_metadata.json"]),
    ("ckpt_plain_llama", ["not a DMS checkpoint", "dms_window_size"]),
    ("ckpt_partial", ["partial DMS fields", "dms_initial_alpha_offset", "dms_cr"]),
    ("ckpt_separate_alpha", ["dms_separate_alpha"]),
    ("ckpt_alpha_per_layer", ["dms_alpha_per", "'layer'"]),
    ("ckpt_unsupported_arch", ["architectures", "Phi3ForCausalLM"]),
])
def test_rejected_fixtures_name_the_field(name, needles):
    with pytest.raises(DMSConfigError) as e:
        DMSConfig.from_checkpoint(ckpt(name))
    for needle in needles:
        assert needle in str(e.value), (needle, str(e.value))


def test_missing_dir():
    with pytest.raises(DMSConfigError, match="no config.json"):
        DMSConfig.from_checkpoint(os.path.join(FIX, "does_not_exist"))


@pytest.mark.parametrize("name, expected", [
    ("ckpt_nvidia_qwen3", True), ("ckpt_fastdms_llama", True), ("ckpt_partial", True),
    ("ckpt_separate_alpha", True), ("ckpt_plain_qwen3", False), ("ckpt_plain_llama", False),
])
def test_has_dms_fields(name, expected):
    assert has_dms_fields(ckpt(name)) is expected


# ------------------------------------------------------------------- decision-shift rule
def test_shift_explicit_field_wins_over_nvidia_default():
    c = DMSConfig.from_checkpoint(ckpt("ckpt_nvidia_qwen3"), {"dms_decision_shift": 0})
    assert c.decision_shift == 0


def test_shift_explicit_metadata_wins_over_fastdms_default(tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(ckpt("ckpt_fastdms_llama"), d)
    meta = json.loads((d / "dms_metadata.json").read_text())
    meta["config"]["decision_shift"] = 1
    (d / "dms_metadata.json").write_text(json.dumps(meta))
    assert DMSConfig.from_checkpoint(str(d)).decision_shift == 1


def test_shift_defaults():
    assert DMSConfig.from_checkpoint(ckpt("ckpt_nvidia_qwen3")).decision_shift == 1
    assert DMSConfig.from_checkpoint(ckpt("ckpt_fastdms_llama")).decision_shift == 0


@pytest.mark.parametrize("bad", [2, -1, True, "1"])
def test_shift_invalid(bad):
    with pytest.raises(DMSConfigError, match="dms_decision_shift"):
        DMSConfig.from_checkpoint(ckpt("ckpt_nvidia_qwen3"), {"dms_decision_shift": bad})


# ------------------------------------------------------------------- field values
@pytest.mark.parametrize("override, needle", [
    ({"dms_window_size": 0}, "dms_window_size"),
    ({"dms_window_size": 512.0}, "dms_window_size"),
    ({"dms_alpha_scale": -1.0}, "dms_alpha_scale"),
    ({"dms_initial_alpha_offset": "5"}, "dms_initial_alpha_offset"),
    ({"dms_cr": 0.5}, "dms_cr"),
    ({"dms_disable_eviction": True}, "dms_disable_eviction"),
    ({"num_key_value_heads": 0}, "num_key_value_heads"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"head_dim": 8}, "head_dim"),
    ({"sliding_window": 128, "use_sliding_window": True}, "sliding_window"),
])
def test_bad_values_name_the_field(override, needle):
    with pytest.raises(DMSConfigError, match=needle):
        DMSConfig.from_checkpoint(ckpt("ckpt_nvidia_qwen3"), override)


def test_fastdms_metadata_missing_key():
    llama = json.load(open(os.path.join(ckpt("ckpt_fastdms_llama"), "config.json")))
    with pytest.raises(DMSConfigError, match="alpha_scale"):
        DMSConfig.from_dicts(llama, {"window_size": 256, "alpha_offset": 5.0})


def test_overrides_apply_and_dms_architecture_names_accepted():
    c = DMSConfig.from_checkpoint(ckpt("ckpt_nvidia_qwen3"),
                                  {"dms_window_size": 64, "architectures": ["DMSQwen3ForCausalLM"]})
    assert (c.window, c.arch) == (64, "qwen3")


def test_dms_config_from_vllm():
    vc = SimpleNamespace(model_config=SimpleNamespace(
        model=ckpt("ckpt_nvidia_qwen3"),
        hf_overrides={"architectures": ["DMSQwen3ForCausalLM"], "dms_window_size": 128}))
    assert dms_config_from_vllm(vc).window == 128
    # A callable hf_overrides cannot be replayed on a dict: the checkpoint values apply.
    vc.model_config.hf_overrides = lambda cfg: cfg
    assert dms_config_from_vllm(vc).window == 512
    vc.model_config.model = ckpt("ckpt_plain_qwen3")
    with pytest.raises(DMSConfigError, match="not a DMS checkpoint"):
        dms_config_from_vllm(vc)


def test_summary_is_json():
    s = DMSConfig.from_checkpoint(ckpt("ckpt_nvidia_qwen3")).summary()
    back = json.loads(json.dumps(s))
    assert (back["group"], back["alpha_offset"], back["decision_shift"]) == (2, 5.0, 1)


# ------------------------------------------------------------------ check_serving (serve + inspect)
def _copy(tmp_path, name="ckpt", config=None, files=None):
    d = tmp_path / name
    shutil.copytree(ckpt("ckpt_nvidia_qwen3"), d)
    if config:
        c = json.loads((d / "config.json").read_text())
        c.update(config)
        (d / "config.json").write_text(json.dumps(c))
    for fn, body in (files or {}).items():
        (d / fn).write_text(json.dumps(body))
    return str(d)


def test_check_serving_accepts_what_from_checkpoint_accepts():
    got = check_serving(ckpt("ckpt_nvidia_qwen3"))
    assert got == DMSConfig.from_checkpoint(ckpt("ckpt_nvidia_qwen3"))


@pytest.mark.parametrize("head_dim", [72, 40])
def test_check_serving_refuses_head_dims_the_kernels_cannot_tile(head_dim):
    over = {"head_dim": head_dim}
    assert DMSConfig.from_checkpoint(ckpt("ckpt_nvidia_qwen3"), over).head_dim == head_dim
    with pytest.raises(DMSConfigError, match=f"head_dim={head_dim} .*multiple of 16"):
        check_serving(ckpt("ckpt_nvidia_qwen3"), over)


@pytest.mark.parametrize("config, files, field", [
    ({"quantization_config": {"quant_method": "compressed-tensors", "kv_cache_scheme": {
        "type": "float", "num_bits": 8, "strategy": "tensor"}}}, {},
     "quantization_config.kv_cache_scheme"),
    ({"quantization_config": {"quant_method": "modelopt", "quant_algo": "FP8",
                              "kv_cache_quant_algo": "FP8"}}, {},
     "quantization_config.kv_cache_quant_algo"),
    ({}, {"hf_quant_config.json": {"quantization": {"quant_algo": "FP8",
                                                   "kv_cache_quant_algo": "FP8"}}},
     "hf_quant_config.json.quantization.kv_cache_quant_algo"),
    ({"quantization_config": {"quant_method": "quark", "export": {
        "kv_cache_group": ["*k_proj", "*v_proj"]}}}, {},
     "quantization_config.export.kv_cache_group"),
    ({}, {"model.safetensors.index.json": {"weight_map": {
        "model.layers.0.self_attn.q_proj.weight": "a.safetensors",
        "model.layers.0.self_attn.v_proj.v_scale": "a.safetensors"}}},
     "model.layers.0.self_attn.v_proj.v_scale"),
])
def test_checkpoint_kv_scales_are_refused_naming_the_field(tmp_path, config, files, field):
    d = _copy(tmp_path, config=config, files=files)
    assert kv_scale_field(d, json.load(open(os.path.join(d, "config.json")))) == field
    with pytest.raises(DMSConfigError) as e:
        check_serving(d)
    assert field in str(e.value) and "dms_fp8" in str(e.value) and "--kv-cache-dtype" in str(
        e.value)


def test_kv_scale_entry_found_in_a_safetensors_header(tmp_path):
    torch = pytest.importorskip("torch")
    st = pytest.importorskip("safetensors.torch")
    d = _copy(tmp_path)
    st.save_file({"model.layers.0.self_attn.q_proj.weight": torch.zeros(2, 2),
                  "model.layers.1.self_attn.k_scale": torch.ones(())},
                 os.path.join(d, "model.safetensors"))
    with pytest.raises(DMSConfigError, match=r"model\.layers\.1\.self_attn\.k_scale"):
        check_serving(d)


def test_quantized_checkpoint_without_kv_scales_passes(tmp_path):
    torch = pytest.importorskip("torch")
    st = pytest.importorskip("safetensors.torch")
    d = _copy(tmp_path, config={"quantization_config": {
        "quant_method": "compressed-tensors", "kv_cache_scheme": None}})
    st.save_file({"model.layers.0.self_attn.q_proj.weight": torch.zeros(2, 2),
                  "model.layers.0.self_attn.q_proj.weight_scale": torch.ones(())},
                 os.path.join(d, "model.safetensors"))
    assert check_serving(d).arch == "qwen3"


@pytest.mark.parametrize("declared, dtype, served", [
    ("float16", "auto", "float16"), ("bfloat16", "auto", "bfloat16"), ("float32", "auto", None),
    (None, "auto", None), ("float16", "bfloat16", "bfloat16"), ("bfloat16", "half", "float16"),
    ("bfloat16", "torch.float16", "float16"), ("bfloat16", "float", "float32")])
def test_served_dtype_follows_vllms_auto_rule(declared, dtype, served):
    assert served_dtype({"torch_dtype": declared}, dtype) == served


def test_float16_checkpoint_is_refused_naming_dtype_unless_bf16_is_asked(tmp_path):
    d = _copy(tmp_path, config={"torch_dtype": "float16"})
    with pytest.raises(DMSConfigError) as e:
        check_serving(d)
    msg = str(e.value)
    assert msg.startswith("--dtype") and "torch_dtype float16" in msg
    assert "pass --dtype bfloat16" in msg
    assert check_serving(d, dtype="bfloat16").arch == "qwen3"


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_explicit_non_bf16_dtype_is_refused(dtype):
    with pytest.raises(DMSConfigError, match=f"^--dtype {dtype}: the DMS kernels run bfloat16"):
        check_serving(ckpt("ckpt_nvidia_qwen3"), dtype=dtype)
