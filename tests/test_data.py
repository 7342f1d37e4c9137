"""Data sources, the grain pipeline, and the data room's import graph."""

import ast
import pathlib

import numpy as np
import pytest

from diffjax import data


def test_digits_source_shapes_and_range():
    src = data.make_source("digits", image_size=8, channels=1)
    assert len(src) == 1797
    rec = src[0]
    assert rec["image"].shape == (8, 8, 1) and rec["image"].dtype == np.float32
    assert rec["image"].min() >= -1.0 and rec["image"].max() <= 1.0
    assert set(np.unique(src.labels)) == set(range(10))


def test_make_source_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="image_size"):
        data.make_source("digits", image_size=32, channels=3)
    with pytest.raises(ValueError, match="Unknown data.source"):
        data.make_source("nope", image_size=8, channels=1)


def _labels(it, n):
    return np.concatenate([next(it)["labels"] for _ in range(n)])


def test_seeded_shuffle_is_deterministic_and_seed_dependent():
    src = data.digits_source()
    a = _labels(data.make_iterator(src, batch_size=64, seed=1), 3)
    b = _labels(data.make_iterator(src, batch_size=64, seed=1), 3)
    c = _labels(data.make_iterator(src, batch_size=64, seed=2), 3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_global_batches_do_not_depend_on_the_process_count():
    images = np.arange(40, dtype=np.uint8).reshape(40, 1, 1, 1)
    src = data.ArraySource(images, np.arange(40))
    one = data.make_iterator(src, batch_size=8, seed=0, random_flip=True)
    procs = [
        data.make_iterator(
            src, batch_size=2, seed=0, process_index=p, process_count=4, random_flip=True
        )
        for p in range(4)
    ]
    epoch = []
    for _ in range(12):  # 2.4 epochs: crosses epoch boundaries
        glob = next(one)
        local = [next(it) for it in procs]
        for key in ("labels", "image"):
            np.testing.assert_array_equal(np.concatenate([b[key] for b in local]), glob[key])
        epoch.extend(glob["labels"].tolist())
    assert sorted(epoch[:40]) == list(range(40))  # each epoch is a permutation
    assert epoch[:40] != epoch[40:80]  # reshuffled every epoch


def test_iterator_state_resumes_at_the_next_batch():
    src = data.digits_source()
    it = data.make_iterator(src, batch_size=32, seed=0, random_flip=True)
    for _ in range(7):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(3)]
    resumed = data.make_iterator(src, batch_size=32, seed=0, random_flip=True)
    resumed.set_state(state)
    for e in expected:
        got = next(resumed)
        np.testing.assert_array_equal(got["labels"], e["labels"])
        np.testing.assert_array_equal(got["image"], e["image"])


def test_random_flip_flips_some_images_horizontally():
    img = np.zeros((16, 2, 2, 1), np.uint8)
    img[:, :, 0] = 255  # left column white
    src = data.ArraySource(img, np.zeros(16))
    batch = next(data.make_iterator(src, batch_size=16, seed=0, random_flip=True, shuffle=False))
    left_white = batch["image"][:, 0, 0, 0] > 0
    assert 0 < left_white.sum() < 16
    np.testing.assert_array_equal(batch["image"][~left_white][:, :, 1], 1.0)


def test_bad_arrays_get_clear_errors():
    with pytest.raises(ValueError, match=r"\[N, H, W, C\]"):
        data.ArraySource(np.zeros((4, 8, 8)))
    with pytest.raises(ValueError, match="lie in"):
        data.ArraySource(np.full((2, 2, 2, 1), 3.0))
    with pytest.raises(ValueError, match="fewer than one global batch"):
        data.make_dataset(data.ArraySource(np.zeros((3, 2, 2, 1), np.uint8)), batch_size=4, seed=0)


# ----------------------------------------------------------------------------- import graph

_ROOT = pathlib.Path(__file__).resolve().parents[1]
# The modules checked: the data room and the two leaf modules it builds on.
_CHECKED = ("diffjax/data", "diffjax/text", "diffjax/images.py")


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(_ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """Module -> the diffjax modules it imports, from every import statement in it.

    Function-level (lazy) imports count: a cycle through them is still a cycle.
    `from pkg import name` is an edge to `pkg.name` when that is a module, else `pkg`.
    """
    files = []
    for entry in _CHECKED:
        p = _ROOT / entry
        files.extend(sorted(p.rglob("*.py")) if p.is_dir() else [p])
    known = {_module_name(f) for f in files}
    graph = {}
    for f in files:
        name = _module_name(f)
        package = name if f.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                for a in node.names:
                    targets.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
        graph[name] = {t for t in targets if t == "diffjax" or t.startswith("diffjax.")}
    return graph


def test_data_text_images_import_graph_is_one_way():
    graph = _import_graph()
    assert "diffjax.data.folder" in graph["diffjax.data.captions"]  # the parser sees edges
    for module, targets in graph.items():
        if module.startswith("diffjax.data"):
            models = sorted(t for t in targets if t.startswith("diffjax.models"))
            assert not models, f"{module} imports the model room: {models}"
        if module.startswith("diffjax.text"):
            assert all(t.startswith("diffjax.text") for t in targets), (module, targets)
        if module == "diffjax.images":
            assert not targets, f"diffjax.images imports {sorted(targets)}"
    # No cycle, lazy imports included (depth-first search over the checked modules).
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(module, path):
        state[module] = 1
        for t in sorted(graph.get(module, ())):
            if t not in graph:
                continue
            assert state.get(t) != 1, "import cycle: " + " -> ".join([*path, module, t])
            if t not in state:
                visit(t, [*path, module])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
