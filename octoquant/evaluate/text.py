"""Real text shipped in packages: Wikipedia articles and labeled newsgroup posts (gensim's test data).

Calibration and evaluation never share text: articles are split into a calibration part (the first half)
and an evaluation part (the rest).
"""

from __future__ import annotations

import bz2
import functools
import importlib.util
import io
import os
import pickle
import re
import zlib

WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def _gensim_test_data() -> str:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the text corpus needs gensim: pip install gensim==4.4.0")
    return os.path.join(spec.submodule_search_locations[0], "test", "test_data")


@functools.cache
def wiki_articles() -> tuple[str, ...]:
    """The 106 real Wikipedia articles, wiki markup removed."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    path = os.path.join(_gensim_test_data(), WIKI_FILE)
    with bz2.open(path, "rb") as f:
        pages = [filter_wiki(text).replace("''", "") for _, text, _ in extract_pages(f)]
    return tuple(p.strip() for p in pages if p and len(p.strip()) > 200)


def wiki_text(part: str) -> str:
    """'calib' (first half of the articles) or 'eval' (second half) as one string."""
    arts = wiki_articles()
    half = len(arts) // 2
    if part == "calib":
        return "\n\n".join(arts[:half])
    if part == "eval":
        return "\n\n".join(arts[half:])
    raise ValueError(f"part must be 'calib' or 'eval', got {part!r}")


def wiki_sentences(part: str, n: int | None = None, min_chars: int = 40, max_chars: int = 300) -> list[str]:
    """Sentences of the calibration or evaluation articles (one per line of prose, split at '. ')."""
    out = []
    for line in wiki_text(part).splitlines():
        line = line.strip()
        if len(line) < min_chars or line.startswith(("*", "|", "{", "=", "!")):
            continue
        for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", line):
            if min_chars <= len(s) <= max_chars:
                out.append(s)
    return out[:n] if n else out


class _NewsgroupUnpickler(pickle.Unpickler):
    """Loads only plain containers and numpy arrays: the shipped file is data, never code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("copy_reg", "_reconstructor"),
        ("__builtin__", "object"),
        ("__builtin__", "dict"),
        ("__builtin__", "list"),
    }

    def find_class(self, module, name):
        if name == "Bunch":
            return dict
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from the newsgroup data")
        if module == "copy_reg":
            import copyreg

            return copyreg._reconstructor
        if module == "__builtin__":
            return {"object": object, "dict": dict, "list": list}[name]
        import numpy

        if name != "_reconstruct":
            return getattr(numpy, name)
        try:  # numpy >= 2 moved it (numpy.core is a deprecated alias)
            from numpy._core.multiarray import _reconstruct
        except ImportError:
            from numpy.core.multiarray import _reconstruct
        return _reconstruct


@functools.cache
def newsgroup_docs() -> tuple[tuple[str, ...], tuple[int, ...], tuple[str, ...]]:
    """(texts with headers removed, labels, label names) of gensim's 200-post mini newsgroup set."""
    with open(os.path.join(_gensim_test_data(), "mini_newsgroup"), "rb") as f:
        raw = zlib.decompress(f.read())
    obj = _NewsgroupUnpickler(io.BytesIO(raw), encoding="latin1").load()
    texts = []
    for doc in obj["data"]:
        body = doc.split("\n\n", 1)[1] if "\n\n" in doc else doc  # drop headers (they name the group)
        texts.append(" ".join(body.split())[:2000])
    return tuple(texts), tuple(int(t) for t in obj["target"]), tuple(obj["target_names"])
