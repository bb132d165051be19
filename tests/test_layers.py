"""The layers' dependency direction, read from every import statement (function-level too).

    core      contract, preprocessing, ModelDescription, evaluation  imports no other layer
    export    model -> contract ONNX                                 core only
    runtime   ONNX Runtime backend, detections of a batch            core only
    server    gRPC inference server (engine, batcher, services)      core, runtime
    client    the SDK: sync and asyncio clients over gRPC            core only
    job       the pretag run job and its gRPC executor               core, client (the SDK)
    local     the embedded server and the default model              core, export, runtime,
                                                                     server, job
    selection Lightly's selection_config over a run folder           core, job (its layout)
    scale     the job on Ray Data                                    core, job, runtime
    cli, bench                                                       compose the others
                                                                     (bench never imports cli)
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = {"core": "pretag", "export": "pretag.export", "runtime": "pretag.runtime",
          "server": "pretag.server", "client": "pretag.client", "job": "pretag.job",
          "local": "pretag.local", "selection": "pretag.selection", "cli": "pretag.cli",
          "bench": "pretag.bench", "scale": "pretag.scale"}
ALLOWED = {  # layer -> the other layers it may import
    "core": set(), "export": {"core"}, "runtime": {"core"}, "server": {"core", "runtime"},
    "client": {"core"}, "job": {"core", "client"},
    "local": {"core", "export", "runtime", "server", "job"},  # exports the default model
    "selection": {"core", "job"},  # reads a run folder through the job's layout
    "scale": {"core", "job", "runtime"},
    "cli": {"core", "export", "runtime", "server", "client", "job", "local", "selection",
            "bench", "scale"},
    "bench": {"core", "export", "runtime", "server", "client", "job", "local", "selection",
              "scale"},
}
GENERATED = {"v1", "kserve_v2"}  # protobuf modules generated into core/ at build time


def layer_of(module: str) -> str | None:
    """The layer a ``pretag...`` module belongs to (the longest matching package)."""
    best = None
    for layer, package in LAYERS.items():
        if (module == package or module.startswith(package + ".")) and (
                best is None or len(package) > len(LAYERS[best])):
            best = layer
    return best


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name == "pretag" or name.startswith("pretag.")}


def test_layer_of_names_the_longest_package():
    assert layer_of("pretag.contract") == "core"
    assert layer_of("pretag.server.engine") == "server"
    assert layer_of("pretag.cli.local") == "cli"
    assert layer_of("pretag.local") == "local" and layer_of("pretag.job.run") == "job"
    assert layer_of("numpy") is None


def test_each_layer_imports_only_what_it_may():
    wrong = []
    checked = 0
    for layer in LAYERS:
        for path in sorted((ROOT / layer).rglob("*.py")):
            if layer == "core" and path.relative_to(ROOT / "core").parts[0] in GENERATED:
                continue
            checked += 1
            for name in sorted(imports(path)):
                target = layer_of(name)
                if target not in (None, layer) and target not in ALLOWED[layer]:
                    wrong.append(f"{path.relative_to(ROOT)} imports {name} ({target})")
    assert checked > 30
    assert not wrong, "\n".join(wrong)


def test_the_readme_layout_table_names_every_folder():
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    rows = {line.split("|")[1].strip().strip("`").rstrip("/") for line in table.splitlines()
            if line.startswith("| `")}
    folders = {p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".")
               and any(p.rglob("*.py")) and p.name not in {"build"}}
    assert folders <= rows, f"folders missing from the README layout: {folders - rows}"
    assert rows <= folders | {"protos", "docs", "examples", "benchmarks"}


def test_the_allowed_arrows_have_no_loop():
    """No two layers import each other, directly or through others."""
    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt}))
                   for nxt in ALLOWED[start] - {"core"} | ({"core"} & ALLOWED[start]))

    loops = [layer for layer in ALLOWED if reaches(layer, layer, {layer})]
    assert loops == []
