"""medhybrid.data.datasets: pair discovery, split problems, few-shot subsets."""

from __future__ import annotations

import json

import pytest
from conftest import PH2

from medhybrid.data.datasets import discover_pairs, few_shot_ids, few_shot_pairs, load_pairs
from medhybrid.data.io import DataError
from medhybrid.data.specs import load_dataset_spec


def _messages(problems) -> list[str]:
    assert all(isinstance(p, DataError) for p in problems)
    return [str(p) for p in problems]


# --------------------------------------------------------------------------------------------- discovery
def test_discover_folder_pairs(tiny_spec, tiny_dataset):
    pairs, problems = discover_pairs(tiny_spec)
    assert problems == []
    assert [p["id"] for p in pairs] == ["IMD002", "IMD003", "IMD004", "IMD006"]  # sorted by file name
    by_id = {p["id"]: p for p in pairs}
    assert by_id["IMD003"] == {"id": "IMD003", "image": str(tiny_dataset / "images" / "IMD003.png"),
                               "label": str(tiny_dataset / "masks" / "IMD003_lesion.png"), "split": "pool"}
    assert by_id["IMD002"]["split"] == "test"


def test_shipped_ph2_pairs(data):
    spec = load_dataset_spec("ph2")
    pairs = load_pairs(spec)
    assert len(pairs) == 200
    split = json.loads((data / "dermoscopy" / "ph2" / "split.json").read_text())
    assert sorted(p["id"] for p in load_pairs(spec, "pool")) == sorted(split["pool"])
    assert len(load_pairs(spec, ["pool", "test"])) == 200
    assert all(p["label"].endswith(f"{p['id']}_lesion.png") for p in pairs)


def test_load_pairs_by_split(tiny_spec):
    assert [p["id"] for p in load_pairs(tiny_spec, "pool")] == ["IMD003", "IMD004"]
    assert [p["id"] for p in load_pairs(tiny_spec, "test")] == ["IMD002", "IMD006"]
    assert load_pairs(tiny_spec, "train") == []


def test_id_in_pool_and_test_is_a_problem(tiny_dataset, tiny_spec):
    (tiny_dataset / "split.json").write_text(json.dumps({"pool": ["IMD003", "IMD004"], "test": ["IMD002", "IMD006", "IMD004"]}))
    pairs, problems = discover_pairs(tiny_spec)
    msgs = _messages(problems)
    assert len(msgs) == 1
    assert str(tiny_dataset / "split.json") in msgs[0] and "id 'IMD004' is in both 'pool' and 'test'" in msgs[0]
    with pytest.raises(DataError, match="'IMD004' is in both 'pool' and 'test'"):
        load_pairs(tiny_spec)
    with pytest.raises(DataError, match="has 1 problem"):
        few_shot_pairs(tiny_spec, 1, seed=0)


def test_split_problems(tiny_dataset, tiny_spec):
    split = tiny_dataset / "split.json"
    split.write_text(json.dumps({"pool": ["IMD003", "IMD004", "IMD999"], "test": ["IMD002", "IMD006"]}))
    msgs = _messages(discover_pairs(tiny_spec)[1])
    assert any("split 'pool' lists 'IMD999', which has no image" in m for m in msgs)

    split.write_text(json.dumps({"pool": ["IMD002", "IMD003", "IMD004", "IMD006"]}))
    msgs = _messages(discover_pairs(tiny_spec)[1])
    assert any("target dataset has no 'test' split" in m for m in msgs)

    split.write_text("{not json")
    msgs = _messages(discover_pairs(tiny_spec)[1])
    assert any(str(split) in m and "split file is not valid JSON" in m for m in msgs)

    split.write_text(json.dumps(["IMD002"]))
    assert any("must map split names to lists of ids" in m for m in _messages(discover_pairs(tiny_spec)[1]))

    split.unlink()
    msgs = _messages(discover_pairs(tiny_spec)[1])
    assert any(str(split) in m and "split file not found" in m for m in msgs)


def test_folder_problems(tiny_dataset, tiny_overrides):
    (tiny_dataset / "images" / "notes.txt").write_text("x")
    (tiny_dataset / "images" / ".hidden").write_text("x")
    spec = load_dataset_spec(tiny_dataset, tiny_overrides)
    pairs, problems = discover_pairs(spec)
    assert len(pairs) == 4
    assert _messages(problems) == [f"{tiny_dataset / 'images' / 'notes.txt'}: unsupported file type '.txt' in the images folder"]

    spec = load_dataset_spec(tiny_dataset, [*tiny_overrides, "masks=labels"])
    pairs, problems = discover_pairs(spec)
    assert pairs == [] and any("masks folder not found" in m for m in _messages(problems))


def test_empty_images_folder(tiny_dataset, tiny_spec):
    for f in (tiny_dataset / "images").iterdir():
        f.unlink()
    (tiny_dataset / "split.json").write_text(json.dumps({"pool": [], "test": []}))
    pairs, problems = discover_pairs(tiny_spec)
    assert pairs == []
    assert _messages(problems) == [f"{tiny_dataset}: dataset is empty: no image/mask pairs found"]
    with pytest.raises(DataError, match="dataset is empty"):
        load_pairs(tiny_spec)


def test_duplicate_ids(tiny_dataset, tiny_spec):
    (tiny_dataset / "images" / "IMD003.jpg").write_bytes((tiny_dataset / "images" / "IMD003.png").read_bytes())
    msgs = _messages(discover_pairs(tiny_spec)[1])
    assert any("id 'IMD003' appears more than once" in m for m in msgs)


def test_datalist_problems(tmp_path):
    f = tmp_path / "list.csv"
    f.write_text("img,seg\na.png,b.png\n")
    spec = load_dataset_spec(f, ["channels=1"])
    pairs, problems = discover_pairs(spec)
    assert pairs == [] and _messages(problems) == [
        f"{f}: CSV datalist needs columns 'image' and 'mask' (or 'label'), has ['img', 'seg']"]

    f.write_text("image,label\na.png,\n")
    assert "line 2: empty image or mask path" in str(discover_pairs(load_dataset_spec(f, ["channels=1"]))[1][0])

    j = tmp_path / "list.json"
    j.write_text(json.dumps({"training": [{"image": "a.png", "label": "a_m.png"}, {"image": "b.png"}]}))
    problems = discover_pairs(load_dataset_spec(j, ["channels=1"]))[1]
    assert _messages(problems) == [f"{j}: training[1]: each item needs 'image' and 'label'"]

    gone = load_dataset_spec(j, ["channels=1", "datalist=gone.csv"])
    assert _messages(discover_pairs(gone)[1]) == [f"{tmp_path / 'gone.csv'}: datalist file not found"]


# --------------------------------------------------------------------------------------------- few-shot
POOL = [f"case{i:03d}" for i in range(100)]


def test_few_shot_ids_deterministic_and_nested():
    a = few_shot_ids(POOL, 10, seed=3)
    assert a == few_shot_ids(POOL, 10, seed=3) == few_shot_ids(list(reversed(POOL)), 10, seed=3)  # order-free
    assert len(a) == len(set(a)) == 10 and set(a) <= set(POOL)
    assert few_shot_ids(POOL, 5, seed=3) == a[:5]
    assert few_shot_ids(POOL, 1, seed=3) == a[:1]
    assert set(few_shot_ids(POOL, 50, seed=3)[:10]) == set(a)
    assert sorted(few_shot_ids(POOL, 100, seed=3)) == POOL


def test_few_shot_ids_differ_by_seed():
    subsets = {tuple(few_shot_ids(POOL, 10, seed=s)) for s in range(5)}
    assert len(subsets) == 5


def test_few_shot_ids_budget_errors():
    with pytest.raises(ValueError, match=r"label budget 101 is larger than the pool \(100 labelled images\)"):
        few_shot_ids(POOL, 101, seed=0)
    with pytest.raises(ValueError, match="label budget must be at least 1, got 0"):
        few_shot_ids(POOL, 0, seed=0)
    # duplicates in the pool count once
    with pytest.raises(ValueError, match=r"larger than the pool \(2 labelled images\)"):
        few_shot_ids(["a", "b", "a"], 3, seed=0)


def test_few_shot_pairs_on_ph2(data):
    spec = load_dataset_spec("ph2")
    pairs = load_pairs(spec)
    pool = {p["id"] for p in pairs if p["split"] == "pool"}
    test = {p["id"] for p in pairs if p["split"] == "test"}
    five = few_shot_pairs(spec, 5, seed=0)
    ten = few_shot_pairs(spec, 10, seed=0)
    assert [p["id"] for p in five] == [p["id"] for p in ten][:5]
    assert few_shot_pairs(spec, 10, seed=0) == ten
    assert [p["id"] for p in few_shot_pairs(spec, 10, seed=1)] != [p["id"] for p in ten]
    for seed in range(3):
        for budget in (1, 5, 20, 100):
            ids = {p["id"] for p in few_shot_pairs(spec, budget, seed)}
            assert len(ids) == budget and ids <= pool and not ids & test
    assert all(p["split"] == "pool" for p in ten)
    everything = few_shot_pairs(spec, None, seed=0)
    assert {p["id"] for p in everything} == pool and len(everything) == 100
    with pytest.raises(ValueError, match=r"label budget 101 is larger than the pool \(100 labelled images\)"):
        few_shot_pairs(spec, 101, seed=0)


def test_few_shot_pairs_needs_a_pool(tiny_dataset, tiny_spec):
    assert [p["id"] for p in few_shot_pairs(tiny_spec, 2, seed=0)] in (["IMD003", "IMD004"], ["IMD004", "IMD003"])
    with pytest.raises(ValueError, match=r"label budget 3 is larger than the pool \(2 labelled images\)"):
        few_shot_pairs(tiny_spec, 3, seed=0)
    with pytest.raises(ValueError, match="has no 'labelled' split"):
        few_shot_pairs(tiny_spec, 1, seed=0, pool_split="labelled")


def test_few_shot_pairs_of_chosen_ids_keep_their_order_and_stay_in_the_pool(tiny_spec):
    pairs = few_shot_pairs(tiny_spec, None, 0, ids=["IMD004", "IMD003"])
    assert [p["id"] for p in pairs] == ["IMD004", "IMD003"]  # an active-learning order, not the seeded draw
    with pytest.raises(ValueError, match=r"\['IMD002'\] are not in the 'pool' split"):
        few_shot_pairs(tiny_spec, None, 0, ids=["IMD003", "IMD002"])  # IMD002 is a test image


def test_required_splits_relax_the_pool_and_test_rule(tiny_dataset, tiny_overrides):
    (tiny_dataset / "split.json").write_text(json.dumps({"pool": ["IMD003", "IMD004"]}))
    spec = load_dataset_spec(tiny_dataset, tiny_overrides)
    assert any("no 'test' split" in str(p) for p in discover_pairs(spec)[1])
    relaxed = load_dataset_spec(tiny_dataset, [*tiny_overrides, "required_splits=[pool]"])
    assert discover_pairs(relaxed)[1] == [] and "required_splits" in relaxed.model_dump()
    assert "required_splits" not in spec.model_dump()  # unset: absent from dumps, so config hashes do not change


def test_csv_datalist_with_a_split_column_needs_no_split_file(data, tmp_path, capsys):
    """A new user's folder: pairs.csv (image, mask, split) and a five-line dataset YAML that leaves ``split`` at its
    default: the CSV's column is the split, and the missing split.json is no problem."""
    from medhybrid.data.check import check_dataset

    split = json.loads((PH2 / "split.json").read_text())
    rows = [(i, "pool") for i in split["pool"][:3]] + [(i, "test") for i in split["test"][:2]]
    (tmp_path / "pairs.csv").write_text("image,mask,split\n" + "".join(
        f"{PH2 / 'images' / f'{i}.png'},{PH2 / 'masks' / f'{i}_lesion.png'},{s}\n" for i, s in rows))
    yml = tmp_path / "clinic.yaml"
    yml.write_text("name: clinic\nrole: target\nroot: .\ndatalist: pairs.csv\nchannels: 3\n")
    spec = load_dataset_spec(yml)
    assert spec.split == "split.json"
    report = check_dataset(spec)
    assert report.ok, report.problems
    assert dict(report.splits) == {"pool": 3, "test": 2}
    assert [p["id"] for p in few_shot_pairs(spec, 2, seed=0)] == few_shot_ids(split["pool"][:3], 2, 0)
    # a split file that is there still decides, and one that lists an unknown id is still a problem
    (tmp_path / "split.json").write_text(json.dumps({"pool": ["nope"]}))
    assert any("lists 'nope'" in m for m in _messages(discover_pairs(spec)[1]))
