"""`cm eval make-noise`: the file it writes, its one-line report, and its refusals."""

import cm_eval
import torch
from click.testing import CliRunner
from cm_cli.main import cli


def cm(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], prog_name="cm")


def test_make_noise_writes_the_library_noise_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / "eval" / "init_noise.pt"
    result = cm("eval", "make-noise", "--shape", "4,6,5", "--num", 3, "--seed", 9, "--out", out)
    assert result.exit_code == 0, (result.output, result.exception)
    assert result.stdout == f"wrote {out}: noise 3×4×6×5 float32, seed 9\n"
    noise, meta = cm_eval.load_noise(out)
    assert meta["seed"] == 9 and meta["shape"] == [4, 6, 5]
    assert torch.equal(noise, cm_eval.make_noise((4, 6, 5), 3, seed=9))
    assert not torch.equal(noise, cm_eval.make_noise((4, 6, 5), 3, seed=0))

    again = cm("eval", "make-noise", "--shape", "4,6,5", "--num", 5, "--out", out)
    assert again.exit_code == 1 and again.stderr == f"error: {out} exists; pass --overwrite to replace it\n"
    assert torch.equal(cm_eval.load_noise(out)[0], noise)  # untouched

    replaced = cm("eval", "make-noise", "--shape", "4,6,5", "--num", 5, "--out", out, "--overwrite")
    assert replaced.exit_code == 0, (replaced.output, replaced.exception)
    assert torch.equal(cm_eval.load_noise(out)[0], cm_eval.make_noise((4, 6, 5), 5, seed=0))

    bad = cm("eval", "make-noise", "--shape", "4,x,5", "--num", 1, "--out", tmp_path / "b.pt")
    assert bad.exit_code == 2 and bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1
    assert "--shape" in bad.stderr and "4,128,128" in bad.stderr
    assert not (tmp_path / "b.pt").exists()
