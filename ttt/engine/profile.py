"""CPU proxies for what a GPU will show: operators, bytes allocated and host syncs of a step.

A TorchDispatchMode sees every ATen operator a step dispatches, on any device, so a CPU run
counts what a GPU run would launch: operators (kernel launches, roughly), bytes of new
tensors, and host syncs: `aten::_local_scalar_dense` (`.item()`, `.tolist()`, `bool(t)`,
Python numbers read from a tensor) and tensors built from host values (`torch.tensor(...)`,
which on a GPU is a copy from the host, and a sync unless from pinned memory).
"""

from __future__ import annotations

import traceback
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

_aten = torch.ops.aten
# the host reads a device value: the host waits for the device
SYNC_OPS = {_aten._local_scalar_dense.default}
# a tensor from Python values (torch.tensor, torch.as_tensor of a list): a host-to-device copy
HOST_VALUE_OPS = {_aten.lift_fresh.default, _aten.lift_fresh_copy.default}
# operators whose weight operands are the model's own reads (forward and backward matmuls,
# the embedding lookup: `embedding`, or `index` when the stacked path picks each member's
# rows of its own table): inherent to any training step, not counted as parameter traffic
_WEIGHT_READERS = {
    "mm", "bmm", "addmm", "matmul", "linear", "embedding", "index", "baddbmm", "addmv", "mv",
    "t", "_scaled_dot_product_flash_attention_for_cpu", "convolution",
}  # fmt: skip
# views that their schemas do not declare as such
_ALIASES = {"_unsafe_view", "_reshape_alias", "alias"}


@dataclass
class StepCounts:
    """What one counted region dispatched."""

    operators: int = 0
    kernels: int = 0  # operators that compute (not views): what a GPU would launch
    bytes_allocated: int = 0
    param_traffic: int = 0  # bytes of parameter-shaped tensors read or written
    syncs: int = 0
    host_values: int = 0
    by_operator: Counter = field(default_factory=Counter)
    traffic_by_operator: Counter = field(default_factory=Counter)  # parameter traffic
    sync_sites: list[str] = field(default_factory=list)  # where each sync came from

    @property
    def host_syncs(self) -> int:
        """Host syncs as the issue counts them: values read back plus tensors from host values."""
        return self.syncs + self.host_values


def _site() -> str:
    """The innermost frame outside torch: where a sync was asked for."""
    for frame in reversed(traceback.extract_stack()[:-3]):
        if "/torch/" not in frame.filename:
            return f"{frame.filename.rsplit('/', 2)[-2:][-1]}:{frame.lineno} {frame.name}"
    return "?"


class CountingMode(TorchDispatchMode):
    """Counts operators, bytes of new tensors, parameter traffic and host syncs while active.

    Parameter traffic: bytes of every tensor shaped as a parameter (with or without a
    leading members dimension) or as a member's flat weight row, read or written by an
    operator, except the weight reads of matmuls and embedding lookups (any step makes
    those). It is what optimizer, clipping, gradient copies and casts cost per parameter.
    `sites=True` also records where each sync came from (slow: a stack walk per sync).
    """

    def __init__(
        self, sites: bool = False, shapes: Iterable[tuple[int, ...]] = (), members: int = 1
    ) -> None:
        super().__init__()
        self.counts = StepCounts()
        self.sites = sites
        self.shapes: set[tuple[int, ...]] = set()
        for shape in shapes:
            self.shapes |= {tuple(shape), (members, *shape)}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        c = self.counts
        c.operators += 1
        c.by_operator[func.overloadpacket.__name__] += 1
        if not _is_view(func):  # a view is metadata: no kernel on any device
            c.kernels += 1
        if func in SYNC_OPS or func in HOST_VALUE_OPS:
            if func in SYNC_OPS:
                c.syncs += 1
            else:
                c.host_values += 1
            if self.sites:
                c.sync_sites.append(f"{func.overloadpacket.__name__} at {_site()}")
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if not _allocates_nothing(func):
            c.bytes_allocated += sum(_nbytes(t) for t in outs)
        if self.shapes:
            ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            if func.overloadpacket.__name__ in _WEIGHT_READERS:
                ins = []
            if func.overloadpacket.__name__ in _ROW_WRITERS:
                moved = _rows_moved(args, self.shapes)
            elif not _is_view(func):  # a view moves no bytes
                seen = ins + [t for t in outs if not any(t is i for i in ins)]
                seen += _written(func, args, kwargs)  # in place: read, then written
                moved = sum(_nbytes(t) for t in seen if tuple(t.shape) in self.shapes)
            else:
                moved = 0
            if moved:
                c.param_traffic += moved
                c.traffic_by_operator[func.overloadpacket.__name__] += moved
        return out


# in-place row updates of a parameter-shaped tensor (the stacked lookup's gradient added into
# the table's): they read and write only the indexed rows, so they count the rows they move
# (the values read, the rows read and written), not the whole table their schema names
_ROW_WRITERS = {"index_put_", "index_put", "index_add_"}


def _rows_moved(args: Any, shapes: set[tuple[int, ...]]) -> int:
    target, values = args[0], args[2] if len(args) > 2 else None
    if tuple(target.shape) not in shapes or not isinstance(values, torch.Tensor):
        return 0
    return 3 * _nbytes(values)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _is_view(func: Any) -> bool:
    if func.overloadpacket.__name__ in _ALIASES:
        return True
    schema = func._schema
    return not schema.is_mutable and any(r.alias_info is not None for r in schema.returns)


def _written(func: Any, args: Any, kwargs: Any) -> list[torch.Tensor]:
    """The tensors an operator writes in place (its schema's mutable arguments)."""
    schema = func._schema
    if not schema.is_mutable:
        return []
    given = {a.name: v for a, v in zip(schema.arguments, args, strict=False)} | (kwargs or {})
    out = []
    for a in schema.arguments:
        if a.alias_info is not None and a.alias_info.is_write and a.name in given:
            out += [t for t in tree_flatten(given[a.name])[0] if isinstance(t, torch.Tensor)]
    return out


def _allocates_nothing(func: Any) -> bool:
    schema = func._schema  # writes in place, or returns a view of an input
    return schema.is_mutable or any(r.alias_info is not None for r in schema.returns)


def count_steps(
    engine: Any, shapes: Iterable[tuple[int, ...]] = (), sites: bool = False
) -> list[StepCounts]:
    """Count every engine.train_step from now on (the ensemble's, or TTTNN's _step): the
    returned list gets one StepCounts per step."""
    name = "train_step" if hasattr(engine, "train_step") else "_step"
    inner: Callable[..., Any] = getattr(engine, name)
    members = int(getattr(engine, "members", 1))
    counted: list[StepCounts] = []

    def counting(*args: Any) -> Any:
        with CountingMode(sites, shapes, members) as mode:
            out = inner(*args)
        counted.append(mode.counts)
        return out

    setattr(engine, name, counting)
    return counted
