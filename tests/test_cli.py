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


def test_shipped_ablation_profiles():
    """quick: the decision-relevant methods (the semi-supervised one that won on the development sets its reference),
    >= 3 seeds, budgets 1-10; standard: 5x its pretraining, 5 seeds (10 at 1 and 2 labels) and the whole pool, quick's
    methods with diffusion (the generative-pretext question), both hybrid-target forms and nnU-Net; semi: every
    semi-supervised method beside its start; compare: every method; pretrain-500 sits between quick and standard on the
    length curve; full: nnU-Net's default trainer, the CPU profiles a shortened one."""
    from medhybrid.experiments.ablation import load_ablation
    from medhybrid.experiments.report import pretraining_iterations

    for config in ("dermoscopy", "chest_xray"):
        quick, standard = load_ablation(config, "quick", []), load_ablation(config, "standard", [])
        compare, mid = load_ablation(config, "compare", []), load_ablation(config, "pretrain-500", [])
        semi = load_ablation(config, "semi", [])
        assert len(quick.seeds) >= 3 and quick.budgets == [1, 2, 5, 10]
        assert {"scratch", "supervised", "hybrid"} <= set(quick.methods) and quick.reference in quick.methods
        assert quick.methods[quick.reference].semi_supervised and quick.methods[quick.reference].pretrain == "supervised"
        assert {m for m, s in compare.methods.items() if s.semi_supervised} == {m for m, s in semi.methods.items() if s.semi_supervised}
        assert set(quick.methods) <= set(semi.methods) and semi.budgets == quick.budgets
        assert standard.seeds == [0, 1, 2, 3, 4] and standard.budgets == [1, 2, 5, 10, 20, None]
        assert pretraining_iterations(standard) >= 5 * pretraining_iterations(quick)
        assert pretraining_iterations(quick) < pretraining_iterations(mid) < pretraining_iterations(standard)
        assert set(standard.methods) == set(quick.methods) | {"diffusion", "hybrid-target", "hybrid-target-beside", "nnunet",
                                                                       "supervised-wise", "hybrid-wise", "supervised-adapt",
                                                                       "hybrid-adapt"}
        assert set(standard.methods) < set(compare.methods) and set(quick.methods) < set(compare.methods)
        assert [len(standard.seeds_for(b)) for b in standard.budgets] == [10, 10, 5, 5, 5, 5]
        assert standard.nnunet["trainer"] == "nnUNetTrainer_1epoch"
        assert load_ablation(config, "full", []).nnunet["trainer"] == "nnUNetTrainer"
        assert standard.finetune == quick.finetune  # only the pretraining length differs
        assert compare.methods["supervised-fixmatch"] == quick.methods["supervised-fixmatch"]


def test_profiles_extend_and_select_methods(tmp_path):
    from medhybrid.core.config import ConfigError
    from medhybrid.experiments.ablation import load_ablation

    path = tmp_path / "abl.yaml"
    path.write_text("source: isic2018\ntarget: ph2\nmethods:\n  a: {pretrain: none}\n  b: {pretrain: supervised}\n"
                    "  c: {pretrain: hybrid}\nreference: c\nprofiles:\n"
                    "  base: {seeds: [0, 1, 2], budgets: [1, 2], pretrain: {train: {epochs: 2, lr: 0.1}}}\n"
                    "  small: {extends: base, methods: [a, c], pretrain: {train: {epochs: 7}}}\n"
                    "  typo: {extends: base, methods: [a, d]}\n  loop1: {extends: loop2}\n  loop2: {extends: loop1}\n")
    cfg = load_ablation(str(path), "small", [])
    assert list(cfg.methods) == ["a", "c"] and cfg.seeds == [0, 1, 2] and cfg.pretrain["train"] == {"epochs": 7, "lr": 0.1}
    assert list(load_ablation(str(path), "small", ["methods=[b]", "reference=b"]).methods) == ["b"]
    assert list(load_ablation(str(path), "base", []).methods) == ["a", "b", "c"]
    with pytest.raises(ConfigError, match=r"methods \['d'\] are not defined"):
        load_ablation(str(path), "typo", [])
    with pytest.raises(ConfigError, match="loop"):
        load_ablation(str(path), "loop1", [])
    with pytest.raises(ConfigError, match="no profile 'nope'"):
        load_ablation(str(path), "nope", [])


def test_a_full_disk_is_one_line(capsys, isic_tiny, workdir, mlflow_uri, monkeypatch):
    """No traceback reaches the user: a checkpoint write that finds the disk full is one ``error:`` line (exit 2)."""
    import errno

    import torch
    from conftest import TINY_NET, TINY_TRAIN

    real_save = torch.save
    writes = []

    def save(obj, f, *a, **kw):
        writes.append(f)
        if len(writes) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", save)
    out = workdir / "pre"
    conf = workdir / "pretrain.yaml"
    conf.write_text(f"dataset: {isic_tiny}\nmode: supervised\n")
    code = main(["pretrain", "--config", str(conf), f"output_dir={out}", f"mlflow.tracking_uri={mlflow_uri}",
                 *TINY_NET, *TINY_TRAIN, "train.checkpoint_every=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"error: no space left on device writing checkpoint {out / 'checkpoints'}/pretrain_checkpoint_8.pt; "
                                 "the previous checkpoint is intact: free some space and run the same command to resume"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["pretrain_checkpoint_4.pt"]
