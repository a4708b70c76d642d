"""The training corpora: alice29 (the evaluation text) never in them, the large one's size and
overlap, and a resumed run keeping the corpus its state was started with."""
import json
import re

import pytest

from test_lora_resume import RUN, STREAM
from test_train import tiny
from vllm_dms.tools import texts as tx
from vllm_dms.tools.training import state as st_mod
from vllm_dms.tools.training.train import CORPORA, token_stream, train

SHINGLE = 10  # words: longer than any proverb or stock phrase two books share by chance


def _shingles(text: str) -> set[int]:
    w = re.findall(r"[a-z]+", text.lower())
    return {hash(" ".join(w[i:i + SHINGLE])) for i in range(len(w) - SHINGLE)}


@pytest.fixture(scope="module")
def large_texts():
    return {n: tx.gutenberg_text(n) for n in CORPORA["large"]}  # cached, else fetched


def test_no_corpus_holds_alice(large_texts):
    assert all(tx.HELD_OUT not in names for names in CORPORA.values())
    alice = tx.gutenberg_text(tx.HELD_OUT)
    line = "`Curiouser and curiouser!' cried Alice"
    assert line in alice and not any(line in t for t in large_texts.values())
    seen = set().union(*(_shingles(t) for t in large_texts.values()))
    assert not _shingles(alice) & seen  # no 10-word run of Alice anywhere (another edition)


def test_large_corpus_has_no_text_twice(large_texts):
    seen: set[int] = set()
    for name, text in large_texts.items():
        own = _shingles(text)
        # measured max: 8.1% (passionate_pilgrim: sonnets also printed in the Sonnets / LLL)
        assert len(own & seen) < 0.1 * len(own), name
        seen |= own


def test_large_corpus_token_count():
    from transformers import AutoTokenizer

    from vllm_dms.tools.checkpoints import smollm2_base
    tok = AutoTokenizer.from_pretrained(smollm2_base())
    small, large = (token_stream(tok, CORPORA[c]).numel() for c in ("small", "large"))
    # measured with the SmolLM2 tokenizer (one EOS per text): 264,678 and 2,105,624
    assert 260_000 < small < 270_000 and 2_050_000 < large < 2_160_000


def _events(path):
    return [json.loads(x) for x in open(path) if '"event"' in x]


def test_resume_keeps_the_state_corpus_and_refuses_another(tmp_path):
    m, state, out = tiny(), str(tmp_path / "state"), str(tmp_path / "out")
    train(None, out, model=m, stream=STREAM, state_dir=state, run_steps=1, **RUN)
    start = _events(tmp_path / "out" / "train_log.jsonl")[0]
    assert start["recipe"]["corpus"] == "large"  # the default for a new run
    assert start["recipe"]["texts"] == list(CORPORA["large"])
    assert start["train_tokens_available"] == STREAM.numel()
    with pytest.raises(ValueError, match=r"another recipe.*'corpus': \('large', 'small'\)"):
        train(None, out, model=m, stream=STREAM, state_dir=state, corpus="small", **RUN)
    with pytest.raises(ValueError, match="3000 training tokens, now 2999"):
        train(None, out, model=m, stream=STREAM[:-1], state_dir=state, run_steps=1, **RUN)
    train(None, out, model=m, stream=STREAM, state_dir=state, run_steps=1, **RUN)
    resume = _events(tmp_path / "out" / "train_log.jsonl")[-2]
    assert resume["event"] == "resume" and resume["recipe"]["corpus"] == "large"


def test_state_from_before_the_corpus_option_resumes_as_small(tmp_path):
    m, state, out = tiny(), str(tmp_path / "state"), str(tmp_path / "out")
    train(None, out, model=m, stream=STREAM, state_dir=state, corpus="small", run_steps=1, **RUN)
    tensors, info = st_mod.load_state(state)
    del info["recipe"]["corpus"], info["train_tokens"]  # as saved before either existed
    st_mod.save_state(state, tensors, info)
    train(None, out, model=m, stream=STREAM, state_dir=state, run_steps=1, **RUN)
    assert _events(tmp_path / "out" / "train_log.jsonl")[-2]["recipe"]["corpus"] == "small"
    with pytest.raises(ValueError, match=r"'corpus': \('small', 'large'\)"):
        train(None, out, model=m, stream=STREAM, state_dir=state, corpus="large", **RUN)
