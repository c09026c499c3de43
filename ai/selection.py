"""What a model is given: rules over header attributes, set per model in the config.

A rule names DICOM attributes (by keyword) and, for each, glob patterns (``*`` and ``?``, case
ignored; a multi-valued attribute is matched as its values joined by backslashes, so
``*LOCALIZER*`` finds LOCALIZER anywhere in ImageType). A rule matches a data set when every
attribute it names matches one of its patterns. ``Orientation`` is the one attribute that is not
a keyword: AXIAL, CORONAL, SAGITTAL or OBLIQUE, from Image Orientation (Patient).

- ``skip`` rules are read per image, in order: an image that matches one is stored and not
  analysed, with the rule's name as the reason (a series all of whose images match is skipped).
- ``prefer`` rules choose among the series of a study that one model would read, when the model
  reads one series per study (CT by default): the series matching the most preferred rules,
  earlier rules weighing more than all later ones together, then the one with more images, wins;
  the others are skipped with the reason.

The header is all they read, so ``pacs-node select FILE...`` says what a file would match
without running a model.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.datadict import keyword_dict
from pydicom.dataset import Dataset

from ai.errors import UnusableInputError

ACTIONS = ("skip", "prefer")
DERIVED = ("Orientation",)


class RuleSkip(UnusableInputError):
    """The series is not for the model by the configured rules (not an input fault: the node
    records the reason and sends no "not analysed" report for it)."""


class RuleError(ValueError):
    """A rule that cannot be read (unknown attribute or action, no pattern)."""


@dataclass(frozen=True)
class Rule:
    name: str
    action: str  # "skip" or "prefer"
    patterns: tuple[tuple[str, tuple[str, ...]], ...]  # (keyword, globs), all must match

    def matches(self, ds: Dataset) -> bool:
        for keyword, globs in self.patterns:
            value = attribute_text(ds, keyword).upper()
            if not any(fnmatch.fnmatchcase(value, g.upper()) for g in globs):
                return False
        return True

    def describe(self) -> str:
        terms = ", ".join(f"{k} {' or '.join(g)}" for k, g in self.patterns)
        return f"{self.action} '{self.name}' ({terms})"


def rule(name: str, action: str, **patterns: str | Sequence[str]) -> Rule:
    """A rule, its patterns checked (the config and the defaults are made by this)."""
    if action not in ACTIONS:
        raise RuleError(f"rule {name!r}: action must be one of {', '.join(ACTIONS)}")
    if not patterns:
        raise RuleError(f"rule {name!r}: names no attribute")
    checked = []
    for keyword, value in patterns.items():
        if keyword not in keyword_dict and keyword not in DERIVED:
            raise RuleError(f"rule {name!r}: {keyword!r} is not a DICOM keyword")
        globs = (value,) if isinstance(value, str) else tuple(value)
        if not globs or not all(isinstance(g, str) for g in globs):
            raise RuleError(f"rule {name!r}: {keyword} needs a pattern or a list of patterns")
        checked.append((keyword, globs))
    return Rule(name, action, tuple(checked))


def rule_from_table(table: Mapping[str, Any], where: str) -> Rule:
    """A rule from its config table: ``{ name = ..., action = ..., Keyword = pattern(s) }``."""
    items = dict(table)
    name, action = items.pop("name", None), items.pop("action", None)
    if not isinstance(name, str) or not name:
        raise RuleError(f"{where}: needs a name")
    if not isinstance(action, str):
        raise RuleError(f"{where}: needs an action ({', '.join(ACTIONS)})")
    try:
        return rule(name, action, **items)
    except RuleError as exc:
        raise RuleError(f"{where}: {exc}") from None


# Kernel names that reconstruct for the lung, by vendor: Siemens B60-B80, Bl, Br6x and I70
# (iterative), GE LUNG, Philips L/YC/YD, Canon FC5x and FC8x.
LUNG_KERNELS = ("*LUNG*", "B6*", "B7*", "B8*", "BL*", "BR6*", "I7*", "L", "YC", "YD", "FC5*",
                "FC8*")  # fmt: skip
DEFAULT_RULES = (
    rule("localizer", "skip", ImageType="*LOCALIZER*"),
    rule("scout", "skip", ImageType="*SCOUT*"),
    rule(
        "scout by description",
        "skip",
        SeriesDescription=("*SCOUT*", "*TOPOGRAM*", "*SURVIEW*", "*LOCALI*", "*SCANOGRAM*"),
    ),
    # CT dose pages are secondary captures (often of Modality CT) with these descriptions; a
    # Secondary Capture SOP class alone says nothing (NCCID's radiographs are stored as SC)
    rule(
        "dose report",
        "skip",
        SeriesDescription=("*DOSE*", "*PATIENT PROTOCOL*", "*SCREEN SAVE*", "*EXAM SUMMARY*"),
    ),
    rule("axial", "prefer", Orientation="AXIAL"),
    rule("lung kernel", "prefer", ConvolutionKernel=LUNG_KERNELS),
)


def attribute_text(ds: Dataset, keyword: str) -> str:
    """The value of *keyword* in *ds* as text (multiple values joined by backslashes; "" when
    absent or unreadable)."""
    if keyword == "Orientation":
        return orientation(ds)
    try:
        value = ds.get(keyword)
    except Exception:
        return ""
    if value is None:
        return ""
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        return str(value).strip()
    return "\\".join(str(v).strip() for v in value)


def orientation(ds: Dataset) -> str:
    """AXIAL, CORONAL, SAGITTAL or OBLIQUE from Image Orientation (Patient); "" without it."""
    try:
        cosines = np.asarray([float(v) for v in ds.ImageOrientationPatient], dtype=float)
    except Exception:
        return ""
    if cosines.shape != (6,):
        return ""
    normal = np.cross(cosines[:3], cosines[3:])
    size = float(np.linalg.norm(normal))
    if size == 0.0:
        return ""
    axis = int(np.argmax(np.abs(normal)))
    if abs(normal[axis]) / size < 0.9:  # more than ~25 degrees off every plane
        return "OBLIQUE"
    return ("SAGITTAL", "CORONAL", "AXIAL")[axis]


def skip_rule(ds: Dataset, rules: Sequence[Rule]) -> Rule | None:
    """The first ``skip`` rule *ds* matches, if any."""
    return next((r for r in rules if r.action == "skip" and r.matches(ds)), None)


def select_images(
    datasets: Sequence[Dataset], rules: Sequence[Rule]
) -> tuple[list[Dataset], list[tuple[str, str]]]:
    """The images of a series no skip rule takes, and (name, reason) for those it takes.
    :class:`UnusableInputError` when none is left."""
    kept: list[Dataset] = []
    skipped: list[tuple[str, str]] = []
    for ds in datasets:
        found = skip_rule(ds, rules)
        if found is None:
            kept.append(ds)
        else:
            skipped.append((str(ds.get("SOPInstanceUID", "?")), f"rule '{found.name}'"))
    if datasets and not kept:
        names = sorted({reason for _, reason in skipped})
        raise RuleSkip("every image matches " + ", ".join(names))
    return kept, skipped


def preference(ds: Dataset, rules: Sequence[Rule]) -> tuple[int, list[str]]:
    """How much the ``prefer`` rules like a series (its first image's header): a score in which
    each rule outweighs all later ones together, and the names of the rules it matches."""
    prefer = [r for r in rules if r.action == "prefer"]
    score, names = 0, []
    for i, r in enumerate(prefer):
        if r.matches(ds):
            score += 1 << (len(prefer) - 1 - i)
            names.append(r.name)
    return score, names


@dataclass(frozen=True)
class Candidate:
    """A series one model could read: its UID, a header of it and how many images it has."""

    series_uid: str
    header: Dataset
    images: int


def choose_series(candidates: Sequence[Candidate], rules: Sequence[Rule]) -> Candidate | None:
    """The series of a study the model reads when it reads one: best by the prefer rules,
    then by image count, then by the lowest Series Number (then UID, for a fixed answer)."""

    def key(c: Candidate) -> tuple[int, int, int, str]:
        number = c.header.get("SeriesNumber")
        try:
            number = int(number) if number not in (None, "") else 1 << 30
        except (TypeError, ValueError):
            number = 1 << 30
        return (-preference(c.header, rules)[0], -c.images, number, c.series_uid)

    usable = [c for c in candidates if skip_rule(c.header, rules) is None]
    return min(usable, key=key) if usable else None


def not_chosen_reason(chosen: Candidate, rules: Sequence[Rule]) -> str:
    _, names = preference(chosen.header, rules)
    why = ", ".join(names) if names else f"{chosen.images} images"
    return f"another series of the study was chosen: {chosen.series_uid} ({why})"


@dataclass
class SeriesDecision:
    """What the rules make of one series: the images kept, those a skip rule took, and, when
    the series is not analysed at all, why."""

    series_uid: str
    kept: list[Dataset]
    skipped: list[tuple[str, str]]
    reason: str = ""


def decide(
    series: Mapping[str, Sequence[Dataset]], rules: Sequence[Rule], one_per_study: bool
) -> dict[str, SeriesDecision]:
    """The rules applied to several series of one model at once (``classify`` and ``select``
    on files; the work role makes the same choice against the series the node holds)."""
    decisions: dict[str, SeriesDecision] = {}
    for uid, datasets in series.items():
        try:
            kept, skipped = select_images(datasets, rules)
        except RuleSkip as exc:
            decisions[uid] = SeriesDecision(uid, [], [], str(exc))
            continue
        decisions[uid] = SeriesDecision(uid, kept, skipped)
    if one_per_study:
        studies: dict[str, list[Candidate]] = {}
        for uid, d in decisions.items():
            if d.kept:
                study = str(d.kept[0].get("StudyInstanceUID", ""))
                studies.setdefault(study, []).append(Candidate(uid, d.kept[0], len(d.kept)))
        for candidates in studies.values():
            chosen = choose_series(candidates, rules)
            for c in candidates:
                if chosen is not None and c.series_uid != chosen.series_uid:
                    decisions[c.series_uid].reason = not_chosen_reason(chosen, rules)
    return decisions
