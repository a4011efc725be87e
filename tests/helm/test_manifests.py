"""manifests/ is the chart rendered with default values; these tests fail when the two drift apart."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from types import ModuleType

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from tests.helm.chart import ROOT, render

MANIFESTS = ROOT / "manifests"


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("render_manifests", ROOT / "scripts" / "render-manifests.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_manifests_equal_a_fresh_render_of_the_chart() -> None:
    wanted: dict[str, str] = _script().render_manifests()
    present = {path.name: path.read_text() for path in MANIFESTS.iterdir()}
    assert sorted(present) == sorted(wanted), "run: python scripts/render-manifests.py"
    for name, content in wanted.items():
        assert present[name] == content, f"manifests/{name} is stale; run: python scripts/render-manifests.py"


def test_check_mode_agrees() -> None:
    assert _script().main(["--check"]) == 0


def test_manifests_are_valid_objects() -> None:
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    count = 0
    for name in kustomization["resources"]:
        for obj in yaml.safe_load_all((MANIFESTS / name).read_text()):
            if obj:
                kubernetes_validate.validate(obj, "1.31.0", strict=True)
                count += 1
    assert count >= 9


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with its built-in kustomize) is not installed")
def test_kustomize_builds() -> None:
    built = subprocess.run(
        ["kubectl", "kustomize", str(MANIFESTS)], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    kinds = [obj["kind"] for obj in yaml.safe_load_all(built) if obj]
    assert {"Namespace", "Deployment", "Service", "ConfigMap", "Role", "RoleBinding", "ServiceAccount"} <= set(kinds)


def test_kind_demo_script_is_valid_bash_and_its_values_fit_the_chart() -> None:
    """The kind demo cannot run here (no Docker engine); check what can be checked without one."""
    script = ROOT / "scripts" / "kind-demo.sh"
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)
    text = script.read_text()
    block = text.split("# BEGIN kind-values", 1)[1].split("# END kind-values", 1)[0]
    body = block.split("<<EOF\n", 1)[1].rsplit("EOF\n", 1)[0]
    for variable, value in {"${TAG}": "dev", "${NODE_PORT}": "30080"}.items():
        body = body.replace(variable, value)
    values = yaml.safe_load(body)
    objects = render(values)  # the schema is enforced while rendering
    service = next(o for o in objects if o["kind"] == "Service" and o["spec"].get("type") == "NodePort")
    assert service["spec"]["ports"][0]["nodePort"] == 30080
    assert all(
        c["imagePullPolicy"] == "Never"
        for o in objects
        if o["kind"] == "Deployment"
        for c in o["spec"]["template"]["spec"]["containers"]
    )
