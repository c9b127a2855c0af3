"""Low-frequency time embeddings for continuous-time objectives (sCM differentiates the network in
t): SongUNet's ``fourier_scale`` and EDM2's ``fourier_bandwidth``; the defaults are unchanged."""

import pytest
import torch

import cm_nets
from cm_nets.testing import SMALL, make_inputs


def _net(name, **kw):
    torch.manual_seed(0)
    return cm_nets.create(name, **dict(SMALL[name][0]), **kw).eval()


@pytest.mark.parametrize("name, key, default", [("ncsnpp-cifar10", "fourier_scale", 16.0),
                                                ("edm2-xs", "fourier_bandwidth", 1.0)])  # fmt: skip
def test_default_is_unchanged_and_a_low_frequency_slows_the_time_derivative(name, key, default, tmp_path):
    plain, same = _net(name), _net(name, **{key: default})
    for (k, a), (_, b) in zip(plain.state_dict().items(), same.state_dict().items()):
        assert torch.equal(a, b), k
    low = _net(name, **{key: default / 100})
    with torch.no_grad():  # make the time path matter: perturb every weight
        for net in (plain, low):
            g = torch.Generator().manual_seed(1)
            for p in net.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    x, c, kw = make_inputs(name)

    def dt_norm(net):
        _, tangent = torch.func.jvp(lambda cc: net(x, cc, **kw), (c,), (torch.ones_like(c),))
        return tangent.norm().item()

    assert dt_norm(low) < dt_norm(plain) / 5
    path = cm_nets.save(low, tmp_path / "low.safetensors")
    back = cm_nets.load(path).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x, c, **kw), low(x, c, **kw))
    with pytest.raises(ValueError, match=key):
        _net(name, **{key: 0.0})
