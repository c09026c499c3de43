"""Training data: images from one or more folders, their patient groups and sources, and the split.

A data folder is either

* a folder with a ``manifest.csv`` (columns ``task, label, file, patient_group`` and, optionally,
  ``source`` or ``source_repo``), or
* a folder of class subfolders (``covid/``, ``pneumonia/``, ``normal/``...) without a manifest:
  each image is then its own patient group (the split cannot be patient-disjoint beyond that, and
  a warning says so) and the folder's name is its source.

Every sample carries its **source** (the hospital or collection it came from), because in public
chest X-ray sets each class comes mostly from its own hospitals and a model can learn the
hospital instead of the disease. The split deals whole patient groups, stratified by label and
source, into train / validation / test; ``hold_out_source`` keeps every image of one source (and
every other image of its patients) out of all three, as the ``held_out`` split, to measure how the
model does on a hospital it never saw; ``exclude_sources`` drops sources altogether (for example a
set whose licence does not allow shipping a model trained on it).

:func:`make_splits` is the one function that training and evaluation both call with the settings
recorded in ``training.json``, so an evaluation sees exactly the patients the model never saw.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import random
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test", "held_out")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
STRATIFY = ("label", "source")  # "source": by (label, source); "label": by label only (<= 0.2)

# Short names for the collections in the project's shared data (manifest ``source_repo``), so
# that ``--hold-out-source hannover`` reads as what it is. Any other repository is named by the
# last part of its path, lower-cased; a manifest ``source`` column wins over both.
SOURCE_ALIASES = {
    "GeneralBlockchain/covid-19-chest-xray-lung-bounding-boxes-dataset": "cohen",
    "ozanguldali/final-covid-chestxray": "kermany",
    "agchung/Figure1-COVID-chestxray-dataset": "figure1",
    "ml-workgroup/covid-19-image-repository": "hannover",
    "muhammedtalo/COVID-19": "nih",
    "pi-null-mezon/OpenIST": "teaching",
    "tonydosreis/deeplearning-covid19": "covid-ct",
}


class DataError(ValueError):
    """A data folder or manifest cannot be used as given."""


@dataclass(frozen=True)
class Sample:
    path: Path
    label: str
    group: str  # patient group: never split across train/validation/test
    source: str = ""  # hospital or collection (see SOURCE_ALIASES)


def source_name(row: Mapping[str, str], default: str) -> str:
    """The source of a manifest row: its ``source`` column, an alias of ``source_repo``, or
    *default*."""
    if row.get("source"):
        return row["source"].strip()
    repo = (row.get("source_repo") or "").strip()
    if repo:
        return SOURCE_ALIASES.get(repo, repo.rstrip("/").rsplit("/", 1)[-1].lower())
    return default


def read_manifest(manifest: Path, task: str, data_dir: Path) -> list[Sample]:
    """The task's rows of *manifest* whose files exist under *data_dir*."""
    with Path(manifest).open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"task", "label", "file", "patient_group"} - set(reader.fieldnames or [])
        if missing:
            raise DataError(f"{manifest}: missing columns {', '.join(sorted(missing))}")
        rows = [r for r in reader if r["task"] == task]
    default = Path(data_dir).resolve().name
    samples = [
        Sample(data_dir / r["file"], r["label"], r["patient_group"], source_name(r, default))
        for r in rows
    ]
    return [s for s in samples if s.path.is_file()]


def read_class_folders(directory: Path, labels: Iterable[str]) -> list[Sample]:
    """Images in ``directory/<label>/`` for each label; each image its own patient group."""
    directory = Path(directory)
    source = directory.resolve().name
    samples = [
        Sample(path, label, f"{source}/{label}/{path.stem}", source)
        for label in labels
        for path in sorted((directory / label).glob("*"))
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
    ]
    if samples:
        log.warning(
            "%s has no manifest.csv: each of its %d images is its own patient group, so images "
            "of one patient may land in different splits",
            directory,
            len(samples),
        )
    return samples


def read_samples(
    data_dirs: Sequence[Path],
    task: str,
    labels: Iterable[str],
    manifest: Path | None = None,
) -> list[Sample]:
    """The task's samples from every folder in *data_dirs* (first wins for a file listed twice).

    *manifest* replaces the first folder's ``manifest.csv``.
    """
    labels = list(labels)
    out: list[Sample] = []
    seen: set[Path] = set()
    for i, directory in enumerate(data_dirs):
        directory = Path(directory)
        listed = manifest if (i == 0 and manifest is not None) else directory / "manifest.csv"
        if listed.is_file():
            found = read_manifest(listed, task, directory)
        elif directory.is_dir():
            found = read_class_folders(directory, labels)
        else:
            raise DataError(f"no data folder at {directory}")
        unknown = sorted({s.label for s in found} - set(labels))
        if unknown:
            raise DataError(f"{directory}: labels {', '.join(unknown)} are not classes of {task}")
        for s in found:
            key = s.path.resolve()
            if key not in seen:
                seen.add(key)
                out.append(s)
    return out


def split_by_group(
    samples: Sequence[Sample],
    seed: int,
    validation_fraction: float,
    test_fraction: float,
    cv_fold: tuple[int, int] | None = None,
    stratify: str = "label",
) -> dict[str, list[Sample]]:
    """Assign whole patient groups to train / validation / test, stratified, reproducibly.

    Each group goes to one split only, so no patient is in two. Groups are stratified by label
    (``stratify="label"``) or by label and source (``"source"``: every source is represented in
    every split in proportion), ordered by a hash of (seed, group) within each stratum and cut by
    fraction. With *cv_fold* ``(i, k)`` the test groups stay the same and the others are dealt
    round-robin into *k* folds (per stratum, in the same hash order): fold *i* is the validation
    split, the rest the training split, and *validation_fraction* is not used.
    """
    if stratify not in STRATIFY:
        raise DataError(f"stratify must be one of {', '.join(STRATIFY)}, not {stratify!r}")
    strata: dict[str, dict[str, list[Sample]]] = {}
    for s in samples:
        key = s.label if stratify == "label" else f"{s.label}\x1f{s.source}"
        strata.setdefault(key, {}).setdefault(s.group, []).append(s)
    out: dict[str, list[Sample]] = {k: [] for k in SPLITS if k != "held_out"}
    assigned: dict[str, str] = {}
    for key in sorted(strata):
        groups = sorted(
            strata[key],
            key=lambda g: hashlib.sha256(f"{seed}:{g}".encode()).hexdigest(),
        )
        n = len(groups)
        n_test = max(1, round(n * test_fraction)) if test_fraction > 0 else 0
        n_val = max(1, round(n * validation_fraction)) if validation_fraction > 0 else 0
        if stratify == "source" and n < 3:  # too few patients to give every split one
            n_test = n_val = 0
        for i, group in enumerate(groups):
            if i < n_test:
                split = "test"
            elif cv_fold is not None:
                split = "validation" if (i - n_test) % cv_fold[1] == cv_fold[0] else "train"
            else:
                split = "validation" if i < n_test + n_val else "train"
            split = assigned.setdefault(group, split)  # a group seen in another stratum
            out[split].extend(strata[key][group])
    return out


def limit(samples: Sequence[Sample], per_class: int | None, seed: int) -> list[Sample]:
    """At most *per_class* samples of each label (seeded choice), for quick runs and tests."""
    if per_class is None:
        return list(samples)
    rng = random.Random(seed)
    shuffled = list(samples)
    rng.shuffle(shuffled)
    counts: Counter[str] = Counter()
    kept = []
    for s in shuffled:
        if counts[s.label] < per_class:
            counts[s.label] += 1
            kept.append(s)
    return kept


def cap_classes(samples: Sequence[Sample], caps: Mapping[str, int], seed: int) -> list[Sample]:
    """At most ``caps[label]`` samples of the capped labels (seeded choice), others unchanged."""
    if not caps:
        return list(samples)
    shuffled = list(samples)
    random.Random(seed + 1).shuffle(shuffled)
    keep: set[Path] = set()
    counts: Counter[str] = Counter()
    for s in shuffled:
        if s.label not in caps or counts[s.label] < caps[s.label]:
            counts[s.label] += 1
            keep.add(s.path)
    return [s for s in samples if s.path in keep]


def _optional_int(value: Any) -> int | None:
    return None if value in (None, "", "None") else int(value)


def data_dirs_of(settings: Mapping[str, Any]) -> list[Path]:
    """The data folders recorded in training settings (``data_dir`` then ``extra_data``)."""
    dirs = [Path(str(settings["data_dir"]))]
    dirs += [Path(str(d)) for d in settings.get("extra_data") or ()]
    return dirs


def make_splits(
    settings: Mapping[str, Any],
    labels: Sequence[str],
    *,
    data_dirs: Sequence[Path] | None = None,
    manifest: Path | None = None,
) -> dict[str, list[Sample]]:
    """Train / validation / test / held_out samples for training *settings* (a training.json
    ``settings`` record or :meth:`ai.train.TrainSettings.record`).

    *data_dirs* and *manifest* replace the recorded folders (data moved to another machine).
    Recorded settings without ``stratify`` (training.json before 0.3) split by label only.
    """
    task = str(settings["task"])
    seed = int(settings.get("seed", 0))
    dirs = list(data_dirs) if data_dirs else data_dirs_of(settings)
    if manifest is None and not data_dirs and settings.get("manifest"):
        manifest = Path(str(settings["manifest"]))
    samples = read_samples(dirs, task, labels, manifest)
    if not samples:
        where = ", ".join(str(d) for d in dirs)
        raise DataError(f"no {task} images found in {where}")
    held_out = str(settings.get("hold_out_source") or "")
    excluded = set(settings.get("exclude_sources") or ())
    sources = {s.source for s in samples}
    for name in [held_out, *excluded]:
        if name and name not in sources:
            raise DataError(
                f"no source {name!r} in the {task} data (sources: {', '.join(sorted(sources))})"
            )
    held = [s for s in samples if held_out and s.source == held_out]
    held_groups = {s.group for s in held}
    rest = [
        s
        for s in samples
        if s.source != held_out and s.source not in excluded and s.group not in held_groups
    ]
    cv = settings.get("cv_fold")
    splits = split_by_group(
        rest,
        seed,
        float(settings.get("validation_fraction", 0.15)),
        float(settings.get("test_fraction", 0.15)),
        (int(cv[0]), int(cv[1])) if cv else None,
        str(settings.get("stratify") or "label"),
    )
    splits["held_out"] = held
    per_class = _optional_int(settings.get("limit_per_class"))
    return {k: limit(v, per_class, seed) for k, v in splits.items()}


def describe_sources(samples: Sequence[Sample]) -> dict[str, dict[str, int]]:
    """``{source: {label: count}}`` of *samples*."""
    out: dict[str, dict[str, int]] = {}
    for s in samples:
        out.setdefault(s.source, {}).setdefault(s.label, 0)
        out[s.source][s.label] += 1
    return {k: dict(sorted(v.items())) for k, v in sorted(out.items())}
