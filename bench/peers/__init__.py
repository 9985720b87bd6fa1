"""The peers Snapyard is measured against, side by side in one run.

``raw``: plain docker-py, no Snapyard code: the physical limit at a given
concurrency. ``naive``: the ~60-line script users write instead of Snapyard.
bench/ is not actors/: only these peers import docker directly, so what they
measure owes nothing to Snapyard's engine layer.
"""
