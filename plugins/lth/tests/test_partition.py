"""Row partitioner for Regroup: hypergraph construction, determinism, balance, planted clusters, and failures."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from prunekit_lth import partition as P
from prunekit_lth.partition import PartitionerError, hypergraph, max_part_size, partition_rows
from prunekit_lth.regroup import regroup

REAL = ("kahypar", "pymetis")  # pymetis is a dependency; kahypar is optional (GPL): its tests skip without it


@pytest.fixture(params=REAL)
def real(request) -> str:
    pytest.importorskip(request.param)
    return request.param


def imp_like_mask(cout: int, n: int, density: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = torch.randn(cout, 1, generator=g) * 0.6 + torch.randn(1, n, generator=g) * 0.6
    scale = scale + torch.randn(cout, 3, generator=g) @ torch.randn(3, n, generator=g) * 0.4
    score = (torch.randn(cout, n, generator=g) * scale.exp()).abs()
    return score >= torch.topk(score.flatten(), int(density * cout * n)).values[-1]


def planted(groups: int, rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``groups`` row groups on disjoint column ranges (each row 60 % of its range), rows shuffled."""
    g = torch.Generator().manual_seed(seed)
    truth = torch.randperm(groups * rows, generator=g) % groups
    m = torch.zeros(groups * rows, groups * cols, dtype=torch.bool)
    for p in range(groups):
        sel = truth == p
        m[sel, p * cols : (p + 1) * cols] = torch.rand(int(sel.sum()), cols, generator=g) < 0.6
    return m, truth


def same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to renaming the part ids."""
    return all(len({int(x) for x in a[b == p]}) == 1 for p in b.unique()) and a.unique().numel() == b.unique().numel()


def test_hypergraph_has_one_edge_per_nonempty_column_with_its_rows() -> None:
    m = imp_like_mask(30, 50, 0.1, 0)
    m[:, 7] = False
    sub = m[m.any(1)]
    num_edges, index, pins = hypergraph(sub)
    cols = [j for j in range(m.shape[1]) if sub[:, j].any()]
    assert num_edges == len(cols) == len(index) - 1
    for e, j in enumerate(cols):
        assert pins[index[e] : index[e + 1]].tolist() == torch.nonzero(sub[:, j]).flatten().tolist()


@pytest.mark.parametrize("backend", [*REAL, "greedy"])
def test_recovers_planted_clusters(backend: str) -> None:
    if backend in REAL:
        pytest.importorskip(backend)
    m, truth = planted(8, 24, 20, seed=1)
    part = partition_rows(m, 8, seed=0, backend=backend)
    assert same_partition(part, truth)
    r = regroup(m, part=part)
    assert len(r.blocks) == 8 and r.rows_without_block == 0
    assert all((b.cols // 20).unique().numel() == 1 for b in r.blocks), "a block spans two planted groups"


@pytest.mark.parametrize("backend", [*REAL, "greedy", "auto"])
def test_deterministic_under_a_fixed_seed(backend: str) -> None:
    if backend in REAL:
        pytest.importorskip(backend)
    m = imp_like_mask(160, 288, 0.2, 3)
    a = partition_rows(m, 8, seed=4, backend=backend)
    b = partition_rows(m, 8, seed=4, backend=backend)
    assert torch.equal(a, b)
    live = m.any(1)
    assert a.dtype == torch.long and a.shape == (160,) and bool((a[~live] == -1).all())
    assert int(a[live].min()) >= 0 and int(a.max()) < 8


@pytest.mark.parametrize("imbalance", [0.0, 0.05, 0.1, 0.3])
def test_kahypar_respects_the_imbalance_bound(imbalance: float) -> None:
    pytest.importorskip("kahypar")
    m = imp_like_mask(200, 144, 0.25, 1)
    m[[5, 50, 51]] = False
    part = partition_rows(m, 8, seed=1, imbalance=imbalance, backend="kahypar")
    sizes = torch.bincount(part[part >= 0], minlength=8)
    assert int(sizes.sum()) == 197
    assert int(sizes.max()) <= max_part_size(197, 8, imbalance)


def test_kahypar_degenerate_hypergraphs(monkeypatch) -> None:
    pytest.importorskip("kahypar")
    eye = torch.eye(40, dtype=torch.bool)  # only one-pin hyperedges: KaHyPar would crash, equal parts are optimal
    assert torch.bincount(partition_rows(eye, 8, backend="kahypar")).tolist() == [5] * 8
    monkeypatch.setattr(P, "_kahypar", lambda mod, sub, parts, seed, imbalance: np.arange(sub.shape[0]) % 2)
    with pytest.raises(PartitionerError, match="balance bound.*backend='pymetis'"):
        partition_rows(imp_like_mask(64, 40, 0.3, 0), 8, backend="kahypar")


def test_empty_rows_get_minus_one_and_few_rows_get_one_part_each() -> None:
    m = imp_like_mask(40, 30, 0.3, 0)
    m[[0, 9, 39]] = False
    part = partition_rows(m, 8)
    assert part[[0, 9, 39]].tolist() == [-1, -1, -1] and bool((part[m.any(1)] >= 0).all())
    few = torch.zeros(12, 30, dtype=torch.bool)
    few[[2, 5, 6, 11], 3] = True
    assert partition_rows(few, 8).tolist() == [-1, -1, 0, -1, -1, 1, 2, -1, -1, -1, -1, 3]
    assert partition_rows(torch.zeros(5, 4, dtype=torch.bool), 8).tolist() == [-1] * 5
    assert set(partition_rows(m, 1)[m.any(1)].tolist()) == {0}


@pytest.mark.parametrize("backend,pin", [("kahypar", r"kahypar==1\.3\.7"), ("pymetis", r"pymetis==2025\.2\.2")])
def test_a_missing_backend_raises_naming_the_fix(monkeypatch, backend: str, pin: str) -> None:
    m = imp_like_mask(64, 40, 0.3, 0)
    monkeypatch.setitem(sys.modules, backend, None)  # makes `import <backend>` raise ImportError
    with pytest.raises(PartitionerError, match=f"pip install -c constraints.txt {pin}"):
        partition_rows(m, 8, backend=backend)
    with pytest.raises(PartitionerError, match="not installed"):
        regroup(m, backend=backend)  # never a silently unchanged mask


def test_auto_uses_the_default_backend() -> None:
    m = imp_like_mask(64, 40, 0.3, 0)
    assert P.DEFAULT_BACKEND in REAL
    assert torch.equal(partition_rows(m, 8, seed=3), partition_rows(m, 8, seed=3, backend=P.DEFAULT_BACKEND))


def test_auto_falls_back_to_the_other_real_partitioner(monkeypatch) -> None:
    m = imp_like_mask(64, 40, 0.3, 0)
    other = "pymetis" if P.DEFAULT_BACKEND == "kahypar" else "kahypar"
    pytest.importorskip(other)
    want = partition_rows(m, 8, seed=2, backend=other)
    monkeypatch.setitem(sys.modules, P.DEFAULT_BACKEND, None)
    assert torch.equal(partition_rows(m, 8, seed=2), want)


def test_auto_never_falls_back_to_nothing_or_to_greedy(monkeypatch) -> None:
    m = imp_like_mask(64, 40, 0.3, 0)
    monkeypatch.setitem(sys.modules, "kahypar", None)
    monkeypatch.setitem(sys.modules, "pymetis", None)
    with pytest.raises(PartitionerError, match="no row partitioner.*pip install.*backend='greedy'"):
        partition_rows(m, 8)
    with pytest.raises(PartitionerError, match="no row partitioner"):
        regroup(m)
    assert P.available_backends() == ("greedy",)


def test_without_any_package_greedy_still_works_on_request(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "kahypar", None)
    monkeypatch.setitem(sys.modules, "pymetis", None)
    m, truth = planted(4, 20, 10, seed=0)
    assert same_partition(partition_rows(m, 4, backend="greedy"), truth)


def test_a_failing_backend_raises(monkeypatch, real: str) -> None:
    backend = real
    mod = pytest.importorskip(backend)

    def boom(*args, **kwargs):
        raise RuntimeError("solver exploded")

    monkeypatch.setattr(mod, "partition" if backend == "kahypar" else "part_graph", boom)
    with pytest.raises(PartitionerError, match="solver exploded"):
        partition_rows(imp_like_mask(64, 40, 0.3, 0), 8, backend=backend)


def test_an_invalid_partition_raises(monkeypatch) -> None:
    monkeypatch.setattr(P, "_greedy", lambda sub, parts: [parts] * sub.shape[0])
    with pytest.raises(PartitionerError, match="invalid partition"):
        partition_rows(imp_like_mask(64, 40, 0.3, 0), 8, backend="greedy")


def test_bad_arguments() -> None:
    m = imp_like_mask(64, 40, 0.3, 0)
    with pytest.raises(PartitionerError, match="unknown partitioner backend 'hmetis'"):
        partition_rows(m, backend="hmetis")
    with pytest.raises(PartitionerError, match="parts"):
        partition_rows(m, parts=0)
    with pytest.raises(PartitionerError, match="seed"):
        partition_rows(m, seed=-1)
    with pytest.raises(PartitionerError, match="imbalance"):
        partition_rows(m, imbalance=1.5)
    with pytest.raises(PartitionerError, match="2-D"):
        partition_rows(m.flatten())
