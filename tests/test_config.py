"""DMSConfig validation on the checkpoint fixtures (pure Python: no vLLM import)."""
import json
import os
import shutil
from types import SimpleNamespace

import pytest

from vllm_dms.config import (DMSConfig, DMSConfigError, dms_config_from_vllm,
                             has_dms_fields)

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
