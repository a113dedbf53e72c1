"""The public surface: __all__ is sorted and complete."""

import inspect

import torchqueue as tq


def test_all_is_sorted_and_names_every_public_attribute():
    assert tq.__all__ == sorted(tq.__all__)
    public = {
        name
        for name, value in vars(tq).items()
        if not name.startswith("_") and not inspect.ismodule(value) and name != "annotations"
    }
    assert public == set(tq.__all__)


def test_every_public_name_has_a_docstring():
    for name in tq.__all__:
        assert inspect.getdoc(getattr(tq, name)), name
