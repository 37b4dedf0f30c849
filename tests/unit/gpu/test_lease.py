"""The lease table as a pure state machine: time is given, never read."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from throttllem.controller.gpu.errors import InvalidArgument, LeaseConflict, LeaseLost
from throttllem.controller.gpu.lease import LeaseTable

A, B = 1, 2  # owners


def test_a_grant_lapses_unless_renewed() -> None:
    t = LeaseTable(max_lease_s=2.0)
    t.grant(A, [0, 1], lease_s=1.0, now_s=10.0)
    assert t.next_expiry_s() == 11.0
    assert t.expire(10.99) == ()
    assert t.renew(A, 1.0, now_s=10.99) == (0, 1)
    assert t.expire(11.5) == ()
    assert t.expire(11.99) == (0, 1)
    assert t.holder(0, 12.0) is None
    assert t.next_expiry_s() is None


def test_a_lapsed_lease_cannot_be_renewed() -> None:
    t = LeaseTable(max_lease_s=2.0)
    t.grant(A, [0], 1.0, now_s=0.0)
    # Not yet collected by expire(), but past its time: the clocks are due for reset.
    with pytest.raises(LeaseLost):
        t.renew(A, 1.0, now_s=1.0)
    with pytest.raises(LeaseLost):
        t.renew(B, 1.0, now_s=0.5)  # never held anything


def test_a_new_grant_extends_everything_the_owner_holds() -> None:
    t = LeaseTable(max_lease_s=5.0)
    t.grant(A, [0], 1.0, now_s=0.0)
    t.grant(A, [1], 2.0, now_s=0.5)
    assert t.expire(1.5) == ()
    assert t.held_by(A, 1.5) == (0, 1)
    assert t.expire(2.5) == (0, 1)


def test_another_owners_live_lease_is_a_conflict_a_lapsed_one_is_not() -> None:
    t = LeaseTable(max_lease_s=2.0)
    t.grant(A, [0], 1.0, now_s=0.0)
    with pytest.raises(LeaseConflict, match="GPU 0"):
        t.grant(B, [1, 0], 1.0, now_s=0.5)
    assert t.holder(1, 0.5) is None  # the refused grant took nothing
    with pytest.raises(LeaseConflict):
        t.release(B, [0], now_s=0.5)
    t.grant(B, [0], 1.0, now_s=1.0)  # A's lease ran out at 1.0
    assert t.holder(0, 1.0) == B
    assert t.expire(1.5) == ()  # B's lease, not A's stale one


def test_release_and_release_owner() -> None:
    t = LeaseTable(max_lease_s=2.0)
    t.grant(A, [0, 1, 2], 1.0, now_s=0.0)
    t.release(A, [1, 5], now_s=0.1)  # a free GPU (5) is fine
    assert t.held_by(A, 0.1) == (0, 2)
    assert t.release_owner(A) == (0, 2)
    assert t.release_owner(A) == ()
    assert t.next_expiry_s() is None


@pytest.mark.parametrize("lease_s", [0.0, -1.0, 2.5, math.inf, math.nan])
def test_lease_length_is_bounded(lease_s: float) -> None:
    t = LeaseTable(max_lease_s=2.0)
    with pytest.raises(InvalidArgument):
        t.grant(A, [0], lease_s, now_s=0.0)
    t.grant(A, [0], 2.0, now_s=0.0)
    with pytest.raises(InvalidArgument):
        t.renew(A, lease_s, now_s=0.0)


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["grant", "renew", "release", "gone", "expire"]),
            st.sampled_from([A, B]),
            st.frozensets(st.integers(0, 3), min_size=1),
            st.floats(0.01, 1.0),
            st.floats(0.0, 0.7),
        ),
        max_size=40,
    )
)
def test_no_gpu_is_ever_held_past_its_lease(
    steps: list[tuple[str, int, frozenset[int], float, float]],
) -> None:
    """Whatever the sequence, a GPU nobody renewed is handed back for reset by its expiry, and
    no GPU ever has two live holders."""
    t = LeaseTable(max_lease_s=1.0)
    now = 0.0
    deadline: dict[int, float] = {}  # model: latest time each GPU may stay leased
    for op, owner, gpus, lease_s, dt in steps:
        now += dt
        for gpu in t.expire(now):
            deadline.pop(gpu, None)
        for gpu, until in list(deadline.items()):
            assert until > now, f"GPU {gpu} still leased at {now} past {until}"
        try:
            if op == "grant":
                t.grant(owner, gpus, lease_s, now)
                for gpu in t.held_by(owner, now):
                    deadline[gpu] = now + lease_s
            elif op == "renew":
                for gpu in t.renew(owner, lease_s, now):
                    deadline[gpu] = now + lease_s
            elif op == "release":
                t.release(owner, gpus, now)
                for gpu in gpus:
                    deadline.pop(gpu, None)
            elif op == "gone":
                for gpu in t.release_owner(owner):
                    deadline.pop(gpu, None)
        except (LeaseConflict, LeaseLost):
            pass
        for gpu in range(4):
            holders = {o for o in (A, B) if gpu in t.held_by(o, now)}
            assert len(holders) <= 1
