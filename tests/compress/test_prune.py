"""px.compress.prune, unstructured and 2:4: masks hit the requested sparsity exactly, the pruned set
is the lowest-scoring one (ties: lower flat index first) against a direct reference computation,
Wanda ranks by |W| * ||X||, the 2:4 pattern is exact in every group; bad input errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from parallax import compress
from parallax.compress.unstructured import lowest_k_mask, prune_count

pytestmark = pytest.mark.usefixtures("one_intraop_thread")

VOCAB = 31


class Toy(nn.Module):
    """Token ids -> embedding -> fc1 -> ReLU -> fc2 (odd output widths), with an LM head that
    pruning must leave alone."""

    def __init__(self, width: int = 12, hidden: int = 20, out: int = 7) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, out)
        self.lm_head = nn.Linear(out, VOCAB)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.fc2(torch.relu(self.fc1(self.embed(idx)))))

    def inputs(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """The input rows (tokens, in) each linear sees, computed directly."""
        x1 = self.embed(idx).reshape(-1, self.fc1.in_features)
        return {"fc1": x1, "fc2": torch.relu(self.fc1(x1))}


def toy(integer_weights: bool = False) -> Toy:
    """A random Toy; integer weights in [-3, 3] make many ties at every threshold."""
    torch.manual_seed(0)
    model = Toy()
    if integer_weights:
        with torch.no_grad():
            for linear in (model.fc1, model.fc2):
                linear.weight.copy_(torch.randint(-3, 4, linear.weight.shape))
    return model


def calib() -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, 10), generator=torch.Generator().manual_seed(1))


def reference_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k lowest entries of each row, ties by position: a stable sort's first k."""
    order = torch.argsort(scores, dim=-1, stable=True)[:, :k]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, order, True)


def wanda_scores(model: Toy, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        inputs = model.inputs(tokens)
        return {name: getattr(model, name).weight.abs() * inputs[name].norm(dim=0)[None] for name in inputs}


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 5), cols=st.integers(1, 40), levels=st.integers(1, 6), fraction=st.floats(0, 1),
       seed=st.integers(0, 2**16))
def test_lowest_k_mask_is_a_stable_sort_prefix(rows, cols, levels, fraction, seed):
    scores = torch.randint(0, levels, (rows, cols), generator=torch.Generator().manual_seed(seed)).float()
    k = round(fraction * cols)
    assert torch.equal(lowest_k_mask(scores, k), reference_mask(scores, k))


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.77])
def test_magnitude_layer_prunes_exactly_the_lowest_with_deterministic_ties(sparsity):
    model = toy(integer_weights=True)
    before = {name: getattr(model, name).weight.detach().clone() for name in ("fc1", "fc2")}
    head = model.lm_head.weight.detach().clone()
    assert compress.prune(model, sparsity) is model
    for name, weight in before.items():
        expected = reference_mask(weight.abs().reshape(1, -1), prune_count(sparsity, weight.numel())).view_as(weight)
        pruned = getattr(model, name).weight
        assert type(getattr(model, name)) is nn.Linear
        assert int((pruned == 0).sum()) == prune_count(sparsity, weight.numel())
        torch.testing.assert_close(pruned, weight.masked_fill(expected, 0), rtol=0, atol=0)
    assert torch.equal(model.lm_head.weight, head)


def test_magnitude_global_ranks_all_targets_together():
    model = toy(integer_weights=True)
    weights = [model.fc1.weight.detach().clone(), model.fc2.weight.detach().clone()]
    compress.prune(model, 0.6, scope="global")
    flat = torch.cat([w.abs().reshape(-1) for w in weights])[None]
    expected = reference_mask(flat, prune_count(0.6, flat.numel()))[0].split([w.numel() for w in weights])
    for linear, weight, mask in zip((model.fc1, model.fc2), weights, expected):
        torch.testing.assert_close(linear.weight, weight.masked_fill(mask.view_as(weight), 0), rtol=0, atol=0)
    assert int(sum((m.weight == 0).sum() for m in (model.fc1, model.fc2))) == prune_count(0.6, flat.numel())
    # one threshold for all: the layers end at different sparsities
    assert (model.fc1.weight == 0).float().mean() != (model.fc2.weight == 0).float().mean()


def test_wanda_prunes_each_row_by_weight_times_input_norm():
    model, tokens = toy(), calib()
    scores = wanda_scores(model, tokens)
    weights = {name: getattr(model, name).weight.detach().clone() for name in scores}
    compress.prune(model, 0.4, "wanda", tokens, batch_size=2)
    for name, weight in weights.items():
        k = prune_count(0.4, weight.shape[1])
        pruned = getattr(model, name).weight
        assert ((pruned == 0).sum(dim=1) == k).all()
        torch.testing.assert_close(pruned, weight.masked_fill(reference_mask(scores[name], k), 0), rtol=0, atol=0)
    # the input norms change the choice: magnitude alone prunes another set
    magnitude = weights["fc2"].masked_fill(reference_mask(weights["fc2"].abs(), prune_count(0.4, 20)), 0)
    assert not torch.equal(model.fc2.weight, magnitude)


def test_wanda_global_ranks_scores_of_all_targets_together():
    model, tokens = toy(), calib()
    scores = wanda_scores(model, tokens)
    weights = [getattr(model, name).weight.detach().clone() for name in scores]
    compress.prune(model, 0.5, "wanda", tokens, scope="global")
    flat = torch.cat([s.reshape(-1) for s in scores.values()])[None]
    masks = reference_mask(flat, prune_count(0.5, flat.numel()))[0].split([w.numel() for w in weights])
    for name, weight, mask in zip(scores, weights, masks):
        expected = weight.masked_fill(mask.view_as(weight), 0)
        torch.testing.assert_close(getattr(model, name).weight, expected, rtol=0, atol=0)


def test_filter_fn_limits_the_targets():
    model = toy()
    fc1 = model.fc1.weight.detach().clone()
    compress.prune(model, 0.5, filter_fn=lambda module, fqn: fqn == "fc2")
    assert torch.equal(model.fc1.weight, fc1)
    assert int((model.fc2.weight == 0).sum()) == 70


@pytest.mark.parametrize("use_calib", [False, True])
def test_two_four_keeps_the_two_best_of_every_group_of_four(use_calib):
    model, tokens = toy(), calib()
    scores = wanda_scores(model, tokens) if use_calib else {n: getattr(model, n).weight.abs() for n in ("fc1", "fc2")}
    weights = {name: getattr(model, name).weight.detach().clone() for name in scores}
    compress.prune(model, method="2:4", calib=tokens if use_calib else None)
    for name, weight in weights.items():
        out, inp = weight.shape  # (20, 12) and (7, 20)
        pruned = getattr(model, name).weight.reshape(out, inp // 4, 4)
        assert ((pruned == 0).sum(dim=-1) == 2).all()
        best = scores[name].reshape(out, inp // 4, 4).topk(2, dim=-1).indices.sort(dim=-1).values
        kept = (pruned != 0).nonzero()[:, -1].reshape(out, inp // 4, 2)
        assert torch.equal(kept, best)


def test_two_four_leaves_a_dense_masked_weight_on_cpu():
    model = toy()
    compress.prune(model, 0.5, "2:4")
    assert model.fc1.weight.layout == torch.strided and type(model.fc1) is nn.Linear


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
                    reason="semi-structured sparse tensors need a CUDA GPU of compute capability 8.0+")
def test_two_four_accelerated_matches_the_masked_dense_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 128)).cuda().half()
    compress.prune(model, method="2:4")
    x = torch.randn(4, 9, 128, device="cuda", dtype=torch.half)
    with torch.no_grad():
        dense = model(x)
        compress.prune(model, method="2:4", accelerate=True)
        sparse = model(x)
    assert type(model[0].weight.data).__name__.startswith("SparseSemiStructuredTensor")
    torch.testing.assert_close(sparse, dense, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("sparsity", [0, 1, -0.1, 1.5, True, "0.5", None])
def test_sparsity_outside_the_open_unit_interval_is_an_error(sparsity):
    with pytest.raises(ValueError, match="sparsity"):
        compress.prune(toy(), sparsity)


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="wanda"), "calib.*wanda"),
    (dict(method="structured"), "calib.*structured"),
    (dict(method="wanda", calib=torch.zeros(3)), "calib"),
    (dict(method="magnitude", calib=torch.zeros(2, 3, dtype=torch.long)), "calib"),
    (dict(method="2:4", sparsity=0.6), "sparsity.*2:4"),
    (dict(method="2:4", accelerate=True), "accelerate"),
    (dict(method="2:4", scope="global"), "scope"),
    (dict(method="sparsegpt"), "method"),
    (dict(scope="model"), "scope"),
    (dict(filter_fn=lambda m, fqn: False), "filter_fn"),
    (dict(batch_size=0), "batch_size"),
])
def test_bad_input_names_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        compress.prune(toy(), **{"sparsity": 0.5, **kwargs})


def test_two_four_names_a_layer_without_whole_groups_of_four():
    model = toy()
    model.fc3 = nn.Linear(7, 7)  # 7 inputs: no whole groups of 4
    with pytest.raises(ValueError, match="fc3.*multiple of 4"):
        compress.prune(model, method="2:4")
