"""MONAI Label app serving the medhybrid bundle to clinicians (``monailabel start_server --app medhybrid/label``).

- :mod:`medhybrid.label.workspace`: what the app does, free of MONAI Label (importable and tested in the main
  environment): the served model and its reloading, segmentation of one study into a mask file of the input's
  size and orientation, fine-tuning from the clinician's saved labels, uncertainty ranking of unlabelled studies.
- :mod:`medhybrid.label.tasks`: MONAI Label's infer task, train task and next-sample strategies over it.
- ``main.py``: the app MONAI Label loads. It needs the ``.venv-label`` environment (``scripts/setup_label.sh``):
  MONAI Label 0.8.5 pins pydicom<3 and needs torchvision, which medhybrid's main environment does not have.
"""
