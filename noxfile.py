"""Developer sessions: ``nox -s tests``, ``core``, ``lint``, ``docs``, ``bench``."""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "tests", "docs"]
nox.options.reuse_existing_virtualenvs = True

# torch is pinned before the project so that pip takes the local CPU build.
INSTALL = ("torch==2.13.0", "-e", ".[torch,onnx,examples,plot,pt2e,dev]")


@nox.session(python="3.11")
def tests(session: nox.Session) -> None:
    """The test suite, with the derandomized hypothesis CI profile."""
    session.install(*INSTALL)
    session.run("python", "-m", "pytest", *session.posargs, env={"HYPOTHESIS_PROFILE": "ci"})


@nox.session(python="3.11")
def core(session: nox.Session) -> None:
    """The core alone: installed with its test and plot extras only (no torch, onnx or
    onnxruntime), it runs its own tests, the toy backend's CLI included."""
    session.install("-e", ".[test,plot]")
    session.run(
        "python", "-m", "pytest", "tests/core", *session.posargs, env={"HYPOTHESIS_PROFILE": "ci"}
    )


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    """ruff: lint and formatting check."""
    session.install("ruff>=0.5")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python="3.11")
def bench(session: nox.Session) -> None:
    """The benchmarks; each prints its figures."""
    session.install(*INSTALL)
    session.run("python", "benchmarks/bench_core.py", *session.posargs)
    session.run("python", "benchmarks/bench_onnx.py")
    session.run("python", "benchmarks/bench_torch.py")
    session.run("python", "benchmarks/bench_other_networks.py")
    session.run("python", "benchmarks/bench_deployments.py")


@nox.session(python="3.11")
def docs(session: nox.Session) -> None:
    """The documentation, warnings as errors; its code examples run as doctests."""
    session.install(*INSTALL)
    session.run("sphinx-build", "-W", "-b", "html", "docs", "docs/_build/html")
    session.run("sphinx-build", "-W", "-b", "doctest", "docs", "docs/_build/doctest")
