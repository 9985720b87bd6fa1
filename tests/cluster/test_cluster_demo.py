"""``snapyard cluster-demo`` is a test too: a story that stops being true fails ``make test``."""

from __future__ import annotations

import io
import os
import re
import subprocess
from pathlib import Path

import pytest

from actors.cluster_demo import run_cluster_demo
from actors.engine.docker import DockerEngine
from actors.settings import load_settings

pytestmark = [pytest.mark.docker, pytest.mark.postgres, pytest.mark.slow]


def test_the_cluster_demo_tells_its_story_and_leaves_nothing(
    docker_engine: DockerEngine, base_image: str
) -> None:
    settings = load_settings(env=os.environ)
    out = io.StringIO()
    code = run_cluster_demo(settings, docker_engine, out)
    story = out.getvalue()
    assert code == 0, story
    for step in ("1. ", "2. ", "3. ", "4. ", "5. ", "6. "):
        assert f"\n{step}" in story, story
    assert "6 of 6 ran on the host holding their snapshot" in story
    assert "from the snapshot pulled from the registry" in story
    assert "cluster demo ok" in story
    # Everything it started is gone: the dirs the story names, and every
    # process (daemon, server, supervisor) that ran out of them.
    made = set(re.findall(r"/tmp/(?:sy|snapyard-pg|snapyard-registry)-[A-Za-z0-9_]+", story))
    assert len(made) == 5, story  # PostgreSQL, the registry, three dockerds
    assert not [path for path in made if Path(path).exists()]
    running = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True)
    assert not [line for line in running.stdout.splitlines() if any(p in line for p in made)]
