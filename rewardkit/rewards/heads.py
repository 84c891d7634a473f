"""Scoring heads shared by published reward models.

The LAION aesthetic predictor v2 and ImageReward end in the same head: five
linear layers with dropout between the first ones and no activations, as
published. Layer names (layers.0/2/4/6/7) match both checkpoints.
"""

from __future__ import annotations

import torch


class LinearStackHead(torch.nn.Module):
    def __init__(self, in_features: int = 768):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(in_features, 1024),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64),
            torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
