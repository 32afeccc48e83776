"""Offline bundle verification: what the MONAI Model Zoo CI checks, and what it leaves out.

``python tools/verify_bundle.py [BUNDLE ...]`` (every bundle under ``bundles/`` by default) prints one line per
problem and exits 1 when there is any (0 when all pass, 2 when a named bundle does not exist).
``python tools/verify_bundle.py BUNDLE --record`` first records the sha256 of the model files (after training).
Checks:

* files: ``LICENSE``, ``docs/README.md``, ``configs/{metadata,inference,train,evaluate,multi_gpu_train}.json``,
  ``configs/logging.conf``, ``models/model.pt`` (unless metadata says ``"weights_shipped": false``: a bundle whose
  README says how to train it; then no model file may be shipped either);
* metadata: valid against the schema it names, read from this repository's ``schemas/`` (never downloaded); the
  version present in the changelog; ``eval_metrics`` each stated in ``docs/README.md`` (key and value on one line);
* ids MONAI's tools and MONAI Label use: ``bundle_root``, ``device``, ``network_def``, ``preprocessing``,
  ``inferer``, ``postprocessing``, ``evaluator`` (inference); ``bundle_root``, ``device``, ``dataset_dir``,
  ``train#trainer``, ``validate#evaluator``, ``training`` (train);
* ``$`` expressions in every config only from an allow-list: imports of glob, os, ignite, torch, monai, numpy and
  networks; names of those modules, a few builtins and names the expression binds; no attribute starting with
  ``_``; of ``os`` only ``path``, ``environ`` and ``sep`` (so no ``os.system``, ``subprocess``, ``open``, ``eval``);
* weights: the sha256 of every file directly under ``models/`` recorded in metadata ``model_sha256`` and matching,
  and nothing recorded that is missing; loaded with ``weights_only=True``;
* network: ``network_def`` with the shipped weights on ``torch.rand(1, C, *spatial_shape)`` from metadata gives
  ``outputs#pred#num_channels`` channels and, for segmentation, the same spatial shape, for classification (output
  format ``classes``) the shape ``(1, classes)`` (``verify_net_in_out`` checks only the channels);
  ``monai.bundle.ckpt_export`` to TorchScript, reloaded, equals eager within 1e-4; ONNX export run by onnxruntime
  equals eager within 1e-4. Without shipped weights these run on the network's seeded initial weights.
"""

from __future__ import annotations

import ast
import glob
import hashlib
import json
import logging
import os
import re
import sys
import tempfile
import warnings

import fire

from networks.data import first_line, write_atomic

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRED_FILES = ("LICENSE", "docs/README.md", "configs/metadata.json", "configs/inference.json", "configs/train.json",
                  "configs/evaluate.json", "configs/multi_gpu_train.json", "configs/logging.conf", "models/model.pt")
REQUIRED_IDS = {
    "inference.json": ("bundle_root", "device", "network_def", "preprocessing", "inferer", "postprocessing",
                       "evaluator"),
    "train.json": ("bundle_root", "device", "dataset_dir", "train#trainer", "validate#evaluator", "training"),
}
ALLOWED_MODULES = {"glob", "os", "ignite", "torch", "monai", "numpy", "networks"}
ALLOWED_NAMES = ALLOWED_MODULES | {"np", "dist", "True", "False", "None", "int", "float", "str", "bool", "len", "list",
                                   "dict", "tuple", "range", "min", "max", "sorted", "sum", "abs", "isinstance", "zip",
                                   "enumerate", "any", "all"}
OS_ATTRIBUTES = {"path", "environ", "sep", "cpu_count"}  # read-only
REFERENCE = "_reference"  # what an ``@id`` becomes before parsing
TOLERANCE = 1e-4
CLASSIFICATION_FORMATS = ("classes", "classification")


def expression_problem(expression: str) -> str | None:
    """Why a ``$`` config expression is not allowed, or None when it is."""
    code = re.sub(r"@[\w#]+", REFERENCE, expression[1:].strip())
    try:
        tree = ast.parse(code, mode="exec" if re.match(r"(import|from)\s", code) else "eval")
    except SyntaxError as e:
        return f"not a Python expression ({e.msg})"
    bound = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store)}
    bound |= {arg.arg for node in ast.walk(tree) if isinstance(node, ast.Lambda) for arg in node.args.args}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if any(module.split(".")[0] not in ALLOWED_MODULES for module in modules):
                return f"imports {', '.join(modules)}, not in the allow-list {sorted(ALLOWED_MODULES)}"
            bound |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
        elif isinstance(node, ast.Name) and node.id not in ALLOWED_NAMES | bound | {REFERENCE}:
            return f"uses the name {node.id!r}, not in the allow-list"
        elif isinstance(node, ast.Attribute):
            if node.attr.startswith("_"):
                return f"reaches the private attribute {node.attr!r}"
            if isinstance(node.value, ast.Name) and node.value.id == "os" and node.attr not in OS_ATTRIBUTES:
                return f"uses os.{node.attr} (only os.{', os.'.join(sorted(OS_ATTRIBUTES))} are allowed)"
    return None


def _expressions(config, where: str = ""):
    if isinstance(config, dict):
        for key, value in config.items():
            yield from _expressions(value, f"{where}#{key}" if where else str(key))
    elif isinstance(config, list):
        for i, value in enumerate(config):
            yield from _expressions(value, f"{where}#{i}")
    elif isinstance(config, str) and config.startswith("$"):
        yield where, config


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _weights_shipped(meta: dict) -> bool:
    return meta.get("weights_shipped", True) is not False


def _check_files(bundle: str, meta: dict) -> list[str]:
    required = REQUIRED_FILES if _weights_shipped(meta) else tuple(n for n in REQUIRED_FILES if n != "models/model.pt")
    problems = [f"{name}: missing" for name in required if not os.path.isfile(os.path.join(bundle, name))]
    if not _weights_shipped(meta) and os.path.isfile(os.path.join(bundle, "models", "model.pt")):
        problems.append("models/model.pt: shipped, but metadata says weights_shipped is false")
    return problems


def _check_metadata(bundle: str, meta: dict) -> list[str]:
    import jsonschema

    problems = []
    schema_file = os.path.join(REPO_ROOT, "schemas", os.path.basename(str(meta.get("schema", ""))))
    if not os.path.isfile(schema_file):
        problems.append(f"metadata: schema {meta.get('schema')!r} is not kept in schemas/ (nothing is downloaded)")
    else:
        with open(schema_file) as f:
            validator = jsonschema.Draft201909Validator(json.load(f))
        problems += [f"metadata: {'/'.join(map(str, e.path)) or 'top level'}: {e.message}"
                     for e in validator.iter_errors(meta)]
    if str(meta.get("version")) not in meta.get("changelog", {}):
        problems.append(f"metadata: version {meta.get('version')!r} has no changelog entry")
    readme = os.path.join(bundle, "docs", "README.md")
    lines = open(readme, encoding="utf-8").read().splitlines() if os.path.isfile(readme) else []
    for key, value in meta.get("eval_metrics", {}).items():
        if not any(key in line and str(value) in line for line in lines):
            problems.append(f"metadata: eval_metrics {key} = {value} is not stated in docs/README.md")
    return problems


def _check_configs(bundle: str) -> list[str]:
    from monai.bundle import ConfigParser

    problems = []
    for path in sorted(glob.glob(os.path.join(bundle, "configs", "*.json"))):
        name = os.path.basename(path)
        try:
            with open(path) as f:
                config = json.load(f)
        except (OSError, ValueError) as e:
            problems.append(f"configs/{name}: not valid JSON ({e})")
            continue
        for where, expression in _expressions(config):
            reason = expression_problem(expression)
            if reason:
                problems.append(f"configs/{name}: {where}: {expression[:80]!r} {reason}")
        if name in REQUIRED_IDS:
            parser = ConfigParser(config)
            problems += [f"configs/{name}: id {key!r} missing" for key in REQUIRED_IDS[name] if key not in parser]
    return problems


def _check_weights(bundle: str, meta: dict) -> list[str]:
    recorded = meta.get("model_sha256", {})
    shipped = sorted(f"models/{name}" for name in os.listdir(os.path.join(bundle, "models"))
                     if os.path.isfile(os.path.join(bundle, "models", name))) if os.path.isdir(
        os.path.join(bundle, "models")) else []
    problems = [f"{path}: sha256 not recorded in metadata model_sha256" for path in shipped if path not in recorded]
    for path, expected in recorded.items():
        full = os.path.join(bundle, path)
        if not os.path.isfile(full):
            problems.append(f"{path}: recorded in metadata model_sha256 but missing")
        elif sha256(full) != expected:
            problems.append(f"{path}: sha256 {sha256(full)[:12]}... differs from metadata ({expected[:12]}...): "
                            f"the file was changed or corrupted")
    return problems


def _check_network(bundle: str, meta: dict) -> list[str]:
    import numpy as np
    import onnxruntime
    import torch
    from monai.bundle import ConfigParser, ckpt_export

    config_file = os.path.join(bundle, "configs", "inference.json")
    meta_file = os.path.join(bundle, "configs", "metadata.json")
    weights = os.path.join(bundle, "models", "model.pt")
    parser = ConfigParser()
    parser.read_config(config_file)
    parser["bundle_root"] = bundle
    parser["device"] = "$torch.device('cpu')"
    torch.manual_seed(0)
    network = parser.get_parsed_content("network_def")
    if _weights_shipped(meta):
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            network.load_state_dict(state.get("model", state))
        except Exception as e:
            return [f"models/model.pt: cannot be loaded into network_def ({first_line(e)[:200]})"]
    else:
        state = network.state_dict()
    network.eval()
    image = meta["network_data_format"]["inputs"]["image"]
    pred = meta["network_data_format"]["outputs"]["pred"]
    spatial = [int(s) if isinstance(s, int) else 64 for s in image["spatial_shape"]]
    x = torch.rand(1, int(image["num_channels"]), *spatial)
    with torch.no_grad():
        expected = network(x)
    problems = []
    if expected.shape[1] != int(pred["num_channels"]):
        problems.append(f"network_def gives {expected.shape[1]} output channels, metadata says {pred['num_channels']}")
    if pred.get("format") == "segmentation" and list(expected.shape[2:]) != spatial:
        problems.append(f"network_def gives spatial shape {list(expected.shape[2:])} for input {spatial}")
    if str(pred.get("format", "")).lower() in CLASSIFICATION_FORMATS and expected.ndim != 2:
        problems.append(f"network_def gives shape {list(expected.shape)} for one image; a classifier (output format "
                        f"{pred.get('format')!r}) gives (1, classes)")
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not _weights_shipped(meta):  # ckpt_export reads a checkpoint file: the initial weights
            weights = os.path.join(tmp, "initial.pt")
            torch.save(state, weights)
        ts_path = os.path.join(tmp, "model.ts")
        try:
            # MONAI's bundle scripts log their input summary to stdout, which carries only this tool's problem lines
            logging.getLogger("monai.bundle.scripts").setLevel(logging.WARNING)
            ckpt_export(net_id="network_def", filepath=ts_path, ckpt_file=weights, meta_file=meta_file,
                        config_file=config_file, bundle_root=bundle, key_in_ckpt="model" if "model" in state else "")
            with torch.no_grad():
                scripted = torch.jit.load(ts_path)(x)
            if float((scripted - expected).abs().max()) > TOLERANCE:
                problems.append(f"TorchScript output differs from eager by {float((scripted - expected).abs().max()):.2e}")
        except Exception as e:
            problems.append(f"ckpt_export to TorchScript failed: {first_line(e)[:200]}")
        onnx_path = os.path.join(tmp, "model.onnx")
        try:
            torch.onnx.export(network, (x,), onnx_path, input_names=["image"], output_names=["pred"], dynamo=False)
            session = onnxruntime.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
            difference = float(np.abs(session.run(None, {"image": x.numpy()})[0] - expected.numpy()).max())
            if difference > TOLERANCE:
                problems.append(f"ONNX Runtime output differs from eager by {difference:.2e}")
        except Exception as e:
            problems.append(f"ONNX export or onnxruntime run failed: {first_line(e)[:200]}")
    return problems


def verify(bundle: str) -> list[str]:
    """Every problem of the bundle in ``bundle``, one line each (empty when it passes)."""
    try:
        with open(os.path.join(bundle, "configs", "metadata.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        return _check_files(bundle, {}) + [f"configs/metadata.json: cannot be read ({e})"]
    problems = _check_files(bundle, meta)
    problems += _check_metadata(bundle, meta) + _check_configs(bundle) + _check_weights(bundle, meta)
    if not {"configs/inference.json: missing", "models/model.pt: missing"} & set(problems):
        try:
            problems += _check_network(bundle, meta)
        except Exception as e:
            problems.append(f"network check failed: {first_line(e)[:200]}")
    return problems


def record_hashes(bundle: str) -> dict[str, str]:
    """Write the sha256 of every file directly under ``models/`` into metadata ``model_sha256`` (after training)."""
    meta_file = os.path.join(bundle, "configs", "metadata.json")
    with open(meta_file) as f:
        meta = json.load(f)
    models = os.path.join(bundle, "models")
    names = sorted(os.listdir(models)) if os.path.isdir(models) else []
    meta["model_sha256"] = {f"models/{name}": sha256(os.path.join(models, name)) for name in names
                            if os.path.isfile(os.path.join(models, name))}
    write_atomic(meta_file, json.dumps(meta, indent=4) + "\n")  # the bundles' own layout, so the diff is the change
    return meta["model_sha256"]


def main(*bundles: str, record: bool = False) -> None:
    """Verify the named bundles (every bundle under bundles/ when none is named); with ``--record``, first write the
    sha256 of their model files into their metadata."""
    bundles = bundles or tuple(sorted(p for p in glob.glob(os.path.join(REPO_ROOT, "bundles", "*")) if os.path.isdir(p)))
    missing = [b for b in bundles if not os.path.isdir(b)]
    if missing:
        print(f"error: {', '.join(missing)}: not a bundle folder", file=sys.stderr)
        sys.exit(2)
    failed = False
    for bundle in bundles:
        if record:
            record_hashes(bundle)
        name = os.path.basename(os.path.abspath(bundle))
        problems = verify(bundle)
        for problem in problems:
            print(f"{name}: {problem}")
        print(f"{name}: {'FAILED, ' + str(len(problems)) + ' problem(s)' if problems else 'ok'}", file=sys.stderr)
        failed |= bool(problems)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    fire.Fire(main)
