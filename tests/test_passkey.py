"""Passkey prompts (SmolLM2's tokenizer and chat template), the answer parser and the scorer, and
the CPU reference runner on a tiny random model."""
import json

import pytest
import torch

from vllm_dms.tools import passkey as pk


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    from vllm_dms.tools.checkpoints import _write_smollm2_tokenizer, smollm2_gguf_path
    try:
        gguf = smollm2_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    d = tmp_path_factory.mktemp("tok")
    _write_smollm2_tokenizer(gguf, str(d))
    return AutoTokenizer.from_pretrained(str(d))


def hay(tok):
    text = "Alice was beginning to get very tired of sitting by her sister on the bank. " * 400
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("depth", [0.1, 0.5, 0.9])
def test_prompt_has_the_length_the_needle_at_its_depth_and_the_chat_frame(tok, depth):
    h = hay(tok)
    c = pk.build_case(tok, h, 2048, depth, "73519", offset=5)
    assert len(c.ids) == 2048
    text = tok.decode(c.ids)
    assert text.startswith("<|im_start|>") and "<|im_start|>user" in text
    assert text.count("73519") == 2 and text.rstrip().endswith(
        "<|im_start|>assistant\n" + pk.ANSWER_PREFIX)
    needle = tok(pk.NEEDLE.format(key="73519"), add_special_tokens=False)["input_ids"]
    assert c.ids[c.needle_at:c.needle_at + len(needle)] == needle
    before, after = pk.template_parts(tok)
    filler = 2048 - len(before) - len(needle) - len(after)
    assert c.needle_at - len(before) == round(depth * filler)  # depth of the filler, in tokens
    assert c.ids[len(before):c.needle_at] == h[5:5 + round(depth * filler)]


def test_cases_grid_keys_and_offsets_are_seeded(tok):
    h = hay(tok)
    a = pk.make_cases(tok, h, lengths=(1024, 1500), depths=(0.1, 0.9), seeds=2)
    b = pk.make_cases(tok, h, lengths=(1024, 1500), depths=(0.1, 0.9), seeds=2)
    assert len(a) == 8 and [c.ids for c in a] == [c.ids for c in b]
    assert [len(c.ids) for c in a] == [1024, 1024, 1500, 1500] * 2
    assert len({c.key for c in a}) >= 6 and all(len(c.key) == 5 for c in a)
    with pytest.raises(ValueError):
        pk.build_case(tok, h[:500], 1024, 0.5, "12345", 0)


def test_parse_answer_and_score():
    assert pk.parse_answer(" 73519. Remember it") == "73519"
    assert pk.parse_answer(" 7 3 5 1 9.") == "73519"  # SmolLM2 spells digits one token each
    assert pk.parse_answer(" unknown") is None
    cases = [pk.Case(2048, d, k, [], 0) for d, k in ((0.1, "11111"), (0.5, "22222"))]
    cases += [pk.Case(4096, 0.1, "33333", [], 0)]
    s = pk.score(cases, [" 11111.", " 22223", "The pass key is 33333"])
    assert s["accuracy"] == pytest.approx(2 / 3) and s["n"] == 3
    assert s["by_length"] == {"2048": 0.5, "4096": 1.0}
    assert s["by_depth"] == {"0.1": 1.0, "0.5": 0.0}
    assert [c["ok"] for c in s["cases"]] == [True, False, True]
    with pytest.raises(ValueError):
        pk.score(cases, ["1"])


def test_reference_runner_evict_vs_noevict(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    from vllm_dms.engine.config import DMSConfig
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      vocab_size=len(tok), max_position_embeddings=2048)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.1)
    hf = dict(cfg.to_dict(), architectures=["LlamaForCausalLM"], dms_window_size=8,
              dms_alpha_scale=100.0, dms_initial_alpha_offset=5.0, dms_cr=8)
    dms = DMSConfig.from_dicts(hf)
    cases = pk.make_cases(tok, hay(tok), lengths=(200,), depths=(0.5,), seeds=1)
    ev = pk.run_reference(m, dms, tok, cases, evict=True, max_tokens=4)
    ne = pk.run_reference(m, dms, tok, cases, evict=False, max_tokens=4)
    assert len(ev) == len(ne) == 1 and ev != ne  # eviction changes this random model's answer
    json.dumps(pk.score(cases, ev))  # the row is plain JSON


def test_rows_merge_by_mode(tmp_path):
    out = str(tmp_path / "p.json")
    pk.merge_rows(out, [dict(model="m", path="dms_fp8", mode="evict", accuracy=0.5)])
    pk.merge_rows(out, [dict(model="m", path="dms_fp8", mode="noevict", accuracy=0.9)])
    pk.merge_rows(out, [dict(model="m", path="dms_fp8", mode="evict", accuracy=0.7)])
    rows = json.load(open(out))
    assert [(r["mode"], r["accuracy"]) for r in rows] == [("noevict", 0.9), ("evict", 0.7)]
