import tomllib

import yaml

from surgvqa.config import REPO_ROOT


def test_environment_yml_lists_the_same_pins_as_pyproject():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    wanted = set(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        wanted |= set(extra)
    env = yaml.safe_load((REPO_ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert set(pip) - {"-e ."} == wanted
    assert all("==" in d for d in wanted), "every dependency is pinned exactly"
    assert "torch==2.13.0" in wanted
