"""Backend choice: a missing extension falls back to the reference with one warning."""
import subprocess
import sys
import textwrap


def test_missing_extension_falls_back_with_one_warning():
    code = textwrap.dedent("""
        import sys, warnings
        sys.modules["memfast._C"] = None          # makes `from . import _C` raise ImportError
        import torch, memfast
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            x = torch.randn(5, 3, requires_grad=True)
            t = memfast.SampleTracker(5)
            for _ in range(3):
                memfast.cross_entropy(x, torch.tensor([0, 1, 2, 0, 1]), sample_ids=torch.arange(5), tracker=t).backward()
        messages = [str(w.message) for w in caught if "reference backend" in str(w.message)]
        assert len(messages) == 1, messages
        assert "not built or does not load" in messages[0]
        assert memfast.build_info() is None
        assert memfast.get_backend() == "reference"  # what runs, not what was asked for
        torch.testing.assert_close(x.grad, 3 * torch.autograd.grad(
            torch.nn.functional.cross_entropy(x, torch.tensor([0, 1, 2, 0, 1])), x)[0])
        assert t.stat("count").tolist() == [3.0] * 5
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_reference_backend_by_environment():
    code = "import memfast; print(memfast.get_backend())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "MEMFAST_BACKEND": "reference"})
    assert out.stdout.strip() == "reference", out.stderr
