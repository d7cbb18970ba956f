"""medhybrid.cli: ``medhybrid data check``."""

from __future__ import annotations

import shutil

import pytest

from medhybrid.cli import main


def test_data_check_shipped_dataset(capsys, data):
    assert main(["data", "check", "ph2", "--split", "pool"]) == 0
    out = capsys.readouterr().out
    assert "dataset ph2: 100 pairs" in out and "splits: pool 100" in out and "no problems found" in out


def test_data_check_folder_with_overrides(capsys, tiny_dataset, tiny_overrides):
    argv = ["data", "check", str(tiny_dataset), "--workers", "1"]
    for o in tiny_overrides:
        argv += ["--set", o]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "dataset ph2tiny: 4 pairs" in out and "no problems found" in out


def test_data_check_reports_problem_and_exits_1(capsys, broken_dataset, tiny_overrides):
    root, name, problem = broken_dataset
    argv = ["data", "check", str(root)]
    for o in tiny_overrides:
        argv += ["--set", o]
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "PROBLEMS" in out
    assert any(name in line and problem in line for line in out.splitlines()), out


def test_data_check_several_datasets_one_bad(capsys, tiny_dataset, tiny_overrides, data):
    (tiny_dataset / "masks" / "IMD002_lesion.png").unlink()
    argv = ["data", "check", str(tiny_dataset), str(data / "dermoscopy" / "ph2"), "--split", "test"]
    for o in tiny_overrides:
        argv += ["--set", o]
    assert main(argv) == 1  # one bad dataset fails the whole check, but both are reported
    out = capsys.readouterr().out
    assert "dataset ph2tiny: 2 pairs" in out and "dataset ph2: 100 pairs" in out


def test_data_check_config_errors_exit_2(capsys, tiny_dataset, data):
    assert main(["data", "check", "no_such_dataset"]) == 2
    assert "error: unknown data config 'no_such_dataset'" in capsys.readouterr().err
    # grey and RGB files in one folder: medhybrid asks which the model should see
    shutil.copy(data / "chest_xray" / "openist" / "images" / "1-10.jpg", tiny_dataset / "images" / "grey.jpg")
    assert main(["data", "check", str(tiny_dataset)]) == 2
    err = capsys.readouterr().err
    assert str(tiny_dataset) in err and "disagree on grey or RGB" in err and "grey.jpg" in err
    assert main(["data", "check", "ph2", "--set", "chanels=3"]) == 2
    assert "chanels: unknown key" in capsys.readouterr().err


def test_data_check_usage_errors(capsys):
    with pytest.raises(SystemExit) as info:
        main(["data"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["data", "check"])
    assert info.value.code == 2
    assert "dataset" in capsys.readouterr().err
