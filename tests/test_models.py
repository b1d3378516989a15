"""Components of timm networks: exact round trips through the layer store, adapters,
clones, block removal, image sizes, preprocessing, BatchNorm in frozen components, and
proof that the packaged root is really pretrained."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from conftest import make_settings, shared_data
from munet import models
from munet.models.vit import ViTFamily
from munet.system import System

LITE0 = "tf_efficientnet_lite0"
VIT = "vit_tiny_patch16_224"
VIT_KWARGS = {"img_size": 32, "patch_size": 8, "depth": 3}


@pytest.fixture(scope="module")
def lite0_timm():
    """The packaged EfficientNet-Lite0 as timm builds it (the reference for round trips)."""
    return models.load_root_model(LITE0, "packaged")


@pytest.fixture(scope="module")
def vit_timm(tmp_path_factory):
    """A small random ViT, saved as a safetensors file so the stored root has its weights."""
    torch.manual_seed(0)
    model = timm.create_model(VIT, pretrained=False, **VIT_KWARGS).eval()
    with torch.no_grad():  # timm zero-initialises some biases; make every tensor matter
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    file = tmp_path_factory.mktemp("vit") / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(file))
    return model, str(file)


@pytest.fixture(scope="module")
def stored(tmp_path_factory, vit_timm):
    """One installation holding both roots; paths are loaded back from its blobs."""
    home = tmp_path_factory.mktemp("home")
    system = System(make_settings(home))
    system.init()
    roots = {
        "lite0": system.add_root("lite0", LITE0, "packaged"),
        "vit": system.add_root("vit", VIT, vit_timm[1], VIT_KWARGS),
    }
    yield system, roots
    system.engine.dispose()


def load_root_path(stored, name: str) -> tuple[models.Path, dict]:
    system, roots = stored
    # An empty cache: every module is rebuilt from its verified blob.
    path, _row = system.load_path(roots[name].root_path_id, cache={})
    return path, roots[name].config


def with_modules(path: models.Path, names: list[str], modules: list) -> models.Path:
    return models.Path(ids=list(names), names=list(names), modules=list(modules), image_size=path.image_size,
                       mean=path.mean, std=path.std, classes=path.classes)


def insert_before(path: models.Path, block: int, name: str, module) -> models.Path:
    i = path.names.index(f"blocks.{block}")
    return with_modules(path, path.names[:i] + [name] + path.names[i:], path.modules[:i] + [module] + path.modules[i:])


def replace(path: models.Path, name: str, new_name: str, module) -> models.Path:
    i = path.names.index(name)
    names, mods = list(path.names), list(path.modules)
    names[i], mods[i] = new_name, module
    return with_modules(path, names, mods)


def drop(path: models.Path, name: str) -> models.Path:
    keep = [i for i, n in enumerate(path.names) if n != name]
    return with_modules(path, [path.names[i] for i in keep], [path.modules[i] for i in keep])


def run(path: models.Path, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return models.assemble(path).eval()(x)


# -- exact round trips ---------------------------------------------------------------------

def test_lite0_root_assembled_from_stored_blobs_reproduces_timm_logits(stored, lite0_timm):
    path, config = load_root_path(stored, "lite0")
    assert path.names[0] == "stem" and path.names[-3:] == ["neck", "final_norm", "head"]
    assert [n for n in path.names if n.startswith("blocks.")] == [f"blocks.{i}" for i in range(config["depth"])]
    torch.manual_seed(1)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = lite0_timm(x)
    got = run(path, x)
    assert got.shape == (2, 1000)
    assert (got - expected).abs().max().item() < 1e-5


def test_folding_batchnorm_into_convolutions_keeps_lite0_logits_and_leaves_no_norm_in_blocks(stored, lite0_timm):
    path, _ = load_root_path(stored, "lite0")
    torch.manual_seed(2)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        expected = run(path, x)
    folded = [models.fold_batchnorm(copy.deepcopy(m)) for m in path.modules]
    for name, module in zip(path.names, folded):
        norms = [m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert bool(norms) == (name == "final_norm"), name  # final_norm is a component of its own
    got = run(models.Path(path.ids, path.names, folded, path.image_size, path.mean, path.std), x)
    assert (got - expected).abs().max().item() < 1e-4
    assert torch.equal(got.argmax(1), expected.argmax(1))
    vit, _ = load_root_path(stored, "vit")
    xv = torch.randn(2, 3, vit.image_size, vit.image_size)
    before = run(vit, xv)
    for m in vit.modules:
        models.fold_batchnorm(m)
    assert torch.equal(run(vit, xv), before)  # no BatchNorm in a ViT: nothing changes


def test_vit_root_assembled_from_stored_blobs_reproduces_timm_logits(stored, vit_timm):
    path, config = load_root_path(stored, "vit")
    assert path.names[:3] == ["stem", "cls_token", "pos_embed@32"]
    assert path.names[-2:] == ["final_norm", "head"]
    torch.manual_seed(2)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = vit_timm[0](x)
    got = run(path, x)
    assert expected.abs().max() > 0.1  # a real comparison, not of two zero tensors
    assert (got - expected).abs().max().item() < 1e-5


def test_root_params_exclude_the_imagenet_head(stored):
    _system, roots = stored
    lite0 = roots["lite0"]
    assert lite0.total_params == 4_652_008
    assert lite0.root_params == 4_652_008 - (1280 * 1000 + 1000) == 3_371_008


def test_loaded_components_are_frozen_and_in_eval_mode(stored):
    path, _ = load_root_path(stored, "lite0")
    for module in path.modules:
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())


# -- adapters and clones ------------------------------------------------------------------

@pytest.mark.parametrize("root,blocks,size", [("lite0", [0, 5, 15], 64), ("vit", [0, 1, 2], 32)])
def test_inserting_a_fresh_adapter_leaves_outputs_unchanged(stored, root, blocks, size):
    path, config = load_root_path(stored, root)
    family = models.family_for(config["timm"])
    torch.manual_seed(3)
    x = torch.randn(2, 3, size, size)
    before = run(path, x)
    for block in blocks:
        name = models.adapter_name(block, 32)
        adapter = family.build(config, name, {})
        assert sum(p.abs().sum() for p in adapter.parameters()) > 0  # only the output projection is zero
        one = insert_before(path, block, name, adapter)
        assert torch.equal(run(one, x), before), f"an adapter before block {block} changed the output"
    every = path
    for block in blocks:
        every = insert_before(every, block, models.adapter_name(block, 32),
                              family.build(config, models.adapter_name(block, 32), {}))
    assert torch.equal(run(every, x), before)


@pytest.mark.parametrize("root,name", [("lite0", "blocks.3"), ("lite0", "final_norm"), ("vit", "blocks.1"),
                                       ("vit", "pos_embed@32")])
def test_cloning_a_component_gives_an_independent_copy(stored, root, name):
    path, config = load_root_path(stored, root)
    original = path.modules[path.names.index(name)]
    snapshot = {k: v.clone() for k, v in original.state_dict().items()}
    family = models.family_for(config["timm"])
    built = family.build(config, name, {})
    built.load_state_dict(original.state_dict(), strict=True)
    for clone in (copy.deepcopy(original), built):
        for a, b in zip(clone.state_dict().values(), original.state_dict().values()):
            assert torch.equal(a, b)
            assert a.data_ptr() != b.data_ptr()
        with torch.no_grad():
            for tensor in clone.state_dict().values():
                tensor.add_(1)  # integer buffers (num_batches_tracked) too
        for key, value in original.state_dict().items():
            assert torch.equal(value, snapshot[key]), f"changing a clone of {name} changed the original's {key}"


# -- CNN specifics ------------------------------------------------------------------------

def test_cnn_removable_blocks_are_exactly_the_skip_blocks(stored, lite0_timm):
    _path, config = load_root_path(stored, "lite0")
    flat = [b for stage in lite0_timm.blocks for b in stage]
    assert config["removable"] == [i for i, b in enumerate(flat) if b.has_skip]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        x = lite0_timm.bn1(lite0_timm.conv_stem(x))
        for i, block in enumerate(flat):
            y = block(x)
            # A block is removable exactly when it keeps the shape of its input.
            assert (y.shape == x.shape) == (i in config["removable"]), f"block {i}"
            x = y


def test_cnn_dropping_a_removable_block_still_runs(stored):
    path, config = load_root_path(stored, "lite0")
    x = torch.randn(2, 3, 64, 64)
    assert config["removable"]
    for i in config["removable"]:
        assert run(drop(path, f"blocks.{i}"), x).shape == (2, 1000)
    everything = path
    for i in config["removable"]:
        everything = drop(everything, f"blocks.{i}")
    assert run(everything, x).shape == (2, 1000)


def test_cnn_dropping_a_shape_changing_block_fails(stored):
    path, config = load_root_path(stored, "lite0")
    fixed = next(i for i in range(config["depth"]) if i not in config["removable"])
    with pytest.raises(RuntimeError):
        run(drop(path, f"blocks.{fixed}"), torch.randn(1, 3, 64, 64))


@pytest.mark.parametrize("size", [32, 48, 80, 97])
def test_cnn_runs_at_any_image_size(stored, lite0_timm, size):
    path, _ = load_root_path(stored, "lite0")
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = lite0_timm(x)
    got = run(path, x)
    assert got.shape == (2, 1000)
    assert (got - expected).abs().max().item() < 1e-5


# -- ViT specifics ------------------------------------------------------------------------

def test_vit_new_image_size_uses_a_resampled_position_embedding(stored, vit_timm):
    path, config = load_root_path(stored, "vit")
    family = models.family_for(config["timm"])
    assert isinstance(family, ViTFamily)
    old = path.modules[path.names.index("pos_embed@32")]
    new = family.resample_pos_embed(config, old, 32, 48)
    assert new.pos_embed.shape == (1, 1 + 6 * 6, config["embed_dim"])
    # The class-token position is kept as it was.
    assert torch.equal(new.pos_embed[:, 0], old.pos_embed[:, 0])
    # A component built for the new size has the same shape (so it can load the blob).
    assert family.build(config, "pos_embed@48", {}).pos_embed.shape == new.pos_embed.shape
    at48 = replace(path, "pos_embed@32", "pos_embed@48", new)
    x = torch.randn(2, 3, 48, 48)
    got = run(at48, x)
    assert got.shape == (2, 1000)
    # timm's own dynamic-size ViT resamples the same way at run time.
    dynamic = timm.create_model(VIT, pretrained=False, dynamic_img_size=True, **VIT_KWARGS).eval()
    dynamic.load_state_dict(vit_timm[0].state_dict())
    with torch.no_grad():
        expected = dynamic(x)
    assert (got - expected).abs().max().item() < 1e-5


def test_vit_fewer_blocks_than_the_root_still_runs(stored):
    path, _ = load_root_path(stored, "vit")
    assert run(drop(path, "blocks.2"), torch.randn(1, 3, 32, 32)).shape == (1, 1000)


# -- preprocessing and BatchNorm ------------------------------------------------------------

def test_preprocess_turns_greyscale_into_three_equal_channels():
    rng = np.random.default_rng(0)
    grey = torch.from_numpy(rng.integers(0, 256, size=(4, 8, 8, 1), dtype=np.uint8))
    x = models.preprocess(grey, 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])
    rgb = models.preprocess(grey.expand(-1, -1, -1, 3).contiguous(), 32, (0.5,) * 3, (0.5,) * 3)
    assert torch.equal(x, rgb)
    # mean = std = 0.5 maps 0..255 to -1..1
    full = models.preprocess(torch.tensor([[[[0], [255]]]], dtype=torch.uint8), 1, (0.5,) * 3, (0.5,) * 3)
    assert full.shape == (1, 3, 1, 1)
    edges = models.preprocess(torch.tensor([[[[0], [255]]]], dtype=torch.uint8).reshape(1, 1, 2, 1),
                              2, (0.5,) * 3, (0.5,) * 3)
    assert edges.min().item() == pytest.approx(-1.0, abs=0.02) and edges.max().item() == pytest.approx(1.0, abs=0.02)


def test_preprocess_rejects_non_uint8_input():
    with pytest.raises(ValueError):
        models.preprocess(torch.zeros(1, 8, 8, 3), 32, (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(ValueError):
        models.preprocess(torch.zeros(8, 8, 3, dtype=torch.uint8), 32, (0.5,) * 3, (0.5,) * 3)


def _bn_buffers(module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items() if "running" in k or "num_batches" in k}


def test_frozen_components_in_eval_mode_keep_batchnorm_statistics(stored):
    path, _ = load_root_path(stored, "lite0")
    stem, block = path.modules[0], path.modules[path.names.index("blocks.0")]
    before = {**_bn_buffers(stem), **{f"b.{k}": v for k, v in _bn_buffers(block).items()}}
    assert before
    x = torch.randn(8, 3, 64, 64) * 3 + 1  # statistics far from ImageNet's
    with torch.no_grad():
        block(stem(x))
    after = {**_bn_buffers(stem), **{f"b.{k}": v for k, v in _bn_buffers(block).items()}}
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_train_mode_would_change_batchnorm_statistics_even_without_grad(stored):
    path, _ = load_root_path(stored, "lite0")
    stem = copy.deepcopy(path.modules[0])
    before = _bn_buffers(stem)
    stem.train()
    with torch.no_grad():
        stem(torch.randn(8, 3, 64, 64) * 3 + 1)
    after = _bn_buffers(stem)
    assert not torch.equal(before["bn1.running_mean"], after["bn1.running_mean"])


# -- the packaged weights are really pretrained -----------------------------------------------

def _flower() -> torch.Tensor:
    from sklearn.datasets import load_sample_image

    return torch.from_numpy(load_sample_image("flower.jpg").copy())[None]  # [1, 427, 640, 3] uint8


def _top1(model, image: torch.Tensor, mean, std) -> str:
    from timm.data import ImageNetInfo

    with torch.no_grad():
        logits = model(models.preprocess(image, 224, mean, std))
    return ImageNetInfo().index_to_description(int(logits.argmax()))


def test_packaged_weights_recognise_a_daisy(stored):
    path, config = load_root_path(stored, "lite0")
    assert _top1(models.assemble(path), _flower(), config["mean"], config["std"]) == "daisy"


def test_random_weights_do_not_recognise_the_daisy(stored):
    _path, config = load_root_path(stored, "lite0")
    torch.manual_seed(0)
    model = models.load_root_model(LITE0, "random")
    assert _top1(model, _flower(), config["mean"], config["std"]) != "daisy"


def _pooled_features(path: models.Path, images: np.ndarray, size: int = 64) -> np.ndarray:
    body = with_modules(path, path.names[:-1], path.modules[:-1])  # up to final_norm
    model = models.assemble(body).eval()
    feats = []
    with torch.no_grad():
        for i in range(0, len(images), 250):
            x = models.preprocess(torch.from_numpy(images[i:i + 250]), size, path.mean, path.std)
            feats.append(model(x).mean(dim=(2, 3)).numpy())
    return np.concatenate(feats)


def _probe_accuracy(path, x_tr, y_tr, x_te, y_te) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=300, C=0.1))
    clf.fit(_pooled_features(path, x_tr), y_tr)
    return float(clf.score(_pooled_features(path, x_te), y_te))


@pytest.mark.data
def test_packaged_weights_give_a_clearly_better_linear_probe_than_random_init(stored):
    data = np.load(shared_data("cifar"))
    rng = np.random.default_rng(0)
    tr = rng.choice(len(data["y_train"]), 800, replace=False)
    te = rng.choice(len(data["y_test"]), 400, replace=False)
    split = (data["x_train"][tr], data["y_train"][tr], data["x_test"][te], data["y_test"][te])
    pretrained, config = load_root_path(stored, "lite0")
    torch.manual_seed(0)
    _, parts = models.decompose(models.load_root_model(LITE0, "random"), LITE0)
    random = with_modules(pretrained, [n for n, _, _ in parts], [m.eval() for _, _, m in parts])
    acc_pre = _probe_accuracy(pretrained, *split)
    acc_rand = _probe_accuracy(random, *split)
    assert acc_pre > acc_rand + 0.15, (acc_pre, acc_rand)
