"""deploy_targets: device profiles, one runner per runtime, the benchmark protocol, bundles, reports.

Layout (see ARCHITECTURE.md, stage 3):

* ``profiles.py`` + ``profiles/*.toml`` — device profiles; ``runners/`` — one runner per runtime;
* ``protocol.py`` (timing and statistics), ``fingerprint.py``, ``postprocess.py``, ``harness.py``,
  ``results.py`` — the device-side modules: they import only the standard library, numpy, the
  runtime, ``qbheat_contract`` (and Pillow for end-to-end timing), so ``bundle.py`` copies them,
  with ``qbheat_contract``, into device bundles;
* ``flops.py``, ``bundle.py``, ``snippets.py``, ``transport.py``, ``report.py``, ``commands/`` — host side.

This package reads export's ``model_card.json`` through ``qbheat_contract.card`` and never imports
export, qbheat or torch (a test checks ``sys.modules``): errors, artifact hashes, preprocessing and
parity tolerances all come from ``qbheat_contract``, the same code on the host and in a bundle.
"""
