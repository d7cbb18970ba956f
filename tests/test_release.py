"""medhybrid.workflows.release: a bundle's pretrained and fine-tuned weights interpolated (WiSE-FT) into its own network."""

from __future__ import annotations

import pytest
import torch
from conftest import REPO_ROOT

from medhybrid.networks.checkpoints import interpolate_weights
from medhybrid.workflows.inference import bundle_segmenter

DERM = REPO_ROOT / "bundles" / "dermoscopy_lesion_segmentation"


def test_the_bundles_weights_interpolate_into_their_network():
    """alpha 0 and 1 load back the pretrained and the released weights exactly, into the bundle's own network."""
    net, _ = bundle_segmenter(DERM)
    pre = torch.load(DERM / "models" / "pretrained.pt", weights_only=True)
    ft = torch.load(DERM / "models" / "model.pt", weights_only=True)
    for alpha, want in ((0.0, pre), (1.0, ft)):
        net.load_state_dict(interpolate_weights(pre, ft, alpha), strict=True)
        assert all(torch.equal(v, want[k]) for k, v in net.state_dict().items())


def test_release_refuses_weights_that_are_already_mixed_in_one_line(tmp_path):
    """The shipped model.pt is itself a release (a WiSE-FT mix, its note says so): release refuses it before anything
    runs, in one line naming the file and what it holds; a file without a note is refused too."""
    import shutil

    import pytest

    from medhybrid.data.io import DataError
    from medhybrid.workflows.bundle import weights_note
    from medhybrid.workflows.release import ReleaseConfig, choose_alpha

    bundle = tmp_path / DERM.name
    shutil.copytree(DERM, bundle, ignore=shutil.ignore_patterns("eval", "runs"))
    assert weights_note(bundle / "models" / "model.pt")["holds"] == "mixed"
    cfg = ReleaseConfig(bundle=bundle, source="isic2018", target="ph2", output_dir=tmp_path / "out")
    with pytest.raises(DataError) as e:
        choose_alpha(cfg)
    msg = str(e.value)
    assert "\n" not in msg and "model.pt" in msg and "mixed" in msg and "--wise 1 --adapt False" in msg
    assert not (tmp_path / "out" / "release.json").exists()
    (bundle / "models" / "model.pt.json").unlink()
    with pytest.raises(DataError, match="has no note"):
        choose_alpha(cfg)


def test_a_training_with_wise_ft_notes_that_its_weights_are_mixed(tmp_path):
    """``save_weights`` after a trainer whose WiSE-FT handler interpolated writes the note ``mixed`` with its alpha;
    without one (or with alpha 1), ``trained``; the note carries the file's checksum."""
    from types import SimpleNamespace

    from medhybrid.engines.handlers import WiSEFT
    from medhybrid.workflows.bundle import save_weights, sha256, weights_note

    net, _ = bundle_segmenter(DERM)
    wise = WiSEFT(0.75)
    engine = SimpleNamespace(network=net)
    wise.keep_start(engine)
    with torch.no_grad():
        next(net.parameters()).add_(1.0)
    wise.interpolate(engine)
    save_weights(net, tmp_path / "mixed.pt", [object(), wise])
    note = weights_note(tmp_path / "mixed.pt")
    assert note["holds"] == "mixed" and note["wise"] == 0.75 and note["sha256"] == sha256(tmp_path / "mixed.pt")
    save_weights(net, tmp_path / "plain.pt", [WiSEFT(1.0)])
    assert weights_note(tmp_path / "plain.pt")["holds"] == "trained"


@pytest.mark.slow(seconds=60)
def test_choose_alpha_end_to_end_on_a_small_real_run(tmp_path):
    """``medhybrid release`` on a copy of the dermoscopy bundle whose ``model.pt`` is taken as plain fine-tuned weights
    (its note says ``trained``, as ``train.json --wise 1 --adapt False`` writes it), with 8 PH2 pool and 4 test images and
    4 ISIC validation images: the bundle's own train.json fine-tunes half the pool, every alpha is scored, the chosen
    one is what the criterion gives on the report's own numbers, and ``--write`` leaves the interpolation with that
    alpha in ``model.pt``, bit for bit, noted as a mix; a second release then refuses it."""
    import json
    import shutil

    from conftest import isic_yaml, ph2_yaml

    from medhybrid.data.io import DataError
    from medhybrid.workflows.bundle import sha256, weights_note
    from medhybrid.workflows.release import ReleaseConfig, choose_alpha

    bundle = tmp_path / DERM.name
    shutil.copytree(DERM, bundle, ignore=shutil.ignore_patterns("eval", "runs"))
    note = bundle / "models" / "model.pt.json"
    note.write_text(json.dumps({"holds": "trained", "by": "train.json", "sha256": sha256(bundle / "models" / "model.pt")}))
    pre = torch.load(bundle / "models" / "pretrained.pt", weights_only=True)
    released = torch.load(bundle / "models" / "model.pt", weights_only=True)
    cfg = ReleaseConfig(bundle=bundle, source=str(isic_yaml(tmp_path / "ds")), target=str(ph2_yaml(tmp_path / "ds")),
                        alphas=[0.0, 0.5, 1.0], output_dir=tmp_path / "out", write_bundle=True,
                        train_args=["--min_iterations", "4", "--max_iterations", "4"])
    report = choose_alpha(cfg)
    grid = report["grid"]
    assert [r["alpha"] for r in grid] == [0.0, 0.5, 1.0] and all(0 <= r["target_dev_dice"] <= 1 for r in grid)
    assert report["development"]["train_images"] == 4 and report["development"]["dev_images"] == 4
    top = max(r["target_dev_dice"] for r in grid)  # the criterion, computed here from the report's numbers
    want = max((r for r in grid if r["target_dev_dice"] >= top - cfg.tolerance), key=lambda r: (r["source_val_dice"], r["alpha"]))
    assert report["chosen_alpha"] == want["alpha"]
    written = torch.load(bundle / "models" / "model.pt", weights_only=True)
    expected = interpolate_weights(pre, released, want["alpha"])
    assert all(torch.equal(written[k], expected[k]) for k in expected)
    assert weights_note(bundle / "models" / "model.pt")["holds"] == "mixed"
    assert weights_note(bundle / "models" / "model.pt")["wise"] == want["alpha"]
    assert (tmp_path / "out" / "release.md").is_file()
    with pytest.raises(DataError, match="mixed"):
        choose_alpha(cfg)
