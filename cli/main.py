"""The ``facexplain`` command line: run services and call them.

facexplain serve embedding --port 50051
facexplain serve decoding --port 50052
facexplain serve directions --port 50053
facexplain serve attributes --port 50054
facexplain serve counterfactual --port 50055
facexplain embed DIR --target 127.0.0.1:50051 --out templates.npz
facexplain reconstruct DIR --target 127.0.0.1:50052 --out recon/
facexplain directions ssi|centroid|regression DIR[,labels.csv] --target 127.0.0.1:50053 --out sets.json
facexplain attributes importance --data DIR --target 127.0.0.1:50054 --control --out importance/
facexplain counterfactual attack|explain IMAGE REF --target 127.0.0.1:50055 --out cf/ | defence --pairs pairs.csv
facexplain traverse IMAGE --target 127.0.0.1:50053 --set ID|NAME@VERSION --index K --alphas -2 0 2 --out strip.png
facexplain registry register-defaults | promote NAME VERSION [--alias champion] | list | check NAME
facexplain staging up | test | down        # k8s/overlays/staging on the cluster in KUBECONFIG
facexplain export torchserve NAME@ALIAS --out DIR   # a TorchServe .mar of a registered embedder/decoder
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import grpc
import numpy as np
from tqdm import tqdm

from cli.attributes import add_attributes_parsers
from cli.audit import add_audit_parser
from cli.counterfactual import add_counterfactual_parsers
from cli.directions import add_directions_parsers
from cli.registry import add_registry_parser
from cli.staging import add_staging_parser
from cli.torchserve import add_export_parser
from sdk.client import (
    TARGET_SYNTAX,
    ClientSecurityError,
    DecodingClient,
    EmbeddingClient,
    image_from_path,
    template_array,
    wait_ready,
)

SERVICES = ("embedding", "decoding", "directions", "attributes", "counterfactual")


# -- serve --------------------------------------------------------------------------------------------------


def service_main(service: str) -> Callable[[], None]:
    """The entry point of ``service``. Imported only when `serve` runs: a server pulls torch, dlib and its
    models, which the client commands neither pay for at start-up nor need installed."""
    if service == "embedding":
        from services.embedding.app import main as embedding_main

        return embedding_main
    if service == "decoding":
        from services.decoding.app import main as decoding_main

        return decoding_main
    if service == "directions":
        from services.directions.app import main as directions_main

        return directions_main
    if service == "attributes":
        from services.attributes.app import main as attributes_main

        return attributes_main
    if service == "counterfactual":
        from services.counterfactual.app import main as counterfactual_main

        return counterfactual_main
    raise KeyError(service)


def _cmd_serve(args: argparse.Namespace) -> int:
    # Flags override the FACEXPLAIN_* environment; everything else comes from the environment.
    for flag, env in (
        ("port", "FACEXPLAIN_PORT"),
        ("host", "FACEXPLAIN_HOST"),
        ("metrics_port", "FACEXPLAIN_METRICS_PORT"),
    ):
        value = getattr(args, flag)
        if value is not None:
            os.environ[env] = str(value)
    if args.service not in SERVICES:
        print(f"unknown service {args.service!r}", file=sys.stderr)
        return 2
    service_main(args.service)()
    return 0


# -- embed / reconstruct ------------------------------------------------------------------------------------


def _input_images(folder: str) -> tuple[Path, list[Path]] | int:
    """The images under ``folder``, or exit code 2 after saying what is wrong."""
    # facexplain.data.faces imports torch (its loaders make tensors): only embed and reconstruct pay for it
    from facexplain.data.faces import list_images

    root = Path(folder)
    if not root.is_dir():
        print(f"error: {root} is not a folder", file=sys.stderr)
        return 2
    paths = list_images(root)
    if not paths:
        print(f"error: no images (jpg, png, pgm, bmp, ...) under {root}", file=sys.stderr)
        return 2
    return root, paths


def _ready(channel: grpc.Channel, service: str, args: argparse.Namespace) -> bool:
    """Wait for the service; say how to start it when it does not answer."""
    try:
        wait_ready(channel, args.connect_timeout)
    except ConnectionError:
        print(
            f"error: {service} service at {args.target} is not reachable (is `facexplain serve {service}` running?)",
            file=sys.stderr,
        )
        return False
    return True


def _cmd_embed(args: argparse.Namespace) -> int:
    found = _input_images(args.dir)
    if isinstance(found, int):
        return found
    root, paths = found
    client = EmbeddingClient(args.target, timeout=args.timeout)
    if not _ready(client.channel, "embedding", args):
        return 3
    kept: list[str] = []
    templates: list[np.ndarray] = []
    failed: list[tuple[str, str]] = []
    model = version = ""
    with tqdm(total=len(paths), unit="img", desc="embedding", disable=args.quiet) as bar:
        for start in range(0, len(paths), args.batch_size):
            chunk = paths[start : start + args.batch_size]
            try:
                resp = client.embed_batch([image_from_path(p) for p in chunk], normalize=args.normalize)
            except grpc.RpcError as err:
                print(f"error: EmbedBatch failed: {err.code().name}: {err.details()}", file=sys.stderr)
                return 4
            model, version = resp.model.name, resp.model.version
            for res in resp.results:
                rel = chunk[res.index].relative_to(root).as_posix()
                if res.WhichOneof("outcome") == "ok":
                    kept.append(rel)
                    templates.append(template_array(res.ok.template))
                else:
                    failed.append((rel, f"{_CODE_NAMES.get(res.error.code, 'UNKNOWN')}: {res.error.message}"))
            bar.update(len(chunk))
    client.close()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    dim = templates[0].shape[0] if templates else 0
    np.savez(
        out,
        paths=np.asarray(kept, dtype=str),
        templates=np.stack(templates).astype(np.float32) if templates else np.zeros((0, dim), np.float32),
        normalized=np.asarray(bool(args.normalize)),
        model=np.asarray(model),
        version=np.asarray(version),
        failed=np.asarray(failed, dtype=str).reshape(-1, 2),
    )
    kind = "L2-normalised" if args.normalize else "raw (not normalised)"
    print(f"{len(kept)} templates ({kind}, model {model} version {version}), {len(failed)} failed -> {out}")
    return 0


_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}

# Reconstruct errors that belong to one image (bad or too large file, no face): recorded, the run goes on.
# Any other code (UNAVAILABLE: no decoder loaded, INTERNAL, ...) is the service's and stops the run.
_PER_IMAGE_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def output_stems(paths: list[Path], root: Path) -> dict[Path, str]:
    """The output file stem of each input image (``<stem>.aligned.png``, ``<stem>.recon.png``).

    An image whose stem is unique among the inputs keeps it (``a/b/001.jpg`` -> ``001``). Images
    sharing a stem in different folders use their path relative to ``root`` without the extension,
    with ``/`` replaced by ``__`` (``orl/s1/1.pgm`` -> ``orl__s1__1``); if even that collides (same
    folder, different extensions) the extension is kept (``orl__s1__1.pgm``). Anything still equal
    after that gets ``~N`` appended, so no output ever overwrites another.
    """
    rel = {p: p.relative_to(root) for p in paths}
    counts = Counter(p.stem for p in paths)
    stems = {p: p.stem if counts[p.stem] == 1 else rel[p].with_suffix("").as_posix().replace("/", "__") for p in paths}
    dup = Counter(stems.values())
    stems = {p: rel[p].as_posix().replace("/", "__") if dup[s] > 1 else s for p, s in stems.items()}
    seen: Counter[str] = Counter()
    out: dict[Path, str] = {}
    taken = set(stems.values())
    for p in paths:
        stem = stems[p]
        seen[stem] += 1
        if seen[stem] > 1:
            k = seen[stem]
            while f"{stem}~{k}" in taken:
                k += 1
            stem = f"{stem}~{k}"
            taken.add(stem)
        out[p] = stem
    return out


@dataclass
class _Reconstructed:
    """What a reconstruct run gathered: metrics rows, failed images, the models that served them."""

    rows: list[dict[str, str]]
    failed: list[tuple[str, str]]
    decoder: str = ""
    fr_model: str = ""


def _reconstruct_all(
    client: DecodingClient, paths: list[Path], root: Path, out: Path, quiet: bool
) -> _Reconstructed | int:
    """Reconstruct each image, writing its chip and decoded face into ``out``; exit code 4 when the service
    fails (an error that belongs to one image is recorded and the run goes on)."""
    stems = output_stems(paths, root)
    done = _Reconstructed([], [])
    with tqdm(total=len(paths), unit="img", desc="reconstructing", disable=quiet) as bar:
        for path in paths:
            rel = path.relative_to(root).as_posix()
            try:
                resp = client.reconstruct(image_from_path(path))
            except OSError as exc:
                done.failed.append((rel, f"cannot read the file: {exc.strerror or exc}"))
                bar.update(1)
                continue
            except grpc.RpcError as err:
                if err.code() not in _PER_IMAGE_CODES:
                    print(f"error: Reconstruct failed on {rel}: {err.code().name}: {err.details()}", file=sys.stderr)
                    return 4
                done.failed.append((rel, f"{err.code().name}: {err.details()}"))
                bar.update(1)
                continue
            stem = stems[path]
            (out / f"{stem}.aligned.png").write_bytes(resp.aligned.encoded)
            (out / f"{stem}.recon.png").write_bytes(resp.reconstruction.encoded)
            m = resp.metrics
            done.rows.append(
                {
                    "path": rel,
                    "psnr": f"{m.psnr:.4f}",
                    "ssim": f"{m.ssim:.5f}",
                    "identity_cosine": f"{m.identity_cosine:.5f}",
                    "same_person": str(m.same_person).lower(),
                }
            )
            done.decoder = f"{resp.decoder.name} v{resp.decoder.version}"
            done.fr_model = f"{resp.fr_model.name} v{resp.fr_model.version}"
            bar.update(1)
    return done


def _write_reconstruct_csvs(done: _Reconstructed, out: Path) -> None:
    with open(out / "metrics.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "psnr", "ssim", "identity_cosine", "same_person"])
        writer.writeheader()
        writer.writerows(done.rows)
    with open(out / "failed.csv", "w", newline="") as fh:
        fwriter = csv.writer(fh)
        fwriter.writerow(["path", "reason"])
        fwriter.writerows(done.failed)


def _cmd_reconstruct(args: argparse.Namespace) -> int:
    found = _input_images(args.dir)
    if isinstance(found, int):
        return found
    root, paths = found
    client = DecodingClient(args.target, timeout=args.timeout)
    if not _ready(client.channel, "decoding", args):
        return 3
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        done = _reconstruct_all(client, paths, root, out, args.quiet)
    finally:
        client.close()
    if isinstance(done, int):
        return done
    _write_reconstruct_csvs(done, out)
    rows, failed = done.rows, done.failed
    if not rows:
        reason = failed[0][1] if failed else "no result"
        print(
            f"error: no image reconstructed ({len(failed)} failed, e.g. {reason}); see {out / 'failed.csv'}",
            file=sys.stderr,
        )
        return 1

    def mean(key: str) -> float:
        return sum(float(r[key]) for r in rows) / len(rows)

    same = sum(r["same_person"] == "true" for r in rows)
    print(
        f"{len(rows)} reconstructed, {len(failed)} failed (decoder {done.decoder}, FR model {done.fr_model}): "
        f"mean PSNR {mean('psnr'):.2f} dB, SSIM {mean('ssim'):.3f}, identity cosine {mean('identity_cosine'):.3f}, "
        f"same person {same}/{len(rows)} -> {out}"
    )
    return 0


# -- train --------------------------------------------------------------------------------------------------


class TrainingCli(Protocol):
    """What each ``training.<pipeline>.cli`` module gives the `train` command."""

    def add_arguments(self, p: argparse.ArgumentParser) -> None: ...

    def run_from_args(self, args: argparse.Namespace) -> int: ...


# The pipelines' modules are imported only when a `train` command runs: training pulls torch and mlflow,
# and no other command may import it (a service host need not ship it; `registry check` is tested for it).
def _decoder_cli() -> TrainingCli:
    from training.decoder import cli

    return cli


def _sadfad_cli() -> TrainingCli:
    from training.sadfad import cli

    return cli


def _probes_cli() -> TrainingCli:
    from training.probes import cli

    return cli


@dataclass(frozen=True)
class Pipeline:
    """One `facexplain train <name>` subcommand: its help texts and where its flags and run live."""

    help: str
    description: str
    load: Callable[[], TrainingCli]

    def run(self, args: argparse.Namespace) -> int:
        return int(self.load().run_from_args(args))


TRAINING_PIPELINES = {
    "decoder": Pipeline(
        help="train a Deep Face Decoder for a registered FR model",
        description="Train a Deep Face Decoder (DFD) for a registered FR model: face set, identity-disjoint "
        "split, DFD losses, MLflow tracking, evaluation on unseen identities, registration.",
        load=_decoder_cli,
    ),
    "sadfad": Pipeline(
        help="train an interpretable FR net with the SAD/FAD losses (Yin et al.)",
        description="Train the interpretable FR net (hypercolumn + filter bank, LMF) with the spatial / feature "
        "activation diversity losses: identity-disjoint split, synthetic occlusion, MLflow tracking, "
        "verification clean and occluded, registration as a servable embedder.",
        load=_sadfad_cli,
    ),
    "probes": Pipeline(
        help="fit accessory/appearance probes (eyeglasses, hat, smiling, ...) on CelebA labels",
        description="Fit one logistic probe per CelebA label on frozen face-api features (not the FR model) of "
        "clean and degraded chips: identity-disjoint split, L2 chosen on validation identities, held-out "
        "balanced accuracy, MLflow tracking, registration as facexplain-probes-faceapi.",
        load=_probes_cli,
    ),
}


# -- the parser ---------------------------------------------------------------------------------------------


def _add_serve_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s = sub.add_parser("serve", help="run a gRPC service in the foreground (config from FACEXPLAIN_* env vars)")
    s.add_argument("service", choices=list(SERVICES))
    s.add_argument(
        "--port",
        type=int,
        help="gRPC port (FACEXPLAIN_PORT; default 50051 embedding, 50052 decoding, 50053 directions, 50054 attributes, "
        "50055 counterfactual)",
    )
    s.add_argument("--host", help="bind address (FACEXPLAIN_HOST, default 127.0.0.1)")
    s.add_argument("--metrics-port", type=int, help="Prometheus port (FACEXPLAIN_METRICS_PORT, default: any free)")
    s.set_defaults(func=_cmd_serve)


def _add_embed_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    e = sub.add_parser("embed", help="embed every image under DIR through a running embedding service")
    e.add_argument("dir")
    e.add_argument("--target", default="127.0.0.1:50051", help=f"the embedding service: {TARGET_SYNTAX}")
    e.add_argument("--out", required=True, help="output .npz (paths, templates, normalized, model, version, failed)")
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--normalize", action="store_true", help="store L2-normalised templates (default: raw)")
    e.add_argument("--timeout", type=float, default=120.0, help="seconds per batch request")
    e.add_argument("--connect-timeout", type=float, default=30.0)
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=_cmd_embed)


def _add_reconstruct_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    r = sub.add_parser(
        "reconstruct",
        help="reconstruct every face under DIR through a running decoding service (chips, decoded faces, metrics)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""\
Writes into OUT:
  <stem>.aligned.png   the aligned face chip at the decoder's size (the reference)
  <stem>.recon.png     the face decoded from the chip's template
  metrics.csv          path,psnr,ssim,identity_cosine,same_person (path relative to DIR), one row per face
  failed.csv           path,reason for images that could not be reconstructed (no face, not an image, ...)
<stem> is the image's file name without extension; when images in different folders share it, it is
the path relative to DIR without extension with '/' replaced by '__' (orl/s1/1.pgm -> orl__s1__1).

Exit status: 0 done (some images may be in failed.csv), 1 no image reconstructed, 2 bad DIR,
3 service not reachable, 4 the service failed (e.g. UNAVAILABLE: no decoder loaded).""",
    )
    r.add_argument("dir", help="folder of images, searched recursively")
    r.add_argument(
        "--target",
        default="127.0.0.1:50052",
        help=f"the decoding service (default: where `facexplain serve decoding` listens): {TARGET_SYNTAX}",
    )
    r.add_argument("--out", required=True, help="output folder (created if missing)")
    r.add_argument("--timeout", type=float, default=120.0, help="seconds per image request")
    r.add_argument("--connect-timeout", type=float, default=30.0)
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.set_defaults(func=_cmd_reconstruct)


def _add_train_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser], with_training: bool) -> None:
    t = sub.add_parser("train", help="train a model with an MLflow-tracked pipeline and register it")
    tsub = t.add_subparsers(dest="pipeline", required=True)
    for name, pipeline in TRAINING_PIPELINES.items():
        parser = tsub.add_parser(name, help=pipeline.help, description=pipeline.description)
        if with_training:
            pipeline.load().add_arguments(parser)
        parser.set_defaults(func=pipeline.run)


# Client security flags: accepted before or after the subcommand of every command that calls a service, and
# exported as the FACEXPLAIN_* variables the SDK reads, so the audit and every client get them unchanged.
CLIENT_SECURITY_FLAGS = (
    ("--tls-ca-file", "FACEXPLAIN_TLS_CA_FILE", "PEM CA bundle that signed the servers' certificates (turns TLS on)"),
    ("--tls-client-cert-file", "FACEXPLAIN_TLS_CLIENT_CERT_FILE", "PEM client certificate for mutual TLS"),
    ("--tls-client-key-file", "FACEXPLAIN_TLS_CLIENT_KEY_FILE", "PEM private key of the client certificate"),
    ("--token", "FACEXPLAIN_TOKEN", "bearer token (prefer the FACEXPLAIN_TOKEN variable: flags show in `ps`)"),
)
_NO_CLIENT = ("serve", "train", "registry", "staging", "export")


def _add_client_security_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("security (services with TLS / authentication)")
    for flag, env, help_text in CLIENT_SECURITY_FLAGS:
        group.add_argument(flag, default=argparse.SUPPRESS, metavar="FILE" if "file" in flag else "TOKEN",
                           help=f"{help_text} ({env})")  # fmt: skip


def _leaf_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [parser]
    return [leaf for sub in subs for child in dict.fromkeys(sub.choices.values()) for leaf in _leaf_parsers(child)]


def export_client_security(args: argparse.Namespace) -> None:
    """Flags override the environment for this process and the clients it opens."""
    for flag, env, _ in CLIENT_SECURITY_FLAGS:
        value = getattr(args, flag.lstrip("-").replace("-", "_"), None)
        if value is not None:
            os.environ[env] = value


def build_parser(with_training: bool = True) -> argparse.ArgumentParser:
    """The whole command line; ``with_training=False`` leaves out the flags of ``train`` subcommands, whose
    definitions live in training code that other commands must not import (a service host may not ship it)."""
    p = argparse.ArgumentParser(prog="facexplain", description="Explainability for face-recognition models.")
    sub = p.add_subparsers(dest="command", required=True)
    _add_serve_parser(sub)
    _add_embed_parser(sub)
    _add_reconstruct_parser(sub)
    add_directions_parsers(sub)
    add_attributes_parsers(sub)
    add_counterfactual_parsers(sub)
    add_audit_parser(sub)
    add_registry_parser(sub)
    add_staging_parser(sub)
    add_export_parser(sub)
    _add_train_parsers(sub, with_training)
    _add_client_security_flags(p)
    for name, child in sub.choices.items():
        if name not in _NO_CLIENT:
            for leaf in _leaf_parsers(child):
                _add_client_security_flags(leaf)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(with_training=bool(argv) and argv[0] == "train").parse_args(argv)
    export_client_security(args)
    try:
        return int(args.func(args))
    except ClientSecurityError as exc:  # a setting the user gave: say which, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
