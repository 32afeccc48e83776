"""K-fold cross-validation of any bundle with its own configs.

``python tools/crossval.py BUNDLE_DIR DATALIST --folds K [--ID VALUE ...]``.

The cases of DATALIST's ``training`` and ``validation`` lists (``--lists`` to change; the ``test`` list stays
untouched by default) are split into K folds by patient or case group: the ``patient`` key when the items have one,
else ``group`` (a source paper, a run of neighbouring images), else each case alone; never one group on both sides.
A ``stratum`` key, an integer class ``label`` (classifiers) or, when patients are the groups, ``group`` (ACDC's
pathology) is spread evenly over the folds. For fold k:

* ``OUTPUT/fold_k/datalist.json``: ``test`` = fold k, the other folds split again by group into ``training`` and
  ``validation`` (``--val_fraction``): the bundle selects its checkpoint on that inner validation, never on fold k;
  ``--fixed_training LIST[,LIST]`` adds the items of those datalist lists to every fold's ``training``, never held
  out: the cases that a ``--pretrained_weights`` starting point was trained on, so that every held-out case is unseen;
* training: ``python -m monai.bundle run training --config_file configs/train.json`` in the bundle folder with
  ``--bundle_root OUTPUT/fold_k`` and the extra ``--ID VALUE`` options given to this tool (``--num_threads 1``,
  ``--pretrained_weights PATH``, ``--train#trainer#max_epochs 40``...);
* evaluation: the bundle's ``['configs/inference.json','configs/evaluate.json']`` on fold k (``--eval_split test``)
  into ``OUTPUT/fold_k/eval_test``, with the same options.

Each run gets every top-level id (``--image_size`` reaches both) and the nested ids whose parent its configs have
(``train#...`` only training, ``--inferer#rotations false`` only evaluation); a nested id whose parent no config of
the bundle has is a usage error.

``--score_weights PATH`` trains nothing: every fold scores the network weights at PATH (a ``models/model.pt``, or
a training checkpoint, whose network is taken; ``{fold}`` in PATH is replaced by the fold's number) on its
held-out cases, e.g. shipped weights as a baseline on the folds of another run (same datalist, ``--folds``,
``--lists`` and ``--seed`` give the same split), or each fold's last checkpoint
(``runs/cv/fold_{fold}/models/checkpoints/checkpoint_epoch=50.pt``) instead of the one its inner validation chose.

The per-case metric is what the bundle's evaluation writes: Dice per image (2D segmentation), the mean Dice over the
structures present per volume (volume segmentation; per-structure means are reported too), or 1/0 for a correct or
wrong class (classification: the fold's mean is its accuracy; its balanced accuracy, macro F1 and AUC are reported
too). ``OUTPUT/crossval.md``, ``crossval.json``, ``crossval_folds.csv`` and ``crossval_cases.csv`` hold the per-fold
and summary tables: mean +- sd over every case, and over the fold means.

A rerun with the same arguments resumes: finished folds are read back, an unfinished training resumes from its last
checkpoint (the bundle's own ``models/checkpoints``). ``--parallel N`` runs N folds at once (give each
``--num_threads``). A fold that fails is reported with its log file and the others go on; exit code 1 then.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import json
import logging
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import fire
import numpy as np

from networks.data import (grouped_stratified_split, load_datalist, write_atomic, write_atomic_with, write_datalist,
                           write_json_atomic)

log = logging.getLogger("crossval")


# ---------------------------------------------------------------------------------------------------------- splits
def group_key(items: Sequence[dict]) -> str | None:
    """The item key that names a patient or case group (``patient``, then ``group``), or None (each case alone)."""
    for key in ("patient", "group"):
        if items and all(key in item and item[key] not in ("", None) for item in items):
            return key
    return None


def _strata(items: Sequence[dict], groups: str | None) -> list[int]:
    if all("stratum" in item for item in items):
        values = [item["stratum"] for item in items]
    elif all(isinstance(item.get("label"), int) for item in items):
        values = [item["label"] for item in items]
    elif groups == "patient" and all("group" in item for item in items):
        values = [item["group"] for item in items]
    else:
        return [0] * len(items)
    codes = {value: i for i, value in enumerate(sorted({str(v) for v in values}))}
    return [codes[str(v)] for v in values]


def case_id(item: dict) -> str:
    return str(item.get("case") or os.path.basename(str(item["image"])))


def _grouped_split(items: Sequence[dict], fractions: Sequence[float], seed: int) -> list[list[dict]]:
    """``grouped_stratified_split`` with this tool's groups (:func:`group_key`, else each case alone) and strata."""
    groups = group_key(items)
    rows = [{**item, "_group": item[groups] if groups else f"case {i}", "_stratum": stratum}
            for i, (item, stratum) in enumerate(zip(items, _strata(items, groups)))]
    parts = grouped_stratified_split(rows, fractions, seed, group_key="_group", label_key="_stratum")
    return [[{k: v for k, v in row.items() if not k.startswith("_")} for row in part] for part in parts]


def split_folds(items: Sequence[dict], folds: int, seed: int = 0) -> list[list[dict]]:
    """``folds`` lists of ``items``: every item in exactly one, every group in one, strata spread evenly."""
    if folds < 2:
        raise ValueError(f"--folds must be at least 2, got {folds}.")
    groups = group_key(items)
    found = len({item[groups] for item in items}) if groups else len(items)
    if found < folds:
        raise ValueError(f"{folds} folds need at least {folds} patients or case groups; found {found}.")
    return _grouped_split(items, [1.0] * folds, seed)


def fold_lists(parts: Sequence[Sequence[dict]], k: int, val_fraction: float, seed: int) -> tuple[list, list, list]:
    """Training, validation (from the other folds, by group) and test (fold ``k``) lists of fold ``k``."""
    rest = [item for i, part in enumerate(parts) if i != k for item in part]
    if val_fraction <= 0:
        return rest, [], list(parts[k])
    training, validation = _grouped_split(rest, [1 - val_fraction, val_fraction], seed + 1 + k)
    return training, validation, list(parts[k])


# --------------------------------------------------------------------------------------------------- per-case metric
def read_case_metrics(eval_dir: str) -> tuple[list[dict], dict[str, float]]:
    """Per-case rows ``{"case", "metric"}`` of a bundle's evaluation folder, and a breakdown: per-structure means
    (volumes) or the evaluation's other summary metrics (classification)."""
    predictions = os.path.join(eval_dir, "predictions.csv")
    metrics = os.path.join(eval_dir, "metrics.csv")
    if os.path.isfile(predictions):  # classification
        with open(predictions) as f:
            cases = [{"case": os.path.basename(r["image"]), "metric": float(r["label"] == r["prediction"])}
                     for r in csv.DictReader(f)]
        breakdown = {}
        if os.path.isfile(metrics):
            with open(metrics) as f:
                breakdown = {r["metric"]: float(r["value"]) for r in csv.DictReader(f)
                             if r["metric"] in ("balanced_accuracy", "f1_macro", "auc")}
        return cases, breakdown
    if not os.path.isfile(metrics):
        raise FileNotFoundError(f"{eval_dir}: the evaluation wrote neither metrics.csv nor predictions.csv.")
    with open(metrics) as f:
        rows = list(csv.DictReader(f))
    if rows and "organ" in rows[0]:  # volume segmentation: one row per case and structure
        present = [r for r in rows if r["gt_present"].lower() in ("true", "1") and r["dice"] not in ("", "nan")]
        cases = sorted({r["case"] for r in present})
        per_case = [{"case": c, "metric": float(np.mean([float(r["dice"]) for r in present if r["case"] == c]))}
                    for c in cases]
        organs = sorted({r["organ"] for r in present})
        return per_case, {o: float(np.mean([float(r["dice"]) for r in present if r["organ"] == o])) for o in organs}
    return [{"case": r["case"], "metric": float(r["dice"])} for r in rows
            if r.get("dice") not in (None, "", "nan") and not math.isnan(float(r["dice"]))], {}


# ------------------------------------------------------------------------------------------------------- running
def _args(overrides: dict) -> list[str]:
    out = []
    for key, value in overrides.items():
        out += [f"--{key}", json.dumps(value) if isinstance(value, (list, dict)) else str(value)]
    return out


def _run(command: list[str], cwd: str, log_path: str) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "a") as log_file:
        log_file.write("$ " + " ".join(command) + "\n")
        log_file.flush()
        done = subprocess.run(command, cwd=cwd, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise RuntimeError(f"exit code {done.returncode}; see {log_path}")


TRAINING_CONFIGS = ("train.json",)
EVALUATION_CONFIGS = ("inference.json", "evaluate.json")


def overrides_for(bundle: str, configs: Sequence[str], overrides: dict) -> dict:
    """The options that a run of the bundle's ``configs`` gets: every top-level id (one that the run does not use is
    inert), and each nested id whose parent those configs have (``train#trainer#max_epochs`` for training,
    ``inferer#rotations`` or a new argument ``inferer#spatial_axes`` for evaluation); MONAI refuses a nested id whose
    parent a config lacks."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([os.path.join(bundle, "configs", name) for name in configs])
    return {k: v for k, v in overrides.items() if "#" not in k or k.rsplit("#", 1)[0] in parser}


def run_fold(bundle: str, fold_dir: str, training: dict, evaluation: dict) -> dict:
    """Train (or resume) with the options ``training`` and evaluate with ``evaluation`` one prepared fold folder;
    returns its result (also saved as result.json)."""
    result_path = os.path.join(fold_dir, "result.json")
    if os.path.isfile(result_path):
        with open(result_path) as f:
            result = json.load(f)
        result.setdefault("breakdown", result.pop("structures", {}))  # written before the key was renamed
        return result
    log_path = os.path.join(fold_dir, "crossval.log")
    common = ["--dataset_dir", fold_dir, "--bundle_root", fold_dir]
    if not os.path.isfile(os.path.join(fold_dir, "trained")):
        _run([sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", "configs/train.json",
              *common, *_args(training)], bundle, log_path)
        write_atomic(os.path.join(fold_dir, "trained"), "training finished\n")
    eval_dir = os.path.join(fold_dir, "eval_test")
    _run([sys.executable, "-m", "monai.bundle", "run", "--config_file",
          "['configs/inference.json','configs/evaluate.json']", "--meta_file", "configs/metadata.json", *common,
          "--eval_split", "test", "--output_dir", eval_dir,
          *_args(evaluation)], bundle, log_path)
    cases, breakdown = read_case_metrics(eval_dir)
    values = [c["metric"] for c in cases]
    result = {"cases": cases, "breakdown": breakdown, "n": len(values),
              "mean": float(np.mean(values)) if values else float("nan")}
    write_json_atomic(result_path, result)
    return result


def install_weights(source: str, fold_dir: str) -> None:
    """Put the network weights of ``source`` at ``fold_dir/models/model.pt`` and mark the fold as trained, so that
    it is only evaluated (``--score_weights``); a fold already marked with another source is an error."""
    import torch

    from networks.training import read_weights

    marker = os.path.join(fold_dir, "trained")
    note = f"not trained: scores {os.path.abspath(source)}\n"
    if os.path.isfile(marker):
        with open(marker) as f:
            if f.read() != note:
                raise ValueError(f"{fold_dir}: this fold already holds other weights; give another --output.")
        return
    if not os.path.isfile(source):
        raise FileNotFoundError(f"{source}: --score_weights file not found.")
    weights = read_weights(source)  # a state dict, or the network a training checkpoint keeps
    write_atomic_with(os.path.join(fold_dir, "models", "model.pt"), lambda tmp: torch.save(weights, tmp), suffix=".pt")
    write_atomic(marker, note)


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def write_tables(output: str, bundle: str, folds: int, results: dict[int, dict], command: str) -> dict:
    """crossval.json / .md / _folds.csv / _cases.csv from the finished folds' results."""
    cases = [{"fold": k, **c} for k, r in sorted(results.items()) for c in r["cases"]]
    case_mean, case_sd = _mean_sd([c["metric"] for c in cases])
    fold_mean, fold_sd = _mean_sd([r["mean"] for r in results.values()])
    columns = sorted({s for r in results.values() for s in r["breakdown"]})
    summary = {"bundle": os.path.basename(os.path.abspath(bundle)), "folds": folds, "finished_folds": len(results),
               "cases": len(cases), "case_mean": case_mean, "case_sd": case_sd, "fold_mean": fold_mean,
               "fold_sd": fold_sd, "command": command,
               "breakdown_fold_mean": {s: _mean_sd([r["breakdown"].get(s, math.nan) for r in results.values()])[0]
                                       for s in columns},
               "per_fold": {str(k): {"n": r["n"], "mean": r["mean"], **r["breakdown"]} for k, r in results.items()}}
    write_json_atomic(os.path.join(output, "crossval.json"), summary)

    def cells(values: dict) -> list[str]:
        return [f"{values.get(s, float('nan')):.4f}" for s in columns]

    rows = [[str(k), str(r["n"]), f"{r['mean']:.4f}", *cells(r["breakdown"])] for k, r in sorted(results.items())]
    write_atomic(os.path.join(output, "crossval_folds.csv"),
                 "".join(",".join(row) + "\n" for row in [["fold", "n", "mean", *columns], *rows]))
    write_atomic(os.path.join(output, "crossval_cases.csv"), "fold,case,metric\n" +
                 "".join(f"{c['fold']},{c['case']},{c['metric']:.4f}\n" for c in cases))
    if columns:
        rows.append(["mean of folds", str(len(cases)), f"{fold_mean:.4f}", *cells(summary["breakdown_fold_mean"])])
    md = [f"# Cross-validation of {summary['bundle']}", "", f"Command: `{command}`", "",
          f"{len(results)} of {folds} folds finished, {len(cases)} held-out cases. Per-case metric: "
          f"**{case_mean:.4f} +- {case_sd:.4f}** (mean +- sd over cases); mean of fold means {fold_mean:.4f} +- "
          f"{fold_sd:.4f} (sd over folds).", "",
          "| " + " | ".join(["fold", "cases", "mean", *columns]) + " |", "|" + " --- |" * (3 + len(columns))]
    md += ["| " + " | ".join(row) + " |" for row in rows]
    write_atomic(os.path.join(output, "crossval.md"), "\n".join(md) + "\n")
    return summary


def prepare_folds(datalist: str, output: str, folds: int, lists: Sequence[str], seed: int,
                  val_fraction: float, fixed_training: Sequence[str] = ()) -> list[str]:
    """Write each fold's datalist (once: a rerun keeps the split it started with); returns the fold folders.
    The items of the ``fixed_training`` lists join every fold's training list and are never held out."""
    split_path = os.path.join(output, "folds.json")
    items = [item for key in lists for item in load_datalist(datalist, key)]
    fixed = [item for key in fixed_training for item in load_datalist(datalist, key)]
    overlap = {case_id(item) for item in items} & {case_id(item) for item in fixed}
    if overlap:
        raise ValueError(f"{datalist}: {len(overlap)} cases are both in the folded lists and in --fixed_training "
                         f"(e.g. {sorted(overlap)[0]}).")
    parts = split_folds(items, folds, seed)
    plan = {"datalist": os.path.abspath(datalist), "lists": list(lists), "seed": seed, "val_fraction": val_fraction,
            "folds": [[case_id(item) for item in part] for part in parts]}
    if fixed:
        plan["fixed_training"] = [case_id(item) for item in fixed]
    if os.path.isfile(split_path):
        with open(split_path) as f:
            if json.load(f) != plan:
                raise ValueError(f"{split_path}: this output folder holds another split (other datalist, folds, lists, "
                                 "seed or val_fraction); give another --output.")
    write_json_atomic(split_path, plan)
    folders = []
    for k in range(folds):
        folder = os.path.join(output, f"fold_{k}")
        training, validation, test = fold_lists(parts, k, val_fraction, seed)
        training = [*training, *fixed]
        if not os.path.isfile(os.path.join(folder, "datalist.json")):
            os.makedirs(folder, exist_ok=True)
            write_datalist(os.path.join(folder, "datalist.json"), training, validation, test, fold=k, folds=folds)
        folders.append(folder)
    return folders


def crossval(bundle: str, datalist: str, folds: int = 5, output: str = "", lists: str = "training,validation",
             seed: int = 0, val_fraction: float = 0.15, parallel: int = 1, fixed_training: str = "",
             score_weights: str = "", **overrides) -> dict:
    """Cross-validate BUNDLE on DATALIST; returns the summary (see the module docstring)."""
    bundle = os.path.abspath(bundle)
    if not os.path.isfile(os.path.join(bundle, "configs", "train.json")):
        raise ValueError(f"{bundle}: not a bundle folder (no configs/train.json).")
    output = os.path.abspath(output or os.path.join("runs", "crossval", os.path.basename(bundle)))
    key_lists, fixed_lists = (_names(names) for names in (lists, fixed_training))
    training = overrides_for(bundle, TRAINING_CONFIGS, overrides)
    evaluation = overrides_for(bundle, EVALUATION_CONFIGS, overrides)
    unknown = [f"--{k}" for k in overrides if k not in training and k not in evaluation]
    if unknown:
        raise ValueError(f"{bundle}: {', '.join(unknown)}: no such place in its train, inference or evaluate config.")
    with _exclusive(output):
        folders = prepare_folds(datalist, output, int(folds), key_lists, int(seed), float(val_fraction), fixed_lists)
        if score_weights:
            for k, folder in enumerate(folders):
                install_weights(score_weights.replace("{fold}", str(k)), folder)
        command = " ".join(["python tools/crossval.py", os.path.relpath(bundle), os.path.relpath(datalist),
                            f"--folds {folds} --lists {','.join(key_lists)} --seed {seed}",
                            f"--val_fraction {val_fraction}",
                            *([f"--fixed_training {','.join(fixed_lists)}"] if fixed_lists else []),
                            *([f"--score_weights {score_weights}"] if score_weights else []),
                            *(f"--{k} {v}" for k, v in overrides.items())])
        return _run_folds(bundle, output, folders, int(folds), int(parallel), training, evaluation, command)


def _names(names: str | Sequence[str]) -> list[str]:
    """Datalist list names from ``"a,b"`` (or fire's tuple for ``a,b``)."""
    if isinstance(names, str):
        return [s.strip() for s in names.split(",") if s.strip()]
    return list(names)


@contextlib.contextmanager
def _exclusive(output: str):
    """Hold OUTPUT/.lock: two runs in one folder would train the same folds into the same files."""
    os.makedirs(output, exist_ok=True)
    with open(os.path.join(output, ".lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise ValueError(f"{output}: another crossval run is using this folder.") from e
        yield


def _run_folds(bundle: str, output: str, folders: list[str], folds: int, parallel: int, training: dict,
               evaluation: dict, command: str) -> dict:
    results, failed = {}, []
    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        futures = {k: pool.submit(run_fold, bundle, folder, training, evaluation) for k, folder in enumerate(folders)}
        for k, future in futures.items():
            try:
                results[k] = future.result()
                log.info("fold %d: %d cases, mean %.4f", k, results[k]["n"], results[k]["mean"])
            except Exception as e:  # one failed fold is reported; the others go on
                log.error("fold %d failed: %s", k, e)
                failed.append(k)
    summary = write_tables(output, bundle, folds, results, command) if results else {}
    return {**summary, "failed_folds": failed, "output": output}


def main(bundle: str, datalist: str, folds: int = 5, **kwargs) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        summary = crossval(bundle, datalist, folds, **kwargs)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"crossval: {e}", file=sys.stderr)
        sys.exit(2)
    if summary.get("cases"):
        print(f"{summary['cases']} cases in {summary['finished_folds']} folds: {summary['case_mean']:.4f} +- "
              f"{summary['case_sd']:.4f} (tables in {summary['output']})")
    sys.exit(1 if summary["failed_folds"] else 0)


if __name__ == "__main__":
    fire.Fire(main)
