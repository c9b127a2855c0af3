"""The objective and function-kind registries: what objectives declare, registering, plugins."""

import cm_core
import pytest
from cm_core.objectives import base


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the registries, restored after the test."""
    monkeypatch.setattr(base, "OBJECTIVES", dict(base.OBJECTIVES))
    monkeypatch.setattr(base, "_broken_plugins", {})
    monkeypatch.setattr(cm_core.functions, "FUNCTIONS", dict(cm_core.functions.FUNCTIONS))
    monkeypatch.setattr(base, "FUNCTIONS", cm_core.functions.FUNCTIONS)
    return base


def test_builtin_declarations():
    kinds = {name: cm_core.get_objective(name).function for name in cm_core.objective_names()}
    assert kinds == {
        "ct": "consistency",
        "ict": "consistency",
        "cd": "consistency",
        "ect": "consistency",
        "direct-cm": "consistency",
        "bcm": "bcm",
        "edm": "diffusion",
        "cdm": "diffusion",
        "lcm": "latent-consistency",
        "latent-direct-cm": "latent-consistency",
        "sct": "trigflow",
        "scd": "trigflow",
        "meanflow": "average-velocity",
    }
    teachers = {n for n in cm_core.objective_names() if cm_core.get_objective(n).needs_teacher}
    assert teachers == {"cd", "direct-cm", "scd"}
    targets = {n: cm_core.get_objective(n).target_rule for n in ("ct", "cd", "ict")}
    assert targets == {"ct": "ct", "cd": "constant", "ict": None}
    assert not cm_core.get_objective("bcm").takes_target and cm_core.get_objective("ect").takes_target
    assert cm_core.get_objective("ict").run_defaults(total_steps=800) == {"total_steps": 800}
    assert cm_core.get_objective("ect").run_defaults(total_steps=800) == {"double_steps": 100}
    assert cm_core.get_objective("bcm").run_defaults(total_steps=800) == {}
    for kind in cm_core.FUNCTIONS.values():
        assert kind.default_sampler in kind.samplers


def test_register_and_refusals(registry):
    class Mine(cm_core.Objective):
        function = "bcm"

        def __call__(self, f, x0, *, step, generator=None, **cond):
            raise NotImplementedError

    assert cm_core.register_objective("mine", Mine) is Mine
    assert cm_core.get_objective("mine") is Mine and "mine" in cm_core.objective_names()
    with pytest.raises(TypeError, match="subclass of cm_core.Objective"):
        cm_core.register_objective("plain", object)
    with pytest.raises(ValueError, match="non-empty string"):
        cm_core.register_objective(" spaced", Mine)

    class Unknown(cm_core.Objective):
        function = "shortcut"

    with pytest.raises(ValueError, match="function 'shortcut', which is not registered"):
        cm_core.register_objective("short", Unknown)
    # Registering the function kind first makes it trainable.
    cm_core.register_function(
        cm_core.FunctionKind("shortcut", lambda net, **kw: net, samplers=("onestep",), default_sampler="onestep")
    )
    cm_core.register_objective("short", Unknown)
    with pytest.raises(ValueError, match="default sampler"):
        cm_core.FunctionKind("bad", lambda net, **kw: net, samplers=("onestep",), default_sampler="heun")
    with pytest.raises(ValueError, match=r"unknown objective 'gan': objective must be one of .*ict"):
        cm_core.get_objective("gan")


def test_a_broken_plugin_warns_and_names_itself(registry, tmp_path, monkeypatch):
    info = tmp_path / "broken-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[cm.objectives]\nbroken = no_such_module_here:Thing\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.warns(UserWarning, match="plugin 'broken' did not load"):
        names = cm_core.objective_names()
    assert "broken" not in names and "ict" in names
    with pytest.raises(ValueError, match="'broken' is an installed plugin that failed to load: no_such_module_here"):
        cm_core.get_objective("broken")
