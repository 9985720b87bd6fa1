"""A job's env arrives byte for byte, the whole way: submit -> store -> Spawner ->
secret file -> the env helper (actors/helper/snapyard-init) -> the job's process.

The engine contract suite pins the file format and the helper's reader on
both engines; this drives a real Snapyard on the real engine, so the store's
round trip and a start from a snapshot (run under the helper too) are covered. Every job prints ``sha256sum`` of each value's bytes.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator

import pytest
from app_kit import real_app
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from actors.app import Snapyard
from actors.engine.docker import DockerEngine
from actors.model import MAX_ENV_VALUE_BYTES, JobState, validate_spec

pytestmark = pytest.mark.docker

JOB_S = 60.0

ANY_VALUE = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=40)
TRICKY_VALUE = st.text(st.sampled_from(list("=\"' \n\r\t\\-$`;|éß€😀x")), max_size=16)
ENV = st.dictionaries(
    st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,15}", fullmatch=True).filter(
        lambda name: (
            not name.startswith("SNAPYARD_")
            # The job's own shell needs these to find and run sha256sum.
            and name not in {"PATH", "IFS", "ENV", "PS4", "HOME", "SHELL"}
        )
    ),
    st.one_of(ANY_VALUE, TRICKY_VALUE),
    min_size=1,
    max_size=5,
)


def digests_command(names: list[str]) -> list[str]:
    return ["sh", "-c", "; ".join(f'printf %s "${name}" | sha256sum' for name in names)]


@pytest.fixture
def app(
    docker_engine: DockerEngine, base_image: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Snapyard]:
    data_dir = tmp_path_factory.mktemp("env")
    with real_app(docker_engine, base_image, data_dir, "env") as app:
        yield app


def run_and_digest(app: Snapyard, env: dict[str, str]) -> tuple[list[str], bool]:
    """The digests the job printed, and whether it started from a snapshot."""
    names = list(env)
    spec = validate_spec("env-prop", "item", command=digests_command(names), env=env)
    job = app.wait(app.submit(spec).id, JOB_S)
    assert job.state is JobState.SUCCEEDED, job
    lines = job.logs_tail.splitlines()
    return [line.split()[0] for line in lines if line.endswith("  -")], job.from_snapshot


def test_the_values_that_arrived_truncated_arrive_whole(app: Snapyard) -> None:
    """Regression: ``hello`` arrived as ``hel``, ``x=y=z`` as ``x=y``."""
    values = ["hello", "hello world", "s3cr3t-0123456789", "x=y=z", "abc", "abcd", "abcdef"]
    env = {f"V{index}": value for index, value in enumerate(values)}
    got, _ = run_and_digest(app, env)
    assert got == [hashlib.sha256(v.encode()).hexdigest() for v in values]


def test_any_env_reaches_the_job_byte_for_byte(app: Snapyard) -> None:
    # One app for every example: actors are stopped after each test, not each example.
    seen_snapshot: list[bool] = []

    @settings(
        max_examples=15,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @example(env={"BIG": "x" * MAX_ENV_VALUE_BYTES, "NL": "a\nb\n\n", "DASH": "-n"})
    @given(env=ENV)
    def delivered(env: dict[str, str]) -> None:
        got, from_snapshot = run_and_digest(app, env)
        seen_snapshot.append(from_snapshot)
        assert got == [hashlib.sha256(v.encode()).hexdigest() for v in env.values()]

    delivered()
    # Later jobs of the key start from a snapshot, run under the helper too.
    assert any(seen_snapshot)


def test_a_job_that_prints_its_secret_shows_it_masked(app: Snapyard) -> None:
    """What `snapyard job ID --logs` serves comes from the store: masked there."""
    token = "tok-" + uuid.uuid4().hex
    spec = validate_spec(
        "env-prop",
        "mask",
        command=["sh", "-c", 'echo "token=$TOKEN"; echo "again $TOKEN" >&2'],
        env={"TOKEN": token},
    )
    job = app.wait(app.submit(spec).id, JOB_S)
    assert job.state is JobState.SUCCEEDED, job
    # Two pipes written in the same instant: the daemon logs them in either order.
    assert {"token=***", "again ***"} <= set(job.logs_tail.splitlines())
    stored = app.get(job.id)
    assert stored is not None
    assert token not in stored.logs_tail
