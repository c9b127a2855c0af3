import cm_nets
import pytest
import torch
from cm_nets.testing import SMALL, make_inputs

REQUIRED = [
    "ddpmpp-cifar10",
    "ncsnpp-cifar10",
    "adm-imagenet64",
    "adm-imagenet64-no32-qkv",
    "adm-imagenet64-bcm",
    "edm2-xs",
    "unet-tiny",
    "mlp-toy",
]

# Exact counts: REFERENCE.md / the issue (EDM, openai, BCM); edm2-xs: EDM2 reports 125M for XS.
COUNTS = [
    ("adm-imagenet64", {}, 295_899_267),
    ("adm-imagenet64-no32-qkv", {}, 278_023_107),
    ("adm-imagenet64-bcm", {}, 279_941_571),
    ("ddpmpp-cifar10", {}, 55_732_739),
    ("ddpmpp-cifar10", {"label_dim": 10}, 55_734_147),
    ("ncsnpp-cifar10", {}, 56_395_523),
    ("edm2-xs", {}, 124_713_125),
]


def test_presets_listed():
    assert set(REQUIRED) <= set(cm_nets.presets())
    assert cm_nets.presets() == sorted(cm_nets.presets())


@pytest.mark.parametrize(
    "name,overrides,expected", COUNTS, ids=[f"{n}{'-' + str(o) if o else ''}" for n, o, _ in COUNTS]
)
def test_parameter_counts(name, overrides, expected):
    with torch.device("meta"):
        net = cm_nets.create(name, **overrides)
    assert cm_nets.count_parameters(net) == expected
    if not overrides:
        assert cm_nets.PRESETS[name].params == expected


def test_adm_tensor_count():
    with torch.device("meta"):
        assert len(cm_nets.create("adm-imagenet64").state_dict()) == 541


def test_preset_docs_name_their_source():
    for name in cm_nets.presets():
        doc = cm_nets.describe(name)
        assert len(doc) > 40
    net = cm_nets.create("unet-tiny")
    assert "unet-tiny" in net.__doc__ and "digits" in net.__doc__


def test_unknown_preset_lists_valid():
    with pytest.raises(ValueError, match="valid presets: .*adm-imagenet64"):
        cm_nets.create("resnet-50")


def test_bad_override_lists_valid():
    with pytest.raises(ValueError, match=r"no argument\(s\) \['chanels'\]; valid: .*model_channels"):
        cm_nets.create("unet-tiny", chanels=3)


def test_bad_option_values():
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        cm_nets.create("unet-tiny", attention_backend="fastest")
    with pytest.raises(ValueError, match="attention_resolutions .* valid resolutions are"):
        cm_nets.create("unet-tiny", attention_resolutions=(5,))
    with pytest.raises(ValueError, match="attention_normalize must be one of"):
        cm_nets.create("unet-tiny", attention_normalize="cosine")
    with pytest.raises(ValueError, match="embedding_type must be one of"):
        cm_nets.create("ddpmpp-cifar10", embedding_type="learned")


def test_forward_shapes_and_dtype(small_preset):
    overrides, shape, _, _ = SMALL[small_preset]
    torch.manual_seed(0)
    net = cm_nets.create(small_preset, **overrides).eval()
    x, c_noise, kw = make_inputs(small_preset)
    with torch.no_grad():
        y = net(x, c_noise, **kw)
    assert y.shape == x.shape and y.dtype == torch.float32 and torch.isfinite(y).all()


def test_unet_tiny_sizes_and_classes():
    net = cm_nets.create("unet-tiny", num_classes=10).eval()
    for size in (8, 16, 32):
        x = torch.randn(2, 1, size, size)
        with torch.no_grad():
            assert net(x, torch.zeros(2), torch.tensor([3, 4])).shape == x.shape
    assert cm_nets.count_parameters(net) < 2_000_000


def test_labels_and_c_noise_checked():
    net = cm_nets.create("unet-tiny", num_classes=10)
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(ValueError, match="class_labels is required"):
        net(x, torch.zeros(2))
    with pytest.raises(ValueError, match="one value per sample"):
        net(x, torch.zeros(3), torch.tensor([1, 2]))
    one_hot = torch.nn.functional.one_hot(torch.tensor([1, 2]), 10).float()
    with torch.no_grad():
        torch.testing.assert_close(net(x, torch.zeros(2), one_hot), net(x, torch.zeros(2), torch.tensor([1, 2])))


def test_bcm_needs_c_noise_end():
    net = cm_nets.create("adm-imagenet64-bcm", **SMALL["adm-imagenet64-bcm"][0])
    with pytest.raises(ValueError, match="c_noise_end"):
        net(torch.randn(1, 3, 16, 16), torch.zeros(1), torch.tensor([0]))
    plain = cm_nets.create("unet-tiny")
    with pytest.raises(ValueError, match="bcm=True"):
        plain(torch.randn(1, 1, 8, 8), torch.zeros(1), c_noise_end=torch.zeros(1))


def test_mlp_toy_shapes():
    net = cm_nets.create("mlp-toy", dim=5)
    assert net(torch.randn(7, 5), torch.randn(7)).shape == (7, 5)
    with pytest.raises(ValueError, match=r"x_in must have shape \[B, 5\]"):
        net(torch.randn(7, 4), torch.randn(7))


def test_mlp_digits_is_the_flat_mlp_on_images():
    """mlp-digits = mlp-toy on C·H·W vectors, reshaped: same weights give the same numbers."""
    torch.manual_seed(0)
    img = cm_nets.create("mlp-digits", hidden=32, depth=2, num_classes=10)
    flat = cm_nets.create("mlp-toy", dim=64, hidden=32, depth=2, num_classes=10)
    torch.nn.init.normal_(img.out.weight)  # the zero-initialized output layer would hide a mix-up
    flat.load_state_dict(img.state_dict())
    x, c, y = torch.randn(5, 1, 8, 8), torch.randn(5), torch.arange(5)
    out = img(x, c, class_labels=y)
    assert out.shape == (5, 1, 8, 8)
    torch.testing.assert_close(out.flatten(1), flat(x.flatten(1), c, class_labels=y), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"x_in must have shape \[B, 1, 8, 8\]"):
        img(torch.randn(5, 64), c)
    with pytest.raises(ValueError, match="image_shape must be"):
        cm_nets.create("mlp-digits", image_shape=(3, 8, 8))


def test_fit_to_data_sizes_every_architecture():
    from cm_nets import fit_to_data

    added, notes = fit_to_data("ddpmpp-cifar10", (1, 16, 16), 10, {})
    assert added == {"img_resolution": 16, "in_channels": 1, "out_channels": 1, "label_dim": 10, "attn_resolutions": (8,)}
    added, _ = fit_to_data("edm2-xs", (3, 32, 32), 0, {})
    assert added["img_resolution"] == 32 and added["img_channels"] == 3 and added["label_dim"] == 0
    added, _ = fit_to_data("mlp-digits", (1, 8, 8), 10, {})
    assert added == {"num_classes": 10}  # dim 64 is the preset's already
    assert fit_to_data("adm-imagenet64", (3, 64, 64), 1000, {}) == ({}, [])  # the preset's own data
    net = cm_nets.create("unet-tiny", **fit_to_data("unet-tiny", (3, 16, 16), 0, {})[0])
    assert net(torch.zeros(2, 3, 16, 16), torch.ones(2)).shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match=r"model.overrides.in_channels = 1 does not fit .*change data.channels"):
        fit_to_data("unet-tiny", (3, 8, 8), 0, {"in_channels": 1})
    with pytest.raises(ValueError, match=r"square images; the data are 8×12 \(set data.resolution\)"):
        fit_to_data("unet-tiny", (1, 8, 12), 0, {})
