"""A shortened nnU-Net trainer for the tests: nnU-Net's own trainer, 40 iterations (its shortest shipped one,
nnUNetTrainer_1epoch, runs 250). Written as nnU-Net writes its variants (training_length/nnUNetTrainer_Xepochs.py):
its init arguments spelled out, which nnU-Net records for its checkpoints."""

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainer_40iterations(nnUNetTrainer):  # noqa: N801 (nnU-Net's naming)
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 1
        self.num_iterations_per_epoch = 40
        self.num_val_iterations_per_epoch = 2

