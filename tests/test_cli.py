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
