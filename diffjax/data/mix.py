"""Mixing sources (`data.mix`) and training on the first N records (`data.num_examples`).

`data.mix` adds other sources to `data.source` with a fraction of the training stream
each: a comma-separated list of `SOURCE:LOCATION:FRACTION` entries,

    folder:/data/synth_digits:0.5                 half the stream from a folder
    tfds:/data/synth:0.3                          a tfds ArrayRecord dataset (see below)
    tfds:synth@/data/tfds:0.3                     ... with an explicit name@data_dir
    folder:/data/a:0.25,latents:/data/b.npz:0.25  several sources
    digits:half1:0.2                              digits (LOCATION = the split)

LOCATION is the source's `data.data_dir` (folder, latents, tfds), or the split for
digits. A tfds LOCATION is `NAME@DATA_DIR`, or `DATA_DIR` alone: the name is then the
one `launch/make_dataset.py` recorded in `DATA_DIR/meta.json`, else DATA_DIR's basename.
Every other option (image size, channels, num_classes, tokenizer ...) is `data.*`'s.
Each FRACTION lies in (0, 1) and they sum to less than 1; `data.source` gets the rest.

`MixSource` is a deterministic random-access source: record i comes from a fixed
component and a fixed record of it, a function of i alone (no state, no seed), so the
grain pipeline's seeded shuffle, per-process slice and resume work unchanged. Its length
M is the smallest for which every component's share holds each of its records at least
once (M = max_k ceil(len_k / f_k)); component k fills round(f_k * M) slots, spread
evenly over 0..M-1 (smooth interleaving: any window of the unshuffled source holds the
components in their ratio), cycling its records in order when it has fewer than that.

All components must give records with the same keys and shapes, and labelled ones the
same number of classes (label ids are taken as they are: an image folder written by
`launch/make_dataset.py` numbers its classes as the model that made it did).

`LimitSource` is the first `n` records of a source (`data.num_examples`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import numpy as np

from diffjax.data.sources import SourceWrapper

# Sources a mix entry may name.
MIX_SOURCES = ("digits", "folder", "tfds", "latents")


@dataclasses.dataclass(frozen=True)
class MixEntry:
    """One parsed `data.mix` entry: `make_source` keywords and its stream fraction."""

    source: str
    fraction: float
    data_dir: str = ""
    name: str = ""
    split: str = ""

    def fields(self) -> dict[str, str]:
        """The `data.*` fields this entry overrides."""
        out = {"source": self.source, "data_dir": self.data_dir, "name": self.name}
        if self.split:
            out["split"] = self.split
        return out


def _tfds_name(data_dir: str) -> str:
    """The tfds name in `data_dir`: the one `launch/make_dataset.py` recorded in its
    meta.json, else the directory's basename."""
    path = os.path.expanduser(data_dir)
    try:
        with open(os.path.join(path, "meta.json")) as f:
            name = json.load(f).get("args", {}).get("name")
        if isinstance(name, str) and name:
            return name
    except (OSError, ValueError, AttributeError):
        pass
    return os.path.basename(os.path.normpath(path))


def parse_mix(spec: str) -> list[MixEntry]:
    """Parses `data.mix` (see the module docstring); '' gives [].

    Raises:
      ValueError: a malformed entry, an unknown source, a fraction outside (0, 1), or
        fractions summing to 1 or more; the message names the entry.
    """
    entries: list[MixEntry] = []
    for raw in (spec or "").split(","):
        item = raw.strip()
        if not item:
            continue
        head, sep, frac = item.rpartition(":")
        source, sep2, location = head.partition(":")
        if not sep or not sep2 or not location:
            raise ValueError(
                f"data.mix entry {item!r} is not SOURCE:LOCATION:FRACTION, e.g. "
                "'folder:/data/synth:0.5' (see diffjax/data/mix.py)."
            )
        try:
            fraction = float(frac)
        except ValueError:
            raise ValueError(
                f"data.mix entry {item!r}: the fraction {frac!r} is not a number; write "
                "SOURCE:LOCATION:FRACTION with FRACTION in (0, 1)."
            ) from None
        if not 0.0 < fraction < 1.0:
            raise ValueError(
                f"data.mix entry {item!r}: the fraction {fraction} must lie in (0, 1) (the "
                "share of the training stream from that source)."
            )
        if source not in MIX_SOURCES:
            raise ValueError(
                f"data.mix entry {item!r}: unknown source {source!r}; choose one of {MIX_SOURCES}."
            )
        if source == "digits":
            entries.append(MixEntry(source, fraction, split=location))
        elif source == "tfds":
            name, at, data_dir = location.partition("@")
            if not at:
                data_dir, name = location, _tfds_name(location)
            entries.append(MixEntry(source, fraction, data_dir=data_dir, name=name))
        else:
            entries.append(MixEntry(source, fraction, data_dir=location))
    total = sum(e.fraction for e in entries)
    if total >= 1.0:
        raise ValueError(
            f"data.mix fractions sum to {total:g}; they must sum to less than 1, the rest "
            "being data.source's share."
        )
    return entries


def class_count(source) -> int | None:
    """Classes of a source's labels: the `num_classes` or `class_names` of it or of a
    source it wraps, else 1 + the largest label of the innermost source; 0 when its
    records have no labels; None when unknown."""
    if "labels" not in source[0]:
        return 0
    chain, obj = [], source
    while obj is not None and len(chain) < 8:
        chain.append(obj)
        obj = getattr(obj, "source", None)
    for obj in chain:
        k = getattr(obj, "num_classes", None)
        if isinstance(k, int) and k > 0:
            return k
        names = getattr(obj, "class_names", None)
        if names:
            return len(names)
    labels = getattr(chain[-1], "labels", None)
    if labels is not None and len(labels):
        return int(np.max(labels)) + 1
    return None


class LimitSource(SourceWrapper):
    """The first `n` records of `source` (`data.num_examples`).

    Other public attributes are the wrapped source's; `labels` and `images` are cut to `n`.
    """

    def __init__(self, source, n: int):
        if n < 1 or n > len(source):
            raise ValueError(
                f"data.num_examples={n} but the source {source!r} has {len(source)} records; "
                f"set data.num_examples to 1..{len(source)} (0 = all)."
            )
        self._source = source
        self._n = int(n)

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not -self._n <= index < self._n:
            raise IndexError(f"index {index} out of range for {self._n} records")
        return self._source[index % self._n]

    def __repr__(self) -> str:
        return f"LimitSource({self._source!r}, n={self._n})"

    @property
    def labels(self) -> np.ndarray | None:
        labels = getattr(self._source, "labels", None)
        return None if labels is None else np.asarray(labels)[: self._n]

    @property
    def images(self) -> np.ndarray | None:
        """The wrapped source's in-memory images (digits, arrays), cut to `n`; None
        for sources that read their files per record."""
        images = getattr(self._source, "images", None)
        return None if images is None else images[: self._n]


def _check_compatible(names: list[str], sources: list) -> None:
    """Same record keys, shapes and class counts in every component, or a clear error."""
    first = sources[0][0]
    k0 = class_count(sources[0])
    for name, src in zip(names[1:], sources[1:], strict=True):
        rec = src[0]
        if set(rec) != set(first):
            raise ValueError(
                f"data.mix: {name} gives records with {sorted(rec)} but data.source gives "
                f"{sorted(first)}; mixed sources must agree (both labelled or both not, "
                "both captioned or both not)."
            )
        for key in first:
            a, b = np.shape(first[key]), np.shape(rec[key])
            if a != b:
                raise ValueError(
                    f"data.mix: {name} gives {key!r} of shape {b} but data.source gives {a}."
                )
        k = class_count(src)
        if k0 is not None and k is not None and k != k0:
            raise ValueError(
                f"data.mix: {name} has {k} classes but data.source has {k0}; label ids must "
                "mean the same classes in every mixed source (write the synthetic set with "
                "launch/make_dataset.py from a model trained on data.source)."
            )


class MixSource:
    """Sources interleaved with fixed fractions (`data.mix`; the module docstring).

    Args:
      sources: the components, `data.source` first.
      fractions: their shares of the stream (positive, summing to 1).
      names: how errors and `repr` name them.
    """

    def __init__(self, sources: list, fractions: list[float], names: list[str] | None = None):
        if len(sources) != len(fractions) or len(sources) < 2:
            raise ValueError("MixSource needs two or more sources, one fraction each.")
        f = np.asarray(fractions, np.float64)
        if np.any(f <= 0) or abs(f.sum() - 1.0) > 1e-9:
            raise ValueError(f"MixSource fractions must be positive and sum to 1, got {fractions}.")
        names = names or [f"source {i}" for i in range(len(sources))]
        for name, src in zip(names, sources, strict=True):
            if len(src) == 0:
                raise ValueError(f"data.mix: {name} has no records.")
        _check_compatible(names, sources)
        self._sources = list(sources)
        self._fractions = [float(x) for x in f]
        self._names = list(names)
        lengths = [len(s) for s in sources]
        total = max(math.ceil(n / fk - 1e-9) for n, fk in zip(lengths, f, strict=True))
        counts = [max(n, round(fk * total)) for n, fk in zip(lengths, f, strict=True)]
        # Slot j of component k sits at its ideal time (j + 0.5) / count_k; merging these
        # times (ties by component order) interleaves the components evenly.
        times = np.concatenate([(np.arange(c) + 0.5) / c for c in counts])
        comp = np.concatenate([np.full(c, k, np.int32) for k, c in enumerate(counts)])
        slot = np.concatenate([np.arange(c, dtype=np.int64) for c in counts])
        order = np.lexsort((comp, times))
        self._component = comp[order]
        self._record = slot[order] % np.asarray(lengths, np.int64)[self._component]
        self._counts = counts

    def __len__(self) -> int:
        return len(self._component)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        return self._sources[self._component[index]][int(self._record[index])]

    def __repr__(self) -> str:
        parts = ", ".join(
            f"{s!r}:{fk:.6g}" for s, fk in zip(self._sources, self._fractions, strict=True)
        )
        return f"MixSource([{parts}], n={len(self)})"

    def __getattr__(self, name: str):
        # Attributes such as `class_names` are data.source's.
        if name.startswith("_") or "_sources" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["_sources"][0], name)

    @property
    def sources(self) -> list:
        return list(self._sources)

    @property
    def fractions(self) -> list[float]:
        return list(self._fractions)

    @property
    def counts(self) -> list[int]:
        """Records of each component in one pass over the mixed source."""
        return list(self._counts)

    def component(self, index: int) -> tuple[int, int]:
        """(component, record of it) that mixed record `index` reads."""
        return int(self._component[index]), int(self._record[index])

    @property
    def labels(self) -> np.ndarray | None:
        """int32 [len] labels, when every component exposes its `labels`."""
        per = [getattr(s, "labels", None) for s in self._sources]
        if any(p is None for p in per):
            return None
        out = np.empty(len(self), np.int32)
        for k, lab in enumerate(per):
            sel = self._component == k
            out[sel] = np.asarray(lab)[self._record[sel]]
        return out
