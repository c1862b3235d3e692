"""The scoped patching both integrations share: every attribute put back, and a failed run's exception kept as
the one the user sees (no tool needed: runs in the main venv)."""

from __future__ import annotations

import pytest

from maca_kernels.integrations._patch import Patch, scoped


def test_undo_restores_every_attribute_even_when_one_restore_fails():
    class Owner:
        x, y = "x", "y"

    before = dict(vars(Owner))
    patch = Patch()
    patch.set(Owner, "x", "X")
    patch.set(Owner, "added", 1)
    patch.set(Owner, "y", "Y")
    del Owner.added  # removed behind our back: restoring it (a delattr) fails, between the other two
    with pytest.raises(AttributeError):
        patch.undo()
    assert dict(vars(Owner)) == before


def test_scoped_keeps_the_original_exception_when_its_cleanup_fails():
    calls = []

    def abandon():
        calls.append("abandon")
        raise RuntimeError("finalize() on an empty HessianAccumulator")

    scope = scoped(lambda: calls.append("enable"), lambda: calls.append("disable"), abandon)
    with pytest.raises(ValueError) as err, scope:
        raise ValueError("the real error")
    assert str(err.value) == "the real error" and calls == ["enable", "abandon"]
    assert err.value.__context__ is None and err.value.__cause__ is None
    assert "finalize() on an empty HessianAccumulator" in err.value.__notes__[0]

    calls.clear()
    with scoped(lambda: calls.append("enable"), lambda: calls.append("disable"), abandon):
        pass
    assert calls == ["enable", "disable"]


def test_scoped_does_not_enter_when_enable_fails():
    def enable():
        raise ValueError("bad option")

    with pytest.raises(ValueError, match="bad option"), scoped(enable, pytest.fail, pytest.fail):
        pytest.fail("the body must not run")
