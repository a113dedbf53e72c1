"""torch_geometric's ``Data``, pickled as the mapping of its attributes and nothing else.

Pickled the usual way, a ``Data`` goes through two objects (the ``Data`` and its ``GlobalStorage``),
their ``__getstate__`` and ``__setstate__``, and three classes by name; the items of a pool's part are
pickled one by one (for the stream step that routes them), so every graph pays all of it on both
sides. A plain ``Data`` (exactly that class, holding what ``Data()`` gives it and nothing else) goes
as its mapping instead, and is rebuilt with the ``__setstate__`` calls that unpickling it makes, so it
arrives as ``pickle.loads(pickle.dumps(data))`` would give it. Anything else (a subclass, a ``Batch``,
a ``HeteroData``, a ``Data`` with attributes set on the object itself) is pickled as before.

Nothing here imports torch_geometric: a process that never imported it sends none of its objects.
"""

from __future__ import annotations

import sys
from typing import Any

_STATE = frozenset(("_edge_attr_cls", "_tensor_attr_cls", "_store"))
_STORE_STATE = frozenset(("_mapping", "_parent"))
_CLASSES = ("DataEdgeAttr", "DataTensorAttr", "GlobalStorage")  # what torch_geometric.data.data holds


def data_class() -> type | None:
    """torch_geometric's ``Data`` where this process imported it, else ``None``."""
    module = sys.modules.get("torch_geometric.data.data")
    return getattr(module, "Data", None)


def reduce_data(data: Any) -> tuple[Any, tuple[dict[str, Any]]] | None:
    """``(rebuild_data, (mapping,))`` for a plain ``Data`` (its type checked by the caller), else ``None``."""
    state = data.__dict__
    if state.keys() != _STATE:
        return None
    module = sys.modules["torch_geometric.data.data"]
    edge_attr, tensor_attr, storage = _classes(module)
    if storage is None or state["_edge_attr_cls"] is not edge_attr or state["_tensor_attr_cls"] is not tensor_attr:
        return None  # a torch_geometric laid out otherwise: pickled as before
    store = state["_store"]
    if type(store) is not storage or store.__dict__.keys() != _STORE_STATE:
        return None
    parent = store.__dict__["_parent"]
    if parent is None or parent() is not data:
        return None
    return rebuild_data, (store.__dict__["_mapping"],)


_resolved: tuple[Any, tuple[Any, ...]] | None = None


def _classes(module: Any) -> tuple[Any, ...]:
    """``_CLASSES`` of torch_geometric's ``data`` module (``None`` for one it lacks), looked up once."""
    global _resolved
    if _resolved is None or _resolved[0] is not module:
        _resolved = (module, tuple(getattr(module, name, None) for name in _CLASSES))
    return _resolved[1]


def rebuild_data(mapping: dict[str, Any]) -> Any:
    """The ``Data`` of ``mapping``: what unpickling a ``Data`` makes, by the same calls."""
    module = sys.modules.get("torch_geometric.data.data")
    if module is None:
        import torch_geometric.data.data as module
    data = module.Data.__new__(module.Data)
    store = module.GlobalStorage.__new__(module.GlobalStorage)
    store.__setstate__({"_mapping": mapping, "_parent": data})
    data.__setstate__(
        {"_edge_attr_cls": module.DataEdgeAttr, "_tensor_attr_cls": module.DataTensorAttr, "_store": store}
    )
    return data
