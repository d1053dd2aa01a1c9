"""The command line: help, info and bench run and print what they promise."""
import json

from memfast.cli import main


def test_help_lists_every_command(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for name in ("demo", "report", "mat-demo", "bench", "info"):
        assert name in out
    assert main(["no-such-command"]) == 2


def test_info(capsys):
    assert main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["backend"] in ("kernels", "reference") and "torch_runtime" in info


def test_bench_prints_a_row_per_shape_and_dtype(capsys):
    assert main(["bench", "--shapes", "8x5", "16x3", "--dtypes", "fp32", "bf16", "--repeats", "2",
                 "--num-samples", "50"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 8x5") or
            line.startswith("| 16x3")]
    assert len(rows) == 4 and all(line.rstrip().endswith("x |") for line in rows)


def test_bad_arguments_end_in_one_line_not_a_traceback(tmp_path, capsys, monkeypatch):
    """Bad numbers are refused by argparse (naming the option); errors a command raises for bad input
    end in one line naming the command (MEMFAST_DEBUG=1 re-raises them)."""
    import pytest

    import memfast

    for argv, option in ((["bench", "--shapes", "abc"], "--shapes"), (["bench", "--repeats", "0"], "--repeats"),
                         (["bench", "--num-samples", "-3"], "--num-samples"),
                         (["score", "c.pt", "--model", "m:f", "--data", "d.pt", "--tracker", "t.pt", "--probes", "0"],
                          "--probes"),
                         (["score", "c.pt", "--model", "m:f", "--data", "d.pt", "--tracker", "t.pt", "--h", "-1"],
                          "--h")):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert f"argument {option}:" in capsys.readouterr().err
    tracker = tmp_path / "t.pt"
    memfast.SampleTracker(4).save(tracker)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit, match=r"memfast report: .*File exists.*MEMFAST_DEBUG=1"):
        main(["report", str(tracker), "--out", str(tmp_path / "a_file")])
    monkeypatch.setenv("MEMFAST_DEBUG", "1")
    with pytest.raises(FileExistsError):
        main(["report", str(tracker), "--out", str(tmp_path / "a_file")])
    with pytest.raises(FileNotFoundError, match="no folder"):
        memfast.SampleTracker(4).save(tmp_path / "missing" / "t.pt")
