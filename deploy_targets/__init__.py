"""deploy_targets: device profiles, one runner per runtime, the benchmark protocol, bundles, reports.

This package reads export's ``model_card.json`` (through ``export.manifest``) and never imports
torch at module level, so runners stay light.
"""
