"""An auditor's own FR model as the recognition net: a TorchScript program (white box) or an endpoint (black box).

Both take what every recognition net takes, ``(N, 3, S, S)`` aligned chips, RGB in [0, 255], and return
``(N, d)`` templates; what the auditor's model expects instead is its *input contract*
(:class:`InputContract`): chip size, channel order, the value range the pixels are scaled to, and a
per-channel mean and std subtracted and divided there. The alignment (dlib's chip or a five-point
similarity onto reference points) is the pipeline's, declared beside the contract in the bundle.

* :class:`ProgramRecognition` runs a TorchScript program (``torch.jit.save``). It is differentiable:
  attacks, SSI and decoder training may use it like the built-in nets. A program is code, so
  :func:`load_torchscript` refuses archives that use operators outside ``aten``/``prim`` (custom op
  libraries), read files (``from_file``) or print (biometric data is never logged), before and after
  loading; loaders call it on a bundle file whose sha256 was verified first.
* :class:`BlackBoxRecognition` sends chips to the auditor's template endpoint over HTTP
  (:data:`PROTOCOL`, below) and is not differentiable (``differentiable = False``): methods that need
  gradients check :func:`require_gradients` and refuse it. The endpoint's address is configuration of
  the process that loads the model (:data:`ENDPOINT_ENV`), never part of a bundle, so whoever can write
  to the registry cannot redirect faces elsewhere.

The black-box protocol, ``facexplain-blackbox-1`` (``scripts/blackbox_fr_server.py`` is a reference server):

* request: ``POST <endpoint>`` with ``Content-Type: application/x-npy``; the body is a NumPy ``.npy``
  array (no pickle), dtype ``uint8``, shape ``(N, S, S, 3)`` (NHWC), aligned chips in the contract's
  channel order; headers ``X-Facexplain-Protocol: facexplain-blackbox-1``, ``X-Facexplain-Model: <name>``
  and, when :data:`TOKEN_ENV` is set, ``Authorization: Bearer <token>``. At most :data:`MAX_BATCH_ENV`
  chips per request (larger batches are split).
* answer: ``200`` with either ``application/x-npy``, a float32/float64 ``(N, d)`` array, or
  ``application/json``, ``{"templates": [[...], ...]}``. Anything else is an error naming the status and
  the first 200 characters of the body. Answers larger than needed for ``(N, d)`` float64 (+ 64 KiB)
  are refused; each request times out after :data:`TIMEOUT_ENV` seconds (default 30).
"""

from __future__ import annotations

import io
import json
import os
import re
import urllib.error
import urllib.request
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

TORCHSCRIPT_ARCH = "torchscript"
EXPORT_ARCH = "torch_export"
ONNX_ARCH = "onnx"
BLACKBOX_ARCH = "blackbox"
PROTOCOL = "facexplain-blackbox-1"
ENDPOINT_ENV = "FACEXPLAIN_BLACKBOX_ENDPOINT"
TOKEN_ENV = "FACEXPLAIN_BLACKBOX_TOKEN"
TIMEOUT_ENV = "FACEXPLAIN_BLACKBOX_TIMEOUT_S"
MAX_BATCH_ENV = "FACEXPLAIN_BLACKBOX_MAX_BATCH"
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_MAX_BATCH = 32
CHANNEL_ORDERS = ("RGB", "BGR")


class ProgramError(ValueError):
    """An auditor's program or contract that cannot be used; the message says what and why."""


class EndpointError(RuntimeError):
    """The black-box endpoint failed a request (unreachable, timed out, bad status or answer)."""


class NotDifferentiable(ValueError):
    """A method that needs gradients was given a model without them (a black-box endpoint)."""


def is_differentiable(module: Any) -> bool:
    """False for a recognition net that declares ``differentiable = False`` (a black box)."""
    return bool(getattr(module, "differentiable", True))


def require_gradients(module: Any, what: str, label: str = "the FR model") -> None:
    """Raise :class:`NotDifferentiable` naming ``what`` needs gradients when ``module`` has none."""
    if not is_differentiable(module):
        raise NotDifferentiable(
            f"{what} needs gradients through the FR model, and {label} is a black-box model (templates only, "
            "served by its owner's endpoint): register it as a TorchScript program for white-box methods"
        )


# -- the input contract -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputContract:
    """How chips (RGB in [0, 255]) become the program's input: reorder to ``channels``, scale [0, 255] to
    ``value_range``, then ``(x - mean) / std`` per channel (in the program's channel order)."""

    chip_size: int
    channels: str = "RGB"
    value_range: tuple[float, float] = (0.0, 255.0)
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def __post_init__(self) -> None:
        if not (isinstance(self.chip_size, int) and 16 <= self.chip_size <= 1024):
            raise ProgramError(f"input contract: chip_size must be an integer in [16, 1024], got {self.chip_size!r}")
        if self.channels not in CHANNEL_ORDERS:
            raise ProgramError(f"input contract: channels must be RGB or BGR, got {self.channels!r}")
        lo, hi = self.value_range
        if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
            raise ProgramError(
                f"input contract: value_range must be two finite numbers lo < hi, got {self.value_range}"
            )
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ProgramError("input contract: mean and std need three values (one per channel)")
        if not all(np.isfinite(m) for m in self.mean) or not all(np.isfinite(s) and s > 0 for s in self.std):
            raise ProgramError(f"input contract: mean must be finite and std positive, got {self.mean} / {self.std}")

    @classmethod
    def from_dict(cls, inp: dict[str, Any]) -> InputContract:
        """The contract from a bundle's ``input`` block; missing or malformed fields are named."""
        missing = [k for k in ("chip_size", "channels", "value_range", "mean", "std") if k not in inp]
        if missing:
            raise ProgramError(f"input contract lacks {', '.join(missing)}")
        try:
            lo, hi = (float(v) for v in inp["value_range"])
            return cls(
                chip_size=int(inp["chip_size"]),
                channels=str(inp["channels"]),
                value_range=(lo, hi),
                mean=_three(inp["mean"]),
                std=_three(inp["std"]),
            )
        except (TypeError, ValueError) as exc:
            if isinstance(exc, ProgramError):
                raise
            raise ProgramError(f"input contract malformed ({exc})") from None

    def to_dict(self, layout: str = "NCHW") -> dict[str, Any]:
        return {
            "chip_size": self.chip_size,
            "layout": layout,
            "channels": self.channels,
            "value_range": list(self.value_range),
            "mean": list(self.mean),
            "std": list(self.std),
            "normalisation": self.describe(),
        }

    def describe(self) -> str:
        lo, hi = self.value_range
        return (
            f"{self.channels} scaled from [0, 255] to [{lo:g}, {hi:g}], then (x - {list(self.mean)}) / {list(self.std)}"
        )

    def apply(self, chips: torch.Tensor) -> torch.Tensor:
        """Chips (N, 3, S, S) RGB in [0, 255] -> the program's input (differentiable)."""
        x = chips.float()
        if self.channels == "BGR":
            x = x.flip(1)
        lo, hi = self.value_range
        if (lo, hi) != (0.0, 255.0):
            x = x * ((hi - lo) / 255.0) + lo
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std


def _three(value: Any) -> tuple[float, float, float]:
    vals = [float(v) for v in (value if isinstance(value, list | tuple) else [value] * 3)]
    if len(vals) == 1:
        vals *= 3
    if len(vals) != 3:
        raise ProgramError(f"input contract: expected one or three values, got {value!r}")
    return vals[0], vals[1], vals[2]


def probe_chips(size: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """Two fixed pseudo-random chips (seed 0) that a loader feeds a program to check its output shape."""
    g = torch.Generator().manual_seed(0)
    return (torch.rand(2, 3, size, size, generator=g) * 255.0).round().to(device)


def check_output(out: Any, n: int, dim: int, what: str) -> torch.Tensor:
    """``out`` must be an (n, dim) finite float tensor; else :class:`ProgramError` saying what it was."""
    if not isinstance(out, torch.Tensor):
        raise ProgramError(f"{what} returned {type(out).__name__}, not a tensor of templates")
    if tuple(out.shape) != (n, dim):
        raise ProgramError(
            f"{what} returned shape {tuple(out.shape)} for a batch of {n} chips; the contract says ({n}, {dim})"
        )
    if not out.dtype.is_floating_point:
        raise ProgramError(f"{what} returned dtype {out.dtype}, not floating point templates")
    if not bool(torch.isfinite(out).all()):
        raise ProgramError(f"{what} returned non-finite templates (NaN/inf) on the probe chips")
    return out


# -- TorchScript (white box) ----------------------------------------------------------------------------------

# A loaded program may call aten and prim operators only; of those, none that reads files or prints.
_ALLOWED_NAMESPACES = {"aten", "prim"}
_DENIED_OPS = {"aten::from_file", "prim::Print", "prim::PythonOp"}
_CODE_DENIED = re.compile(r"\bfrom_file\b|\bprint\s*\(|\bops\.(?!aten\.|prim\.)\w+\.")


def scan_torchscript_archive(path: Path) -> None:
    """Refuse a file that is not a TorchScript archive, or whose code calls a denied operator (read as text,
    nothing loaded)."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            if not any(n.endswith("/constants.pkl") or n.endswith("/data.pkl") for n in names) or not any(
                "/code/" in n for n in names
            ):
                raise ProgramError(f"{path.name} is not a TorchScript archive (torch.jit.save): no code/ or data.pkl")
            for n in names:
                if "/code/" in n and n.endswith(".py"):
                    text = zf.read(n).decode("utf-8", errors="replace")
                    hit = _CODE_DENIED.search(text)
                    if hit:
                        raise ProgramError(
                            f"refused: {path.name} calls {hit.group(0).strip()!r} ({n.split('/code/', 1)[1]}); a "
                            "recognition program may use aten/prim operators only, and none that reads files or prints"
                        )
    except zipfile.BadZipFile:
        raise ProgramError(f"{path.name} is not a TorchScript archive (not a zip file)") from None


def _graph_kinds(graph: Any) -> set[str]:
    kinds: set[str] = set()
    stack = [graph]
    while stack:
        g = stack.pop()
        for node in g.nodes():
            kinds.add(node.kind())
            stack.extend(node.blocks())
    return kinds


def load_torchscript(path: Path, device: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    """An auditor's TorchScript program, on ``device``, frozen and in eval mode, its operators checked."""
    scan_torchscript_archive(path)
    try:
        with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript in favour of torch.export
            warnings.simplefilter("ignore", DeprecationWarning)
            program = torch.jit.load(str(path), map_location=torch.device(device))
    except Exception as exc:
        raise ProgramError(f"{path.name}: torch.jit.load failed ({type(exc).__name__}: {str(exc)[:300]})") from None
    if not hasattr(program, "forward"):
        raise ProgramError(f"{path.name}: the program has no forward method")
    try:
        kinds = _graph_kinds(program.inlined_graph)
    except Exception as exc:
        raise ProgramError(f"{path.name}: cannot read the program's graph ({type(exc).__name__}: {exc})") from None
    bad = sorted(k for k in kinds if k in _DENIED_OPS or k.split("::", 1)[0] not in _ALLOWED_NAMESPACES)
    if bad:
        raise ProgramError(
            f"refused: {path.name} uses operators {', '.join(bad[:5])}; a recognition program may use aten/prim "
            "operators only, and none that reads files or prints"
        )
    program.eval()
    for p in program.parameters():
        p.requires_grad_(False)
    return program


# -- torch.export (white box) ---------------------------------------------------------------------------------

# The members a torch.export.save archive may hold here: JSON, raw tensor bytes, and the sample inputs (a
# torch.save of tensors, scanned like a state dict). Custom or opaque objects (unpickled by
# torch.export.load) and AOTInductor payloads are refused.
_EXPORT_MEMBER = re.compile(
    r"^[^/]+/(?:archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
    r"|models/[\w.-]+\.json|data/(?:weights|constants)/model_(?:weights|constants)_config\.json"
    r"|data/weights/weight_\d+|data/constants/tensor_\d+|data/sample_inputs/[\w.-]+\.pt)$"
)
_EXPORT_TARGET = re.compile(
    r"^torch\.ops\.(?:aten|prim)\.\w+\.\w+$|^_operator\.(?:getitem|add|sub|mul|floordiv|truediv|mod|neg|eq|ne|lt|le|gt|ge)$"
)
# symbolic-shape expressions (sympy srepr, parsed by sympy's eval): numbers, symbols s0/u1 (bare or quoted),
# capitalised sympy names, assumption keywords, operators; no dunders, attributes or other lower-case names
_SYM_EXPR = re.compile(
    r"^(?:\s|\d+(?:\.\d+)?|'?[su]\d+'?|[A-Z][A-Za-z]*|[-+*/%(),<>=!]|oo"
    r"|(?:positive|negative|nonnegative|nonpositive|integer|real|finite|zero|nonzero|even|odd|rational)(?==))*$"
)


def _walk_json(obj: Any, key: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield str(k), v
            yield from _walk_json(v, str(k))
    elif isinstance(obj, list):
        for v in obj:
            yield from _walk_json(v, key)


def scan_export_archive(path: Path) -> None:
    """Refuse a ``torch.export.save`` archive that would run code or unpickle objects when loaded: members
    outside :data:`_EXPORT_MEMBER`, pickled weights or constants, guard code (``exec``-ed by torch), operator
    targets outside aten/prim, symbolic expressions that are not arithmetic, sample inputs beyond tensors."""
    from facexplain.artifacts.bundle import BundleError, check_tensor_pickle

    what = path.name
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if not n.endswith("/")]
            bad = [n for n in names if not _EXPORT_MEMBER.match(n)]
            if bad:
                raise ProgramError(
                    f"refused: {what} holds {bad[:3]}; only tensors, JSON and sample inputs may be in it"
                )
            if not any(n.endswith("/models/model.json") for n in names):
                raise ProgramError(f"{what} is not a torch.export archive (torch.export.save): no models/model.json")
            for n in names:
                if n.endswith("_config.json"):
                    for k, v in _walk_json(json.loads(zf.read(n))):
                        if k == "use_pickle" and v:
                            raise ProgramError(f"refused: {what} stores pickled tensors ({n.split('/')[-1]})")
                elif "/models/" in n:
                    for k, v in _walk_json(json.loads(zf.read(n))):
                        if k == "guards_code" and v:
                            raise ProgramError(f"refused: {what} carries guard code (Python torch would exec)")
                        if k == "target" and isinstance(v, str) and not _EXPORT_TARGET.match(v):
                            raise ProgramError(
                                f"refused: {what} calls {v!r}; a recognition program may use aten/prim operators only"
                            )
                        if k == "expr_str" and isinstance(v, str) and not _SYM_EXPR.match(v):
                            raise ProgramError(f"refused: {what} has a symbolic expression that is not arithmetic")
                    ranges = json.loads(zf.read(n)).get("range_constraints") or {}
                    if any(not _SYM_EXPR.match(str(k)) for k in ranges):
                        raise ProgramError(f"refused: {what} has a range constraint that is not arithmetic")
                elif n.endswith(".pt"):
                    try:
                        check_tensor_pickle(zf.read(n), f"{what}: {n.split('/')[-1]}")
                    except BundleError as exc:
                        raise ProgramError(str(exc)) from None
    except zipfile.BadZipFile:
        raise ProgramError(f"{what} is not a torch.export archive (not a zip file)") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ProgramError(f"{what}: a JSON member of the archive does not parse") from None


def load_onnx(path: Path, device: str | torch.device = "cpu") -> nn.Module:
    """An auditor's ONNX graph (``.onnx``) replayed in torch (:class:`facexplain.models.onnx_graph.OnnxGraphNet`):
    nothing in the file runs, and an op or attribute the replay does not support is refused by name."""
    from facexplain.models.onnx_graph import OnnxGraphError, OnnxGraphNet

    try:
        net = OnnxGraphNet.from_file(path)
    except OnnxGraphError as exc:
        raise ProgramError(f"{path.name}: {exc}") from None
    return net.to(torch.device(device)).eval()


def load_export(path: Path, device: str | torch.device = "cpu") -> nn.Module:
    """An auditor's ``torch.export`` program (``.pt2``) as a module on ``device``, its archive checked first."""
    scan_export_archive(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = torch.export.load(str(path)).module()
        module = module.to(torch.device(device))
    except Exception as exc:
        raise ProgramError(f"{path.name}: torch.export.load failed ({type(exc).__name__}: {str(exc)[:300]})") from None
    for p in module.parameters():
        p.requires_grad_(False)
    return module  # type: ignore[no-any-return]


class _ContractRecognition(nn.Module):
    """What both kinds of auditor's model share as a recognition net: the input contract, and the fields
    the default model's bundle metadata reads (the contract replaces them in these bundles)."""

    def __init__(self, contract: InputContract) -> None:
        super().__init__()
        self.contract = contract
        self.channels = contract.channels
        self.mean_rgb = torch.zeros(1, 3, 1, 1)
        self.input_divisor = 1.0


class ProgramRecognition(_ContractRecognition):
    """An auditor's program as the recognition net: chips RGB in [0, 255] -> contract -> program -> templates.

    Differentiable with respect to the chips. ``source`` is the program file, copied byte for byte into a
    bundle (so the bundle's sha256 of it is the auditor's file's); ``origin``, when set, says where that file
    came from (a bundle's ``source`` tag names it instead of "the auditor's program").
    """

    differentiable = True
    origin: str | None = None

    def __init__(
        self, program: nn.Module, contract: InputContract, *, source: Path | None = None, fmt: str = TORCHSCRIPT_ARCH
    ) -> None:
        super().__init__(contract)
        self.program = program
        self.source = source
        self.arch = fmt

    @classmethod
    def from_file(cls, path: Path, contract: InputContract, dim: int, device: str | torch.device = "cpu") -> Any:
        """Load and probe: two chips, then one, must give (2, ``dim``) and (1, ``dim``) finite float templates
        (a program exported for one batch size fails here), or :class:`ProgramError`."""
        fmt = {".pt2": EXPORT_ARCH, ".onnx": ONNX_ARCH}.get(path.suffix, TORCHSCRIPT_ARCH)
        loaders = {EXPORT_ARCH: load_export, ONNX_ARCH: load_onnx, TORCHSCRIPT_ARCH: load_torchscript}
        program = loaders[fmt](path, device)
        net = cls(program, contract, source=path, fmt=fmt)
        chips = probe_chips(contract.chip_size, device)
        for n in (2, 1):
            with torch.no_grad():
                try:
                    out = net(chips[:n])
                except Exception as exc:
                    first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
                    raise ProgramError(
                        f"{path.name} fails on a ({n}, 3, {contract.chip_size}, {contract.chip_size}) chip batch "
                        f"({type(exc).__name__}: {first}); it must take any batch size"
                    ) from None
            check_output(out, n, dim, path.name)
        return net.eval()

    def train(self, mode: bool = True) -> ProgramRecognition:
        """The program stays as loaded (in eval mode; an exported program cannot switch modes at all)."""
        self.training = mode
        return self

    def input_block(self) -> dict[str, Any]:
        return self.contract.to_dict()

    def forward(self, chips: torch.Tensor) -> torch.Tensor:
        out = self.program(self.contract.apply(chips))
        return out.float() if isinstance(out, torch.Tensor) else out


# -- black box ---------------------------------------------------------------------------------------------------


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    try:
        value = float(raw) if raw else default
    except ValueError:
        raise ProgramError(f"{name}={raw!r} is not a number") from None
    if not value > 0:
        raise ProgramError(f"{name} must be positive, got {raw!r}")
    return value


@dataclass(frozen=True)
class BlackBoxEndpoint:
    """Where and how to reach an auditor's template endpoint (the loading process's configuration)."""

    url: str
    token: str = ""
    timeout_s: float = DEFAULT_TIMEOUT_S
    max_batch: int = DEFAULT_MAX_BATCH

    def __post_init__(self) -> None:
        if not re.match(r"^https?://[^\s/]+", self.url):
            raise ProgramError(f"black-box endpoint must be an http:// or https:// URL, got {self.url!r}")

    @classmethod
    def from_env(cls, url: str | None = None) -> BlackBoxEndpoint:
        """``url`` if given, else :data:`ENDPOINT_ENV`; token, timeout and batch size from the environment."""
        address = url or os.environ.get(ENDPOINT_ENV, "")
        if not address:
            raise ProgramError(
                f"a black-box FR model needs its template endpoint: set {ENDPOINT_ENV} in this process's "
                "environment (the address is never read from the bundle)"
            )
        return cls(
            url=address,
            token=os.environ.get(TOKEN_ENV, ""),
            timeout_s=_env_float(TIMEOUT_ENV, DEFAULT_TIMEOUT_S),
            max_batch=int(_env_float(MAX_BATCH_ENV, DEFAULT_MAX_BATCH)),
        )

    @property
    def public_url(self) -> str:
        """The URL without credentials or query (for messages)."""
        m = re.match(r"^(https?://)(?:[^@/]*@)?([^/?#]*)([^?#]*)", self.url)
        return "".join(m.groups()) if m else "<endpoint>"

    def templates(self, chips_u8: np.ndarray, model: str) -> np.ndarray:
        """One request: (N, S, S, 3) uint8 chips -> (N, d) float32 templates (:data:`PROTOCOL`)."""
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(chips_u8), allow_pickle=False)
        headers = {
            "Content-Type": "application/x-npy",
            "Accept": "application/x-npy, application/json",
            "X-Facexplain-Protocol": PROTOCOL,
            "X-Facexplain-Model": model,
        }
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(self.url, data=buf.getvalue(), headers=headers, method="POST")
        where = self.public_url
        try:
            with _OPENER.open(req, timeout=self.timeout_s) as resp:
                ctype = str(resp.headers.get("Content-Type", "")).split(";")[0].strip().lower()
                limit = len(chips_u8) * 8 * 65536 + 65536  # (N, d) float64 for d <= 64k, plus headers
                body = resp.read(limit + 1)
        except urllib.error.HTTPError as exc:
            detail = exc.read(200).decode("utf-8", errors="replace").strip()
            raise EndpointError(f"black-box endpoint {where} answered HTTP {exc.code}: {detail[:200]}") from None
        except TimeoutError:
            raise EndpointError(f"black-box endpoint {where} timed out after {self.timeout_s:g} s") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise EndpointError(f"black-box endpoint {where} unreachable ({reason})") from None
        if len(body) > limit:
            raise EndpointError(f"black-box endpoint {where} answered more than {limit} bytes; refused")
        return _parse_templates(body, ctype, len(chips_u8), where)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Redirects are errors: chips go to the configured address and nowhere else."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirect())


def _parse_templates(body: bytes, ctype: str, n: int, where: str) -> np.ndarray:
    try:
        if ctype == "application/json":
            arr = np.asarray(json.loads(body.decode("utf-8"))["templates"], dtype=np.float64)
        elif ctype in ("application/x-npy", "application/octet-stream"):
            arr = np.load(io.BytesIO(body), allow_pickle=False)
        else:
            raise EndpointError(
                f"black-box endpoint {where} answered Content-Type {ctype!r}; expected application/x-npy or json"
            )
    except EndpointError:
        raise
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise EndpointError(f"black-box endpoint {where} answered an unreadable body ({type(exc).__name__})") from None
    if arr.ndim != 2 or arr.shape[0] != n or not np.issubdtype(arr.dtype, np.floating):
        raise EndpointError(
            f"black-box endpoint {where} answered a {arr.dtype} array of shape {arr.shape} for {n} chips; "
            f"expected ({n}, d) floats"
        )
    return arr.astype(np.float32)


class BlackBoxRecognition(_ContractRecognition):
    """An auditor's template endpoint as the recognition net: chips -> 8-bit NHWC -> HTTP -> templates.

    Not differentiable: the forward runs without gradients and its output never requires them.
    """

    arch = BLACKBOX_ARCH
    differentiable = False

    def __init__(self, endpoint: BlackBoxEndpoint, contract: InputContract, model: str = "") -> None:
        if contract.value_range != (0.0, 255.0) or contract.mean != (0.0, 0.0, 0.0) or contract.std != (1.0, 1.0, 1.0):
            raise ProgramError("a black-box endpoint receives 8-bit chips: value_range 0..255, mean 0, std 1")
        super().__init__(contract)
        self.endpoint = endpoint
        self.model = model

    @classmethod
    def connect(cls, endpoint: BlackBoxEndpoint, contract: InputContract, dim: int, model: str = "") -> Any:
        """Build and probe: two chips must come back as an (2, ``dim``) finite float array."""
        net = cls(endpoint, contract, model)
        try:
            out = net(probe_chips(contract.chip_size))
        except EndpointError as exc:
            raise ProgramError(str(exc)) from None
        check_output(out, 2, dim, f"black-box endpoint {endpoint.public_url}")
        return net.eval()

    def input_block(self) -> dict[str, Any]:
        out = self.contract.to_dict(layout="NHWC")
        out["dtype"] = "uint8"
        out["normalisation"] = f"none: 8-bit {self.contract.channels} chips sent to the endpoint ({PROTOCOL})"
        return out

    @torch.no_grad()
    def forward(self, chips: torch.Tensor) -> torch.Tensor:
        x = chips.detach().float().round().clamp(0, 255)
        if self.contract.channels == "BGR":
            x = x.flip(1)
        u8 = x.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        if len(u8) == 0:
            return torch.zeros(0, 0, device=chips.device)
        step = max(1, self.endpoint.max_batch)
        parts = [self.endpoint.templates(u8[i : i + step], self.model) for i in range(0, len(u8), step)]
        return torch.from_numpy(np.concatenate(parts)).to(chips.device)
