"""Real English text (Project Gutenberg, public domain) shipped inside PyPI source archives.

``gutenberg_text(name)`` returns the text of alice29.txt, lcet10.txt, asyoulik.txt or
plrabn12.txt from the brotli==1.2.1 sdist (tests/testdata), downloading the sdist with pip into
the cache on first use; ``VLLM_DMS_TEXT_DIR`` may point at a folder that already holds the files.
"""
from __future__ import annotations

import glob
import os
import subprocess
import sys
import tarfile

SDIST = "brotli==1.2.1"


def cache_dir() -> str:
    return os.environ.get("VLLM_DMS_CACHE", os.path.expanduser("~/.cache/vllm_dms"))


def gutenberg_text(name: str) -> str:
    for d in (os.environ.get("VLLM_DMS_TEXT_DIR"), os.path.join(cache_dir(), "texts")):
        if d and os.path.isfile(os.path.join(d, name)):
            with open(os.path.join(d, name), encoding="latin-1") as f:
                return f.read()
    _fetch()
    with open(os.path.join(cache_dir(), "texts", name), encoding="latin-1") as f:
        return f.read()


def _fetch() -> None:
    dest = os.path.join(cache_dir(), "texts")
    os.makedirs(dest, exist_ok=True)
    tmp = os.path.join(cache_dir(), "sdist")
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    SDIST, "-d", tmp, "-q"], check=True)
    (archive,) = glob.glob(os.path.join(tmp, "brotli-*.tar.gz"))
    with tarfile.open(archive) as tar:
        for m in tar.getmembers():
            if "/tests/testdata/" in m.name and m.name.endswith(".txt"):
                m.name = os.path.basename(m.name)
                tar.extract(m, dest)
