"""The registry of attention implementations.

An implementation is a subclass of :class:`Attention` whose limits are data (devices, dtypes,
backward support, whether it needs the spatial map shapes, optional modules it imports) and
whose parameters are declared with :class:`Param`. It is registered by name, ``family.backend``:

    @register("mine.window")
    class WindowAttention(Attention):
        PARAMS = {"window": Param(7, int, low=1, doc="side of the key window")}
        def forward(self, q, k, v, spec): ...

Third-party packages register the same way from their own modules, or through the entry-point
group ``attnbench.impls`` (an entry point names a module to import, or an Attention subclass to
register under the entry point's name).

``create(name, **params)`` validates the parameters and returns a ready implementation;
calling it validates the inputs and raises :class:`UnsupportedError` with every reason when it
cannot run them. Nothing falls back silently.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import functools
import importlib
import math
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, ClassVar

import torch

from attnbench.spec import HW, AttentionSpec

ENTRY_POINT_GROUP = "attnbench.impls"
MAX_WEIGHT_ELEMENTS = 1 << 28  # entries of a dense attention matrix Attention.weights returns
_NAME_RE = re.compile(r"^[a-z0-9_]+(\.[a-z0-9_]+)*$")
_DTYPE_NAMES = {
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float32: "float32",
    torch.float64: "float64",
}


def dtype_name(dtype: torch.dtype) -> str:
    """ "float32" for torch.float32 and so on."""
    return _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


class UnsupportedError(ValueError):
    """An implementation was asked to run inputs it cannot run; ``reasons`` lists why."""

    def __init__(self, label: str, reasons: list[str]):
        self.label = label
        self.reasons = list(reasons)
        lines = "\n".join(f"  - {r}" for r in self.reasons)
        super().__init__(f"{label} cannot run these inputs:\n{lines}")

    def __reduce__(self):  # pickles whole, so it crosses process boundaries (pools, DDP)
        return type(self), (self.label, self.reasons)


@dataclass(frozen=True)
class Param:
    """A declared parameter of an implementation.

    Attributes:
        default: value used when the parameter is not given.
        kind: int, float, str or bool.
        doc: one line saying what it is.
        choices: the allowed values, for a closed set.
        low: smallest allowed value (inclusive), for numbers.
        high: largest allowed value (inclusive), for numbers.
        optional: whether None is allowed.
    """

    default: Any
    kind: type
    doc: str = ""
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    optional: bool = False

    def allowed(self) -> str:
        """What values this parameter accepts, in words."""
        if self.choices is not None:
            text = "one of " + ", ".join(repr(c) for c in self.choices)
        else:
            words = {int: "an integer", float: "a finite number", str: "a string"}
            text = words.get(self.kind, "true or false")
            if self.low is not None and self.high is not None:
                text += f" in [{self.low}, {self.high}]"
            elif self.low is not None:
                text += f" >= {self.low}"
            elif self.high is not None:
                text += f" <= {self.high}"
        return text + (" or None" if self.optional else "")

    def validate(self, owner: str, name: str, value: Any) -> Any:
        """Return ``value`` (ints widened to float where a float is declared) or raise."""
        if value is None and self.optional:
            return None
        ok = isinstance(value, self.kind) and not (
            self.kind is not bool and isinstance(value, bool)
        )
        if self.kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if ok and self.kind is float:
            ok = math.isfinite(value)  # inf or nan would reach a kernel (and Inductor) as is
        if ok and self.choices is not None:
            ok = value in self.choices
        if ok and self.low is not None:
            ok = value >= self.low
        if ok and self.high is not None:
            ok = value <= self.high
        if not ok:
            raise ValueError(
                f"{owner}: parameter {name}={value!r} is not allowed (allowed: {self.allowed()})"
            )
        return value


class Attention:
    """Base class of every attention implementation.

    Subclasses set the class attributes that describe their limits and implement
    :meth:`forward` and :meth:`flops`; they add their own checks to
    :meth:`unsupported_reasons` by extending the base's list.
    """

    name: ClassVar[str] = ""
    family: ClassVar[str] = ""
    backend: ClassVar[str] = ""
    PARAMS: ClassVar[dict[str, Param]] = {}
    DEVICES: ClassVar[tuple[str, ...]] = ("cpu", "cuda")
    DTYPES: ClassVar[tuple[torch.dtype, ...]] = tuple(_DTYPE_NAMES)
    SUPPORTS_BACKWARD: ClassVar[bool] = True
    BACKWARD_DEVICES: ClassVar[tuple[str, ...]] = ("cpu", "cuda")  # where backward runs
    BACKWARD_LIMIT: ClassVar[str] = ""  # why it does not on the other devices
    NEEDS_SPATIAL: ClassVar[bool] = False
    EXACT: ClassVar[bool] = False
    REQUIRES: ClassVar[tuple[str, ...]] = ()
    INSTALL_HINT: ClassVar[str] = ""
    TOLERANCES: ClassVar[dict[torch.dtype, tuple[float, float]]] = {
        torch.float64: (1e-10, 1e-12),
        torch.float32: (1e-4, 1e-5),
        torch.bfloat16: (3e-2, 3e-2),
        torch.float16: (5e-3, 5e-3),
    }

    def __init__(self, **params: Any):
        owner = self.name or type(self).__name__
        unknown = sorted(set(params) - set(self.PARAMS))
        if unknown:
            accepted = ", ".join(sorted(self.PARAMS)) or "none"
            raise ValueError(
                f"{owner}: unknown parameter {unknown[0]}={params[unknown[0]]!r} "
                f"(accepted parameters: {accepted})"
            )
        self.params: dict[str, Any] = {
            key: p.validate(owner, key, params.get(key, p.default))
            for key, p in self.PARAMS.items()
        }

    @property
    def label(self) -> str:
        """Name with the resolved parameters, e.g. ``full.sdpa(scale=None)``."""
        if not self.params:
            return self.name
        inner = ",".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.name}({inner})"

    def label_for(self, spec: AttentionSpec) -> str:
        """The label with any parameter that depends on the inputs resolved for ``spec``."""
        return self.label

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.label}>"

    @classmethod
    @functools.cache
    def missing_dependencies(cls) -> tuple[str, ...]:
        """Reasons why optional modules this implementation needs cannot be imported."""
        reasons = []
        for module in cls.REQUIRES:
            try:
                importlib.import_module(module)
            except Exception as err:  # any failure to import makes it unavailable
                hint = f": {cls.INSTALL_HINT}" if cls.INSTALL_HINT else ""
                reasons.append(f"not installed{hint} ({module}: {type(err).__name__}: {err})")
        return tuple(reasons)

    @classmethod
    def availability(cls, device: str) -> list[str]:
        """Why this implementation cannot run at all on ``device`` ([] if it can)."""
        reasons = list(cls.missing_dependencies())
        if device not in cls.DEVICES:
            reasons.append(f"device={device} (supported: {', '.join(cls.DEVICES)})")
        return reasons

    @classmethod
    def is_available(cls, device: str) -> bool:
        """Whether it can run some inputs on ``device``."""
        return not cls.availability(device)

    def unsupported_reasons(self, spec: AttentionSpec) -> list[str]:
        """Every reason why these inputs cannot run ([] if they can)."""
        reasons = self.availability(spec.device)
        if spec.dtype not in self.DTYPES:
            allowed = ", ".join(dtype_name(d) for d in self.DTYPES)
            reasons.append(f"dtype={dtype_name(spec.dtype)} (supported: {allowed})")
        if spec.requires_grad and not self.SUPPORTS_BACKWARD:
            reasons.append("inputs require grad (backward is not supported)")
        elif spec.requires_grad and spec.device not in self.BACKWARD_DEVICES:
            reasons.append(
                f"inputs require grad on device={spec.device} ({self.BACKWARD_LIMIT}; backward "
                f"is supported on {', '.join(self.BACKWARD_DEVICES)})"
            )
        if self.NEEDS_SPATIAL and (spec.q_hw is None or spec.kv_hw is None):
            reasons.append(f"q_hw={spec.q_hw}, kv_hw={spec.kv_hw} (needs both spatial map shapes)")
        return reasons

    def supports(self, spec: AttentionSpec) -> bool:
        """Whether these inputs can run."""
        return not self.unsupported_reasons(spec)

    def check(self, spec: AttentionSpec) -> None:
        """Raise :class:`UnsupportedError` with every reason if ``spec`` cannot run."""
        reasons = self.unsupported_reasons(spec)
        if reasons:
            raise UnsupportedError(self.label, reasons)

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        q_hw: HW | None = None,
        kv_hw: HW | None = None,
    ) -> torch.Tensor:
        """Attention of q [B,H,Nq,C] over k [B,H,Nk,C], v [B,H,Nk,Cv] -> [B,H,Nq,Cv]."""
        spec = AttentionSpec.from_inputs(q, k, v, q_hw, kv_hw)
        self.check(spec)
        return self.forward(q, k, v, spec)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec
    ) -> torch.Tensor:
        """Compute the output for validated inputs; ``spec`` describes them."""
        raise NotImplementedError(f"{type(self).__name__} does not implement forward")

    def weights(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        q_hw: HW | None = None,
        kv_hw: HW | None = None,
    ) -> torch.Tensor:
        """The dense attention matrix [B, H, Nq, Nk] this implementation applies to v.

        For every method that is linear in v, ``weights(q, k) @ v`` equals ``self(q, k, v)``;
        rows of exact attention sum to 1. Meant for small inputs (inspection, the copy hit
        rate of the training tasks): more than ``MAX_WEIGHT_ELEMENTS`` entries is a ValueError.
        Computed without gradient.

        Raises:
            UnsupportedError: the inputs cannot run, or the method exposes no weights.
            ValueError: malformed inputs, or a matrix larger than ``MAX_WEIGHT_ELEMENTS``.
        """
        spec = AttentionSpec.from_inputs(q, k, k, q_hw, kv_hw)
        self.check(dataclasses.replace(spec, requires_grad=False))
        elements = spec.batch * spec.heads * spec.q_tokens * spec.kv_tokens
        if elements > MAX_WEIGHT_ELEMENTS:
            raise ValueError(
                f"{self.label}: weights of {spec.batch}x{spec.heads}x{spec.q_tokens}x"
                f"{spec.kv_tokens} = {elements} entries (allowed: at most {MAX_WEIGHT_ELEMENTS};"
                " pass fewer batch items or smaller maps)"
            )
        with torch.no_grad():
            return self.dense_weights(q, k, spec)

    def dense_weights(self, q: torch.Tensor, k: torch.Tensor, spec: AttentionSpec) -> torch.Tensor:
        """The [B, H, Nq, Nk] attention matrix for validated inputs (see :meth:`weights`)."""
        raise UnsupportedError(self.label, ["this implementation exposes no attention weights"])

    def kept_keys(
        self, q: torch.Tensor, k: torch.Tensor, spec: AttentionSpec
    ) -> torch.Tensor | None:
        """[B, H, Nq, Nk] bool: the keys each query attends to, for methods that keep a subset
        of them (GPA, its relatives, the local attentions); every key for exact attention;
        None for methods that weigh every key approximately or none (Nyström, Performer,
        ``none``). Validated inputs, no gradient; meant for small inputs, like :meth:`weights`.
        """
        if not self.EXACT:
            return None
        return torch.ones(
            spec.batch, spec.heads, spec.q_tokens, spec.kv_tokens, dtype=torch.bool, device=q.device
        )

    def timed_parts(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec
    ) -> dict[str, Callable[[], object]]:
        """Parts of the forward pass the harness can time apart (e.g. GPA's ``phase1``)."""
        return {}

    def flops(self, spec: AttentionSpec, backward: bool = False) -> int:
        """Useful FLOPs of one call (multiply-add = 2; softmax, pooling not counted).

        With ``backward=True``, forward plus backward. The base counts exact attention; its
        backward recomputes nothing useful and costs two matmuls per forward matmul
        (dV = P^T dO and dP = dO V^T; dQ = dS K and dK = dS^T Q), so fwd+bwd = 3 x fwd.
        """
        fwd = spec.exact_flops()
        return 3 * fwd if backward else fwd

    def memory_bytes(self, spec: AttentionSpec, backward: bool = False) -> int | None:
        """Analytic peak bytes allocated beyond the inputs, or None if not estimated."""
        return None

    def exact_params(self, spec: AttentionSpec) -> dict[str, Any] | None:
        """Parameters under which this implementation is exact attention on ``spec``.

        None when no setting makes it exact (the harness then measures its fidelity).
        """
        return {} if self.EXACT else None

    @classmethod
    def tolerance(cls, dtype: torch.dtype) -> tuple[float, float]:
        """(rtol, atol) against an fp64 oracle when exact, for inputs of ``dtype``."""
        return cls.TOLERANCES[dtype]


_REGISTRY: dict[str, type[Attention]] = {}
_loaded = False


def register(name: str, *, override: bool = False) -> Callable[[type[Attention]], type[Attention]]:
    """Class decorator: register an :class:`Attention` subclass as ``name``.

    Args:
        name: ``family.backend`` (lower case, digits, underscores; dots separate parts).
        override: replace an implementation registered under the same name.

    Raises:
        ValueError: bad name, not an Attention subclass, or a name already taken.
    """
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(
            f"implementation name {name!r} is not allowed "
            "(allowed: lower-case 'family.backend', letters, digits and '_')"
        )

    def decorate(cls: type[Attention]) -> type[Attention]:
        if not (isinstance(cls, type) and issubclass(cls, Attention)):
            raise ValueError(f"register({name!r}) needs a subclass of attnbench.registry.Attention")
        old = _REGISTRY.get(name)
        same_definition = old is not None and (old.__module__, old.__qualname__) == (
            cls.__module__,
            cls.__qualname__,
        )
        if old is not None and not (override or same_definition):
            raise ValueError(
                f"implementation {name!r} is already registered by "
                f"{old.__module__}.{old.__qualname__}; pass override=True to replace it"
            )
        if old is not None and not same_definition:
            warnings.warn(
                f"implementation {name!r} of {old.__module__}.{old.__qualname__} is replaced by "
                f"{cls.__module__}.{cls.__qualname__} (override=True): its rows measure the "
                "replacement and name it in impl_class",
                stacklevel=2,
            )
        family, _, backend = name.partition(".")
        cls.name, cls.family, cls.backend = name, family, backend or "torch"
        _REGISTRY[name] = cls
        return cls

    return decorate


def class_path(name: str) -> str:
    """``module.Class`` of the implementation registered as ``name``."""
    cls = get(name)
    return f"{cls.__module__}.{cls.__qualname__}"


def unregister(name: str) -> None:
    """Remove ``name`` from the registry (tests and interactive use)."""
    _REGISTRY.pop(name, None)


def _load_entry_points() -> None:
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
            # A class registers under the entry point's name unless it registered itself (a
            # subclass of a built-in inherits the built-in's name, not its registration).
            registered = "name" in vars(obj) and _REGISTRY.get(obj.name) is obj
            if isinstance(obj, type) and issubclass(obj, Attention) and not registered:
                register(ep.name)(obj)
        except Exception as err:
            warnings.warn(
                f"attnbench plugin {ep.name!r} ({ep.value}) failed to load: "
                f"{type(err).__name__}: {err}",
                stacklevel=2,
            )


def ensure_loaded() -> None:
    """Import the built-in implementations and the entry-point plugins (once)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    importlib.import_module("attnbench.impls")
    _load_entry_points()


def import_plugins(modules: list[str]) -> None:
    """Import modules that register implementations (a suite's ``plugins:``)."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ValueError(f"plugin module {module!r} cannot be imported: {err}") from err
        except Exception as err:  # the plugin's own code failed: name it and the error
            raise ValueError(
                f"plugin module {module!r} raised {type(err).__name__} on import: {err}"
            ) from err


def list_impls(pattern: str = "*") -> list[str]:
    """Sorted names of registered implementations matching a shell-style ``pattern``."""
    ensure_loaded()
    return sorted(n for n in _REGISTRY if fnmatch.fnmatchcase(n, pattern))


def get(name: str) -> type[Attention]:
    """The class registered as ``name``.

    Raises:
        ValueError: unknown name, with close matches and every available name.
    """
    ensure_loaded()
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        pass
    names = sorted(_REGISTRY)
    families = sorted({n.split(".")[0] for n in names})
    close = difflib.get_close_matches(str(name), names, n=4, cutoff=0.5)
    for fam in difflib.get_close_matches(str(name).split(".")[0], families, n=2, cutoff=0.6):
        close += [n for n in names if n.split(".")[0] == fam and n not in close]
    hint = f"did you mean {', '.join(repr(n) for n in close)}? " if close else ""
    raise ValueError(f"unknown implementation {name!r}; {hint}available: {', '.join(names)}")


def create(name: str, **params: Any) -> Attention:
    """A ready implementation ``name`` with ``params`` validated against its declaration."""
    return get(name)(**params)
