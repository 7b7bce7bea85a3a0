#!/usr/bin/env python3
"""Generate the Python gRPC modules of the facexplain API into services/api/v1/.

    python scripts/gen_protos.py            (what `make proto` runs)

The protos live in protos/facexplain/v1/*.proto (proto package facexplain.v1). Compiled as they
are, protoc would emit Python modules `facexplain.v1.*_pb2`, which collide with the core library
package `facexplain` (and that package must not contain gRPC code). So this script:

1. runs grpc_tools.protoc with `-I protos` into a temporary directory: *_pb2.py, *_pb2_grpc.py
   and type stubs (*_pb2.pyi, *_pb2_grpc.pyi from mypy-protobuf when its plugins are installed,
   protoc's own *_pb2.pyi otherwise);
2. rewrites the generated Python imports and module names from `facexplain.v1.X_pb2` to
   `services.api.v1.X_pb2` (the descriptor file names stay `facexplain/v1/X.proto`, so server
   reflection and the descriptor pool see the real proto paths);
3. writes the modules into services/api/v1/ (only files whose content changed are rewritten)
   and deletes generated modules there that no longer have a .proto.

It is idempotent. On a protoc error nothing in services/api/v1/ is touched and the script exits
with status 1 and protoc's message.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO / "protos"
PROTO_PACKAGE_DIR = Path("facexplain") / "v1"  # relative to PROTO_ROOT; also the descriptor path
OUT_DIR = REPO / "services" / "api" / "v1"
PY_PACKAGE = "services.api.v1"  # where the generated modules are imported from

GENERATED_GLOBS = ("*_pb2.py", "*_pb2.pyi", "*_pb2_grpc.py", "*_pb2_grpc.pyi")

# `from facexplain.v1 import common_pb2 as ...` (protoc python/grpc output, mypy-protobuf stubs)
_FROM_IMPORT = re.compile(r"^(\s*)from\s+facexplain\.v1\s+import\s+", re.MULTILINE)
# dotted module references: `import facexplain.v1.common_pb2`, the module name passed to
# _builder.BuildTopDescriptorsAndMessages, fully qualified names in stubs.
_DOTTED = re.compile(r"\bfacexplain\.v1\.(\w+_pb2(?:_grpc)?)\b")
# anything still importing the proto package as Python after the rewrite is a bug
_LEFTOVER = re.compile(r"^\s*(from|import)\s+facexplain\.v1\b|\bfacexplain\.v1\.\w+_pb2", re.MULTILINE)


class GenerationError(RuntimeError):
    """protoc failed or produced something this script cannot handle."""


def _plugin(name: str) -> str | None:
    """Path of a protoc plugin executable: next to this interpreter (venv bin), else on PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    return shutil.which(name)


def _well_known_include() -> str:
    """The include dir holding google/protobuf/*.proto that ships with grpc_tools."""
    import grpc_tools

    return str(Path(grpc_tools.__file__).resolve().parent / "_proto")


def rewrite_imports(text: str) -> str:
    """Point generated imports at services.api.v1 instead of the proto package path."""
    text = _FROM_IMPORT.sub(lambda m: f"{m.group(1)}from {PY_PACKAGE} import ", text)
    return _DOTTED.sub(lambda m: f"{PY_PACKAGE}.{m.group(1)}", text)


def _protoc_args(proto_root: Path, protos: list[Path], out: Path) -> tuple[list[str], str]:
    args = [
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"-I{_well_known_include()}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
    ]
    mypy, mypy_grpc = _plugin("protoc-gen-mypy"), _plugin("protoc-gen-mypy_grpc")
    if mypy and mypy_grpc:
        args += [
            f"--plugin=protoc-gen-mypy={mypy}",
            f"--mypy_out=quiet:{out}",
            f"--plugin=protoc-gen-mypy_grpc={mypy_grpc}",
            f"--mypy_grpc_out=quiet:{out}",
        ]
        stubs = "mypy-protobuf"
    else:
        args.append(f"--pyi_out={out}")
        stubs = "protoc --pyi_out (mypy-protobuf not installed: no *_pb2_grpc.pyi)"
    # Relative to the include root, so descriptor names are "facexplain/v1/<name>.proto".
    args += [p.relative_to(proto_root).as_posix() for p in protos]
    return args, stubs


def _run_protoc(args: list[str]) -> str:
    """Run protoc; return its warnings (stderr) on success."""
    # A subprocess keeps protoc's state (and any crash) out of this interpreter and lets us
    # report its stderr verbatim.
    cmd = [sys.executable, "-m", *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip() or "(no output)"
        raise GenerationError(f"protoc failed with exit status {proc.returncode}:\n{detail}")
    return proc.stderr.strip()


def generate(out_dir: Path = OUT_DIR, proto_root: Path = PROTO_ROOT, verbose: bool = True) -> list[Path]:
    """Generate into out_dir; return the generated files (sorted). Raises GenerationError."""
    proto_dir = proto_root / PROTO_PACKAGE_DIR
    protos = sorted(proto_dir.glob("*.proto"))
    if not protos:
        raise GenerationError(f"no .proto files in {proto_dir}")

    with tempfile.TemporaryDirectory(prefix="facexplain-protoc-") as tmp_name:
        tmp = Path(tmp_name)
        args, stubs = _protoc_args(proto_root, protos, tmp)
        warnings = _run_protoc(args)
        if warnings:
            print(f"gen_protos: protoc warnings:\n{warnings}", file=sys.stderr)

        produced = tmp / PROTO_PACKAGE_DIR
        new_files: dict[str, str] = {}
        for pattern in GENERATED_GLOBS:
            for path in produced.glob(pattern):
                text = rewrite_imports(path.read_text(encoding="utf-8"))
                leftover = _LEFTOVER.search(text)
                if leftover:
                    raise GenerationError(
                        f"{path.name}: unrewritten reference to the proto package: {leftover.group(0)!r}"
                    )
                new_files[path.name] = text
        # Every proto must have produced its messages module (a sanity check on protoc's output).
        missing = [p.stem for p in protos if f"{p.stem}_pb2.py" not in new_files]
        if missing:
            raise GenerationError(f"protoc produced no module for: {', '.join(missing)}")

    out_dir.mkdir(parents=True, exist_ok=True)
    init = out_dir / "__init__.py"
    if not init.exists():
        init.write_text('"""Generated by scripts/gen_protos.py, do not edit."""\n', encoding="utf-8")

    stale = [p for pattern in GENERATED_GLOBS for p in out_dir.glob(pattern) if p.name not in new_files]
    for path in stale:
        path.unlink()

    changed = 0
    for name, text in sorted(new_files.items()):
        target = out_dir / name
        if target.exists() and target.read_text(encoding="utf-8") == text:
            continue
        tmp_target = target.with_name(f".{name}.tmp")
        tmp_target.write_text(text, encoding="utf-8")
        tmp_target.replace(target)  # atomic: an importing process never sees half a module
        changed += 1

    if verbose:
        rel = out_dir.relative_to(REPO) if out_dir.is_relative_to(REPO) else out_dir
        print(
            f"gen_protos: {len(protos)} protos -> {len(new_files)} files in {rel} "
            f"({changed} written, {len(stale)} stale removed; stubs: {stubs})"
        )
    return sorted(out_dir / name for name in new_files)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=OUT_DIR,
        help=f"output directory (default: {OUT_DIR.relative_to(REPO)}); modules are imported as "
        f"{PY_PACKAGE}, so change it only for inspection",
    )
    parser.add_argument(
        "--proto-root",
        type=Path,
        default=PROTO_ROOT,
        help="include root holding facexplain/v1/*.proto (default: protos)",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    ns = parser.parse_args(argv)
    try:
        generate(ns.out.resolve(), ns.proto_root.resolve(), verbose=not ns.quiet)
    except GenerationError as exc:
        print(f"gen_protos: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
