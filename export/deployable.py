"""``DeployableModel``: a frozen backbone and a qbheat head as one module with named outputs, what export converts.

A head's task (``head.task``: classifier, features, detector) offers output variants (``VARIANTS``);
``check_variant`` is the one place that validates a variant, for the recipe, the pipeline and the module.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from qbheat.errors import QBHeatError
from qbheat.heads import head_inputs


VARIANTS = {
    "classifier": {"logits": ("logits",), "probabilities": ("probabilities",)},
    "features": {"embedding": ("embedding",)},
    "detector": {"decode": ("boxes", "scores"), "nms": ("boxes", "scores", "labels", "num_detections")},
}


def check_variant(task: str, variant: str | None) -> str:
    """``variant`` (default: the task's first) if a ``task`` head has it; else a QBHeatError naming the choices."""
    variant = variant or next(iter(VARIANTS[task]))
    if variant not in VARIANTS[task]:
        raise QBHeatError(f"a {task} head has the variants {', '.join(VARIANTS[task])}, not {variant!r}.")
    return variant


class DeployableModel(nn.Module):
    """Frozen backbone + head with named outputs: the module that export converts.

    Input: a normalised image batch B×3×H×W (mean/std applied). Outputs (a tuple, names in
    ``output_names``) by head task and ``variant``:

        classifier  "logits"        logits B×K
                    "probabilities" softmax(logits) B×K (what Core ML's ClassifierConfig expects)
        features    "embedding"     embedding B×D
        detector    "decode"        boxes B×N×4 (xyxy input pixels), scores B×N×K (every point, every class)
                    "nms"           boxes B×D×4, scores B×D, labels B×D (int64, −1 = padding), num_detections B
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, variant: str | None = None):
        super().__init__()
        task = getattr(head, "task", None)
        if task not in VARIANTS:
            raise QBHeatError(f"{type(head).__name__} is not a qbheat head (task {task!r}).")
        variant = check_variant(task, variant)
        self.backbone, self.head, self.task, self.variant = backbone, head, task, variant
        self.output_names = VARIANTS[task][variant]
        self.strides = tuple(getattr(head, "strides", (8, 16, 32)))
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "DeployableModel":
        # Frozen by construction: BatchNorm statistics and dropout never switch to training here.
        return super().train(False)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = image  # B×3×H×W, normalised; the argument's name is the exported input's name
        feats = head_inputs(self.backbone, x, self.head.consumes, self.strides)
        if self.task == "classifier":
            logits = self.head(feats)
            return (logits.softmax(dim=-1),) if self.variant == "probabilities" else (logits,)
        if self.task == "features":
            return (self.head(feats),)
        height, width = x.shape[-2], x.shape[-1]
        raw = self.head(feats)
        boxes, scores = self.head.decode(raw, height, width)
        if self.variant == "decode":
            return boxes, scores
        return self.head.nms(boxes, scores, height, width)
