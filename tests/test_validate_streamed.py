"""The layer-streamed reference of `validate` (issue 20 item 4) against the whole-model one.

- The two references give the same outputs and taps on the same jobs, with and without forced routing.
- `validate` gives the same verdict, flips, unit checks and generation tokens with either, on samples whose fp16
  exports have routing flips and near-tie divergences (the issue's cases).
- The streamed path never builds the whole model.
- Teacher-forced generation (one forward over the prompt and the candidate's tokens) gives the KV-cache decoder's
  tokens and logits, and its free-running continuation after a divergence follows the reference's own greedy run.
"""

from __future__ import annotations

import numpy as np
import pytest

import moe_export
from moe_export.export.manifest import Artifact
from moe_export.runtimes.decoding import Prompts, torch_greedy
from moe_export.runtimes.registry import RunnerOptions, make_runner
from moe_export.validation.feeds import random_feeds
from moe_export.validation.generation import default_prompts
from moe_export.validation.generation_units import forced_feeds, free_running, step_logits
from moe_export.validation.options import ValidateOptions
from moe_export.validation.reference_run import Job, StreamedReference, WholeReference
from moe_export.validation.replay import forced_routes
from moe_export.validation.report import ValidationReport
from tests.test_mutations import _export

OPTIONS = RunnerOptions(torch_dtype="fp32")
# Both references run the same modules in fp32 on the same inputs; the streamed one runs each decoder layer in
# two calls (attention with the MLP replaced by a zero probe, then residual + MLP), which adds the same terms in
# the same order. Measured difference: 0 on the samples; 1e-6 relative leaves room for a BLAS that blocks
# differently for the smaller calls, far below the fp32 export tolerance (1e-4 relative).
SAME = 1e-6


def _jobs(artifact: Artifact, with_routes: dict | None) -> list[Job]:
    interface = artifact.interface
    feeds = [interface.complete_feeds(random_feeds(interface, b, s, artifact.vocab_size(), 3)) for b, s in ((2, 9),)]
    prompt = default_prompts(artifact.vocab_size(), 0, 1)[1]  # the right-padded batch
    tokens = np.random.default_rng(4).integers(0, artifact.vocab_size(), size=(3, 5))
    jobs = [Job(f) for f in feeds] + [Job(forced_feeds(prompt, tokens, interface))]
    return jobs + ([Job(feeds[0], with_routes)] if with_routes is not None else [])


@pytest.mark.parametrize(("sample", "dtype"), [("goat", "fp16"), ("mixlora_dynamic", "fp16"), ("mola", "fp32")])
def test_streamed_and_whole_references_compute_the_same(
    tmp_path_factory: pytest.TempPathFactory, sample: str, dtype: str
) -> None:
    artifact = Artifact.open(_export(tmp_path_factory, sample, dtype))
    ort = make_runner("onnxruntime", artifact, OPTIONS)
    ort.request_taps()
    with WholeReference(make_runner("torch", artifact, OPTIONS), replay=True) as whole:
        with ort:
            ort.infer(_jobs(artifact, None)[0].feeds)
            routes = forced_routes(dict(ort.last_taps), whole.units)
        assert routes, "the candidate's taps give forced routes"
        want = whole.run(_jobs(artifact, routes))
        units = whole.units
    with StreamedReference(artifact, OPTIONS) as streamed:
        assert sorted(streamed.units) == sorted(units)
        got = streamed.run(_jobs(artifact, routes))
    for w, g in zip(want, got, strict=True):
        (name,) = g.outputs
        scale = float(np.abs(w.outputs[name]).max())
        assert np.abs(w.outputs[name] - g.outputs[name]).max() <= SAME * scale
        assert list(w.taps) == list(g.taps), "same units tapped in the same order"
        for unit, capture in w.taps.items():
            assert (capture.expert_ids == g.taps[unit].expert_ids).all()
            np.testing.assert_allclose(g.taps[unit].x, capture.x, rtol=0, atol=SAME * float(np.abs(capture.x).max()))


def _summary(report: ValidationReport) -> dict:
    data = report.to_dict()
    units = {r: {n: (u["flip_count"], u["router_flip_count"], u["passed"]) for n, u in us.items()}
             for r, us in data["units"].items()}  # fmt: skip
    comparisons = [(c["runtime"], c["shape"], c["passed"], c["flip_count"]) for c in data["comparisons"]]
    generation = [(g["label"], g["passed"], g["reference_tokens"], g["candidate_tokens"], g["near_ties"])
                  for g in data["generation"]]  # fmt: skip
    return {"passed": data["passed"], "units": units, "comparisons": comparisons, "generation": generation}


@pytest.mark.parametrize("sample", ["moelora", "moe_peft_mola", "goat", "mixlora_dynamic"])
def test_streamed_validate_gives_the_whole_models_verdict(
    tmp_path_factory: pytest.TempPathFactory, sample: str
) -> None:
    """fp16 exports of the samples the issue names (flips whose margins are below fp16 rounding, goat's right-padded
    generation): both references pass them with the same flips, unit verdicts and generation tokens."""
    export = _export(tmp_path_factory, sample, "fp16")
    streamed = moe_export.validate(export)
    whole = moe_export.validate(export, reference="whole")
    assert any("layer-streamed" in n for n in streamed.notes) and not any("layer-streamed" in n for n in whole.notes)
    assert streamed.passed and whole.passed, streamed.failures + whole.failures
    assert _summary(streamed) == _summary(whole)
    for s, w in zip(streamed.comparisons, whole.comparisons, strict=True):
        for name, result in s.result.outputs.items():
            assert result.max_abs == pytest.approx(w.result.outputs[name].max_abs, rel=1e-3, abs=1e-6)


def test_streamed_validate_never_builds_the_whole_model(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    export = _export(tmp_path_factory, "mola", "fp32")

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the whole reference model was built")

    monkeypatch.setattr("moe_export.runtimes.torch_runner.TorchRunner._activate", refuse)
    assert moe_export.validate(export).passed


def test_teacher_forced_generation_is_the_kv_cache_decode(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Free-running from teacher-forced logits equals torch_greedy (the KV-cache loop) on a right-padded batch, both
    when the candidate's tokens are the reference's (one forward) and when a row leaves them at step 2 (the rest of
    that row is continued step by step, the other rows keep the teacher-forced logits)."""
    artifact = Artifact.open(_export(tmp_path_factory, "goat", "fp32"))
    prompt = default_prompts(artifact.vocab_size(), 0, 2)[1]
    steps = 6
    runner = make_runner("torch", artifact, OPTIONS)
    with WholeReference(runner, replay=True) as reference:
        kv = torch_greedy(runner.model, prompt, steps)  # type: ignore[attr-defined]
        for candidate in (kv.tokens, _leave_at(kv.tokens, row=1, step=2, vocab=artifact.vocab_size())):
            (ran,) = reference.run([Job(forced_feeds(prompt, candidate, artifact.interface))])
            own = step_logits(ran.outputs[artifact.interface.logits_name], prompt, steps)
            free = free_running(reference, prompt, own, candidate, artifact.interface.logits_name, artifact.interface)
            assert (free.tokens == kv.tokens).all()
            scale = float(np.abs(kv.logits).max())
            assert np.abs(free.logits - kv.logits).max() <= 1e-5 * scale  # cache vs no cache: fp32 summation order


def _leave_at(tokens: np.ndarray, row: int, step: int, vocab: int) -> np.ndarray:
    """`tokens` with `row` taking another token at `step` (and arbitrary ones after it)."""
    out = tokens.copy()
    out[row, step] = (out[row, step] + 1) % vocab
    out[row, step + 1 :] = np.arange(out.shape[1] - step - 1) % vocab
    return out


def test_prompts_are_what_the_decoder_gets() -> None:
    """forced_feeds: the prompt, then the tokens but the last, the mask 1 on them, positions counting attended ones."""
    from moe_export.export.interface import GraphInterface

    interface = GraphInterface.scoring()
    prompt = Prompts("p", np.array([[5, 6, 7], [8, 0, 0]]), np.array([[1, 1, 1], [1, 0, 0]]))
    feeds = forced_feeds(prompt, np.array([[1, 2, 3], [4, 5, 6]]), interface)
    assert feeds[interface.tokens_name].tolist() == [[5, 6, 7, 1, 2], [8, 0, 0, 4, 5]]
    assert feeds[interface.mask_name].tolist() == [[1, 1, 1, 1, 1], [1, 0, 0, 1, 1]]


def test_validate_takes_its_options_or_their_fields(tmp_path_factory: pytest.TempPathFactory) -> None:
    export = _export(tmp_path_factory, "mola", "fp32")
    by_options = moe_export.validate(export, ValidateOptions(batch=2, seq=9, new_tokens=2, reference="whole"))
    by_fields = moe_export.validate(export, batch=2, seq=9, new_tokens=2, reference="whole")
    assert by_options.shapes == ["2x9"] and _summary(by_options) == _summary(by_fields)
    assert not any("layer-streamed" in n for n in by_options.notes)


def test_fp16_exports_validate_at_basic_without_the_arena(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --optimization, an fp16 export's sessions run at basic on the CPU (at all ORT stores its weights in
    fp32) and fp32's at all; validate's sessions never keep ORT's arena; an explicit level is kept."""
    import moe_export.runtimes.onnxruntime as ort_runtime

    built: list[tuple[str, bool]] = []
    original = ort_runtime.session_builder

    def recording(*args: object, **kwargs: object) -> object:
        optimization = kwargs.get("optimization", args[3] if len(args) > 3 else "all")
        built.append((str(optimization), bool(kwargs.get("memory_arena", args[6] if len(args) > 6 else True))))
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ort_runtime, "session_builder", recording)
    fp16 = moe_export.validate(_export(tmp_path_factory, "mola", "fp16"), batch=1, seq=5, new_tokens=2)
    assert fp16.passed, fp16.failures
    assert built and set(built) == {("basic", False)}
    assert any("--optimization basic, the default for an fp16 export" in n for n in fp16.notes)
    built.clear()
    fp32 = moe_export.validate(_export(tmp_path_factory, "mola", "fp32"), batch=1, seq=5, new_tokens=0)
    assert fp32.passed and set(built) == {("all", False)} and not any("--optimization" in n for n in fp32.notes)
    built.clear()
    moe_export.validate(_export(tmp_path_factory, "mola", "fp16"), batch=1, seq=5, new_tokens=0, optimization="all")
    assert set(built) == {("all", False)}


def test_the_scoring_results_wait_on_disk_while_the_decode_runs(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The candidate's scoring outputs and taps are not in memory beside the decode session (they are read back
    after it), and the verdict, flips and tokens are those of a run that kept them (saved with --save-results)."""
    import gc

    import moe_export.validation.validate_artifact as validate_artifact
    from moe_export.validation.results import RunResult

    export = _export(tmp_path_factory, "goat", "fp16")
    alive: list[int] = []
    original = validate_artifact.decode_candidate

    def counting(*args: object, **kwargs: object) -> object:
        alive.append(sum(isinstance(o, RunResult) and bool(o.taps) for o in gc.get_objects()))
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(validate_artifact, "decode_candidate", counting)
    saved = tmp_path_factory.mktemp("saved")
    report = moe_export.validate(export, new_tokens=3, save_results=saved)
    assert alive == [0], "a tapped RunResult was alive during the decode"
    monkeypatch.setattr(validate_artifact, "decode_candidate", original)
    reloaded = moe_export.validate(export, new_tokens=3, load_results=saved)
    assert report.passed and _summary(report) == _summary(reloaded)
    assert report.comparisons[0].result.outputs.keys() == reloaded.comparisons[0].result.outputs.keys()
