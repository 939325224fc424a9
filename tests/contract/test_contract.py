"""Every registered task through the same checks, on its own `tiny()` configuration and generated data.

A new task that passes these trains, evaluates, checkpoints and exports through the shared engine.
"""

from __future__ import annotations

import ast
import math
import re
from pathlib import Path

import pytest
import torch

from helpers import SRC
from modelworks.config import apply_override, load_config
from modelworks.engine import checkpoint, debug
from modelworks.engine.batches import eval_indices, fetch
from modelworks.engine.optim import build_optimizer
from modelworks.registry import TASKS
from modelworks.tasks.base import Task

CPU = torch.device("cpu")
TASK_NAMES = list(TASKS)


def tiny_task(name: str, folder: Path, overrides: tuple[str, ...] = ()):
    """The task on its `tiny()` configuration (CPU, fp32), with `--set`-style overrides applied."""
    task_cls = TASKS[name]
    raw = task_cls.tiny(folder / "data")
    raw["task"] = name
    raw["output_dir"] = str(folder / "runs")
    raw.setdefault("train", {})["device"] = "cpu"
    raw["train"]["precision"] = "fp32"
    for assignment in overrides:
        apply_override(raw, assignment)
    return task_cls(load_config(task_cls, raw))


def fixed_batch(task, size: int = 32):
    """The first `size` training samples, prepared without augmentation: the same batch every call."""
    splits = task.datasets(CPU)
    (raw,) = fetch(splits.train, iter([torch.arange(size)]), CPU, 0, splits.collate_fn)
    return task.prepare_batch(raw, None)


def loss_on(task, model, batch) -> float:
    with torch.no_grad():
        return task.step(model, batch).loss.item()


@pytest.fixture(params=TASK_NAMES)
def task(request, tmp_path):
    torch.manual_seed(0)
    return tiny_task(request.param, tmp_path)


def test_step_returns_a_scalar_loss_logs_and_count(task):
    model = task.build_model()
    out = task.step(model, fixed_batch(task))
    assert out.loss.ndim == 0 and out.loss.requires_grad and math.isfinite(out.loss.item())
    assert out.n == 32
    assert all(v.ndim == 0 and not v.requires_grad for v in out.logs.values())


def test_a_few_steps_on_a_fixed_batch_lower_the_loss(task):
    model = task.build_model().train()
    batch = fixed_batch(task)
    optimizer = build_optimizer(model, task.cfg.optim)
    before = loss_on(task, model, batch)
    for _ in range(5):
        task.step(model, batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss_on(task, model, batch) < before


# ---------------------------------------------------------------------------------------------- debug commands
# `modelworks debug TASK overfit | augment | gradients` on every task, through the functions the CLI calls.


@pytest.fixture(params=TASK_NAMES)
def task_name(request):
    torch.manual_seed(0)
    return request.param


def test_one_batch_can_be_overfit(task_name, tmp_path):
    """`debug overfit` passes: with the task's own overrides and target, AdamW at 1e-2 (the tiny configurations
    train briefly at whatever rate suits them)."""
    overrides = (*TASKS[task_name].overfit_overrides, "optim.name=adamw", "optim.lr=0.01")
    task = tiny_task(task_name, tmp_path, overrides)
    result = debug.overfit_batch(task, task.cfg, steps=100)
    assert result.passed, result.verdict()
    assert len(result.losses) == 100 and result.verdict().startswith("PASS")


def test_overfit_fails_on_a_model_that_cannot_learn(task_name, tmp_path):
    task = tiny_task(task_name, tmp_path)
    task.cfg.optim.lr = 0.0  # the config refuses 0: set after validation, a model whose weights never move
    result = debug.overfit_batch(task, task.cfg, steps=4)
    assert not result.passed
    assert result.losses == pytest.approx([result.losses[0]] * 4, rel=1e-6)
    assert result.verdict().startswith("FAIL") and "optim.lr=0" in result.verdict()


def test_debug_commands_are_deterministic(task_name, tmp_path):
    """With train.deterministic=true the same command gives the same numbers, bit for bit."""
    task = tiny_task(task_name, tmp_path, ("train.deterministic=true",))
    first, second = (debug.overfit_batch(task, task.cfg, steps=3).losses for _ in range(2))
    assert first == second
    norms = [[p.grad_norms for p in debug.gradient_flow(task, task.cfg, steps=2).parameters] for _ in range(2)]
    assert norms[0] == norms[1]


def test_augment_draws_prepared_batches(task_name, tmp_path):
    """`debug augment`: each sample as prepared and in augmented views, uint8 RGB pictures of one size, or None
    from a task without images."""
    from modelworks.engine.debug_plots import save_view_grid

    task = tiny_task(task_name, tmp_path)
    rows = debug.augmented_views(task, task.cfg, samples=3, views=2)
    if rows is None:
        assert type(task).draw_batch is Task.draw_batch  # only the default says "nothing to draw"
        return
    assert len(rows) == 3 and all(len(row) == 3 for row in rows)
    shapes = {tuple(image.shape) for row in rows for image in row}
    assert len(shapes) == 1 and next(iter(shapes))[0] == 3
    assert all(image.dtype == torch.uint8 for row in rows for image in row)
    save_view_grid(rows, tmp_path / "augment.png", ["original", "view 0", "view 1"])
    assert (tmp_path / "augment.png").stat().st_size > 1000


def test_every_parameter_gets_a_gradient(task_name, tmp_path):
    """`debug gradients` over the first steps: a row per parameter, and none frozen, detached, dead or
    non-finite (a vanishing flag depends on the data, so it is not part of the contract)."""
    task = tiny_task(task_name, tmp_path)
    report = debug.gradient_flow(task, task.cfg, steps=3)
    assert [p.name for p in report.parameters] == [name for name, _ in task.build_model().named_parameters()]
    broken = {p.name: p.flags for p in report.parameters
              if p.flags and not p.flags[0].startswith(("vanishing", "exploding"))}
    assert broken == {}


def test_state_round_trips_through_a_checkpoint(task, tmp_path):
    model = task.build_model()
    task.step(model.train(), fixed_batch(task))  # moves BatchNorm statistics off their initial values
    checkpoint.save_atomic({"model": model.state_dict()}, tmp_path / "m.pt")
    torch.manual_seed(1)
    other = task.build_model()
    other.load_state_dict(checkpoint.load(tmp_path / "m.pt")["model"])
    x = task.example_inputs()
    with torch.no_grad():
        assert torch.equal(model.eval()(*x), other.eval()(*x))


def test_evaluate_returns_the_monitor_key(task):
    monitor_key, mode = task.monitor
    split, metric = monitor_key.split("/", 1)
    assert split == "val" and mode in ("min", "max")
    splits = task.datasets(CPU)
    model = task.build_model().eval()
    batches = (task.prepare_batch(b, None)
               for b in fetch(splits.val, eval_indices(len(splits.val), 64, 0, 1), CPU, 0, splits.collate_fn))
    with torch.no_grad():
        metrics = task.evaluate(model, batches)
    assert metric in metrics
    assert all("/" not in key for key in metrics)  # the engine adds the split prefix
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())


def test_exported_graph_matches_eager(task, tmp_path):
    from modelworks.export.formats import write_torchscript
    from modelworks.export.runtime import load_torchscript

    model = task.build_model().eval()
    exported = task.export_module(model).eval()
    example = task.example_inputs()
    write_torchscript(exported, example, tmp_path / "graph.pt")  # traced as export traces it
    traced = load_torchscript(tmp_path / "graph.pt")
    with torch.no_grad():
        probe = tuple(torch.randn_like(t) if t.is_floating_point() else t for t in example)
        for inputs in (example, probe):
            torch.testing.assert_close(traced(*inputs), exported(*inputs), atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(exported(*inputs), model(*inputs), atol=1e-5, rtol=1e-4)


def test_every_format_exports_and_matches_eager(task, tmp_path):
    """The export path of `modelworks export`: every graph the task exports (one for most tasks; a language
    model's prefill and decode) written as TorchScript and ONNX, run on the validation split by their runtimes and
    held to the default tolerance against eager PyTorch, and the package opens with every runtime."""
    from modelworks.export.build import ExportOptions, build_package
    from modelworks.export.package import read_package
    from modelworks.export.runtime import open_runner

    splits = task.datasets(CPU)
    model = task.build_model().eval()
    val = (task.prepare_batch(b, None)
           for b in fetch(splits.val, eval_indices(len(splits.val), 64, 0, 1), CPU, 0, splits.collate_fn))
    manifest = build_package(task, model, val, iter(()), tmp_path / "package", ExportOptions("m", "1"),
                             source={}, metrics={}, config={}, log=lambda line: None)
    assert manifest["checks"]["passed"] == ["eager", "torchscript", "onnx"]
    package = read_package(tmp_path / "package")
    predictor = type(task).load_predictor(package.manifest["predictor"], package.path)
    graphs = task.export_graphs(model)
    assert package.graphs == list(graphs)
    for runtime in ("torchscript", "onnx"):
        run = open_runner(package, runtime, lambda graph: predictor.graph_names(graph)[0], build_eager=None)
        for name, graph in graphs.items():
            inputs = {n: t.numpy() for n, t in zip(graph.input_names, graph.example_inputs)}
            with torch.no_grad():
                expected = graph.module(*graph.example_inputs)
            expected = expected if isinstance(expected, tuple) else (expected,)
            for got, want in zip(run(inputs, graph=name), expected):
                torch.testing.assert_close(torch.from_numpy(got), want.float(), atol=1e-4, rtol=1e-4)


def test_the_predictor_answers_its_example_request(task, tmp_path):
    """parse -> predict with the eager graph: one typed Response per request, and a spec that survives JSON."""
    import json

    from modelworks.export.runtime import GraphSet, TorchRunner

    task.datasets(CPU)
    live = task.predictor()
    for name, content in live.files().items():  # what a package ships beside its manifest (a tokenizer)
        (tmp_path / name).write_bytes(content)
    predictor = type(task).load_predictor(json.loads(json.dumps(live.spec)), tmp_path)
    request, file = predictor.example_request()
    request = predictor.Request.model_validate_json(request.model_dump_json())  # the wire round trip
    items = [predictor.parse(request, file) for _ in range(3)]
    graphs = task.export_graphs(task.build_model().eval())
    runner = GraphSet({name: TorchRunner(g.module, g.input_names) for name, g in graphs.items()})
    with torch.no_grad():
        responses = predictor.predict(items, runner)
    assert len(responses) == 3 and all(isinstance(r, predictor.Response) for r in responses)
    assert responses[0] == predictor.Response.model_validate_json(responses[0].model_dump_json())
    confidence = predictor.confidence(responses[0])
    assert confidence is None or 0 <= confidence <= 1


def test_registry_names_match_task_names():
    assert all(task_cls.name == name for name, task_cls in TASKS.items())


# ---------------------------------------------------------------------------------------------- boundaries


TASK_MODULES = ("modelworks.tasks", "modelworks.registry")
IMPORT_FUNCTIONS = {"import_module", "__import__", "find_spec"}  # importlib's, the builtin, importlib.util's


def imported_modules(path: Path, root: Path = SRC) -> set[str]:
    """Absolute names of the modules a source file imports; relative imports are resolved against its package
    (`root` is the folder of the top-level package `modelworks`). Imports by function (importlib.import_module,
    __import__) count too: a string argument by its value, anything else as "<dynamic>", which no check can
    read."""
    package = ["modelworks", *path.relative_to(root).parent.parts]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call):
            function = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if function in IMPORT_FUNCTIONS and node.args:
                first = node.args[0]
                names.add(first.value if isinstance(first, ast.Constant) and isinstance(first.value, str)
                          else "<dynamic>")
    return names


def task_imports(path: Path, root: Path = SRC) -> list[str]:
    """The imports of `path` that reach a task or the registry, or that cannot be read."""
    return sorted(name for name in imported_modules(path, root)
                  if name.startswith(TASK_MODULES) or name == "<dynamic>")


def task_names_in_script(script: str) -> list[str]:
    """Registered task names a script spells as a string ('detection', "classification", `...`): a script that
    branches on the task would have to."""
    # Left to right, so a quote inside a comment or a comment marker inside a string is read as what it is.
    tokens = re.findall(r"//[^\n]*|/\*.*?\*/|'(?:\\.|[^'\\\n])*'|\"(?:\\.|[^\"\\\n])*\"|`(?:\\.|[^`\\])*`",
                        script, flags=re.S)
    strings = [t for t in tokens if t[0] in "'\"`"]
    text = " ".join(re.sub(r"\$\{[^}]*\}", " ", t) for t in strings)  # a template's ${code} is not text
    return sorted(name for name in TASKS if re.search(rf"\b{re.escape(name)}\b", text))


def task_names_in_page(html: str) -> list[str]:
    """Task names spelled by a page's scripts: its <script> blocks and its inline event handlers (onclick=...)."""
    scripts = re.findall(r"<script[^>]*>(.*?)</script>", html, flags=re.S | re.I)
    handlers = re.findall(r"""\bon\w+\s*=\s*("[^"]*"|'[^']*')""", html, flags=re.I)
    return task_names_in_script("\n".join([*scripts, *(h[1:-1] for h in handlers)]))


# How each kind of non-Python file in a generic layer is read for task names. A file of another kind fails the
# check until a reader for it is added here, so a new template or script cannot slip past unread.
WEB_FILE_READERS = {".html": task_names_in_page, ".htm": task_names_in_page,
                    ".js": task_names_in_script, ".mjs": task_names_in_script}


@pytest.mark.parametrize("layer", ["engine", "export", "serve", "models", "data"])
def test_generic_layers_import_no_task(layer):
    folder = SRC / layer
    files = sorted(folder.rglob("*.py"))
    assert files
    for path in files:
        assert task_imports(path) == [], f"{path.relative_to(SRC)} imports a task: the {layer} must not know any"


def test_no_task_imports_another_task():
    """Code two tasks share (the transformer decoder, sampling, beam search, image backbones, scene generators)
    lives in a module both import (models/, data/, tasks/base.py ...), never in one task imported by another."""
    task_packages = sorted(path for path in (SRC / "tasks").iterdir() if (path / "__init__.py").is_file())
    assert len(task_packages) == len(TASKS)
    for package in task_packages:
        for path in sorted(package.rglob("*.py")):
            others = sorted(name for name in imported_modules(path) for other in task_packages
                            if other != package and (name == f"modelworks.tasks.{other.name}"
                                                     or name.startswith(f"modelworks.tasks.{other.name}.")))
            assert others == [], f"{path.relative_to(SRC)} imports another task: {others}; move the shared code"


@pytest.mark.parametrize("layer", ["engine", "export", "serve"])
def test_generic_layers_web_files_name_no_task(layer):
    """The Python import scan cannot see the demo page's script (or any other non-Python file a layer ships):
    read each such file for a task name, so the page stays generic too (it draws from the response's shape:
    `top_k`, `detections`, and from the fields /v1/models reports)."""
    files = sorted(path for path in (SRC / layer).rglob("*") if path.is_file() and path.suffix not in (".py", ".pyc"))
    for path in files:
        reader = WEB_FILE_READERS.get(path.suffix.lower())
        assert reader is not None, (f"{path.relative_to(SRC)}: no reader for {path.suffix!r} files; add one to "
                                    "WEB_FILE_READERS so the task-name scan covers it")
        assert reader(path.read_text()) == [], f"{path.relative_to(SRC)} names a task: the {layer} must not know any"


def test_the_demo_page_is_among_the_files_scanned():
    page = SRC / "serve" / "static" / "index.html"
    assert "<script" in page.read_text() and page.suffix in WEB_FILE_READERS


def test_import_scan_finds_every_spelling_of_a_task_import(tmp_path):
    """The boundary checks above must fail on a module that imports a task, however it is spelled, or they
    could never fail."""
    root = tmp_path / "modelworks"
    (root / "engine").mkdir(parents=True)
    violations = {
        "from ..tasks.classification import task": ["modelworks.tasks.classification",
                                                   "modelworks.tasks.classification.task"],
        "import modelworks.registry": ["modelworks.registry"],
        "from .. import tasks": ["modelworks.tasks"],
        "from modelworks.tasks import detection as d": ["modelworks.tasks", "modelworks.tasks.detection"],
        "import importlib\nimportlib.import_module('modelworks.tasks.detection.task')":
            ["modelworks.tasks.detection.task"],
        "from importlib import import_module\nimport_module('modelworks.registry')": ["modelworks.registry"],
        "import importlib\nname = 'modelworks.' + 'tasks'\nimportlib.import_module(name)": ["<dynamic>"],
        "task = __import__('modelworks.tasks.classification')": ["modelworks.tasks.classification"],
    }
    for i, (code, expected) in enumerate(violations.items()):
        source = root / "engine" / f"violating_{i}.py"
        source.write_text(code + "\n")
        assert task_imports(source, root) == expected, code
    clean = root / "engine" / "clean.py"
    clean.write_text("import torch\nfrom . import checkpoint\nfrom ..errors import ConfigError\n"
                     "version = __import__('modelworks').__version__\n")
    assert task_imports(clean, root) == []


def test_page_scan_finds_a_task_name_in_the_script():
    branching = '<p>detection results</p><script>if (model.task === "detection") draw();</script>'
    assert task_names_in_page(branching) == ["detection"]
    assert task_names_in_page("<script>const t = `${x} classification`;</script>") == ["classification"]
    assert task_names_in_page("<script>for (const detection of prediction.detections) draw(detection);</script>"
                              ) == []
    assert task_names_in_page('<button onclick="show(\'detection\')">boxes</button>') == ["detection"]
    assert task_names_in_script('const draw = {classification: bars, "detection": boxes};') == ["detection"]
