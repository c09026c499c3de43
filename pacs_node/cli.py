"""The ``pacs-node`` command: serve, classify, train, status."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from ai import DISCLAIMER
from ai.errors import AiError
from pacs_node import __version__
from pacs_node.errors import NodeError
from storage.errors import StorageError

# TensorFlow reads this once, at import: keep its C++ start-up chatter out of the node's log
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
log = logging.getLogger("pacs_node")

EPILOG = f"All results are {DISCLAIMER}; research use only."
# ai.train.BACKBONES, listed here so that the parser does not import TensorFlow
BACKBONE_NAMES = [
    "small-cnn",
    "efficientnet_lite0",
    "efficientnet_lite1",
    "efficientnet_lite2",
    "efficientnet_b0",
    "mobilenet_v2",
    "densenet121",
    "resnet50",
    "vgg16",
    "vgg19",
    "inception_v3",
    "inception_resnet_v2",
]


def _setup_logging(level: str) -> None:
    from pacs_node.logs import OneLineFormatter

    handler = logging.StreamHandler()
    handler.setFormatter(OneLineFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler])
    # pynetdicom logs every PDU at INFO, including patient attributes: keep it to warnings
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # and its "standard" handlers, bound to every association, format every PDU and DIMSE
    # message they see (copying each data set) for debug lines nobody reads; unbound, the
    # per-message cost goes (issue 9)
    from pynetdicom import _config as pynetdicom_config

    pynetdicom_config.LOG_HANDLER_LEVEL = "none"
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    logging.getLogger("highdicom").setLevel(logging.WARNING)


def cmd_serve(args: argparse.Namespace) -> int:
    from pacs_node.config import load
    from pacs_node.process import Stop
    from pacs_node.supervisor import Supervisor

    config = load(args.config)
    level = args.log_level or config.log_level
    _setup_logging(level)
    stop = Stop().install()
    status = Supervisor(config, args.config, level).run(stop)
    print("pacs-node: stopped", flush=True)
    return status


def cmd_role(args: argparse.Namespace) -> int:
    """``receive``, ``work``, ``send`` or ``web``: one role in this process, until SIGTERM or
    SIGINT."""
    # numpy's OpenBLAS threads spin after every small product (the abstention score): on a
    # worker that doubled the CPU of a chest X-ray job (120 ms instead of 56) and stole the
    # core the other roles need. Set before numpy is first imported; an operator's value wins.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from pacs_node.config import load
    from pacs_node.process import Stop

    config = load(args.config)
    _setup_logging(args.log_level or config.log_level)
    stop = Stop().install()
    if args.command == "receive":
        from pacs_node import receive

        receive.run(config, stop)
    elif args.command == "work":
        if config.worker.nice > 0:
            # before the first thread: Linux sets a niceness thread by thread, and threads
            # take their creator's
            os.nice(config.worker.nice)
        from pacs_node import work

        work.run(config, stop)
    elif args.command == "web":
        from pacs_node.web import server

        server.run(config, stop)
    else:
        from pacs_node import send

        send.run(config, stop)
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from pacs_node.config import load
    from storage.db import make_engine, migrate

    config = load(args.config)
    engine = make_engine(config.node.resolved_database_url)
    try:
        print(f"database schema: {migrate(engine)}")
    finally:
        engine.dispose()
    return 0


def _read_dicom(path: Path) -> Any:
    """*path* as DICOM with its Pixel Data left on disk until used (ai.analysis.read_dicom), or
    None for a file that is not DICOM."""
    from pydicom.errors import InvalidDicomError

    from ai.analysis import read_dicom

    try:
        return read_dicom(path)
    except (InvalidDicomError, EOFError, ValueError, TypeError, AttributeError):
        return None


def _prediction_record(analysis: Any) -> dict[str, Any]:
    p = analysis.prediction
    record: dict[str, Any] = {
        "label": p.label.name,
        "finding": p.label.meaning,
        "probabilities": {
            c.name: round(v, 4) for c, v in zip(p.classes, p.probabilities, strict=True)
        },
        "decision_rule": p.rule_text(),
    }
    if p.indeterminate:
        record["indeterminate"] = p.indeterminate
        record["most_likely"] = p.decided.name
    if analysis.excluded:
        record["excluded"] = [{"image": n, "reason": r} for n, r in analysis.excluded]
    return record


def _group_files(paths: list[Path], config: Any) -> tuple[dict[Any, list[Any]], list[Any]]:
    """DICOM files, as (path, dataset), grouped by (model binding, SeriesInstanceUID) and
    routed by Modality as the node routes them; the rest: (path, None) for image files,
    (path, reason) for DICOM no model serves."""
    groups: dict[Any, list[Any]] = {}
    others: list[Any] = []
    for path in paths:
        try:
            header = _read_dicom(path)
        except OSError as exc:
            others.append((path, f"cannot read the file: {exc.strerror or exc}"))
            continue
        if header is None:
            others.append((path, None))
            continue
        modality = str(header.get("Modality", "") or "").upper()
        binding = config.model_for(modality)
        if binding is None:
            served = ", ".join(f"{'/'.join(b.modalities)}" for b in config.models if b.enabled)
            others.append((path, f"no model serves modality {modality or '(none)'} ({served})"))
            continue
        series = str(header.get("SeriesInstanceUID", "") or f"file:{path}")
        groups.setdefault((binding, series), []).append((path, header))
    return groups, others


def _decisions(groups: dict[Any, list[Any]]) -> dict[str, dict[str, Any]]:
    """The selection rules of each model applied to its series among the files, as the work
    role applies them (ai.selection)."""
    from ai.selection import decide

    by_model: dict[str, tuple[Any, dict[str, list[Any]]]] = {}
    for (binding, series), members in groups.items():
        by_model.setdefault(binding.name, (binding, {}))[1][series] = [ds for _, ds in members]
    return {
        name: decide(series, binding.rules, binding.one_series_per_study)
        for name, (binding, series) in by_model.items()
    }


def cmd_select(args: argparse.Namespace) -> int:
    """Which model and which rule each DICOM file meets, without running a model."""
    from ai.selection import preference, skip_rule
    from pacs_node.config import load

    config = load(args.config)
    groups, others = _group_files([Path(f) for f in args.files], config)
    decisions = _decisions(groups)
    records: list[dict[str, Any]] = []
    for (binding, series), members in groups.items():
        decision = decisions[binding.name][series]
        for path, ds in members:
            found = skip_rule(ds, binding.rules)
            _, prefers = preference(ds, binding.rules)
            if found is not None:
                outcome = f"skipped by rule {found.describe()}"
            elif decision.reason:
                outcome = f"series not analysed: {decision.reason}"
            else:
                outcome = "analysed"
            records.append(
                {
                    "file": str(path),
                    "modality": str(ds.get("Modality", "")),
                    "model": binding.name,
                    "series": series,
                    "rule": found.name if found is not None else "",
                    "prefers": prefers,
                    "outcome": outcome,
                }
            )
    for path, reason in others:
        records.append({"file": str(path), "outcome": reason or "not DICOM (see classify --task)"})
    if args.json:
        print(json.dumps({"files": records}, indent=2))
    else:
        for r in records:
            to = f" -> {r['model']}" if r.get("model") else ""
            liked = f" (prefers: {', '.join(r['prefers'])})" if r.get("prefers") else ""
            print(f"{r['file']}: {r.get('modality', '')}{to}: {r['outcome']}{liked}")
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    """DICOM files go to the model the node would use for their Modality, one result per
    series; PNG/JPEG files to --model or the --task model, one result per file."""
    _setup_logging("WARNING")

    from ai.analysis import analyse_datasets, analyse_images
    from ai.errors import UnusableInputError
    from ai.preprocess import read_image_file
    from ai.runtime import load_runtime_classifier
    from pacs_node.config import load

    config = load(args.config)
    out_dir = Path(args.output) if args.output else None
    groups, others = _group_files([Path(f) for f in args.files], config)
    decisions = _decisions(groups)
    records: list[dict[str, Any]] = []
    failures = 0
    for (binding, series), members in groups.items():
        datasets = [ds for _, ds in members]
        record: dict[str, Any] = {
            "series": series,
            "files": [str(path) for path, _ in members],
            "modality": str(datasets[0].get("Modality", "")),
        }
        decision = decisions[binding.name][series]
        if decision.reason:  # the node's selection rules: not for this model, no failure
            record.update(model=binding.name, skipped=decision.reason)
            records.append(record)
            continue
        try:
            classifier = load_runtime_classifier(binding.path or binding.name, binding.runtime)
            record.update(model=classifier.spec.name, version=classifier.spec.version)
            analysis = analyse_datasets(decision.kept, classifier)
        except (UnusableInputError, OSError, ValueError) as exc:
            record["error"] = str(exc)
            failures += 1
            records.append(record)
            continue
        analysis.excluded[:0] = decision.skipped
        record.update(_prediction_record(analysis))
        if analysis.prediction.task == "ct":
            record["slices"] = [
                {
                    "instance": item.dataset.get("InstanceNumber") if item.dataset else None,
                    "sop_instance_uid": item.name,
                    "probability": round(item.probability, 4),
                }
                for item in analysis.explained
            ]
        if out_dir is not None:
            record["written"] = _write_dicom_outputs(out_dir, analysis)
        records.append(record)
    image_model = args.model or args.task
    for path, reason in others:
        record = {"file": str(path)}
        if reason is not None:
            record["error"] = reason
            failures += 1
            records.append(record)
            continue
        try:
            classifier = load_runtime_classifier(image_model, args.runtime)
            record.update(model=classifier.spec.name, version=classifier.spec.version)
            analysis = analyse_images([path.name], [read_image_file(path)], classifier)
        except (UnusableInputError, OSError) as exc:
            record["error"] = str(exc)
            failures += 1
            records.append(record)
            continue
        record.update(_prediction_record(analysis))
        if out_dir is not None:
            record["written"] = _write_png_output(out_dir, path, analysis)
        records.append(record)
    if args.json:
        print(json.dumps({"disclaimer": DISCLAIMER, "results": records}, indent=2))
    else:
        for r in records:
            print(_describe(r))
        print(f"-- {DISCLAIMER}")
    return 1 if failures else 0


def _describe(r: dict[str, Any]) -> str:
    what = (
        f"series {r['series']} ({r.get('modality') or '?'}, {len(r['files'])} files)"
        if "series" in r
        else r["file"]
    )
    if "error" in r:
        return f"{what}: cannot classify: {r['error']}"
    if "skipped" in r:
        return f"{what}: not for {r['model']} by the selection rules: {r['skipped']}"
    probs = "  ".join(f"{k}={v:.3f}" for k, v in r["probabilities"].items())
    lines = [f"{what}: {r['label']} ({probs})  [{r['model']} {r['version']}]"]
    lines.append(f"  {r['decision_rule']}")
    if "indeterminate" in r:
        lines.append(f"  not determined: {r['indeterminate']}")
    if r.get("slices"):
        top = ", ".join(
            f"{s['instance'] if s['instance'] is not None else '?'} (p={s['probability']:.2f})"
            for s in r["slices"]
        )
        lines.append(f"  slices that drove it: {top}")
    lines += [f"  wrote {w}" for w in r.get("written", [])]
    return "\n".join(lines)


def _write_dicom_outputs(out_dir: Path, analysis: Any) -> list[str]:
    """The SR, secondary captures and parametric maps the node would send back
    (ai.results.build_results)."""
    from pydicom.uid import ParametricMapStorage

    from ai.results import build_results
    from ai.templates import encoded

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    stem = Path(str(getattr(analysis.used[0], "filename", "") or "series")).stem
    for ds in build_results(analysis, software_version=__version__):
        if ds.Modality == "SR":
            kind = "sr"
        elif ds.SOPClassUID == ParametricMapStorage:
            kind = f"pm{int(ds.InstanceNumber)}"
        else:
            kind = f"sc{int(ds.InstanceNumber)}"
        target = out_dir / f"{stem}_{kind}.dcm"
        target.write_bytes(encoded(ds))  # the bytes the worker writes
        written.append(str(target))
    return written


def _write_png_output(out_dir: Path, path: Path, analysis: Any) -> list[str]:
    import cv2

    from ai.outputs import overlay_lines, render_overlay

    out_dir.mkdir(parents=True, exist_ok=True)
    item = analysis.explained[0]
    overlay = render_overlay(item.image, item.heatmap, overlay_lines(analysis.prediction))
    target = out_dir / f"{path.stem}_gradcam.png"
    cv2.imwrite(str(target), cv2.cvtColor(overlay, cv2.COLOR_RGB2BGR))
    return [str(target)]


def _key_values(items: list[str] | None, what: str) -> dict[str, int]:
    """``["covid=30", "normal=50"]`` to ``{"covid": 30, "normal": 50}``."""
    out: dict[str, int] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not value.strip().isdigit():
            raise NodeError(f"{what}: expected CLASS=N, got {item!r}")
        out[key.strip()] = int(value)
    return out


def cmd_train(args: argparse.Namespace) -> int:
    _setup_logging("INFO")
    from ai.preprocess import parse_options
    from ai.train import TrainSettings, train

    data_dirs = [Path(d) for d in args.data]
    data_dir = data_dirs[0]
    try:
        preprocessing: dict[str, Any] = {}
        for text in args.preprocess or []:
            preprocessing.update(parse_options(text))
        settings = TrainSettings(
            task=args.task,
            data_dir=data_dir,
            manifest=Path(args.manifest) if args.manifest else data_dir / "manifest.csv",
            out_dir=Path(args.out),
            extra_data=tuple(data_dirs[1:]),
            hold_out_source=args.hold_out_source or "",
            exclude_sources=tuple(args.exclude_source or ()),
            stratify=args.stratify,
            name=args.name or "",
            version=args.version,
            description=args.description or "",
            backbone=args.backbone,
            pretrained=args.pretrained,
            image_size=args.image_size,
            epochs=args.epochs,
            phase2_epochs=args.phase2_epochs,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            phase2_learning_rate=args.phase2_learning_rate,
            fine_tune_layers=args.fine_tune_layers,
            train_batchnorm=args.train_batchnorm,
            lr_schedule=args.lr_schedule,
            patience=args.patience,
            dropout=args.dropout,
            class_weights=not args.no_class_weights,
            balance=args.balance,
            rotation_degrees=args.rotation,
            shift=args.shift,
            zoom=args.zoom,
            horizontal_flip=args.horizontal_flip,
            brightness=args.brightness,
            contrast=args.contrast,
            blur=args.blur,
            erase=args.erase,
            preprocessing=preprocessing,
            dcgan=args.dcgan,
            dcgan_steps=args.dcgan_steps,
            dcgan_target=args.dcgan_target,
            train_class_limit=_key_values(args.train_class_limit, "--train-class-limit"),
            seed=args.seed,
            validation_fraction=args.validation_fraction,
            test_fraction=args.test_fraction,
            limit_per_class=args.limit_per_class,
            cv_fold=_fold(args.cv_fold),
        )
    except ValueError as exc:
        raise NodeError(str(exc)) from None
    from ai.dataset import DataError

    try:
        metrics = train(settings)
    except DataError as exc:
        raise NodeError(str(exc)) from None
    print(json.dumps({k: v for k, v in metrics.items() if k != "history"}, indent=2))
    return 0


def _fold(text: str | None) -> tuple[int, int] | None:
    """``"2/5"`` to ``(2, 5)``; the range is checked by TrainSettings."""
    if text is None:
        return None
    fold, sep, folds = text.partition("/")
    try:
        if not sep:
            raise ValueError
        return int(fold), int(folds)
    except ValueError:
        raise ValueError(f"--cv-fold {text!r}: expected I/K, e.g. 0/5") from None


def cmd_evaluate(args: argparse.Namespace) -> int:
    _setup_logging("WARNING")
    from ai.evaluate import evaluate, fmt_ci
    from ai.model import model_dir

    out = Path(args.out)
    result = evaluate(
        model_dir(args.model),
        [Path(d) for d in args.data or []],
        Path(args.manifest) if args.manifest else None,
        out,
        bootstrap=args.bootstrap,
        gradcam_images=args.gradcam_images,
    )
    print(
        f"{out / 'report.md'}: accuracy {fmt_ci(result['overall']['accuracy'])}, "
        f"macro-F1 {fmt_ci(result['overall']['macro_f1'])}  ({DISCLAIMER})"
    )
    return 0


def cmd_fit_serving(args: argparse.Namespace) -> int:
    _setup_logging("WARNING")
    from ai.dataset import DataError
    from ai.model import ModelError, model_dir
    from ai.serving import fit_serving

    try:
        summary = fit_serving(
            model_dir(args.model),
            data_dirs=[Path(d) for d in args.data or []],
            manifest=Path(args.manifest) if args.manifest else None,
            target_sensitivity=args.target_sensitivity,
            quantile=args.abstention_quantile,
        )
    except (DataError, ModelError) as exc:
        raise NodeError(str(exc)) from None
    cal = summary["calibration"]
    print(
        f"temperature {cal['temperature']}: validation ECE {cal['ece_before']:.3f} -> "
        f"{cal['ece_after']:.3f}"
    )
    point = summary.get("operating_point")
    if point:
        print(
            f"operating point: {point['class']} at >= {point['threshold']:.4f} (validation "
            f"sensitivity {point['validation_sensitivity']}, specificity "
            f"{point['validation_specificity']})"
        )
    ab = summary["abstention"]
    print(
        f"abstention: distance > {ab['threshold']} ({ab['quantile']} quantile of validation; "
        f"{ab['validation_abstention_rate']:.1%} of validation images)"
    )
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from pacs_node.config import load
    from pacs_node.status import render_status
    from storage.db import Database

    config = load(args.config)
    db = Database(config.node.resolved_database_url)
    try:
        print(render_status(db, limit=args.limit))
    finally:
        db.dispose()
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    from pacs_node.config import load
    from storage import queue
    from storage.db import Database

    config = load(args.config)
    db = Database(config.node.resolved_database_url)
    try:
        with db.session() as session:
            chosen = args.delivery is not None or args.job is not None
            deliveries, jobs = queue.retry_failed(
                session,
                delivery_ids=(args.delivery or []) if chosen else None,
                job_ids=(args.job or []) if chosen else None,
            )
    finally:
        db.dispose()
    print(
        f"requeued {deliveries} failed deliveries and {jobs} failed jobs; "
        "a running node picks them up at its next round"
    )
    return 0


def _node_options(cmd: argparse.ArgumentParser) -> None:
    """--config and --log-level, for the commands that run the node or one of its roles."""
    cmd.add_argument("--config", metavar="PATH", help="TOML config file (see config.toml)")
    cmd.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pacs-node",
        description="A DICOM node that classifies chest X-ray and CT studies sent by a PACS and "
        "returns a Structured Report and a Grad-CAM heatmap to the same study.",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"pacs-node {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="run the node: receive, work and send, each in a process of its own",
        description="Run the node until interrupted: the receive, work and send roles, each "
        "in a process of its own, restarted if it dies. Without --config it uses the built-in "
        "defaults: AE title AINODE on 127.0.0.1:11112, data and SQLite database under ./var, "
        "any calling AE title accepted, shipped models for CR/DX and CT.",
        epilog=EPILOG,
    )
    _node_options(serve)
    serve.set_defaults(func=cmd_serve)

    roles = {
        "receive": "the DICOM services only (C-ECHO, C-STORE, C-FIND, C-GET, C-MOVE); "
        "loads no model",
        "work": "analysis only: claim queued jobs and run the models (run as many as you like)",
        "send": "delivery only: send the results to the peers they are owed to",
        "web": "the web server only: DICOMweb, the dashboard, /metrics ([web] in the config)",
    }
    for role, text in roles.items():
        cmd = sub.add_parser(
            role,
            help=f"run one role: {text}",
            description=f"Run one role of the node in this process: {text}. `serve` runs "
            "all of them on one machine; run roles separately to spread them over machines that "
            "share the database (PostgreSQL) and the storage folder.",
            epilog=EPILOG,
        )
        _node_options(cmd)
        cmd.set_defaults(func=cmd_role)

    migrate = sub.add_parser(
        "migrate",
        help="bring the database schema up to date (every role also does this at start)",
        epilog=EPILOG,
    )
    migrate.add_argument("--config", metavar="PATH", help="TOML config file (see config.toml)")
    migrate.set_defaults(func=cmd_migrate)

    select_cmd = sub.add_parser(
        "select",
        help="dry run of the selection rules: which model and rule each DICOM file meets",
        description="Read the headers of DICOM files and say, for each, which model the node "
        "would give it (by Modality), which of that model's rules it matches (skip: stored "
        "and not analysed; prefer: how a study's series are chosen between) and whether its "
        "series would be analysed. No model is run. Rules: [[models]] rules in the config "
        "(config.toml documents the defaults).",
        epilog=EPILOG,
    )
    select_cmd.add_argument("files", nargs="+", metavar="FILE")
    select_cmd.add_argument("--json", action="store_true", help="print JSON")
    select_cmd.add_argument(
        "--config", metavar="PATH", help="TOML config file (default: the built-in rules)"
    )
    select_cmd.set_defaults(func=cmd_select)

    classify = sub.add_parser(
        "classify",
        help="classify DICOM, PNG or JPEG files offline",
        description="Run the node's inference on files. DICOM files are routed by Modality to "
        "the model the node would use and grouped by series: one result per series (a CT "
        "series with the slices that drove it). PNG/JPEG files get one result each from "
        "--model or --task. Prints the label, every class's calibrated probability, the "
        "decision rule and the model's name and version.",
        epilog=EPILOG,
    )
    classify.add_argument("files", nargs="+", metavar="FILE")
    classify.add_argument("--json", action="store_true", help="print JSON")
    classify.add_argument(
        "--config",
        metavar="PATH",
        help="take the [[models]] routing from this node config (default: built-in, CR/DX to "
        "the chest X-ray model, CT to the CT model)",
    )
    classify.add_argument(
        "--task",
        choices=["cxr", "ct"],
        default="cxr",
        help="the shipped model for PNG/JPEG files (default cxr); DICOM files go by Modality",
    )
    classify.add_argument(
        "--model", metavar="NAME_OR_DIR", help="a model folder or shipped name for PNG/JPEG files"
    )
    classify.add_argument(
        "--runtime",
        choices=["onnx", "keras"],
        default="onnx",
        help="ONNX Runtime (default, faster on CPU) or Keras",
    )
    classify.add_argument(
        "--output",
        metavar="DIR",
        help="also write the SR and SC (or a PNG heatmap for image files)",
    )
    classify.set_defaults(func=cmd_classify)

    train = sub.add_parser(
        "train",
        help="train a model on a folder of images and a manifest",
        description="Train a classifier with a patient-disjoint train/validation/test split "
        "(from the manifest's patient_group column, fixed by --seed) and write a model folder "
        "(model.keras, model.json, training.json with every setting). Two phases: phase 1 "
        "trains the head on a frozen pretrained base (a randomly initialised base trains with "
        "it), phase 2 trains the base too at a lower learning rate. A progress bar per epoch.",
        epilog=EPILOG,
    )
    train.add_argument("--task", choices=["cxr", "ct"], required=True)
    train.add_argument(
        "--data",
        required=True,
        action="append",
        metavar="DIR",
        help="a data folder: with a manifest.csv (task, label, file, patient_group, source or "
        "source_repo), or class subfolders (covid/, pneumonia/, normal/); repeat for more",
    )
    train.add_argument("--manifest", metavar="CSV", help="default: the first DIR/manifest.csv")
    train.add_argument(
        "--hold-out-source",
        metavar="NAME",
        help="keep every image of this source (and of its patients) out of training, validation "
        "and test; evaluate reports it as the held-out source (e.g. hannover, nih, cohen)",
    )
    train.add_argument(
        "--exclude-source",
        action="append",
        metavar="NAME",
        help="do not use this source at all (e.g. teaching: licence unknown); repeatable",
    )
    train.add_argument(
        "--stratify",
        choices=["source", "label"],
        default="source",
        help="split strata: label and source (default: every source in every split) or label",
    )
    train.add_argument("--out", required=True, metavar="DIR", help="model folder to write")
    train.add_argument("--name", help="model name in model.json (default TASK-BACKBONE)")
    train.add_argument("--version", default="0.1.0")
    train.add_argument("--description", help="model.json description (default: generated)")
    g = train.add_argument_group("model")
    g.add_argument(
        "--backbone",
        choices=BACKBONE_NAMES,
        default="small-cnn",
        help="architecture (default small-cnn). Only efficientnet_lite0/1/2 have ImageNet weights "
        "here (--pretrained); the keras.applications ones start from random weights, since "
        "nothing is downloaded at run time",
    )
    g.add_argument(
        "--pretrained",
        action="store_true",
        help="start from ImageNet weights (efficientnet_lite0/1/2 only; shipped in ai/weights)",
    )
    g.add_argument("--image-size", type=int, default=128, help="square input side (default 128)")
    g.add_argument("--dropout", type=float, default=0.3, help="before the classifier (0.3)")
    g = train.add_argument_group("schedule")
    g.add_argument(
        "--epochs",
        "--phase1-epochs",
        dest="epochs",
        type=int,
        default=20,
        help="phase-1 epochs (default 20)",
    )
    g.add_argument(
        "--phase2-epochs", type=int, default=0, help="phase-2 (fine-tune) epochs (default 0: none)"
    )
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument(
        "--learning-rate", type=float, default=1e-3, help="phase-1 learning rate (default 1e-3)"
    )
    g.add_argument(
        "--phase2-learning-rate", type=float, default=1e-4, help="phase-2 learning rate (1e-4)"
    )
    g.add_argument(
        "--fine-tune-layers",
        type=int,
        metavar="N",
        help="phase 2 trains only the last N backbone layers (default: all)",
    )
    g.add_argument(
        "--train-batchnorm",
        action="store_true",
        help="phase 2 also trains a pretrained backbone's BatchNormalization (default frozen)",
    )
    g.add_argument(
        "--lr-schedule",
        choices=["plateau", "cosine", "constant"],
        default="plateau",
        help="per phase: halve on a validation-loss plateau (default), cosine decay, or none",
    )
    g.add_argument(
        "--patience", type=int, default=4, help="early-stopping patience, epochs (default 4)"
    )
    g.add_argument(
        "--no-class-weights", action="store_true", help="do not weight the loss by class"
    )
    g.add_argument(
        "--balance",
        choices=["class", "source"],
        default="class",
        help="loss weights: by class (default), or by class and source so that no hospital's "
        "look stands in for a class",
    )
    g = train.add_argument_group("augmentation (training only)")
    g.add_argument("--rotation", type=float, default=10.0, help="max rotation, degrees (10)")
    g.add_argument("--shift", type=float, default=0.05, help="max shift, fraction (0.05)")
    g.add_argument("--zoom", type=float, default=0.05, help="max zoom, fraction (0.05)")
    g.add_argument(
        "--horizontal-flip",
        action="store_true",
        help="random left-right flips (off: the heart is on the left)",
    )
    g.add_argument("--brightness", type=float, default=0.1, help="max brightness change (0.1)")
    g.add_argument("--contrast", type=float, default=0.1, help="max contrast change (0.1)")
    g.add_argument("--blur", type=float, default=0.0, help="max Gaussian blur sigma, px (0: off)")
    g.add_argument(
        "--erase",
        type=float,
        default=0.0,
        help="probability of blanking a random patch, like a marker or text (0: off)",
    )
    g = train.add_argument_group("preprocessing and data")
    g.add_argument(
        "--preprocess",
        action="append",
        metavar="OPTS",
        help="shortcut-removing preprocessing, stored in model.json and applied by the node "
        "too: comma-separated square (central square first: hides the source's aspect ratio), "
        "crop=F (central crop, e.g. 0.8), mask_border=F (blank each edge, "
        "e.g. 0.06), clahe[=CLIP], equalize; e.g. --preprocess crop=0.8,mask_border=0.06,clahe",
    )
    g.add_argument(
        "--dcgan",
        action="store_true",
        help="balance the training split's classes with DCGAN-generated images (off)",
    )
    g.add_argument(
        "--dcgan-steps", type=int, default=800, help="DCGAN training steps per class (800)"
    )
    g.add_argument(
        "--dcgan-target",
        type=int,
        metavar="N",
        help="top each class up to N training images (default: the largest class's count)",
    )
    g.add_argument(
        "--train-class-limit",
        action="append",
        metavar="CLASS=N",
        help="use at most N training images of CLASS (validation/test untouched), e.g. to "
        "simulate scarce COVID-19 data: --train-class-limit covid=30",
    )
    g.add_argument("--seed", type=int, default=0, help="split, weights and shuffling (0)")
    g.add_argument("--validation-fraction", type=float, default=0.15)
    g.add_argument("--test-fraction", type=float, default=0.15)
    g.add_argument("--limit-per-class", type=int, help="use at most N images per class")
    g.add_argument(
        "--cv-fold",
        metavar="I/K",
        help="grouped cross-validation: deal the non-test patient groups into K folds and "
        "validate on fold I (0-based); the test split stays the same. Run I = 0..K-1 to compare "
        "settings on more patients than one validation split holds",
    )
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser(
        "evaluate",
        help="write an evaluation report of a model on its held-out patients",
        description="Evaluate a model folder on the test patients of its own training split: "
        "report.md with per-class metrics and 95%% patient-level bootstrap intervals, confusion "
        "matrix, ROC and learning curves, and a sheet of Grad-CAM maps.",
        epilog=EPILOG,
    )
    evaluate.add_argument("model", metavar="MODEL", help="a model folder or a shipped name")
    evaluate.add_argument(
        "--data",
        action="append",
        metavar="DIR",
        help="data folder(s) (repeatable; default: the folders recorded in training.json)",
    )
    evaluate.add_argument("--manifest", metavar="CSV", help="default: the first DIR/manifest.csv")
    evaluate.add_argument("--out", required=True, metavar="DIR")
    evaluate.add_argument("--bootstrap", type=int, default=1000, help="resamples (default 1000)")
    evaluate.add_argument("--gradcam-images", type=int, default=12)
    evaluate.set_defaults(func=cmd_evaluate)

    fit = sub.add_parser(
        "fit-serving",
        help="fit calibration, the operating point and abstention on a model's validation split",
        description="Fit, on the validation patients of the model's own split (never the test "
        "split): the temperature that calibrates its probabilities, the COVID-19 threshold "
        "that reaches the target sensitivity, and the feature-distance threshold above which "
        "it answers 'indeterminate'. Writes them into model.json (statistics in "
        "abstention.npz) and a summary into serving.json. pacs-node train runs it at the end.",
        epilog=EPILOG,
    )
    fit.add_argument("model", metavar="MODEL", help="a model folder")
    fit.add_argument("--data", action="append", metavar="DIR", help="default: recorded folders")
    fit.add_argument("--manifest", metavar="CSV")
    fit.add_argument(
        "--target-sensitivity", type=float, default=0.95, help="for COVID-19 (default 0.95)"
    )
    fit.add_argument(
        "--abstention-quantile",
        type=float,
        default=0.98,
        help="of validation distances: the abstention threshold (default 0.98)",
    )
    fit.set_defaults(func=cmd_fit_serving)

    status = sub.add_parser(
        "status", help="show the queue, results and failed deliveries", epilog=EPILOG
    )
    status.add_argument("--config", metavar="PATH")
    status.add_argument("--limit", type=int, default=20)
    status.set_defaults(func=cmd_status)

    retry = sub.add_parser(
        "retry",
        help="send failed deliveries again and rerun failed jobs",
        description="Give failed deliveries and jobs a fresh set of attempts: all of them, or "
        "only the ids given (see pacs-node status).",
        epilog=EPILOG,
    )
    retry.add_argument("--config", metavar="PATH")
    retry.add_argument("--delivery", type=int, action="append", metavar="ID")
    retry.add_argument("--job", type=int, action="append", metavar="ID")
    retry.set_defaults(func=cmd_retry)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (NodeError, StorageError, AiError) as exc:
        print(f"pacs-node: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
