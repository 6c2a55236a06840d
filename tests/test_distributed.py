"""Data-parallel fit on torch.distributed (gloo, 2 CPU processes).

Two spawned ranks fit shards of one data set; every rank must hold the
posterior a single process fits on the union (factors, evidence at several
prior precisions, predictive). Also: an empty shard, ranks whose LoRA weights
differ and a rank whose input is bad all end in the same error on every rank
within the timeout, never a hang.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import make_batch, make_loader, make_peft_classifier, rel_err
from laplace import Laplace
from torch.utils.data import DataLoader, DistributedSampler

import laplace_lora_backend  # noqa: F401
from laplace_lora_backend.distributed import DistributedFitError
from laplace_lora_backend.matrix import LowRankFactor

WORLD = 2
PRIORS = [0.1, 1.0, 10.0]
N_UNION = 11  # uneven shards: 6 + 5
CASES = {
    # name: (hessian_structure, kwargs, shards via DistributedSampler?)
    "kron-dense": ("kron", {"lowrank_threshold": None}, True),
    # drop_last=False: the sampler repeats one example (6 + 6 for 11); the
    # repeat is left out, so the ranks fit the 11 examples once each
    "kron-sampler-padded": ("kron", {"lowrank_threshold": None}, "padded"),
    "kron-lowrank-exact": ("kron", {"lowrank_threshold": 16, "lowrank_rank": 32}, 0),
    "kron-lowrank-k4": ("kron", {"lowrank_threshold": 16, "lowrank_rank": 4}, 0),
    "kron-ef": ("kron", {"lowrank_threshold": None, "backend_kwargs": {}}, False),
    "diag": ("diag", {}, False),
    "full": ("full", {}, False),
}


def union_batch():
    return make_batch(N_UNION, T=5, seed=0)


def probe_batch():
    return make_batch(4, T=5, seed=7)


def shard(batch, rank):
    cut = [0, 6, N_UNION]
    return {k: v[cut[rank] : cut[rank + 1]] for k, v in batch.items()}


def make_la(structure, kwargs, model=None):
    kwargs = dict(kwargs)
    if "backend_kwargs" in kwargs:  # the "-ef" case
        from laplace_lora_backend import LoRAEF

        kwargs["backend"] = LoRAEF
    return Laplace(
        model if model is not None else make_peft_classifier("llama"),
        "classification",
        subset_of_weights="lora",
        hessian_structure=structure,
        **kwargs,
    )


def summary(la):
    """What must agree across ranks and with the single-process fit."""
    H = la.H_facs.to_matrix() if hasattr(la, "H_facs") else la.H
    out = {"H": H, "n_data": la.n_data, "loss": torch.as_tensor(la.loss)}
    out["lml"] = torch.stack(
        [la.log_marginal_likelihood(prior_precision=p).detach() for p in PRIORS]
    )
    la.prior_precision = 1.0
    out["probs"] = la(probe_batch())
    if hasattr(la, "H_facs"):  # exact traces of the low-rank factors
        out["traces"] = [
            F.trace for b in la.H_facs.kfacs for F in b if isinstance(F, LowRankFactor)
        ]
    # the default prior: marglik and the trust region on every rank's kept
    # training examples (their sums reduced), as on the union in one process
    la.optimize_prior_precision(n_steps=10)
    out["prior"] = la.prior_precision.detach().clone()
    out["trust_examples"] = la.trust_region.n_examples
    return out


def worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    results: dict = {}
    try:
        batch = union_batch()
        for name, (structure, kwargs, use_sampler) in CASES.items():
            la = make_la(structure, kwargs)
            if use_sampler:  # the usual way: one data set, a sampler shards it
                from helpers import DictDataset

                data = DictDataset(batch)
                sampler = DistributedSampler(
                    data,
                    num_replicas=WORLD,
                    rank=rank,
                    shuffle=False,
                    drop_last=use_sampler != "padded",
                )
                loader = DataLoader(data, batch_size=3, sampler=sampler)
            else:
                loader = make_loader(shard(batch, rank), batch_size=3)
            la.fit(loader)
            results[name] = summary(la)

        # a rank with an empty shard still participates
        la = make_la("kron", {"lowrank_threshold": None})
        la.fit(make_loader(shard(batch, 0), batch_size=3) if rank == 0 else [])
        results["empty-shard"] = summary(la)

        # ranks with different LoRA weights: the same error on both
        model = make_peft_classifier("llama", r=4 if rank == 0 else 2)
        la = make_la("kron", {}, model)
        try:
            la.fit(make_loader(shard(batch, rank), batch_size=3))
            results["mismatch"] = "no error"
        except DistributedFitError as err:
            results["mismatch"] = str(err)

        # a rank with bad labels: its error, reported on both
        bad = shard(batch, rank)
        if rank == 1:
            bad["labels"] = bad["labels"] + 10
        la = make_la("kron", {})
        try:
            la.fit(make_loader(bad, batch_size=3))
            results["bad-rank"] = "no error"
        except DistributedFitError as err:
            results["bad-rank"] = str(err)

        # the process group still works after those errors
        la = make_la("diag", {})
        la.fit(make_loader(shard(batch, rank), batch_size=3))
        results["after-errors"] = summary(la)
    except Exception:
        results["crash"] = traceback.format_exc()
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=worker, args=(r, str(tmp / "init"), str(tmp)))
        for r in range(WORLD)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    hung = [p.pid for p in procs if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not hung, "a rank hung (timeout 300 s)"
    assert [p.exitcode for p in procs] == [0] * WORLD
    results = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    for r in results:
        assert "crash" not in r, r.get("crash")
    return results


def single_process(name, batch=None):
    structure, kwargs, _ = CASES.get(name, ("kron", {"lowrank_threshold": None}, 0))
    la = make_la(structure, kwargs)
    la.fit(make_loader(batch if batch is not None else union_batch(), batch_size=3))
    return summary(la)


def assert_same(got, ref, rtol):
    assert got["n_data"] == ref["n_data"]
    assert rel_err(got["H"], ref["H"]) < rtol
    assert torch.allclose(got["loss"], ref["loss"], rtol=rtol)
    assert torch.allclose(got["lml"], ref["lml"], rtol=rtol)
    assert torch.allclose(got["probs"], ref["probs"], rtol=rtol, atol=1e-10)
    assert torch.allclose(got["prior"], ref["prior"], rtol=rtol)
    assert got["trust_examples"] == ref["trust_examples"]


@pytest.mark.parametrize(
    "name",
    [
        "kron-dense",
        "kron-sampler-padded",
        "kron-lowrank-exact",
        "kron-ef",
        "diag",
        "full",
    ],
)
def test_every_rank_holds_the_union_posterior(rank_results, name):
    ref = single_process(name)
    if name == "kron-dense":  # the sampler dropped the last example (drop_last)
        ref = single_process(name, {k: v[:10] for k, v in union_batch().items()})
    for r in rank_results:
        assert_same(r[name], ref, rtol=1e-6)
    # and the ranks agree bit for bit with each other
    assert torch.equal(rank_results[0][name]["H"], rank_results[1][name]["H"])
    assert torch.equal(rank_results[0][name]["lml"], rank_results[1][name]["lml"])


def test_truncated_lowrank_factors_merge_to_the_documented_tolerance(rank_results):
    """Rank k below the data rank: traces exact, the factors as close to the
    exact (dense) curvature as the single-process streaming fit is."""
    name = "kron-lowrank-k4"
    ref = single_process(name)
    dense = single_process("kron-dense", union_batch())
    got = rank_results[0][name]
    assert len(got["traces"]) > 0
    for tg, tr in zip(got["traces"], ref["traces"], strict=True):
        assert torch.allclose(tg, tr, rtol=1e-6)
    err_single = rel_err(ref["H"], dense["H"])
    err_dist = rel_err(got["H"], dense["H"])
    assert err_dist < 1.5 * err_single + 1e-6
    assert torch.allclose(got["probs"], ref["probs"], atol=2e-2)
    assert torch.equal(rank_results[0][name]["H"], rank_results[1][name]["H"])


def test_empty_shard_participates(rank_results):
    ref = single_process("empty-shard", shard(union_batch(), 0))
    for r in rank_results:
        assert_same(r["empty-shard"], ref, rtol=1e-6)


def test_mismatched_lora_weights_raise_on_every_rank(rank_results):
    for r in rank_results:
        assert "Ranks 0 and 1 have different LoRA weights" in r["mismatch"]
        assert "lora_A" in r["mismatch"]


def test_a_failing_rank_stops_every_rank(rank_results):
    own, other = rank_results[1]["bad-rank"], rank_results[0]["bad-rank"]
    assert "failed on this rank: ValueError: Class labels" in own
    assert "failed on rank 1: ValueError: Class labels" in other
    ref = single_process("diag")
    for r in rank_results:
        assert_same(r["after-errors"], ref, rtol=1e-6)
