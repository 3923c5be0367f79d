"""Every Ray fan-out against its local twin (identical artifacts), and the Ray Train fit."""

import json

import numpy as np
import pytest

from nncift.exec.local import LocalExecutor
from nncift.exec.ray_executor import fit_ray, map_ray, map_rows_ray
from nncift.kernels.estimate_worker import EstimateWorker
from nncift.kernels.kernel_io import assemble_dense
from nncift.labels.label_worker import LabelWorker, plan_blocks
from nncift.labels.plan import block_grid, plan_labels
from nncift.labels.tables import gather_labels
from nncift.surrogate.fitting import PairLabels, split_train_val
from tests.kernels.test_estimate_worker import _heads

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


def test_estimate_ray_equals_local(ray_session, tmp_path):
    heads, _ = _heads()
    specs = [b.to_dict() for b in block_grid("ff", 37, 37, 10) + block_grid("ft", 37, 11, 10, start_id=50)]
    for name, fn in (("local", LocalExecutor().map_blocks), ("ray", map_ray)):
        res = fn(EstimateWorker, {"heads": heads, "out_dir": str(tmp_path / name)}, specs)
        assert sorted(int(r["block_id"]) for r in res) == [s["block_id"] for s in specs]
    for kernel, shape in (("ff", (37, 37)), ("ft", (37, 11))):
        np.testing.assert_array_equal(
            assemble_dense(tmp_path / "local", kernel, shape), assemble_dense(tmp_path / "ray", kernel, shape)
        )


def test_label_ray_equals_local(ray_session, tmp_path):
    rng = np.random.default_rng(0)
    e = rng.normal(size=(60, 8)).astype(np.float32)
    e /= np.linalg.norm(e, axis=1, keepdims=True)

    def side(sl):
        return {
            "ids": [f"i{i}" for i in range(sl.start, sl.stop)],
            "prompts": ["p"] * (sl.stop - sl.start),
            "responses": ["r"] * (sl.stop - sl.start),
            "embeddings": e[sl],
        }

    plan = plan_labels(40, 20, 0.25, 4, 36, seed=0)
    specs = plan_blocks(plan, 4)
    sets = [{"kernel": s.kernel, "quadrant": s.quadrant, "rows": s.rows, "cols": s.cols} for s in plan.sets]
    for name, fn in (("local", LocalExecutor().map_blocks), ("ray", map_ray)):
        kw = {
            "function": "delift_se",
            "function_kwargs": {},
            "pool": side(slice(0, 40)),
            "target": side(slice(40, 60)),
            "sets": sets,
            "out_dir": str(tmp_path / name),
        }
        fn(LabelWorker, kw, specs)
    a = gather_labels(tmp_path / "local", len(specs))
    b = gather_labels(tmp_path / "ray", len(specs))
    assert a.equals(b)
    # the SE teacher labels are exactly the cosines of the embeddings they name
    rows, cols = a.column("row").to_numpy(), a.column("col").to_numpy()
    ft = np.asarray(a.column("kernel").to_pylist()) == "ft"
    np.testing.assert_allclose(a.column("value").to_numpy()[ft], np.sum(e[rows[ft]] * e[40 + cols[ft]], 1), rtol=1e-5)


@pytest.mark.slow  # CI time: the embedding's Ray twin in CI is test_devices.py::test_embed_on_logical_gpus_equals_local
def test_embed_ray_streams_parquet_and_equals_local(ray_session, tiny_st_model, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from nncift.corpus.embedder import Embedder
    from nncift.exec.local import LocalExecutor

    prompts = [f"explain python sort {i} " * (1 + i % 3) for i in range(50)]
    responses = [f"answer list {i}" for i in range(50)]
    pq.write_table(
        pa.table({"id": [str(i) for i in range(50)], "prompt": prompts, "response": responses, "idx": np.arange(50)}),
        tmp_path / "pool.parquet",
        row_group_size=7,
    )
    kw = {"model_path": tiny_st_model, "batch_size": 8, "max_seq_length": 64, "template": "{prompt}\n{response}"}
    direct = Embedder(**kw).encode([f"{p}\n{r}" for p, r in zip(prompts, responses, strict=True)])
    src = {"pool": str(tmp_path / "pool.parquet")}
    local = LocalExecutor().map_rows(Embedder, kw, src, tmp_path / "local", 8, "embedding")["pool"]
    remote = map_rows_ray(Embedder, kw, src, tmp_path / "out", 8, "embedding", concurrency=2, num_cpus=0.5)["pool"]
    assert remote.shape == local.shape == direct.shape
    np.testing.assert_allclose(remote, local, atol=1e-5)
    np.testing.assert_array_equal(local, direct)  # the local twin encodes exactly what the Embedder does
    assert list((tmp_path / "out").glob("*.parquet"))  # written by the actors, not the driver


@pytest.mark.slow  # the fit's Ray twin is test_ray_fit_equals_the_local_fit_on_any_worker_count (CI time)
def test_torchtrainer_fit_reduces_loss(ray_session, tmp_path):
    rng = np.random.default_rng(0)
    e = rng.normal(size=(40, 8)).astype(np.float32)
    rows, cols = np.meshgrid(np.arange(40), np.arange(40), indexing="ij")
    rows, cols = rows.reshape(-1), cols.reshape(-1)
    y = np.tanh(e[rows, 0] + e[cols, 1]).astype(np.float32) * 0.5 + 0.5
    labels = PairLabels(rows, cols, y)
    tr, va = split_train_val(len(y), 0.1, 0)
    cfg = {"hidden": 16, "lr": 1e-2, "epochs": 6, "batch_size": 64, "patience": 6, "seed": 0}
    task = (e, labels.take(tr), labels.take(va))
    out = fit_ray(cfg, e, {"a": task, "b": task}, num_workers=2, use_gpu=False, storage=tmp_path, name="t")
    state, history = out["a"]
    assert out["b"][1] == history  # same task and seed in one run: the loop is deterministic
    assert len(history) == 6
    # rank 0's epoch heartbeat, which the driver's stall watch counts: one line per epoch of each task
    beats = (tmp_path / "t.epochs.jsonl").read_text().splitlines()
    assert len(beats) == 12 and json.loads(beats[-1])["epoch"] == history[-1]["epoch"]
    assert history[-1]["val_mse"] < 0.5 * history[0]["val_mse"]
    assert set(state) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}


def greedi_ray(kern, parts, budget):
    """GreeDi with round 1 as Ray tasks (the select stage's fan-out through ``map_tasks``)."""
    from nncift.exec.ray_executor import map_tasks_ray
    from nncift.selection.sparse import greedi_local_round, greedi_merge

    return greedi_merge(kern, map_tasks_ray(greedi_local_round, kern, [(p, budget) for p in parts]), budget)


def greedi_local(kern, parts, budget):
    from nncift.exec.local import LocalExecutor
    from nncift.selection.sparse import greedi_local_round, greedi_merge

    local = LocalExecutor().map_tasks(greedi_local_round, kern, [(p, budget) for p in parts])
    return greedi_merge(kern, local, budget)


def test_greedi_ray_equals_local(ray_session):
    from nncift.selection.sparse import greedi_local_round, greedi_merge, partition_items
    from tests.selection.test_sparse import _dense, _sparse

    sk = _sparse(_dense(m=300, seed=7), 24)
    parts = partition_items(300, 3, seed=1)
    local = greedi_merge(sk, [greedi_local_round(sk, p, 25) for p in parts], 25)
    remote = greedi_ray(sk, parts, 25)
    np.testing.assert_array_equal(local[0], remote[0])
    np.testing.assert_allclose(local[1], remote[1])


def test_greedi_ray_from_stripes_equals_local(ray_session, tmp_path):
    """Ray tasks that read their parts from the Parquet stripes pick what the local twin picks."""
    from nncift.selection.sparse import StripeSource, partition_items
    from tests.selection.test_sparse import _dense, _write_stripes

    _write_stripes(tmp_path, _dense(m=300, seed=8), 16)
    src = StripeSource(str(tmp_path), 300)
    parts = partition_items(300, 3, seed=1)
    local, remote = greedi_local(src, parts, 25), greedi_ray(src, parts, 25)
    np.testing.assert_array_equal(local[0], remote[0])
    np.testing.assert_array_equal(local[1], remote[1])


def _bilinear_heads(m=37, n=11, d=6):
    import torch

    from nncift.surrogate.network import BilinearNetwork

    torch.manual_seed(1)
    er, et = torch.randn(m, d), torch.randn(n, d)
    heads = {}
    for kernel, ec in (("ff", er), ("ft", et)):
        head = BilinearNetwork(d, rank=3, symmetric=kernel == "ff", cosine_prior=True).estimator(er, ec)
        head.update(lo=-1.0, hi=3.0, diag=np.linspace(500, 600, m).astype(np.float32) if kernel == "ff" else None)
        heads[kernel] = head
    return heads


@pytest.mark.parametrize("layout", [pytest.param("dense", marks=pytest.mark.slow), "sparse"])  # CI time
def test_estimate_ray_equals_local_for_the_bilinear_kind(ray_session, tmp_path, layout):
    from nncift.kernels.kernel_io import read_sparse

    heads = _bilinear_heads()
    sparse = layout == "sparse"
    specs = [
        b.to_dict()
        for b in block_grid("ff", 37, 37, 10, col_size=37 if sparse else None)
        + block_grid("ft", 37, 11, 10, start_id=50, col_size=11 if sparse else None)
    ]
    kw = {"heads": heads, "layout": layout, "topk": 5, "col_chunk": 8}
    for name, fn in (("local", LocalExecutor().map_blocks), ("ray", map_ray)):
        fn(EstimateWorker, {**kw, "out_dir": str(tmp_path / name)}, specs)
    for kernel, shape in (("ff", (37, 37)), ("ft", (37, 11))):
        if sparse:
            a, b = read_sparse(tmp_path / "local", kernel, 37), read_sparse(tmp_path / "ray", kernel, 37)
            np.testing.assert_array_equal(a[0], b[0])
            np.testing.assert_array_equal(a[1], b[1])
            if kernel == "ff":  # the exact diagonal (500..600, above every estimate) is each row top entry
                np.testing.assert_array_equal(a[0][:, 0], np.arange(37))
        else:
            a = assemble_dense(tmp_path / "local", kernel, shape)
            np.testing.assert_array_equal(a, assemble_dense(tmp_path / "ray", kernel, shape))
            if kernel == "ff":
                np.testing.assert_array_equal(np.diag(a), heads["ff"]["diag"])
                off = ~np.eye(37, dtype=bool)
                expect = (heads["ff"]["p"] @ heads["ff"]["q"].T) * 4.0 - 1.0
                np.testing.assert_allclose(a[off], expect[off], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "fit_cfg",
    [  # CI runs the default kind on 2 workers; the other kinds and 1 worker are marked slow (CI time)
        pytest.param({"kind": "mlp", "hidden": 8}, marks=pytest.mark.slow),
        {"kind": "bilinear", "rank": 4, "symmetric": True, "cosine_prior": True},
        pytest.param(
            {"kind": "bilinear", "rank": 4, "symmetric": False, "cosine_prior": False, "weight_decay": 1e-3},
            marks=pytest.mark.slow,
        ),
    ],
)
@pytest.mark.parametrize("workers", [pytest.param(1, marks=pytest.mark.slow), 2])
def test_ray_fit_equals_the_local_fit_on_any_worker_count(ray_session, tmp_path, fit_cfg, workers):
    import os

    import torch

    from nncift.surrogate.fitting import fit_loop

    rng = np.random.default_rng(0)
    e = rng.normal(size=(30, 6)).astype(np.float32)
    rows, cols = np.meshgrid(np.arange(30), np.arange(30), indexing="ij")
    rows, cols = rows.reshape(-1), cols.reshape(-1)
    y = (0.5 + 0.4 * np.tanh(np.sum(e[rows] * e[cols], 1) / 3)).astype(np.float32)
    labels = PairLabels(rows, cols, y)
    tr, va = split_train_val(len(y), 0.1, 0)
    cfg = {**fit_cfg, "lr": 1e-2, "epochs": 3, "batch_size": 64, "patience": 3, "seed": 0}
    task = (e, labels.take(tr), labels.take(va))
    # the Ray worker runs cpu_count // num_workers torch threads: the local fit uses as many
    torch.set_num_threads(os.cpu_count() or 1)
    local_state, local_hist = fit_loop(cfg, e, *task)
    remote = fit_ray(cfg, e, {"a": task}, num_workers=workers, use_gpu=False, storage=tmp_path, name="t1")
    state, hist = remote["a"]
    assert set(state) == set(local_state)
    assert len((tmp_path / "t1.epochs.jsonl").read_text().splitlines()) == len(hist)  # the stall watch's heartbeat
    # fit.batch_size is the global batch: 2 DDP workers take the same optimizer steps as one process
    # (equal up to float summation order)
    for k in state:
        torch.testing.assert_close(state[k], local_state[k], rtol=1e-4, atol=1e-5)
    assert [h["epoch"] for h in hist] == [h["epoch"] for h in local_hist]
    assert hist[-1]["val_mse"] < hist[0]["val_mse"] or len(hist) == 1


@pytest.mark.gpu
@pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="needs a CUDA GPU")
def test_ray_fit_on_a_gpu_matches_the_cpu_fit(ray_session, tmp_path):
    # fit.use_gpu=true: labels and embeddings follow the DDP model to CUDA (they stayed on the CPU before)
    rng = np.random.default_rng(0)
    e = rng.normal(size=(30, 6)).astype(np.float32)
    rows, cols = np.meshgrid(np.arange(30), np.arange(30), indexing="ij")
    labels = PairLabels(rows.reshape(-1), cols.reshape(-1), rng.uniform(size=900).astype(np.float32))
    tr, va = split_train_val(900, 0.1, 0)
    cfg = {"kind": "bilinear", "rank": 4, "lr": 1e-2, "epochs": 2, "batch_size": 64, "patience": 2, "seed": 0}
    task = (e, labels.take(tr), labels.take(va))
    state, hist = fit_ray(cfg, e, {"a": task}, num_workers=1, use_gpu=True, storage=tmp_path, name="g")["a"]
    assert len(hist) == 2 and all(np.isfinite(h["val_mse"]) for h in hist)
    assert all(v.device.type == "cpu" for v in state.values())


def test_lexical_view_chunks_as_ray_tasks_equal_the_local_twin(ray_session):
    """The choose stage's lexical vectors of a large side: chunks fanned out through ``map_tasks``."""
    from types import SimpleNamespace

    from nncift.exec.local import LocalExecutor
    from nncift.exec.ray_executor import map_tasks_ray
    from nncift.surrogate.recipes import lexical_vectors
    from nncift.surrogate.views import LexicalView
    from tests.surrogate.test_views import TEXTS

    view = LexicalView(dim=4, analyzers=("word", "char")).fit(TEXTS)
    texts = TEXTS * 2
    whole = view.transform(texts)
    local = lexical_vectors(SimpleNamespace(executor=LocalExecutor()), view, texts, chunk=5)
    remote = lexical_vectors(SimpleNamespace(executor=SimpleNamespace(map_tasks=map_tasks_ray)), view, texts, chunk=5)
    assert local.shape == remote.shape == whole.shape == (32, 8)
    np.testing.assert_allclose(local, whole, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(remote, local, rtol=1e-6, atol=1e-7)
