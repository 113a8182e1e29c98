"""Frozen-backbone evaluation: the protocols that judge a pre-training.

- ``features``: feature extraction in eval mode (BatchNorm frozen), batched, cached; ``ProbePreprocessing``
  is the image recipe that probe checkpoints record for export.
- ``knn``: weighted cosine kNN (k=20/T=0.07 and k=200/T=0.1).
- ``linear_probe``: logistic regression on frozen pooled features, weight decay chosen on held-out data.
- ``nonlinear_probe``: the QB-Heat paper's probe, one transformer block before the linear classifier.
- ``detection``: the light detector head on frozen multi-scale features, COCO mAP via pycocotools.
- ``sources``: backbones (checkpoint or random init), labelled images, and the probe checkpoints
  that ``qbheat-export export --checkpoint`` ships.

Hyper-parameters are always chosen on a held-out part of the training data; test data is scored once.
"""
