"""The README's examples say what the code does: the commands it calls equivalent are equivalent."""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

from parallax.planner.cli import build_parser

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_the_plan_command_is_the_same_query_as_the_python_call_beside_it():
    call = re.search(r"^p = (px\.plan\(.*\))$", README, re.MULTILINE).group(1)
    node = ast.parse(call, mode="eval").body
    python = {"preset": ast.literal_eval(node.args[0]),
              **{k.arg: ast.literal_eval(k.value) for k in node.keywords}}
    line = re.search(r"^(parallax plan .*?)\s+# the same table$", README, re.MULTILINE).group(1)
    args = build_parser().parse_args(shlex.split(line)[2:])
    cli = {"preset": args.preset, "world_size": args.world_size, "device_bytes": args.device_memory,
           "seq_len": args.seq_len, "micro_batch": args.micro_batch}
    assert cli == python
