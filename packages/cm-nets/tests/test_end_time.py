"""The second time input ``c_noise_end`` (BCM's end time; MeanFlow's t − r) of SongUNet (DDPM++ /
NCSN++) and the EDM2 UNet, built with ``bcm=True``: neutral at initialization, trainable, refused by
a network without it, saved and loaded, invisible in a default network, correct under forward-mode AD.

Attention runs on the ``math`` backend: these tests are about the embedding, and the plain
PyTorch backend keeps them independent of the compiled kernels."""

import cm_nets
import pytest
import torch
from cm_nets.testing import SMALL, make_inputs

NAMES = ["ddpmpp-cifar10", "ncsnpp-cifar10", "edm2-xs"]
# The tensors bcm=True adds, and the zero-initialized one among them that makes the branch neutral.
BRANCH = {
    "ddpmpp-cifar10": {"map_layer0_end.weight", "map_layer0_end.bias", "map_layer1_end.weight", "map_layer1_end.bias"},
    "ncsnpp-cifar10": {
        "map_noise_end.freqs",
        "map_layer0_end.weight",
        "map_layer0_end.bias",
        "map_layer1_end.weight",
        "map_layer1_end.bias",
    },
    "edm2-xs": {"emb_fourier_end.freqs", "emb_fourier_end.phases", "emb_noise_end.weight", "emb_end_gain"},
}
ZERO_INIT = {"ddpmpp-cifar10": "map_layer1_end", "ncsnpp-cifar10": "map_layer1_end", "edm2-xs": "emb_end_gain"}


def _create(name, seed=0, **kw):
    torch.manual_seed(seed)
    return cm_nets.create(name, **SMALL[name][0], attention_backend="math", **kw)


def _wake(net, name, std=0.05):
    """Perturb every parameter but the zero-initialized layer of the end-time branch: the near-zero
    (SongUNet's 1e-5 output convolution) and zero (EDM2's out_gain, emb_gain) initializations would
    otherwise make the output almost independent of the embedding. The branch is registered last,
    so a network with and one without it built from the same seed receive the same perturbation."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if not n.startswith(ZERO_INIT[name]):
                p.add_(torch.randn(p.shape, generator=g) * std)
    return net


def _perturb_branch(net, name, std=0.5):
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if n.startswith(ZERO_INIT[name]):
                p.add_(torch.randn(p.shape, generator=g) * std)


def _inputs(name):
    x, c, kw = make_inputs(name)
    return x, c, kw, torch.tensor([-1.5, 0.7]), torch.tensor([0.3, 2.0])


@pytest.mark.parametrize("name", NAMES)
def test_end_time_is_neutral_at_init_and_matters_once_the_branch_moves(name):
    net = _wake(_create(name, bcm=True), name).eval()
    plain = _wake(_create(name), name).eval()  # same seed: the branch is built last
    x, c, kw, end_a, end_b = _inputs(name)
    with torch.no_grad():
        ref = plain(x, c, **kw)
        assert ref.abs().max() > 0
        torch.testing.assert_close(net(x, c, **kw, c_noise_end=end_a), ref, rtol=0, atol=0)
        torch.testing.assert_close(net(x, c, **kw, c_noise_end=end_b), ref, rtol=0, atol=0)
        _perturb_branch(net, name)
        a, b = net(x, c, **kw, c_noise_end=end_a), net(x, c, **kw, c_noise_end=end_b)
    assert (a - b).abs().max() > 1e-4 * ref.abs().max()


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_the_branch(name):
    net = _wake(_create(name, bcm=True), name).train()
    x, c, kw, end, _ = _inputs(name)
    net(x, c, **kw, c_noise_end=end).square().mean().backward()
    zero_init = {n: p.grad for n, p in net.named_parameters() if n.startswith(ZERO_INIT[name])}
    assert zero_init and all(g is not None and g.abs().max() > 0 for g in zero_init.values()), zero_init
    # Behind the zero-initialized layer the branch learns once that layer has moved.
    net.zero_grad()
    _perturb_branch(net, name)
    end = end.clone().requires_grad_(True)
    net(x, c, **kw, c_noise_end=end).square().mean().backward()
    branch = [n for n, _ in net.named_parameters() if n in BRANCH[name]]
    assert sorted(branch) == sorted(n for n in BRANCH[name] if "freqs" not in n and "phases" not in n)
    for n, p in net.named_parameters():
        if n in BRANCH[name]:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, n
    assert end.grad is not None and end.grad.abs().max() > 0


@pytest.mark.parametrize("name", NAMES)
def test_c_noise_end_needs_the_flag_and_the_flag_needs_c_noise_end(name):
    x, c, kw, end, _ = _inputs(name)
    plain = _create(name)
    assert plain.bcm is False  # cm_core's MeanFlow wrapper reads this to refuse the network early
    with pytest.raises(ValueError, match=r"c_noise_end given .* bcm=True"):
        plain(x, c, **kw, c_noise_end=end)
    net = _create(name, bcm=True)
    assert net.bcm is True
    with pytest.raises(ValueError, match=r"bcm=True and needs c_noise_end"):
        net(x, c, **kw)
    with pytest.raises(ValueError, match="c_noise_end must have one value per sample"):
        net(x, c, **kw, c_noise_end=torch.zeros(3))


@pytest.mark.parametrize("name", NAMES)
def test_save_load_round_trip(name, tmp_path):
    net = _create(name, bcm=True)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = cm_nets.save(net, tmp_path / "net")
    assert cm_nets.read_config(path)["overrides"]["bcm"] is True
    back = cm_nets.load(path).eval()
    assert back.bcm is True
    assert back.state_dict().keys() == net.state_dict().keys()
    for k, v in net.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    x, c, kw, end, _ = _inputs(name)
    with torch.no_grad():
        torch.testing.assert_close(back(x, c, **kw, c_noise_end=end), net.eval()(x, c, **kw, c_noise_end=end))


@pytest.mark.parametrize("name", NAMES)
def test_default_network_is_unchanged_and_loads_into_the_flagged_one(name):
    default = _create(name).state_dict()
    off = _create(name, bcm=False).state_dict()
    assert list(off) == list(default) and not any("_end" in k for k in default)
    for k, v in default.items():
        assert torch.equal(off[k], v), k
    on = _create(name, bcm=True)
    assert set(on.state_dict()) == set(default) | BRANCH[name]
    # A checkpoint without the branch starts the flagged network as that checkpoint.
    missing, unexpected = on.load_state_dict(default, strict=False)
    assert set(missing) == BRANCH[name] and not unexpected


@pytest.mark.parametrize("name", NAMES)
def test_jvp_over_x_c_noise_and_c_noise_end_equals_reverse_mode(name):
    net = _create(name, bcm=True)
    with torch.no_grad():  # zero-initialized layers and gains would hide terms of the derivative
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    net.eval()
    x, c, kw, end, _ = _inputs(name)
    g = torch.Generator().manual_seed(1)
    tangents = tuple(torch.randn(t.shape, generator=g) for t in (x, c, end))

    def fn(a, b, e):
        return net(a, b, **kw, c_noise_end=e)

    out, tangent = torch.func.jvp(fn, (x, c, end), tangents)
    w = torch.randn(out.shape, generator=g)
    primals = tuple(t.clone().requires_grad_(True) for t in (x, c, end))
    grads = torch.autograd.grad((fn(*primals) * w).sum(), primals)
    terms = [(gr * d).sum().item() for gr, d in zip(grads, tangents)]
    assert all(abs(t) > 0 for t in terms), terms  # each input, c_noise_end included, contributes
    forward, reverse = (w * tangent).sum().item(), sum(terms)
    assert forward == pytest.approx(reverse, rel=1e-4), (forward, reverse, terms)
    # The c_noise_end term can be small beside the others: check its direction on its own too.
    _, tangent_end = torch.func.jvp(lambda e: fn(x, c, e), (end,), (tangents[2],))
    assert (w * tangent_end).sum().item() == pytest.approx(terms[2], rel=1e-4), terms
