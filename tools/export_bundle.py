"""Export a bundle as a self-contained zip: ``python tools/export_bundle.py BUNDLE OUT.zip``.

The bundles' configs build their networks from this repository's ``networks`` package (``networks.LTMedNeXt``,
``networks.LiteNeXt``), which an environment such as MONAI Label's does not have. The exported zip carries it:

* ``<name>/networks/``: the package's Python files, in the bundle root. MONAI puts the bundle root on ``sys.path``
  (``python -m monai.bundle run`` before running, MONAI Label when it loads a bundle), so ``import networks`` and
  ``_target_: networks.LTMedNeXt`` resolve to this copy; nothing needs to be installed;
* ``<name>/models/model.ts``: the network with its weights as TorchScript (``monai.bundle.ckpt_export``, metadata
  and inference config embedded), loadable with ``torch.jit.load`` and no Python class at all, beside
  ``models/model.pt``;
* ``<name>/configs/inference_torchscript.json``: an override that runs inference with ``model.ts`` instead of
  ``network_def`` + ``model.pt``: ``--config_file "['configs/inference.json','configs/inference_torchscript.json']"``;
* ``configs/metadata.json``: ``litemed-bundles`` dropped from ``required_packages_version`` (its code is inside),
  the sha256 of ``model.ts`` recorded in ``model_sha256``, ``exported_networks`` naming the copied package.

Everything else (LICENSE, configs, docs, models/model.pt) is copied as is; training checkpoints, ``eval/`` and
caches are left out. The zip has one top folder named after the bundle, the model-zoo layout that
``monai.bundle.download`` and MONAI Label's ``model/`` folder expect. It is written under a temporary name and renamed.

Exit codes: 0 written, 2 usage error (not a bundle, no weights, output folder missing).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import warnings
import zipfile

import fire

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NETWORKS = os.path.join(REPO_ROOT, "networks")
COPIED = ("LICENSE", "configs", "docs", "models/model.pt")
TORCHSCRIPT_NETWORK = "$torch.jit.load(os.path.join(@bundle_root, 'models', 'model.ts'), map_location=@device)"


class UsageError(Exception):
    pass


def _check(bundle: str, out: str) -> None:
    for name in ("configs/metadata.json", "configs/inference.json", "models/model.pt"):
        if not os.path.isfile(os.path.join(bundle, name)):
            raise UsageError(f"{os.path.join(bundle, name)}: not found; is {bundle} a bundle with trained weights?")
    if not out.endswith(".zip"):
        raise UsageError(f"{out}: the output must be a .zip file.")
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise UsageError(f"{folder}: output folder does not exist.")
    problems = networks_expressions(bundle)
    if problems:
        raise UsageError("the bundle reaches networks from $ expressions, which MONAI evaluates before it puts the "
                         "bundle root on sys.path (use a _target_ component instead): " + "; ".join(problems))


def networks_expressions(bundle: str) -> list[str]:
    """``config: id`` of every ``$`` expression that uses ``networks`` (``$networks.f(...)``).

    MONAI evaluates a config's imports when it resolves the first item, before ``run`` puts the bundle root on
    ``sys.path``; a failed ``$import networks`` leaves a stub (harmless by itself) that every later
    ``$networks...`` raises from. ``_target_`` names are looked up only when instantiated, so they find the bundle's
    copy."""
    from tools.verify_bundle import _expressions

    found = []
    for path in sorted(glob.glob(os.path.join(bundle, "configs", "*.json"))):
        with open(path) as f:
            config = json.load(f)
        found += [f"configs/{os.path.basename(path)}: {where}" for where, expression in _expressions(config)
                  if re.search(r"\bnetworks\b", expression) and not re.match(r"\$\s*(import|from)\s", expression)]
    return found


def torchscript_config(inference: dict) -> dict:
    """The ``inference_torchscript.json`` override for a bundle's ``inference.json``: ``network_def`` loaded from
    ``model.ts``, and the inference handlers without the checkpoint loader (``model.ts`` holds the weights); handlers
    that write outputs (a classifier's ``ClassificationSaver``) are kept."""
    handlers = [h for h in inference.get("handlers", []) if h != "@checkpoint_loader"
                and not (isinstance(h, dict) and str(h.get("_target_", "")).endswith("CheckpointLoader"))]
    return {"network_def": TORCHSCRIPT_NETWORK, "handlers": handlers}


def _copy_networks(target: str) -> None:
    """The package without its batch engine (``networks/batch``: this repository's tools, which no config names)."""
    shutil.copytree(NETWORKS, target, ignore=lambda folder, names: [
        n for n in names if n == "__pycache__" or (folder == NETWORKS and n == "batch")
        or (os.path.isfile(os.path.join(folder, n)) and not n.endswith(".py"))])


def _torchscript(stage: str) -> None:
    import torch
    from monai.bundle import ckpt_export

    weights = os.path.join(stage, "models", "model.pt")
    state = torch.load(weights, map_location="cpu", weights_only=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("monai.bundle.scripts").setLevel(logging.WARNING)
        ckpt_export(net_id="network_def", filepath=os.path.join(stage, "models", "model.ts"), ckpt_file=weights,
                    meta_file=os.path.join(stage, "configs", "metadata.json"),
                    config_file=os.path.join(stage, "configs", "inference.json"), bundle_root=stage,
                    key_in_ckpt="model" if isinstance(state, dict) and "model" in state else "")


def export(bundle: str, out: str) -> str:
    """Write the self-contained zip of ``bundle`` to ``out``; returns ``out``."""
    from tools.verify_bundle import sha256

    bundle = os.path.abspath(bundle)
    _check(bundle, out)
    name = os.path.basename(bundle)
    with tempfile.TemporaryDirectory() as tmp:
        stage = os.path.join(tmp, name)
        for item in COPIED:
            source, target = os.path.join(bundle, item), os.path.join(stage, item)
            if os.path.isdir(source):
                shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "monailabel_*.json"))
            elif os.path.isfile(source):
                os.makedirs(os.path.dirname(target), exist_ok=True)
                shutil.copy2(source, target)
        _copy_networks(os.path.join(stage, "networks"))
        meta_file = os.path.join(stage, "configs", "metadata.json")
        with open(meta_file) as f:
            meta = json.load(f)
        meta.get("required_packages_version", {}).pop("litemed-bundles", None)
        meta["exported_networks"] = "networks/ in the bundle root: a copy of the litemed-bundles package " \
                                    f"{_package_version()} (MONAI puts the bundle root on sys.path)"
        _write_json(meta_file, meta)
        _torchscript(stage)
        meta.setdefault("model_sha256", {})["models/model.ts"] = sha256(os.path.join(stage, "models", "model.ts"))
        _write_json(meta_file, meta)
        with open(os.path.join(stage, "configs", "inference.json")) as f:
            inference = json.load(f)
        _write_json(os.path.join(stage, "configs", "inference_torchscript.json"), torchscript_config(inference))
        partial = os.path.join(os.path.dirname(os.path.abspath(out)), f".tmp_{os.path.basename(out)}")
        try:
            with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as archive:
                for folder, dirs, files in os.walk(stage):
                    dirs.sort()
                    for file in sorted(files):
                        path = os.path.join(folder, file)
                        archive.write(path, os.path.relpath(path, tmp))
            os.replace(partial, out)
        except BaseException:
            if os.path.exists(partial):
                os.remove(partial)
            raise
    return out


def _package_version() -> str:
    import configparser

    parser = configparser.ConfigParser()
    parser.read(os.path.join(REPO_ROOT, "setup.cfg"))
    return parser.get("metadata", "version", fallback="unknown")


def _write_json(path: str, content: dict) -> None:
    with open(path, "w") as f:
        json.dump(content, f, indent=4)
        f.write("\n")


def main(bundle: str, out: str) -> None:
    """Export BUNDLE (a bundle folder) as the self-contained zip OUT (``.zip``)."""
    try:
        print(export(bundle, out))
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    fire.Fire(main)
