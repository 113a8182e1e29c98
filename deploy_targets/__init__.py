"""deploy_targets: device profiles, one runner per runtime, the benchmark protocol, bundles, reports.

Layout (see ARCHITECTURE.md, stage 3):

* ``profiles.py`` + ``profiles/*.toml`` — device profiles; ``runners/`` — one runner per runtime;
* ``protocol.py`` (timing and statistics), ``fingerprint.py``, ``preprocess.py``, ``harness.py``,
  ``results.py`` — the device-side modules: they import only the standard library, numpy, the
  runtime (and Pillow for end-to-end timing), so ``bundle.py`` copies them into device bundles;
* ``flops.py``, ``bundle.py``, ``snippets.py``, ``transport.py``, ``report.py``, ``commands/`` — host side.

This package reads export's ``model_card.json`` through ``export.manifest`` and never imports
export's conversion code or torch itself (on the host, ``qbheat.errors`` brings torch in through
qbheat's torchvision shim; inside a bundle ``_errors`` falls back to a local class).
"""
