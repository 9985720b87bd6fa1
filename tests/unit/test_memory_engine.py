"""MemoryEngine's own surface: fault injection, the call log and test helpers.

Docker semantics are pinned by tests/contract against both engines; this file
covers what only the fake has, which other tests rely on to stage races.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from actors.clock import FakeClock
from actors.engine.base import (
    ContainerMissing,
    ContainerSpec,
    Engine,
    EngineError,
    EngineEvent,
    EngineUnavailable,
    ImageConfig,
    ImageMissing,
)
from actors.engine.memory import MemoryContainer, MemoryEngine
from actors.labels import LABEL_ROLE

BASE = "base:latest"


def runs_forever(_: MemoryContainer) -> int | None:
    return None


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def mem(clock: FakeClock) -> MemoryEngine:
    engine = MemoryEngine(clock=clock, exit_policy=lambda _: 0)
    engine.add_image(BASE, labels={LABEL_ROLE: "base"}, env=["PATH=/bin"])
    return engine


def spec(image: str = BASE, **labels: str) -> ContainerSpec:
    return ContainerSpec(image=image, labels=labels)


def test_it_is_an_engine(mem: MemoryEngine) -> None:
    assert isinstance(mem, Engine)


# --- fail_next -------------------------------------------------------------------


def test_fail_next_fails_that_many_calls_then_recovers(mem: MemoryEngine) -> None:
    mem.fail_next("create_container", times=2)
    for _ in range(2):
        with pytest.raises(EngineUnavailable, match="injected"):
            mem.create_container(spec())
    container_id = mem.create_container(spec())
    assert mem.inspect_container(container_id).status == "created"


def test_fail_next_raises_the_given_error_only_on_that_method(mem: MemoryEngine) -> None:
    mem.fail_next("start_container", error=EngineError("boom", status_code=500))
    container_id = mem.create_container(spec())
    with pytest.raises(EngineError, match="boom") as caught:
        mem.start_container(container_id)
    assert caught.value.status_code == 500
    mem.start_container(container_id)
    assert mem.inspect_container(container_id).status == "exited"


def test_fault_on_an_unknown_method_is_a_test_bug(mem: MemoryEngine) -> None:
    with pytest.raises(ValueError, match="not an Engine method"):
        mem.fail_next("create")


# --- before ----------------------------------------------------------------------


def test_before_deletes_an_image_between_lookup_and_create(mem: MemoryEngine) -> None:
    mem.before("create_container", lambda: mem.delete_image_behind_back(BASE))
    image_id = mem.inspect_image(BASE).id
    with pytest.raises(ImageMissing) as caught:
        mem.create_container(spec(image_id))
    assert caught.value.image == image_id
    assert mem.list_images({}) == []


def test_before_runs_once_unless_told_otherwise(mem: MemoryEngine) -> None:
    once: list[str] = []
    always: list[str] = []
    mem.before("ping", lambda: once.append("x"))
    mem.before("ping", lambda: always.append("x"), once=False)
    for _ in range(3):
        mem.ping()
    assert once == ["x"]
    assert always == ["x", "x", "x"]


def test_before_commit_returns_sees_the_image_deleted(mem: MemoryEngine) -> None:
    container_id = mem.create_container(spec())
    mem.start_container(container_id)
    image_id = mem.commit_container(container_id, "snap", "1", ImageConfig())
    mem.before("inspect_image", lambda: mem.delete_image_behind_back(image_id))
    with pytest.raises(ImageMissing):
        mem.inspect_image(image_id)


# --- set_unavailable -------------------------------------------------------------


def test_unavailable_engine_fails_every_call_until_it_is_back(mem: MemoryEngine) -> None:
    mem.set_unavailable(True)
    with pytest.raises(EngineUnavailable):
        mem.ping()
    with pytest.raises(EngineUnavailable):
        mem.list_images({})
    with pytest.raises(EngineUnavailable):
        mem.create_container(spec())
    mem.set_unavailable(False)
    mem.ping()
    assert [i.tags for i in mem.list_images({})] == [(BASE,)]


def test_going_down_ends_open_streams_and_waits_with_engine_unavailable(
    mem: MemoryEngine,
) -> None:
    mem.exit_policy = runs_forever
    container_id = mem.create_container(spec())
    mem.start_container(container_id)
    stream = mem.events()
    errors: list[BaseException] = []
    waiting = threading.Event()

    def wait() -> None:
        waiting.set()
        try:
            mem.wait_container(container_id, timeout_s=30)
        except EngineUnavailable as exc:
            errors.append(exc)

    waiter = threading.Thread(target=wait)
    waiter.start()
    waiting.wait(5)
    # The waiter may not be inside the wait yet; it fails on entry then, which is the same.
    mem.set_unavailable(True)
    with pytest.raises(EngineUnavailable):
        list(stream)
    waiter.join(5)
    assert not waiter.is_alive()
    assert len(errors) == 1


# --- delay and the call log ------------------------------------------------------


def test_delay_sleeps_on_the_clock_before_the_call(mem: MemoryEngine, clock: FakeClock) -> None:
    mem.delay("create_container", 2.5)
    mem.create_container(spec())
    mem.create_container(spec())
    assert clock.slept == [2.5, 2.5]
    mem.delay("create_container", 0)
    mem.create_container(spec())
    assert clock.slept == [2.5, 2.5]


def test_calls_records_every_engine_call_in_order(mem: MemoryEngine) -> None:
    mem.calls.clear()
    container_id = mem.create_container(spec(job="j1"))
    mem.start_container(container_id)
    mem.wait_container(container_id, timeout_s=1)
    mem.delete_image_behind_back(BASE)  # a test action, not an engine call
    assert [name for name, _ in mem.calls] == [
        "create_container",
        "start_container",
        "wait_container",
    ]
    assert mem.calls_of("start_container") == [(container_id,)]
    (created,) = mem.calls_of("create_container")
    assert isinstance(created[0], ContainerSpec)
    assert created[0].labels == {"job": "j1"}


def test_failed_calls_are_recorded_too(mem: MemoryEngine) -> None:
    mem.fail_next("ping")
    with pytest.raises(EngineUnavailable):
        mem.ping()
    assert mem.calls_of("ping") == [()]


# --- driving containers ----------------------------------------------------------


def test_a_running_container_exits_when_the_test_says(mem: MemoryEngine) -> None:
    mem.exit_policy = runs_forever
    container_id = mem.create_container(spec())
    mem.start_container(container_id)
    assert mem.inspect_container(container_id).status == "running"
    stream = mem.events()
    result: list[int] = []
    waiter = threading.Thread(target=lambda: result.append(mem.wait_container(container_id, 30)))
    waiter.start()
    assert mem.exit_container(container_id, 137, oom=True)
    waiter.join(5)
    assert result == [137]
    assert mem.inspect_container(container_id).oom_killed
    assert not mem.exit_container(container_id, 0)  # already exited
    stream.close()
    assert [(e.kind, e.exit_code) for e in stream] == [
        ("container_oom", None),
        ("container_exited", 137),
    ]


def test_stop_of_a_sigterm_ignoring_container_waits_the_grace_then_kills(
    mem: MemoryEngine, clock: FakeClock
) -> None:
    mem.exit_policy = runs_forever
    container_id = mem.create_container(spec())
    mem.start_container(container_id)
    mem.ignore_sigterm(container_id)
    mem.stop_container(container_id, grace_s=7)
    assert clock.slept == [7]
    assert mem.wait_container(container_id, timeout_s=1) == 137


def test_auto_remove_container_is_gone_after_exit(mem: MemoryEngine) -> None:
    container_id = mem.create_container(ContainerSpec(image=BASE, auto_remove=True))
    stream = mem.events()
    mem.start_container(container_id)
    # As on Docker, a wait that starts after the removal finds nothing to wait on.
    with pytest.raises(ContainerMissing):
        mem.wait_container(container_id, timeout_s=1)
    assert mem.list_containers({}) == []
    stream.close()
    assert [(e.kind, e.exit_code) for e in stream] == [("container_exited", 0)]


def test_files_and_logs_helpers(mem: MemoryEngine) -> None:
    container_id = mem.create_container(spec())
    mem.write_file(container_id, "/workspace/.marker", "yes")
    mem.append_logs(container_id, stdout="a\nb\n", stderr="c\n")
    image_id = mem.commit_container(container_id, "snap", "x", ImageConfig())
    assert mem.image_files(image_id) == {"/workspace/.marker": "yes"}
    assert mem.image_parent(image_id) == mem.inspect_image(BASE).id
    assert mem.container_logs(container_id, tail=2).text == "b\nc\n"
    mem.print_output(container_id, ("stderr", "d\n"), ("stdout", "e\n"))
    assert mem.container_logs(container_id, tail=3).lines() == ["c", "d", "e"]


def test_events_since_replays_and_close_from_another_thread_ends_iteration(
    mem: MemoryEngine, clock: FakeClock
) -> None:
    container_id = mem.create_container(spec())
    mem.start_container(container_id)
    replay = mem.events(since=clock.now())
    got: list[EngineEvent] = []
    first = threading.Event()

    def pump() -> None:
        for event in replay:
            got.append(event)
            first.set()

    reader = threading.Thread(target=pump)
    reader.start()
    assert first.wait(5)
    replay.close()
    reader.join(5)
    assert not reader.is_alive()
    assert [(e.kind, e.id, e.exit_code) for e in got] == [("container_exited", container_id, 0)]


def test_many_threads_can_share_one_engine(mem: MemoryEngine) -> None:
    def one_job(index: int) -> int:
        container_id = mem.create_container(spec(job=str(index)))
        mem.start_container(container_id)
        code = mem.wait_container(container_id, timeout_s=5)
        mem.commit_container(container_id, "snap", f"t{index}", ImageConfig())
        mem.remove_container(container_id)
        return code

    with ThreadPoolExecutor(max_workers=16) as pool:
        codes = list(pool.map(one_job, range(200)))
    assert codes == [0] * 200
    assert mem.list_containers({}) == []
    assert len(mem.list_images({})) == 201


# --- the read API: state without a recorded call ----------------------------------


def test_the_read_api_shows_state_and_records_no_call(mem: MemoryEngine) -> None:
    """Kits read the engine through these, never through its private fields."""
    cid = mem.create_container(spec())
    snapshot = mem.commit_container(cid, "snap", "one", ImageConfig())
    before = len(mem.calls)
    assert [c.id for c in mem.containers()] == [cid]
    assert mem.image("snap:one").id == snapshot
    assert [i.id for i in mem.images()] == [mem.image(BASE).id, snapshot]
    assert mem.has_children(mem.image(BASE).id)
    assert not mem.has_children(snapshot)
    with pytest.raises(ImageMissing):
        mem.image("nothing:here")
    with mem.lock:  # re-entrant: a kit may hold it across an engine call
        mem.remove_container(cid)
    assert mem.containers() == []
    assert len(mem.calls) == before + 1
