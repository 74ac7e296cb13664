"""The ``cle`` sessions that ``docs/cli.rst`` shows, regenerated from real runs.

Exports the pretrained EfficientNet-Lite0 with the TorchScript exporter (which folds its
batch norms), runs each command of ``COMMANDS`` on it as the docs show it, saves what
each printed in ``benchmarks/results/doc_figures.json``, and rewrites the blocks of the
docs that lie between ``.. figures:NAME`` and ``.. end figures:NAME`` comments from that
file. ``tests/test_docs.py`` checks that the docs equal what the saved file gives, so a
figure in those blocks cannot go stale without the test saying so; the run itself takes
a minute or two on 2 cores and is not part of the tests.

Run: ``python benchmarks/doc_figures.py`` (runs everything, then rewrites the docs), or
``python benchmarks/doc_figures.py --docs-only`` (rewrites the docs from the saved file).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "doc_figures.json"
DOCS = (ROOT / "docs" / "cli.rst", ROOT / "docs" / "benchmarks.rst")

COMMANDS = {
    "equalize": "cle equalize effnet_lite0.onnx -o effnet_lite0_cle.onnx --report report.json "
    "--check --dim batch=2",
    "evaluate": "cle evaluate effnet_lite0.onnx effnet_lite0_cle.onnx",
    "demo": "cle demo",
    "demo-all": "cle demo --all --out cle-demo-all",
}
"""The sessions, by the name their block has in the docs, in the order they run."""


def run_commands() -> dict[str, dict[str, str]]:
    """Each command's output (stdout), run in a fresh folder on the exported model."""
    from cle_torch._examples import efficientnet_lite0, export_onnx

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        export_onnx(efficientnet_lite0(), Path(tmp) / "effnet_lite0.onnx")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        for name, command in COMMANDS.items():
            argv = [sys.executable, "-m", "cle_core._cli", *shlex.split(command)[1:]]
            proc = subprocess.run(argv, cwd=tmp, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{command} exited {proc.returncode}:\n{proc.stderr}")
            results[name] = {"command": command, "output": proc.stdout.rstrip("\n")}
            print(f"$ {command}\n{proc.stdout}", flush=True)
    return results


def block(session: dict[str, str]) -> list[str]:
    """The reStructuredText console block of one session."""
    lines = [".. code-block:: console", "", f"    $ {session['command']}"]
    lines += [f"    {line}".rstrip() for line in session["output"].splitlines()]
    return lines


def rewrite(text: str, results: dict[str, dict[str, str]]) -> str:
    """``text`` with every marked block replaced by its session from ``results``."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        out.append(lines[i])
        name = _marker(lines[i], ".. figures:")
        if name is None:
            i += 1
            continue
        if name not in results:
            raise SystemExit(f"the docs mark a block {name!r} that no command writes")
        end = next(
            (j for j in range(i + 1, len(lines)) if _marker(lines[j], ".. end figures:") == name),
            None,
        )
        if end is None:
            raise SystemExit(f"block {name!r} has no '.. end figures:{name}'")
        # blank lines around the block: a comment absorbs the indented lines after it
        out += ["", *block(results[name]), ""]
        out.append(lines[end])
        i = end + 1
    return "\n".join(out)


def marked_names(text: str) -> list[str]:
    """The names of the blocks that ``text`` marks."""
    return [n for n in (_marker(line, ".. figures:") for line in text.split("\n")) if n]


def _marker(line: str, prefix: str) -> str | None:
    return line[len(prefix) :].strip() if line.startswith(prefix) else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs-only", action="store_true", help="rewrite from the saved file")
    args = parser.parse_args()
    if args.docs_only:
        results = json.loads(RESULTS.read_text())
    else:
        results = run_commands()
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    for doc in DOCS:
        doc.write_text(rewrite(doc.read_text(), results))
        print(f"rewrote {doc.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
