"""Progress: plain periodic lines off a terminal (no carriage-return bars in CI logs),
silent on other ranks or with DQTOOL_PROGRESS=0; used by eval generation."""

import io

import torch

from dqtool.base.progress import Progress, track


def test_plain_lines_off_a_terminal(monkeypatch):
    out = io.StringIO()
    with Progress(10, "teacher targets", unit="rows", stream=out, interval=0) as p:
        for _ in range(5):
            p.update(2)
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert lines[0].startswith("teacher targets: 2/10 rows (20%)") and "s left" in lines[0]
    assert lines[-1].startswith("teacher targets: 10/10 rows (100%)") and "left" not in lines[-1]
    assert len(lines) == 5  # 4 periodic + the final line (the last update is the final line)
    out = io.StringIO()
    with Progress(10, "x", stream=out, interval=3600) as p:
        p.update(5)
    assert len(out.getvalue().splitlines()) == 1  # only the final line within the interval


def test_silent_on_other_ranks_and_when_disabled(monkeypatch):
    for env in ({"RANK": "1"}, {"DQTOOL_PROGRESS": "0"}):
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            out = io.StringIO()
            assert list(track(range(3), 3, "x", stream=out, interval=0)) == [0, 1, 2]
            assert out.getvalue() == ""


def test_eval_generation_reports_progress(tiny_dir, capsys, monkeypatch):
    from dqtool.stages.evaluate import EvalConfig, generate
    from dqtool.formats.hf import load_seq2seq

    monkeypatch.setenv("DQTOOL_PROGRESS_SECONDS", "0")
    model, tok = load_seq2seq(tiny_dir("bart"))
    preds = generate(model.eval(), tok, ["a b c", "d e", "f"], EvalConfig(data="d", batch_size=2, max_length=4), 16)
    assert len(preds) == 3
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("eval: generation: 2/3 rows") and err[-1].startswith("eval: generation: 3/3 rows (100%)")
