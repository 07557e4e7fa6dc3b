from collections import Counter

from aisetl.model.placement import object_key, owner

TARGETS = ["t1", "t2", "t3"]
KEYS = [object_key("b", f"obj-{i}") for i in range(6000)]


def test_hrw_spreads_objects_evenly_over_targets() -> None:
    counts = Counter(owner(k, TARGETS) for k in KEYS)
    assert set(counts) == set(TARGETS)
    for t in TARGETS:
        assert 0.28 < counts[t] / len(KEYS) < 0.39, counts


def test_hrw_is_deterministic_and_order_independent() -> None:
    for k in KEYS[:200]:
        assert owner(k, TARGETS) == owner(k, list(reversed(TARGETS)))


def test_removing_a_target_moves_only_its_objects() -> None:
    before = {k: owner(k, TARGETS) for k in KEYS}
    after = {k: owner(k, ["t1", "t3"]) for k in KEYS}
    moved = [k for k in KEYS if before[k] != after[k]]
    assert moved, "objects of the removed target must move"
    assert all(before[k] == "t2" for k in moved)
    assert all(after[k] == before[k] for k in KEYS if before[k] != "t2")


def test_adding_a_target_moves_objects_only_onto_it() -> None:
    before = {k: owner(k, TARGETS) for k in KEYS}
    after = {k: owner(k, [*TARGETS, "t4"]) for k in KEYS}
    moved = [k for k in KEYS if before[k] != after[k]]
    assert 0.18 < len(moved) / len(KEYS) < 0.32
    assert all(after[k] == "t4" for k in moved)


def test_no_targets_is_an_error() -> None:
    import pytest

    with pytest.raises(ValueError):
        owner("b/o", [])
