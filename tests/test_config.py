"""medhybrid.core.config: layered YAML, env expansion, overrides, validation errors and dataset specs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT
from pydantic import Field

from medhybrid.core.config import (
    PACKAGED_CONFIGS,
    ConfigError,
    StrictModel,
    apply_overrides,
    config_dir,
    expand_env,
    find_config,
    load_config,
    parse_override,
    save_config,
    validate,
)
from medhybrid.data.datasets import discover_pairs
from medhybrid.data.specs import DatasetSpec, MaskSpec, Preprocess, load_dataset_spec


class Optim(StrictModel):
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)


class RunConfig(StrictModel):
    """A small run config, as a module defining its own would."""

    name: str
    seed: int = 0
    channels: list[int] = Field(default_factory=lambda: [16, 32])
    out_dir: str = "runs"
    optim: Optim = Field(default_factory=Optim)
    preprocess: Preprocess = Field(default_factory=Preprocess)


def _write(path: Path, data: dict | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


# --------------------------------------------------------------------------------------------- load_config
def test_load_config_plain(tmp_path):
    f = _write(tmp_path / "run.yaml", {"name": "a", "seed": 3, "optim": {"lr": 0.01}})
    cfg = load_config(RunConfig, f)
    assert cfg.name == "a" and cfg.seed == 3 and cfg.optim.lr == 0.01
    assert cfg.optim.betas == (0.9, 0.999) and cfg.preprocess.resolution == 64  # defaults filled in


def test_base_layering(tmp_path):
    _write(tmp_path / "bases" / "common.yaml", {"name": "common", "seed": 1, "channels": [8, 16, 32],
                                                 "optim": {"lr": 0.5, "betas": [0.5, 0.9]}})
    _write(tmp_path / "bases" / "res.yaml", {"preprocess": {"resolution": 32}})
    f = _write(tmp_path / "exp" / "child.yaml", {"base": ["../bases/common.yaml", "../bases/res.yaml"],
                                                  "optim": {"lr": 0.01}, "name": "child"})
    cfg = load_config(RunConfig, f)
    assert cfg.name == "child"  # child wins
    assert cfg.seed == 1 and cfg.channels == [8, 16, 32]  # from the base
    assert cfg.optim.lr == 0.01 and cfg.optim.betas == (0.5, 0.9)  # merged key by key
    assert cfg.preprocess.resolution == 32
    # a single base given as a string, itself layered on another base
    g = _write(tmp_path / "exp" / "grandchild.yaml", "base: child.yaml\nseed: 7\n")
    cfg = load_config(RunConfig, g)
    assert cfg.seed == 7 and cfg.name == "child" and cfg.optim.lr == 0.01


def test_env_expansion(tmp_path, monkeypatch):
    f = _write(tmp_path / "env.yaml", "name: ${MH_TEST_NAME:fallback}\nout_dir: ${MH_TEST_OUT:/tmp/x}/runs\n")
    monkeypatch.delenv("MH_TEST_NAME", raising=False)
    monkeypatch.delenv("MH_TEST_OUT", raising=False)
    cfg = load_config(RunConfig, f)
    assert cfg.name == "fallback" and cfg.out_dir == "/tmp/x/runs"
    monkeypatch.setenv("MH_TEST_NAME", "from_env")
    monkeypatch.setenv("MH_TEST_OUT", "/data")
    cfg = load_config(RunConfig, f)
    assert cfg.name == "from_env" and cfg.out_dir == "/data/runs"


def test_env_without_default_must_be_set(tmp_path, monkeypatch):
    monkeypatch.delenv("MH_TEST_UNSET", raising=False)
    f = _write(tmp_path / "env.yaml", "name: ${MH_TEST_UNSET}\n")
    with pytest.raises(ConfigError, match="MH_TEST_UNSET is not set and has no default"):
        load_config(RunConfig, f)
    assert expand_env({"a": ["${MH_TEST_UNSET:d}", 3]}) == {"a": ["d", 3]}


def test_overrides_parsed_as_yaml(tmp_path):
    f = _write(tmp_path / "run.yaml", {"name": "a", "optim": {"lr": 0.1}})
    cfg = load_config(RunConfig, f, ["optim.lr=3e-4", "channels=[32, 64, 128]", "seed=42", "name=ph2",
                                     "preprocess.aspect=crop", "optim.betas=[0.8, 0.99]"])
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.channels == [32, 64, 128] and cfg.seed == 42 and cfg.name == "ph2"
    assert cfg.preprocess.aspect == "crop" and cfg.optim.betas == (0.8, 0.99)
    # overrides alone, without a file
    assert load_config(RunConfig, None, ["name=x"]).name == "x"


def test_parse_override():
    assert parse_override("a.b.c=[1, 2]") == (["a", "b", "c"], [1, 2])
    assert parse_override("x=") == (["x"], "")
    assert parse_override("x=null") == (["x"], None)
    assert parse_override("k=a=b") == (["k"], "a=b")
    assert apply_overrides({"a": 1}, ["a.b=2"]) == {"a": {"b": 2}}
    for bad in ["noequals", "=3", "a..b=1"]:
        with pytest.raises(ConfigError, match=bad.replace(".", r"\.")):
            parse_override(bad)
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_override("a=[1, 2")


def test_wrong_key_names_the_key(tmp_path):
    f = _write(tmp_path / "run.yaml", {"name": "a", "optim": {"lrr": 0.1}})
    with pytest.raises(ConfigError) as info:
        load_config(RunConfig, f)
    assert str(f) in str(info.value) and "optim.lrr: unknown key" in str(info.value)
    with pytest.raises(ConfigError, match="seeed: unknown key"):
        load_config(RunConfig, f, ["optim.lr=0.1", "seeed=1"])


def test_wrong_type_names_the_key(tmp_path):
    f = _write(tmp_path / "run.yaml", {"name": "a"})
    with pytest.raises(ConfigError) as info:
        load_config(RunConfig, f, ["seed=abc"])
    assert "seed:" in str(info.value) and "valid integer" in str(info.value) and "'abc'" in str(info.value)
    with pytest.raises(ConfigError, match="preprocess.resolution: .*multiple of 8"):
        load_config(RunConfig, f, ["preprocess.resolution=60"])
    with pytest.raises(ConfigError, match="preprocess.aspect: Input should be 'stretch', 'pad' or 'crop'"):
        load_config(RunConfig, f, ["preprocess.aspect=fit"])
    with pytest.raises(ConfigError, match="name: Field required"):
        load_config(RunConfig, None, [])


def test_missing_or_bad_config_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(RunConfig, tmp_path / "absent.yaml")
    bad = _write(tmp_path / "bad.yaml", "name: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(RunConfig, bad)
    listed = _write(tmp_path / "list.yaml", "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level, got list"):
        load_config(RunConfig, listed)
    nobase = _write(tmp_path / "nobase.yaml", "base: missing_base.yaml\nname: a\n")
    with pytest.raises(ConfigError, match="missing_base.yaml: config file not found"):
        load_config(RunConfig, nobase)


def test_save_config_reloads_equal(tmp_path):
    cfg = load_config(RunConfig, None, ["name=saved", "optim.lr=2e-4", "channels=[4, 8]", "preprocess.aspect=stretch"])
    out = save_config(cfg, tmp_path / "nested" / "resolved.yaml")
    assert out.is_file() and not list(out.parent.glob("*.tmp"))
    assert load_config(RunConfig, out) == cfg


def test_save_dataset_spec_reloads_equal(tmp_path):
    spec = load_dataset_spec("v7_covid")
    out = save_config(spec, tmp_path / "v7.yaml")
    again = load_dataset_spec(out)
    assert again == spec and again.mask.ignore == [127] and again.mask.values == {0: 0, 255: 1}


# --------------------------------------------------------------------------------------------- dataset specs
def test_shipped_dataset_specs(data):
    specs = {n: load_dataset_spec(n) for n in ["isic2018", "ph2", "v7_covid", "openist"]}
    assert specs["ph2"].root == data / "dermoscopy" / "ph2"
    assert specs["isic2018"].root == data / "dermoscopy" / "isic2018"
    assert specs["v7_covid"].root == data / "chest_xray" / "v7_covid"
    assert specs["openist"].root == data / "chest_xray" / "openist"
    assert {n: s.channels for n, s in specs.items()} == {"isic2018": 3, "ph2": 3, "v7_covid": 1, "openist": 1}
    assert {n: s.role for n, s in specs.items()} == {"isic2018": "source", "ph2": "target", "v7_covid": "source",
                                                     "openist": "target"}
    assert specs["v7_covid"].mask.ignore == [127] and specs["openist"].mask.threshold == 128
    assert specs["ph2"].mask_suffix == "_lesion" and specs["isic2018"].mask_suffix == "_segmentation"
    assert specs["ph2"].splits == ("pool", "test") and specs["isic2018"].splits == ("train", "val")
    assert all(s.mask.num_classes == 2 for s in specs.values())
    # by path as well as by name, and with overrides
    by_path = load_dataset_spec(REPO_ROOT / "configs" / "data" / "ph2.yaml", ["channels=1"])
    assert by_path.channels == 1 and by_path.root == specs["ph2"].root


def test_data_root_from_environment(data, tmp_path, monkeypatch):
    (tmp_path / "dermoscopy" / "ph2").mkdir(parents=True)
    monkeypatch.setenv("MEDHYBRID_DATA_ROOT", str(tmp_path))
    assert load_dataset_spec("ph2").root == tmp_path / "dermoscopy" / "ph2"


def test_unknown_dataset_name():
    with pytest.raises(ConfigError) as info:
        load_dataset_spec("no_such_dataset")
    assert "no_such_dataset" in str(info.value) and "ph2" in str(info.value) and "isic2018" in str(info.value)


# --------------------------------------------------------------------------------------------- config lookup
def test_shipped_configs_are_the_repository_configs():
    """In a clone, the package's configs/ is a link to the top-level configs/: one copy of each YAML."""
    assert PACKAGED_CONFIGS.is_symlink() and PACKAGED_CONFIGS.resolve() == (REPO_ROOT / "configs").resolve()
    assert config_dir() == (REPO_ROOT / "configs").resolve()
    assert find_config("dermoscopy", "ablation") == (REPO_ROOT / "configs" / "ablation" / "dermoscopy.yaml").resolve()
    assert find_config("isic2018", "pretrain").parent == (REPO_ROOT / "configs" / "pretrain").resolve()


def test_config_dir_from_environment(data, tmp_path, monkeypatch):
    cfg = tmp_path / "cfg"
    shutil.copytree(REPO_ROOT / "configs" / "data", cfg / "data")
    monkeypatch.setenv("MEDHYBRID_CONFIG_DIR", str(cfg))
    assert config_dir() == cfg.resolve() and find_config("ph2", "data") == (cfg / "data" / "ph2.yaml").resolve()
    monkeypatch.setenv("MEDHYBRID_DATA_ROOT", str(data))
    assert load_dataset_spec("ph2").root == data / "dermoscopy" / "ph2"
    with pytest.raises(ConfigError) as info:  # a folder without the kind asked for names the variable
        find_config("dermoscopy", "ablation")
    assert "MEDHYBRID_CONFIG_DIR" in str(info.value) and "pass a YAML file's path" in str(info.value)


def test_unknown_config_name_says_what_to_pass():
    with pytest.raises(ConfigError) as info:
        find_config("no_such_ablation", "ablation")
    assert "'dermoscopy'" in str(info.value) and "pass a YAML file's path" in str(info.value)


def test_data_root_default_outside_the_clone_asks_for_the_variable(data, tmp_path, monkeypatch):
    """A dataset YAML installed elsewhere (site-packages) cannot reach ../shared/data with its relative default: the
    error says to set MEDHYBRID_DATA_ROOT, or which value of it does not hold the dataset."""
    cfg = tmp_path / "site-packages" / "medhybrid" / "configs"
    shutil.copytree(REPO_ROOT / "configs" / "data", cfg / "data")
    monkeypatch.setenv("MEDHYBRID_CONFIG_DIR", str(cfg))
    with pytest.raises(ConfigError) as info:
        load_dataset_spec("ph2")
    msg = str(info.value)
    assert "dataset root" in msg and "MEDHYBRID_DATA_ROOT is not set" in msg and "set MEDHYBRID_DATA_ROOT" in msg
    monkeypatch.setenv("MEDHYBRID_DATA_ROOT", str(tmp_path / "elsewhere"))
    with pytest.raises(ConfigError, match=r"MEDHYBRID_DATA_ROOT=.*elsewhere does not hold this dataset"):
        load_dataset_spec("ph2")
    monkeypatch.setenv("MEDHYBRID_DATA_ROOT", str(data))
    assert load_dataset_spec("ph2").root == data / "dermoscopy" / "ph2"


def test_dataset_spec_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_dataset_spec("ph2", [f"root={tmp_path / 'nowhere'}"])
    assert "root:" in str(info.value) and "nowhere does not exist" in str(info.value)
    with pytest.raises(ConfigError, match="channels: Input should be 1 or 3"):
        load_dataset_spec("ph2", ["channels=2"])
    with pytest.raises(ConfigError, match="mask_sufix: unknown key"):
        load_dataset_spec("ph2", ["mask_sufix=_x"])
    with pytest.raises(ConfigError, match=r"mask: .*classes 0\.\.K-1"):
        load_dataset_spec("ph2", ["mask.values={0: 0, 255: 2}"])
    with pytest.raises(ConfigError, match=r"mask: .*\[127\] are both a class and ignored"):
        load_dataset_spec("ph2", ["mask.values={0: 0, 127: 1}", "mask.ignore=[127]"])
    with pytest.raises(ConfigError, match="role: Input should be 'source' or 'target'"):
        load_dataset_spec("ph2", ["role=pool"])


def test_relative_root_is_relative_to_the_yaml(tiny_dataset, tmp_path):
    f = _write(tmp_path / "cfgs" / "tiny.yaml", {"name": "tiny", "root": "../ph2tiny", "role": "target", "channels": 3,
                                                  "mask_suffix": "_lesion"})
    spec = load_dataset_spec(f)
    assert spec.root == tiny_dataset
    assert load_dataset_spec("cfgs/tiny.yaml", base_dir=tmp_path).root == tiny_dataset


def test_dataset_spec_from_folder_with_overrides(tiny_dataset, data):
    spec = load_dataset_spec(tiny_dataset, ["channels=3", "mask_suffix=_lesion", "role=target"])
    assert spec.name == "ph2tiny" and spec.root == tiny_dataset and spec.channels == 3
    assert spec.mask == MaskSpec() and spec.split == "split.json"
    pairs, problems = discover_pairs(spec)
    assert problems == [] and len(pairs) == 4
    # without channels, the files say: the PH2 images are RGB
    assert load_dataset_spec(tiny_dataset, ["mask_suffix=_lesion", "role=target"]).channels == 3
    # a folder is also accepted as a string path, with a folder of grey images (grey read from the JPEG headers)
    grey = load_dataset_spec(str(data / "chest_xray" / "openist"), ["mask_suffix=_mask", "mask.threshold=128"])
    assert grey.name == "openist" and grey.mask.threshold == 128 and grey.mask.num_classes == 2 and grey.channels == 1


def _copy_ph2(data: Path, dest: Path, ids: list[str]) -> None:
    (dest / "img").mkdir(parents=True)
    (dest / "lab").mkdir()
    for sid in ids:
        shutil.copy(data / "dermoscopy" / "ph2" / "images" / f"{sid}.png", dest / "img")
        shutil.copy(data / "dermoscopy" / "ph2" / "masks" / f"{sid}_lesion.png", dest / "lab")


def test_dataset_spec_from_csv_datalist(data, tmp_path):
    ph2 = data / "dermoscopy" / "ph2"
    _copy_ph2(data, tmp_path, ["IMD003", "IMD004"])
    lines = ["image,mask,split",
             "img/IMD003.png,lab/IMD003_lesion.png,train",  # relative to the CSV's folder
             "img/IMD004.png,lab/IMD004_lesion.png,val",
             f"{ph2 / 'images' / 'IMD002.png'},{ph2 / 'masks' / 'IMD002_lesion.png'},train"]  # absolute
    f = tmp_path / "pairs.csv"
    f.write_text("\n".join(lines) + "\n")
    spec = load_dataset_spec(f, ["channels=3"])
    assert spec.name == "pairs" and spec.datalist == "pairs.csv" and spec.split is None and spec.root == tmp_path
    pairs, problems = discover_pairs(spec)
    assert problems == []
    assert [(p["id"], p["split"]) for p in pairs] == [("IMD003", "train"), ("IMD004", "val"), ("IMD002", "train")]
    assert pairs[0]["image"] == str(tmp_path / "img" / "IMD003.png") and Path(pairs[0]["label"]).is_file()
    assert pairs[2]["image"] == str(ph2 / "images" / "IMD002.png")


def test_dataset_spec_from_decathlon_json(data, tmp_path):
    ph2 = data / "dermoscopy" / "ph2"
    _copy_ph2(data, tmp_path, ["IMD003"])
    datalist = {
        "name": "tiny",
        "training": [{"image": "img/IMD003.png", "label": "lab/IMD003_lesion.png"},
                     {"image": str(ph2 / "images" / "IMD004.png"), "label": str(ph2 / "masks" / "IMD004_lesion.png")}],
        "validation": [{"image": str(ph2 / "images" / "IMD002.png"), "label": str(ph2 / "masks" / "IMD002_lesion.png"),
                        "id": "case2"}],
    }
    f = tmp_path / "dataset.json"
    f.write_text(json.dumps(datalist))
    spec = load_dataset_spec(f, ["channels=3"])
    assert spec.name == "dataset" and spec.datalist == "dataset.json"
    pairs, problems = discover_pairs(spec)
    assert problems == []
    assert [(p["id"], p["split"]) for p in pairs] == [("IMD003", "train"), ("IMD004", "train"), ("case2", "val")]
    assert pairs[0]["image"] == str(tmp_path / "img" / "IMD003.png")


def test_split_json_is_not_taken_for_a_datalist(tiny_dataset):
    """A split file ({name: [ids]}) is a config path, not a datalist: it is not mistaken for one."""
    with pytest.raises(ConfigError, match="pool: unknown key"):
        load_dataset_spec(tiny_dataset / "split.json", ["channels=3"])


def test_validate_and_mask_spec():
    assert validate(MaskSpec, {"threshold": 128}).num_classes == 2
    assert validate(MaskSpec, {"values": {0: 0, 1: 1, 2: 2}}).num_classes == 3
    with pytest.raises(ConfigError, match="tresh: unknown key"):
        validate(MaskSpec, {"tresh": 1}, source="mask")
    with pytest.raises(ConfigError, match="does not exist"):
        validate(DatasetSpec, {"name": "x", "root": "/definitely/not/here", "channels": 1})
