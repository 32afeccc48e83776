"""Render each bundle's shared configs from its family's template: one source for what a family has in common.

``python tools/render_bundles.py`` rewrites the rendered files of every bundle; ``--check`` writes nothing and exits 1
listing the files that differ from their rendering (a hand edit to a rendered file, or a template changed without
rendering). Edit ``templates/``, never a rendered file, then render and commit both.

``templates/`` holds

* ``<family>/configs/*.json``: the configs every bundle of the family shares (``litenext_segmentation``,
  ``ltmednext_classification``, ``ltmednext_segmentation``). A value ``"<per bundle>"`` must be set by every bundle;
  a key whose value is ``"<per bundle, optional>"`` is kept only by the bundles that set it (so its place in the
  file stays the template's).
* ``<family>/values.json``: ``{bundle name: {config file: {id: value}}}``, ids in MONAI's ``#`` notation
  (``train#trainer#max_epochs``, ``train#augmentation#0#roi_scale``; list items by index).
* ``common/``: files copied unchanged into every bundle (``LICENSE``, ``configs/logging.conf``).

The rendered files are plain, complete bundle configs: a bundle folder stays self-contained, so MONAI Label, ``python
-m monai.bundle run`` and an exported zip need nothing from this repository. ``metadata.json``, the model card and
any config a family does not share stay per bundle.
"""

from __future__ import annotations

import copy
import json
import os
import sys

import fire

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPLATES = os.path.join(REPO_ROOT, "templates")
REQUIRED = "<per bundle>"
OPTIONAL = "<per bundle, optional>"


def set_id(config: dict, config_id: str, value) -> None:
    """Set ``value`` at ``config_id`` (``a#b#0#c``) in ``config``; every parent must exist in the template."""
    *parents, last = config_id.split("#")
    node = config
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if isinstance(node, list):
        node[int(last)] = value
    elif last in node:
        node[last] = value
    else:
        raise KeyError(f"{config_id}: the template has no such id")


def _fill(node, where: str):
    """``node`` without unset optional keys; a ValueError names any required value left unset."""
    if node == REQUIRED:
        raise ValueError(f"{where}: the bundle sets no value for this template id")
    if isinstance(node, dict):
        return {k: _fill(v, f"{where}#{k}") for k, v in node.items() if v != OPTIONAL}
    if isinstance(node, list):
        return [_fill(v, f"{where}#{i}") for i, v in enumerate(node)]
    return node


def render_config(template: dict, values: dict, where: str = "") -> dict:
    """The template with the bundle's values set and unset optional keys dropped."""
    config = copy.deepcopy(template)
    for config_id, value in values.items():
        try:
            set_id(config, config_id, value)
        except (KeyError, IndexError, ValueError) as error:
            raise ValueError(f"{where}: {config_id}: the template has no such id") from error
    return _fill(config, where)


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def renderings(templates: str = TEMPLATES) -> dict[str, str]:
    """Every rendered file: ``{path relative to the repository: content}``."""
    common = os.path.join(templates, "common")
    shared = {os.path.relpath(os.path.join(d, f), common): _read(os.path.join(d, f))
              for d, _, files in os.walk(common) for f in files}
    out = {}
    for family in sorted(os.listdir(templates)):
        values_path = os.path.join(templates, family, "values.json")
        if family == "common" or not os.path.isfile(values_path):
            continue
        configs = os.path.join(templates, family, "configs")
        with open(values_path, encoding="utf-8") as f:
            bundles = json.load(f)
        for bundle, per_file in bundles.items():
            unknown = set(per_file) - set(os.listdir(configs))
            if unknown:
                raise ValueError(f"{values_path}: {bundle}: no template for {sorted(unknown)}")
            for name in sorted(os.listdir(configs)):
                with open(os.path.join(configs, name), encoding="utf-8") as f:
                    template = json.load(f)
                where = f"{family}/{bundle}/{name}"
                config = render_config(template, per_file.get(name, {}), where)
                out[os.path.join("bundles", bundle, "configs", name)] = json.dumps(config, indent=4) + "\n"
            for relative, content in shared.items():
                out[os.path.join("bundles", bundle, relative)] = content
    return out


def stale(root: str = REPO_ROOT, templates: str = TEMPLATES) -> list[str]:
    """The rendered files whose committed content differs from their rendering (missing ones included)."""
    differing = []
    for relative, content in renderings(templates).items():
        path = os.path.join(root, relative)
        if not os.path.isfile(path) or _read(path) != content:
            differing.append(relative)
    return differing


def main(check: bool = False) -> None:
    """Render every bundle's family configs, or with ``--check`` list the ones out of date and exit 1."""
    if check:
        differing = stale()
        for relative in differing:
            print(f"{relative}: differs from its rendering (edit templates/, then run tools/render_bundles.py)")
        sys.exit(1 if differing else 0)
    for relative, content in renderings().items():
        path = os.path.join(REPO_ROOT, relative)
        if os.path.isfile(path) and _read(path) == content:
            continue
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(content)
        os.replace(tmp, path)
        print(f"rendered {relative}")


if __name__ == "__main__":
    fire.Fire(main)
