"""BaseImages: which bases a snapshot may have grown from, decided only once all are known."""

from __future__ import annotations

from actors.lineage import BaseImages

A1, A2, B1 = "sha256:" + "a1" * 32, "sha256:" + "a2" * 32, "sha256:" + "b1" * 32


def test_nothing_is_old_until_every_configured_base_is_known() -> None:
    bases = BaseImages(["worker:a", "worker:b"])
    assert not bases.is_old(B1)
    bases.set("worker:a", A1)
    assert not bases.is_old(B1)  # worker:b's ID could still be B1
    bases.set("worker:b", B1)
    assert not bases.is_old(B1)
    assert not bases.is_old(A1.removeprefix("sha256:"))  # either spelling
    assert bases.is_old(A2)


def test_a_rebuilt_base_makes_its_old_id_old_and_reports_the_change() -> None:
    bases = BaseImages(["worker:a"])
    assert bases.set("worker:a", A1)
    assert not bases.set("worker:a", A1.removeprefix("sha256:"))  # same image
    assert bases.set("worker:a", A2)
    assert bases.is_old(A1)
    assert not bases.is_old(A2)
    assert bases.get("worker:a") == A2


def test_with_no_base_configured_every_lineage_is_old() -> None:
    assert BaseImages([]).is_old(A1)
