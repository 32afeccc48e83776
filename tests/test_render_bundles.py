"""The family configs of every bundle are their rendering from templates/ (tools/render_bundles.py)."""

import json
import os
import shutil

import pytest

from helpers import REPO

from tools.render_bundles import OPTIONAL, REQUIRED, TEMPLATES, render_config, renderings, stale


def test_committed_configs_are_their_rendering():
    assert stale() == [], "edit templates/ and run `python tools/render_bundles.py`, never a rendered file"


def test_every_bundle_is_rendered_from_one_family():
    rendered = {path.split(os.sep)[1] for path in renderings()}
    assert rendered == set(os.listdir(os.path.join(REPO, "bundles")))
    configs = [p for p in renderings() if p.endswith("train.json") and "multi_gpu" not in p]
    assert len(configs) == len(rendered)


def test_a_hand_edit_to_a_rendered_file_is_found(tmp_path):
    relative = os.path.join("bundles", "glas_litenext_segmentation", "configs", "inference.json")
    for path in renderings():
        os.makedirs(tmp_path / os.path.dirname(path), exist_ok=True)
        shutil.copy(os.path.join(REPO, path), tmp_path / path)
    assert stale(root=str(tmp_path)) == []
    config = json.loads((tmp_path / relative).read_text())
    config["roi_size"] = [512, 512]
    (tmp_path / relative).write_text(json.dumps(config, indent=4) + "\n")
    (tmp_path / "bundles" / "ph2_litenext_segmentation" / "LICENSE").unlink()
    assert stale(root=str(tmp_path)) == [relative, os.path.join("bundles", "ph2_litenext_segmentation", "LICENSE")]


def test_render_sets_values_by_id_and_drops_unset_optional_keys():
    template = {"a": REQUIRED, "b": OPTIONAL, "c": {"d": [1, {"e": 2}]}, "f": OPTIONAL}
    config = render_config(template, {"a": 1, "c#d#1#e": 3, "f": "x"})
    assert config == {"a": 1, "c": {"d": [1, {"e": 3}]}, "f": "x"} and list(config) == ["a", "c", "f"]
    assert template["a"] == REQUIRED  # the template itself is not changed


@pytest.mark.parametrize("values, message", [({}, "x/y.json#a: the bundle sets no value"),
                                             ({"a": 1, "c#z#q": 2}, "x/y.json: c#z#q: the template has no such id"),
                                             ({"a": 1, "new": 2}, "x/y.json: new: the template has no such id")])
def test_render_names_the_bundle_file_and_id_that_is_wrong(values, message):
    with pytest.raises(ValueError, match=message):
        render_config({"a": REQUIRED, "c": {"d": 1}}, values, "x/y.json")


def test_templates_leave_no_value_that_every_bundle_sets_the_same():
    """A per-bundle value that is equal in every bundle of a family belongs in the template."""
    for family in os.listdir(TEMPLATES):
        values_path = os.path.join(TEMPLATES, family, "values.json")
        if not os.path.isfile(values_path):
            continue
        with open(values_path) as f:
            bundles = list(json.load(f).values())
        for name, ids in bundles[0].items():
            for config_id, value in ids.items():
                if len(bundles) > 1:
                    assert any(b.get(name, {}).get(config_id, OPTIONAL) != value for b in bundles[1:]), (
                        f"{family}/{name}: {config_id} is the same in every bundle")
