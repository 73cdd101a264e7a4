"""The attention-copying generator (Jetchev et al. 2021, arXiv 2107.03742): shapes, which
attention each level uses, the ``none`` baseline, gradient flow, presets and errors."""

import dataclasses

import pytest
import torch

from attnbench.generators import CopyingGenerator, GeneratorConfig, preset
from attnbench.generators.presets import PRESETS

# Four levels 4, 8, 16, 32: exact attention at 4 and 8, the implementation under test at 16, 32.
TINY = GeneratorConfig(
    image_size=(32, 32),
    channels=(16, 16, 8, 8),
    pose_channels=2,
    attn_channels=8,
    full_attn_max=8,
    gpa_phase1_res=8,
)


def inputs(config: GeneratorConfig, batch: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    h, w = config.image_size
    image = torch.rand(batch, config.image_channels, h, w, generator=gen)
    pose = torch.rand(batch, config.pose_channels, h, w, generator=gen)
    target_pose = torch.rand(batch, config.pose_channels, h, w, generator=gen)
    return image, pose, target_pose


def train_step(model: CopyingGenerator, seed: int = 0) -> torch.Tensor:
    image, pose, target_pose = inputs(model.config, seed=seed)
    out = model(image, pose, target_pose)
    (out - image).abs().mean().backward()
    return out


def grad_abs_sum(module: torch.nn.Module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


def test_cpu64_output_shape():
    torch.manual_seed(0)
    model = CopyingGenerator(preset("cpu64"))
    with torch.no_grad():
        out = model(*inputs(model.config))
    assert out.shape == (2, 3, 64, 64)
    assert torch.isfinite(out).all()


def test_non_square_with_gpa():
    config = GeneratorConfig(
        image_size=(64, 32), channels=(16, 16, 8, 8), attn_channels=8, full_attn_max=16,
        gpa_phase1_res=16,
    )  # fmt: skip
    torch.manual_seed(0)
    model = CopyingGenerator(config, "gpa.torch")
    assert config.level_sizes == ((8, 4), (16, 8), (32, 16), (64, 32))
    # phase1_res applies to the longer side: d = 32 / 16 and 64 / 16.
    labels = list(model.attention_labels().values())
    assert labels[2].startswith("gpa.torch(d=2,") and labels[3].startswith("gpa.torch(d=4,"), labels
    out = train_step(model)
    assert out.shape == (2, 3, 64, 32)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("attention", ["gpa.torch", "none", "full.naive"])
def test_levels_pick_exact_or_requested_attention(attention):
    model = CopyingGenerator(preset("cpu64"), attention)
    used = {name: block.attention_name for name, block in model.attention_blocks()}
    assert used == {
        "level0_8x8": "full.sdpa",
        "level1_16x16": "full.sdpa",
        "level2_32x32": attention,
        "level3_64x64": attention,
    }


def test_none_copies_zeros_at_large_levels_with_the_same_parameters():
    torch.manual_seed(0)
    model = CopyingGenerator(TINY, "none")
    counts = {name: CopyingGenerator(TINY, name).n_params() for name in ("full.sdpa", "gpa.torch")}
    assert counts == {"full.sdpa": model.n_params(), "gpa.torch": model.n_params()}
    feats = model.attention_block_inputs(batch=2)
    for i, (name, block) in enumerate(model.attention_blocks()):
        out = block.attention_call(*feats[name])
        assert out.shape == (2, TINY.attn_channels, *block.map_size)
        largest = float(out.detach().abs().max())
        if i in TINY.large_levels:
            assert largest == 0.0, f"{name}: none copied values up to {largest}"
        else:
            assert largest > 0.0, f"{name}: exact attention copied only zeros"


def test_gradients_reach_both_branches_when_copying():
    torch.manual_seed(0)
    model = CopyingGenerator(TINY, "full.sdpa")
    train_step(model)
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    for i, block in enumerate(model.source_decoder.blocks):
        weight = block[0].weight.grad
        assert weight.abs().sum() > 0, f"source decoder level {i} conv got a zero gradient"
    assert grad_abs_sum(model.source_encoder) > 0


def test_none_cuts_the_source_decoder_at_large_levels():
    torch.manual_seed(0)
    model = CopyingGenerator(TINY, "none")
    train_step(model)
    for i in range(TINY.levels):
        source = grad_abs_sum(model.source_decoder.blocks[i])
        kv = grad_abs_sum(model.copies[i].key) + grad_abs_sum(model.copies[i].value)
        if i in TINY.large_levels:
            assert source == 0.0 and kv == 0.0, f"level {i}: gradient {source}, {kv} through none"
        else:
            assert source > 0.0 and kv > 0.0, f"level {i}: exact attention passed no gradient"
    # The target branch still learns at every level.
    for i, block in enumerate(model.target_decoder.blocks):
        assert block[0].weight.grad.abs().sum() > 0, f"target decoder level {i}"


def test_cpu64_gpa_defaults_to_phase1_at_16():
    torch.manual_seed(0)
    model = CopyingGenerator(preset("cpu64"), "gpa.torch")
    assert model.attention_params == {"phase1_res": 16}
    labels = model.attention_labels()
    assert labels["level2_32x32"] == "gpa.torch(d=2,s=2,k=12)"
    assert labels["level3_64x64"] == "gpa.torch(d=4,s=2,k=12)"
    out = train_step(model)
    assert torch.isfinite(out).all()
    assert all(p.grad is not None for p in model.parameters())
    # A caller's downsample or phase1_res is kept as given.
    given = CopyingGenerator(preset("cpu64"), "gpa.torch", {"downsample": 2})
    assert given.attention_params == {"downsample": 2}
    assert CopyingGenerator(preset("cpu64"), "none").attention_params == {}


@pytest.mark.parametrize(
    "name, sizes, exact, d",
    [
        ("paper_df256", [(8, 8), (16, 16), (32, 32), (64, 64), (128, 128), (256, 256)], 4, [2, 4]),
        (
            "paper_512x256",
            [(16, 8), (32, 16), (64, 32), (128, 64), (256, 128), (512, 256)],
            3,
            [2, 4, 8],
        ),
    ],
)
def test_paper_presets(name, sizes, exact, d):
    config = preset(name)
    assert list(config.level_sizes) == sizes
    channels = {"paper_df256": (640, 640, 640, 640, 320, 160)}.get(
        name, (768, 768, 768, 512, 256, 128)
    )
    assert config.channels == channels
    with torch.device("meta"):  # no memory for the weights
        model = CopyingGenerator(config, "gpa.torch")
        none = CopyingGenerator(config, "none")
    labels = list(model.attention_labels().values())
    assert labels[:exact] == ["full.sdpa(scale=None)"] * exact
    assert labels[exact:] == [f"gpa.torch(d={x},s=2,k=12)" for x in d]
    assert model.n_params() == none.n_params()
    assert model.unsupported_reasons("cpu") == []


def test_unsupported_levels_are_named():
    model = CopyingGenerator(preset("cpu64"), "gpa.torch", {"phase1_res": 64})
    reasons = model.unsupported_reasons("cpu")
    assert reasons and all(r.startswith("level2_32x32") for r in reasons), reasons
    with pytest.raises(ValueError, match="phase1_res=64"):
        model.check("cpu")


def test_attention_block_inputs_run_alone():
    model = CopyingGenerator(TINY, "gpa.torch")
    feats = model.attention_block_inputs(batch=1, generator=torch.Generator().manual_seed(0))
    for name, block in model.attention_blocks():
        block.attention_call(*feats[name]).sum().backward()
        h, w = block.map_size
        assert block.last_shapes == tuple(torch.Size(s) for s in block.qkv_shapes(1))
        assert block.qkv_shapes(1)[0] == (1, 1, h * w, TINY.attn_channels), name


def test_bad_preset_lists_presets():
    with pytest.raises(ValueError, match="unknown generator preset 'cpu_64'") as err:
        preset("cpu_64")
    for name in PRESETS:
        assert name in str(err.value)


def test_unknown_attention_gets_the_registry_error():
    with pytest.raises(ValueError, match=r"did you mean 'gpa\.torch'"):
        CopyingGenerator(TINY, "gpa.torh")
    with pytest.raises(ValueError, match="topk"):
        CopyingGenerator(TINY, "gpa.torch", {"topk": 0})


def test_config_and_input_errors():
    with pytest.raises(ValueError, match="divisible by 8"):
        GeneratorConfig(image_size=(60, 64), channels=(8, 8, 8, 8))
    with pytest.raises(ValueError, match="norm='batch'"):
        GeneratorConfig(image_size=(64, 64), channels=(8,), norm="batch")
    model = CopyingGenerator(TINY)
    image, pose, target_pose = inputs(TINY)
    with pytest.raises(ValueError, match=r"target_pose has shape \(2, 3, 32, 32\)"):
        model(image, pose, image)


def test_no_copying_at_any_level():
    model = CopyingGenerator(dataclasses.replace(TINY, small_attention="none"), "none")
    assert {block.attention_name for _, block in model.attention_blocks()} == {"none"}
    assert model.n_params() == CopyingGenerator(TINY, "none").n_params()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("small_attention", "gpa.torch", "allowed: full.sdpa, none"),
        ("coords", "xy", "allowed: none, qk, inputs, pose"),
        ("affinity", "l1", "allowed: dot, euclid, cosine"),
        ("copy_init", "codes", "needs positional codes"),
        ("copy_init", "match", "needs positional codes"),
        ("temperature_init", 0.0, "a number > 0"),
    ],
)
def test_copy_options_are_checked(field, value, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(TINY, **{field: value})


def block_scores(config, target, source, codes=None):
    """The softmax weights a tiny copying block applies, from its recorded q and k."""
    torch.manual_seed(0)
    (_, block), *_ = CopyingGenerator(config, "full.sdpa").attention_blocks()
    block.record = True
    block.attention_call(target, source, codes)
    q, k = block.recorded
    return block, q, k, block.attention.weights(q, k, block.map_size, block.map_size)


@pytest.mark.parametrize("affinity", ["euclid", "cosine"])
def test_block_affinities_reach_every_implementation_as_dot_products(affinity):
    config = dataclasses.replace(TINY, affinity=affinity, temperature_init=2.0)
    g = torch.Generator().manual_seed(1)
    target, source = torch.randn(2, 1, 16, 4, 4, generator=g)
    block, q, k, weights = block_scores(config, target, source)
    assert q.shape[-1] == k.shape[-1] == config.attn_channels, "32-wide kernels keep 32 channels"
    q_raw = block._tokens(block.query(target))  # (1, 1, 16, C or C - 1)
    k_raw = block._tokens(block.key(source))
    if affinity == "euclid":
        scores = -2.0 * torch.cdist(q_raw, k_raw).square() / config.attn_channels**0.5
    else:
        cos = torch.nn.functional.normalize(q_raw, dim=-1) @ torch.nn.functional.normalize(
            k_raw, dim=-1
        ).transpose(-1, -2)
        scores = 2.0 * cos
    torch.testing.assert_close(weights, scores.softmax(-1), rtol=1e-4, atol=1e-6)


def test_copy_init_starts_by_copying_the_source_image():
    config = dataclasses.replace(TINY, pose_channels=2, coords="pose", copy_init="copy")
    torch.manual_seed(0)
    model = CopyingGenerator(config, "full.sdpa")
    for name, block in model.attention_blocks():
        assert not block.query.weight[:, : block.target_channels].any(), name
        assert not block.key.weight[:, : block.source_channels].any(), name
    image = torch.rand(1, 3, 32, 32)
    (_, block), *_ = model.attention_blocks()
    pooled = torch.nn.functional.adaptive_avg_pool2d(image, block.map_size)
    values = block.value(torch.cat([torch.randn(1, block.source_channels, 4, 4), pooled], 1))
    torch.testing.assert_close(values[:, :3], pooled)
    for i, to_rgb in enumerate(model.to_rgb):  # each level adds a quarter of its copied image
        c = config.channels[i]
        torch.testing.assert_close(to_rgb.weight[:, c : c + 3, 0, 0], torch.eye(3) / 4)


def test_match_init_needs_the_codes_to_fit_in_q_and_k():
    with pytest.raises(ValueError, match="20 code channels to fit in the 8 channels"):
        dataclasses.replace(TINY, coords="pose", copy_init="match")


@pytest.mark.parametrize("affinity", ["dot", "euclid"])
def test_match_init_attends_to_the_pixel_the_codes_name(affinity):
    from attnbench.data import coordinate_map

    config = dataclasses.replace(
        TINY, coords="pose", copy_init="match", attn_channels=24, temperature_init=8.0,
        affinity=affinity,
    )  # fmt: skip
    torch.manual_seed(0)
    model = CopyingGenerator(config, "full.sdpa")
    grid = coordinate_map((32, 32))[None]
    image = torch.rand(1, 3, 32, 32)
    features = {}
    for name, block in model.attention_blocks():
        h, w = block.map_size
        features[name] = torch.randn(2, 1, block.target_channels, h, w)
        # The target's pose says each of its pixels comes from the mirrored source pixel.
        codes = model.codes(features[name][0], features[name][1], grid, grid.flip(-1, -2))
        block.record = True
        pooled = torch.nn.functional.adaptive_avg_pool2d(image, (h, w))
        block.attention_call(features[name][0], features[name][1], codes, pooled)
        weights = block.attention.weights(*block.recorded, block.map_size, block.map_size)[0, 0]
        mirrored = torch.arange(h * w).flip(0)
        assert torch.equal(weights.argmax(dim=1), mirrored), name
        assert float(weights[torch.arange(h * w), mirrored].min()) > 0.5, name


def test_pose_codes_are_fourier_features_of_the_pose_coordinates():
    from attnbench.data import coordinate_map
    from attnbench.generators.blocks import fourier_features

    config = dataclasses.replace(TINY, pose_channels=2, coords="pose")
    model = CopyingGenerator(config, "full.sdpa")
    grid = coordinate_map((32, 32))[None]  # (1, 2, 32, 32)
    feats = torch.zeros(1, 16, 4, 4)
    target_code, source_code = model.codes(feats, feats, source_pose=-grid, target_pose=grid)
    assert target_code.shape == (1, 20, 4, 4)
    pooled = coordinate_map((4, 4))[None]  # the 8x8-pixel means of the coordinates
    torch.testing.assert_close(target_code, fourier_features(pooled, 5))
    torch.testing.assert_close(source_code, fourier_features(-pooled, 5))
    # Two codes' dot product peaks where their coordinates agree.
    code = fourier_features(pooled, 5).flatten(2)[0]  # (20, 16)
    similarity = code.T @ code  # (16, 16)
    assert torch.equal(similarity.argmax(dim=1), torch.arange(16))
