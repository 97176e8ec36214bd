import pytest

from latentreason.registry import Registry, RegistryError


def test_register_get_and_duplicate():
    reg: Registry = Registry("thing")
    reg.register("alpha", 1)

    @reg.register("beta")
    def beta():
        return 2

    assert reg.get("alpha") == 1 and reg.get("beta")() == 2
    assert reg.names() == ["alpha", "beta"] and "alpha" in reg and len(reg) == 2
    with pytest.raises(RegistryError, match="already registered"):
        reg.register("alpha", 3)


def test_unknown_name_suggests_and_lists():
    reg: Registry = Registry("method")
    for name in ("cot-sft", "nocot-sft", "coconut"):
        reg.register(name, name)
    with pytest.raises(RegistryError) as err:
        reg.get("cot-stf")
    msg = str(err.value)
    assert "Did you mean 'cot-sft'" in msg and "coconut, cot-sft, nocot-sft" in msg


def test_dotted_path_and_base_type():
    reg: Registry = Registry("fn", base=int)
    assert reg.get("math:pi") == pytest.approx(3.14159, abs=1e-4)
    with pytest.raises(RegistryError, match="cannot import"):
        reg.get("math:nope")
    with pytest.raises(TypeError, match="not a int"):
        reg.register("s", "string")
