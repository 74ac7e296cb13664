"""The ONNX backend on a corpus of exporter patterns (tests/helpers/onnx_corpus.py).

Every model must come out valid (full checker, onnxruntime) and equivalent: the outputs
before and after agree to an SQNR of 100 dB (float32) or 30 dB (float16) on two seeded
inputs. The region and fold counts are what a complete backend should reach, not what it
reaches today; for the exports of tests/helpers/torch_models.py, at least as many regions as the
PyTorch backend finds on the same module.
"""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import cle_onnx  # noqa: E402
from tests.helpers import onnx_corpus as oc  # noqa: E402

MIN_DB = 100.0
MIN_DB_FP16 = 30.0

_BUILDERS = {f.__name__: f for f in oc.ALL}
_NAMES = oc.NAMES + oc.TORCH_NAMES
_models: dict[str, oc.CorpusModel] = {}
_results: dict[str, tuple] = {}


@pytest.fixture(scope="module")
def torch_corpus(tmp_path_factory):
    pytest.importorskip("torch")
    return {cm.name: cm for cm in oc.torch_exports(tmp_path_factory.mktemp("exports"))}


@pytest.fixture
def corpus_model(request) -> oc.CorpusModel:
    name = request.param
    if name in _BUILDERS:
        if name not in _models:
            _models[name] = _BUILDERS[name]()
        cm = _models[name]
    else:
        cm = request.getfixturevalue("torch_corpus")[name]
    if cm.model is None:
        pytest.skip(cm.skip)
    return cm


def equalized(cm: oc.CorpusModel):
    """``(eq, report, input bytes before, input bytes after)``, computed once per model;
    an exception from equalize_model is raised again on every call."""
    if cm.name not in _results:
        before = cm.model.SerializeToString()
        try:
            eq, report = cle_onnx.equalize_model(cm.model)
        except Exception as e:  # noqa: BLE001 - re-raised in each test
            _results[cm.name] = (e,)
        else:
            _results[cm.name] = (eq, report, before, cm.model.SerializeToString())
    result = _results[cm.name]
    if len(result) == 1:
        raise result[0]
    return result


corpus = pytest.mark.parametrize("corpus_model", _NAMES, ids=_NAMES, indirect=True)

# Patterns the translation does not handle yet; strict, so that support makes them fail.
NOT_YET: dict[str, str] = {}  # corpus model -> why it is not equalized yet (strict xfail)


@corpus
def test_corpus_model_is_valid(corpus_model):
    model = corpus_model.model
    onnx.checker.check_model(model, full_check=True)
    for seed in (0, 1):
        outputs = oc.run(model, seed)
        assert outputs and all(np.all(np.isfinite(o)) for o in outputs)
    assert set(corpus_model.expect) in ({"regions", "folds"}, {"regions_min"})


@corpus
def test_equalized_model_is_valid_and_equivalent(corpus_model):
    eq, report, before, after = equalized(corpus_model)
    assert after == before, "the input model must not change"
    onnx.checker.check_model(eq, full_check=True)
    oc.session(eq)  # onnxruntime loads it
    floor = MIN_DB_FP16 if oc.is_float16(corpus_model.model) else MIN_DB
    db = oc.min_sqnr(corpus_model.model, eq)
    assert db >= floor, f"SQNR {db:.1f} dB < {floor} dB\n{report.summary()}"


@corpus
def test_equalized_counts(corpus_model, request):
    if corpus_model.name in NOT_YET:
        request.applymarker(pytest.mark.xfail(reason=NOT_YET[corpus_model.name], strict=True))
    eq, report, _, _ = equalized(corpus_model)
    expect = corpus_model.expect
    got = {"regions": len(report.regions), "folds": len(report.folds)}
    why = f"{corpus_model.pattern}\n{report.summary()}"
    if "regions_min" in expect:
        assert got["regions"] >= expect["regions_min"], why
    else:
        assert got == {"regions": expect["regions"], "folds": expect["folds"]}, why


def test_if_branches_and_what_they_read_are_untouched():
    cm = oc.if_branch_lstm()
    eq, report, _, _ = equalized(cm)
    (before,) = [n for n in cm.model.graph.node if n.op_type == "If"]
    (after,) = [n for n in eq.graph.node if n.op_type == "If"]
    assert after == before
    reads = {i for a in before.attribute for n in a.g.node for i in n.input}
    old = {t.name: t for t in cm.model.graph.initializer if t.name in reads}
    new = {t.name: t for t in eq.graph.initializer if t.name in reads}
    assert len(old) == 3 and new == old  # the LSTM's W, R and B
    consts = {o for n in cm.model.graph.node if n.op_type == "Constant" for o in n.output}
    for name in reads & consts:  # the outer Constant read in a branch keeps its value
        (a,) = [n for n in cm.model.graph.node if name in n.output]
        assert [n for n in eq.graph.node if name in n.output] == [a]
