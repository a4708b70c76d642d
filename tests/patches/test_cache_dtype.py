"""patches.cache_dtype in-process: every place vLLM interprets the dtype string accepts
"dms_fp8" as an unquantized byte cache, and check()/apply_all() refuse a differently shaped vLLM.

Applying the patch here is what any vLLM use in this process would do anyway (the entry
point runs it); it only adds a dtype name.
"""
import logging
from typing import get_args

import pytest

pytest.importorskip("vllm")

from vllm_dms.patches import PatchError, apply_all, cache_dtype, engine, require_params  # noqa: E402


@pytest.fixture(scope="module")
def patched():
    cache_dtype.check()
    cache_dtype.apply()


def test_cache_config_and_vllm_config_validate(patched):
    from pydantic import ValidationError
    from vllm.config import CacheConfig

    assert CacheConfig(cache_dtype="dms_fp8").cache_dtype == "dms_fp8"
    with pytest.raises(ValidationError):
        CacheConfig(cache_dtype="dms_fp9")


def test_argparse_choices(patched):
    from vllm.config import CacheConfig
    from vllm.engine.arg_utils import get_kwargs

    assert "dms_fp8" in get_kwargs(CacheConfig)["cache_dtype"]["choices"]


def test_module_literals_rebound(patched):
    import vllm.config.cache as cache_mod
    import vllm.v1.attention.selector as selector

    assert selector.CacheDType is cache_mod.CacheDType
    assert get_args(cache_mod.CacheDType).count("dms_fp8") == 1


def test_string_interpretation_is_unquantized_bytes(patched):
    import torch
    from vllm.utils.torch_utils import (STR_DTYPE_TO_TORCH_DTYPE, is_quantized_kv_cache,
                                        kv_cache_dtype_str_to_dtype)
    from vllm.v1.kv_cache_interface import KVQuantMode, get_kv_quant_mode

    assert STR_DTYPE_TO_TORCH_DTYPE["dms_fp8"] is torch.uint8
    assert kv_cache_dtype_str_to_dtype("dms_fp8", None) is torch.uint8
    assert not is_quantized_kv_cache("dms_fp8")
    assert get_kv_quant_mode("dms_fp8") == KVQuantMode.NONE


def test_apply_is_idempotent(patched):
    from vllm.config import CacheConfig

    ann = CacheConfig.__pydantic_fields__["cache_dtype"].annotation
    cache_dtype.apply()
    assert CacheConfig.__pydantic_fields__["cache_dtype"].annotation is ann
    assert get_args(ann).count("dms_fp8") == 1


def test_check_refuses_non_literal(monkeypatch):
    import vllm.config.cache as cache_mod

    monkeypatch.setattr(cache_mod, "CacheDType", str)
    with pytest.raises(PatchError, match="CacheDType"):
        cache_dtype.check()


def test_require_params_names_both_shapes():
    with pytest.raises(PatchError, match=r"expected parameters \('a',\), found \('a', 'b'\)"):
        require_params(lambda a, b: None, ("a",), "f")


def test_apply_all_is_all_or_nothing(monkeypatch, caplog):
    applied = []

    def broken():
        raise PatchError("EngineArgs.create_engine_config: expected parameters ...")

    monkeypatch.setattr(engine, "check", broken)
    monkeypatch.setattr(cache_dtype, "apply", lambda: applied.append("cache_dtype"))
    monkeypatch.setattr(engine, "apply", lambda: applied.append("engine"))
    with caplog.at_level(logging.ERROR, logger="test_dms"):
        assert apply_all(logging.getLogger("test_dms")) is False
    assert applied == []
    assert "vllm_dms disabled" in caplog.text and "create_engine_config" in caplog.text
