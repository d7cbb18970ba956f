"""What annotators' viewers do against a MONAI Label server, through MONAI Label's own Python client
(``monailabel.client.MONAILabelClient``). Run with the MONAI Label environment's Python by ``tests/test_label.py``:

    python tests/label_client.py PLAN.json RESULT.json

PLAN: ``server``, ``workdir``, ``derm`` and ``chest`` (model names), ``png`` (PNG study ids), ``dicom``
(``{study id: model}``), ``labels`` (``{study id: label file}``), ``train`` (request settings over the train task's
config). RESULT: what the server answered, and the result files it sent (copied into ``workdir``).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from monailabel.client import MONAILabelClient


def infer(client: MONAILabelClient, model: str, study: str, out: Path) -> dict:
    path, params = client.infer(model, study, {})
    out.parent.mkdir(parents=True, exist_ok=True)
    dst = out.with_suffix(Path(path).suffix if not path.endswith(".nii.gz") else ".nii.gz")
    shutil.copy(path, dst)
    return {"file": str(dst), "params": params}


def main(plan_file: str, result_file: str) -> None:
    plan = json.loads(Path(plan_file).read_text())
    work = Path(plan["workdir"])
    ann1 = MONAILabelClient(plan["server"], tmpdir=str(work / "ann1"), client_id="ann1")
    ann2 = MONAILabelClient(plan["server"], tmpdir=str(work / "ann2"), client_id="ann2")
    result: dict = {"info": ann1.info()}

    # two annotators ask for their next study with each strategy
    result["next"] = {s: [ann1.next_sample(s, {}).get("id"), ann2.next_sample(s, {}).get("id")]
                      for s in ("random", "first", "uncertainty")}
    result["before"] = {sid: infer(ann1, plan["derm"], sid, work / "before" / sid) for sid in plan["png"]}
    result["dicom"] = {sid: infer(ann1, model, sid, work / "dicom" / sid) for sid, model in plan["dicom"].items()}

    # the annotator saves labels for the PNG studies
    result["saved"] = {sid: ann1.save_label(sid, label, tag="final") for sid, label in plan["labels"].items()}
    result["next_after_labels"] = [ann1.next_sample("first", {}).get("id"), ann2.next_sample("first", {}).get("id")]

    # training with the settings the train task offers (as a viewer's UI sends them back), then inference again
    params = {**result["info"]["trainers"][plan["derm"]]["config"], **plan["train"]}
    result["train_request"] = params
    ann1.train_start(plan["derm"], params)
    deadline = time.time() + 900
    while True:
        status = ann1.train_status()
        if status.get("status") not in ("SUBMITTED", "RUNNING") or time.time() > deadline:
            break
        time.sleep(2)
    result["train_status"] = status
    result["after"] = {sid: infer(ann1, plan["derm"], sid, work / "after" / sid) for sid in plan["png"]}
    Path(result_file).write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
