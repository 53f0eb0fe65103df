"""Local test mode: run the handler once on `--test_input` (or ./test_input.json) and print the result."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from runplane_worker import results


def test_input_from_argv(argv: list[str]) -> str | None:
    for index, arg in enumerate(argv):
        if arg == "--test_input" and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith("--test_input="):
            return arg.split("=", 1)[1]
    return None


def run_local(config: dict[str, Any], test_input: str | None) -> int:
    if test_input is None:
        if not os.path.exists("test_input.json"):
            print("runplane_worker | no --test_input and no test_input.json", file=sys.stderr)
            return 1
        with open("test_input.json", encoding="utf-8") as fh:
            test_input = fh.read()
    job = json.loads(test_input)
    if not isinstance(job, dict) or job.get("input") is None:
        print("runplane_worker | the test job has no input", file=sys.stderr)
        return 1
    job.setdefault("id", "local_test")
    handler = config["handler"]
    runner = results.AsyncRunner()
    if results.is_generator(handler):
        final: dict[str, Any] = {"output": []}
        for chunk in results.stream(handler, job, runner):
            end = results.stream_result(chunk)
            if end is not None:
                final = end
                break
            final["output"].append(chunk["output"])
    else:
        final = results.run(handler, job, runner)
    print(json.dumps(final, ensure_ascii=False, default=str))
    return 1 if final.get("error") else 0
