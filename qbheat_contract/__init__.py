"""The contract between qbheat's stages: facts that training, export, benchmarking and the device-side
bundle runner must agree on, kept once.

* ``errors``        — ``QBHeatError`` (a problem a user can cause, in one sentence) and the exit codes;
* ``hashing``       — an artifact's files and its content hash (one rule for single files, OpenVINO
                      ``.xml`` + ``.bin``, ONNX external data, TensorRT sidecars and ``.mlpackage`` folders);
* ``preprocessing`` — the ``preprocessing`` block (resize, interpolation, crop, mean/std) and its numpy/PIL
                      application;
* ``parity``        — the tolerance table and the comparison of two models' outputs;
* ``card``          — ``model_card.json``: schema, validation, reading and writing.

Standard library and numpy only (Pillow inside the functions that decode images), never torch:
``deploy_targets.bundle`` copies this package next to ``run_bundle.py``, where qbheat is not installed.
"""
from qbheat_contract.errors import QBHeatError

__all__ = ["QBHeatError"]
