"""The command line's dispatch: training code is imported only by `train`, every pipeline is reachable."""

from __future__ import annotations

import json
import subprocess
import sys

from cli.launcher import REPO
from cli.main import SERVICES, TRAINING_PIPELINES, build_parser


def test_parser_without_training_imports_no_training_code() -> None:
    code = (
        "import json, sys\n"
        "from cli.main import build_parser\n"
        "build_parser(with_training=False).parse_args(['registry', 'list'])\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'training')))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.splitlines()[-1]) == []


def test_every_pipeline_module_gives_the_train_command_its_flags_and_run() -> None:
    assert list(TRAINING_PIPELINES) == ["decoder", "sadfad", "probes"]
    for pipeline in TRAINING_PIPELINES.values():
        module = pipeline.load()
        assert callable(module.add_arguments) and callable(module.run_from_args)
    args = build_parser(with_training=True).parse_args(["train", "decoder", "--preset", "cpu"])
    assert args.pipeline == "decoder" and args.func == TRAINING_PIPELINES["decoder"].run


def test_serve_accepts_the_five_services() -> None:
    parser = build_parser(with_training=False)
    assert [parser.parse_args(["serve", s]).service for s in SERVICES] == list(SERVICES)
