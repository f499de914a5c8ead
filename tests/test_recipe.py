"""One recipe per method: every method at every preset resolves from the command line's parameters,
records never collide silently, and the recipe knows no method by name."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from adnb.data import default_dataset
from adnb.methods import names
from adnb.methods.base import Prepared, build_detector
from adnb.recipe import Recipe, holdout_count, parameter_names, parameters
from adnb.runtime.errors import AdnbError
from adnb.runtime.notebook import open_categories
from adnb.runtime.presets import list_presets
from adnb.runtime.records import load_records, one_per_configuration, write_record

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def bottle_shaped(tmp_path_factory) -> Path:
    """A folder laid out like MVTec AD's bottle (the name drives the official per-category choices)."""
    root = tmp_path_factory.mktemp("mvtec") / "bottle"
    rng = np.random.default_rng(0)
    for sub in ("train/good", "test/good", "test/broken_large", "ground_truth/broken_large"):
        (root / sub).mkdir(parents=True)
    for i in range(6):
        cv2.imwrite(str(root / "train/good" / f"{i:03d}.png"), rng.integers(0, 255, (72, 80, 3), dtype=np.uint8))
    cv2.imwrite(str(root / "test/good/000.png"), rng.integers(0, 255, (72, 80, 3), dtype=np.uint8))
    cv2.imwrite(str(root / "test/broken_large/000.png"), rng.integers(0, 255, (72, 80, 3), dtype=np.uint8))
    mask = np.zeros((72, 80), np.uint8)
    mask[20:40, 30:50] = 255
    cv2.imwrite(str(root / "ground_truth/broken_large/000_mask.png"), mask)
    return root


def test_only_a_methods_own_module_names_it():
    """Recipe, presets, runner, bench, train-all and report learn the methods from their declarations
    (``adnb.methods.registry``): no module outside ``adnb/methods`` names one in its code (docstrings may)."""
    methods = set(names())
    for path in (REPO / "adnb").rglob("*.py"):
        if path.parent.name == "methods":
            continue
        tree = ast.parse(path.read_text())
        documents = {id(node.body[0].value) for node in ast.walk(tree)
                     if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                     and node.body and isinstance(node.body[0], ast.Expr)}
        named = [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and node.value in methods
                 and id(node) not in documents]
        assert not named, f"{path.relative_to(REPO)} names {named}: declare it in the method's MethodSpec instead"


def test_no_special_case_for_a_method():
    found = subprocess.run(["grep", "-rnE", "method (==|!=|in \\()", str(REPO / "adnb")], capture_output=True,
                           text=True).stdout
    assert found == "", found


@pytest.mark.parametrize("preset", list_presets())
@pytest.mark.parametrize("method", names())
def test_every_method_and_preset_resolves_to_a_buildable_model(method, preset, bottle_shaped):
    """The command line's parameters (chapter defaults ⊕ preset) give a complete config — "auto" choices
    resolved — for the embedded dataset and a bottle-shaped folder, and the model builds from it."""
    recipe = Recipe.from_preset(method, preset, device="cpu")
    for category in (open_categories("", "")[0], open_categories(str(bottle_shaped), "")[0]):
        config = recipe.config(category)
        for name in ("levels", "volume_norm", "latent", "weights"):
            assert getattr(config, name, None) not in (0, "auto"), f"{method}/{preset}: {name} left unresolved"
        if preset == "full" and method in ("d3ad", "realnet", "fair"):
            continue  # the papers' full-size models: resolving is checked; building them costs GBs
        detector = build_detector(method, config)
        assert detector.config == config and detector.image_size == config.image_size


def test_official_choices_reach_the_cli_config(bottle_shaped):
    bottle = open_categories(str(bottle_shaped), "")[0]
    flow = Recipe.from_preset("pyramidflow", "full", device="cpu").config(bottle)
    assert (flow.levels, flow.volume_norm, flow.augment) == (4, "svn", False)
    realnet = Recipe.from_preset("realnet", "cpu", device="cpu").config(bottle)
    assert realnet.foreground == "otsu_dark" and realnet.weights == "imagenet"


def test_chapter_parameters_are_the_cli_parameters():
    """What papermill injects into a chapter (its defaults, then the preset) is what the CLI resolves."""
    from adnb.runtime.presets import load_preset
    from adnb.runtime.runner import chapter_parameters, notebook_defaults

    for method, chapter in (("fair", "fair"), ("realnet", "realnet"), ("patchcore", "benchmark"),
                            ("padim", "benchmark")):
        namespace = {**notebook_defaults(chapter), **load_preset("ci", chapter), "unrelated": 1}
        assert chapter_parameters(chapter, namespace) == parameters(method, "ci")


def test_holdout_keeps_most_images_for_training():
    assert holdout_count(100, 0.1) == 10 and holdout_count(209, 0.1) == 20 and holdout_count(16, 0.1) == 2
    assert holdout_count(3, 0.1) == 1 and holdout_count(50, 0.0) == 0


def test_two_configurations_of_one_method_are_refused_by_name(tmp_path):
    recipe = Recipe.from_preset("baseline", "ci", device="cpu")
    category = open_categories("", "")[0]
    base = {"method": "baseline", "dataset": "embedded", "category": category.name, "preset": "ci", "device": "cpu",
            "image_size": 64, "metrics": {"image_auroc": 0.5, "pixel_auroc": 0.5, "aupro": 0.5}, "train_seconds": 0.0,
            "infer_images_per_s": 1.0, "n_params": 1, "weights": {}, "checkpoint": None, "adnb_version": "x",
            "torch_version": "x", "created": "2026"}
    a = write_record({**base, "config_hash": recipe.config_hash(recipe.config(category), Prepared())}, tmp_path)
    b = write_record({**base, "config_hash": recipe.with_params(box=3).config_hash(recipe.config(category, box=3),
                                                                                   Prepared())}, tmp_path)
    assert a != b and a.exists() and b.exists()  # one file per configuration: nothing overwritten
    with pytest.raises(AdnbError, match=f"{a.name}.*{b.name}|{b.name}.*{a.name}"):
        one_per_configuration(load_records(tmp_path))
    b.unlink()
    assert len(one_per_configuration(load_records(tmp_path))) == 1


def test_cli_train_writes_a_record_with_the_recipes_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("ADNB_HOME", str(tmp_path))
    out = subprocess.run([sys.executable, "-m", "adnb", "train", "baseline", "--preset", "ci", "--category", "washer"],
                         capture_output=True, text=True, check=True, env={**__import__("os").environ})
    record = json.loads(Path(out.stdout.split("record: ")[1].split()[0]).read_text())
    recipe = Recipe.from_preset("baseline", "ci", device="cpu")
    washer = open_categories(str(default_dataset()), "washer")[0]
    assert record["config_hash"] == recipe.config_hash(recipe.config(washer), Prepared())
    assert record["config_hash"][:12] in Path(out.stdout.split("record: ")[1].split()[0]).name


def test_named_variants_are_the_recipe_with_their_parameters_changed():
    recipe = Recipe.from_preset("pyramidflow", "cpu", device="cpu")
    [(name, variant)] = recipe.variants().items()
    assert name == "pretrained" and variant.params == {**recipe.params, **recipe.params["pretrained_variant"]}
    assert Recipe.from_preset("fair", "cpu", device="cpu").variants() == {}
    assert recipe.with_params(pretrained_variant={}).variants() == {}  # an empty variant is none


@pytest.mark.parametrize("max_train", [0, 7])
def test_the_cache_entry_counts_the_training_images_without_reading_them(max_train, tmp_path, monkeypatch):
    monkeypatch.setenv("ADNB_HOME", str(tmp_path))
    recipe = Recipe.from_preset("baseline", "ci", {"max_train": max_train}, device="cpu")
    [washer] = open_categories(str(default_dataset()), "washer")
    config = recipe.config(washer)
    train, held = recipe.training_data(config, washer)
    assert recipe.n_train(washer) == len(train) and held is not None
    monkeypatch.setattr(type(washer), "load", lambda *a, **k: pytest.fail("an image was read"))
    assert recipe.cache_entry(washer, config=config, prepared=Prepared()).folder.parent.name == "baseline"


@pytest.mark.parametrize("argv", [
    ["train", "fair", "--preset", "ci", "-p", "wdith", "32"],
    ["bench", "fair", "--size", "32", "--device", "cpu", "-p", "wdith", "4"],
    ["train-all", "--preset", "ci", "--methods", "fair", "baseline", "-p", "wdith", "4"],
    ["train-all", "--preset", "ci", "-p", "fair.wdith", "4"],
    ["run", "fair", "--preset", "ci", "-p", "wdith", "4"],
], ids=lambda argv: " ".join(argv[:2]) + (" (scoped)" if "fair.wdith" in argv else ""))
def test_every_command_refuses_an_unknown_parameter_naming_the_valid_ones(argv, tmp_path, monkeypatch, capsys):
    from adnb.cli import main

    monkeypatch.setenv("ADNB_HOME", str(tmp_path))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "unknown parameter(s) " in err and "wdith" in err and "width" in err.split("valid:")[1]
    assert not (tmp_path / "weights").exists()  # refused before anything trained


def test_parameters_check_the_overrides_in_one_place():
    with pytest.raises(AdnbError, match=r"unknown parameter\(s\) wdith for fair \(the parameters of 02_fair"):
        parameters("fair", "ci", {"wdith": 32})
    with pytest.raises(AdnbError, match="parameter width='wide' of fair .* should be int"):
        parameters("fair", "ci", {"width": "wide"})
    assert parameters("fair", "ci", {"width": 32})["width"] == 32
    assert "width" in parameter_names("fair") and "box" in parameter_names("baseline")
    from adnb.schedule import overrides_for

    # train-all: an unscoped key applies to the methods whose chapter has it (and plan refuses one that none has)
    assert overrides_for("fair", {"width": 8, "box": 3}) == {"width": 8}
    assert overrides_for("baseline", {"width": 8, "box": 3}) == {"box": 3}


def test_precision_auto_is_one_cache_key_whoever_resolves_it(tmp_path, monkeypatch):
    """A driver without native bf16 and a worker with it ask for the same model under ``precision: auto``: one
    config hash, one cache entry; each detector resolves the arithmetic on its own device, and the record
    states the one training ran at."""
    monkeypatch.setenv("ADNB_HOME", str(tmp_path))
    [washer] = open_categories(str(default_dataset()), "washer")
    seen = {}
    for native in ("0", "1"):  # adnb.runtime.precision reads ADNB_CPU_BF16 in place of the CPU's flags
        monkeypatch.setenv("ADNB_CPU_BF16", native)
        recipe = Recipe.from_preset("fair", "ci", {"precision": "auto"}, device="cpu")
        config = recipe.config(washer)
        entry = recipe.cache_entry(washer, config=config, prepared=Prepared())
        seen[native] = recipe.config_hash(config, Prepared()), entry.folder, build_detector("fair", config).precision
    assert seen["0"][:2] == seen["1"][:2]
    assert (seen["0"][2], seen["1"][2]) == ("fp32", "bf16")

