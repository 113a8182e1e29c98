"""Data: ImageFolder trees, Fashion-MNIST, the synthetic set, deterministic views, the step sampler."""
import numpy as np
import pytest
import torch
from PIL import Image

from qbheat.data import fashion_mnist
from qbheat.data.build import GlobalStepSampler, PretrainDataset, build_pretrain_dataset
from qbheat.data.image_folder import ImageFolderImages, read_image
from qbheat.data.synthetic import SyntheticImages
from qbheat.data.transforms import MultiView, blur_kernel_size, mae_augmentation, mocov2_augmentation
from qbheat.errors import QBHeatError


def _write_tree(root, per_class=3):
    rng = np.random.default_rng(0)
    for c, mode in (("cat", "RGB"), ("dog", "L")):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            shape = (20 + i, 30) if mode == "L" else (20 + i, 30, 3)
            Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(root / c / f"{i}.png")


def test_image_folder_labels_grey_to_rgb_and_resize(tmp_path):
    _write_tree(tmp_path)
    images = ImageFolderImages(tmp_path)
    assert len(images) == 6 and images.classes == ["cat", "dog"]
    assert images.labels.tolist() == [0, 0, 0, 1, 1, 1]
    grey = images[3]
    assert grey.shape == (3, 20, 30) and grey.dtype == torch.uint8
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])  # grey repeated on 3 channels
    ds = build_pretrain_dataset(str(tmp_path), image_size=16)
    (view,) = ds[4]
    assert view.shape == (3, 16, 16) and view.dtype == torch.float32


def test_image_folder_flat_has_no_labels_and_uses_split_subfolder(tmp_path):
    (tmp_path / "train").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "a.jpg")
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "b.jpg")
    ds = build_pretrain_dataset(str(tmp_path), image_size=8)
    assert len(ds) == 2 and ds.labels is None


def test_image_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(QBHeatError, match="does not exist"):
        ImageFolderImages(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(QBHeatError, match="holds no images"):
        ImageFolderImages(tmp_path / "empty")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG truncated")
    with pytest.raises(QBHeatError, match="bad.png cannot be read"):
        read_image(bad)


@pytest.mark.skipif(not fashion_mnist.is_available(), reason="install dataset-fashion-mnist (apt-get)")
def test_fashion_mnist_becomes_three_channel_views():
    ds = build_pretrain_dataset("fashion-mnist", image_size=32)
    assert len(ds) == 60_000 and ds.labels.shape == (60_000,)
    raw = ds.images[0]
    assert raw.shape == (3, 28, 28) and torch.equal(raw[0], torch.from_numpy(np.array(fashion_mnist.load("train")[0][0])))
    (view,) = ds[0]
    assert view.shape == (3, 32, 32)
    assert torch.allclose(view[0] * 0.229 + 0.485, view[1] * 0.224 + 0.456, atol=1e-5)  # still grey


def test_synthetic_set_is_deterministic_and_structured():
    a, b = SyntheticImages(n=8, size=32, seed=3), SyntheticImages(n=8, size=32, seed=3)
    assert torch.equal(a[5], b[5]) and not torch.equal(a[5], a[6])
    assert a[0].shape == (3, 32, 32) and a[0].dtype == torch.uint8
    assert a.labels.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    img = a.image(0)  # smooth: neighbouring pixels are far closer than random pairs
    assert np.abs(np.diff(img, axis=1)).mean() < 0.5 * np.abs(img - img[::-1, ::-1]).mean()


def test_views_depend_only_on_seed_epoch_and_index():
    ds = PretrainDataset(SyntheticImages(n=4, size=32), MultiView(mocov2_augmentation(32), 2), seed=7)
    state = torch.get_rng_state()
    v1, v2 = ds[(0, 1)]
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched
    torch.manual_seed(123)  # another global RNG state changes nothing
    w1, w2 = ds[(0, 1)]
    assert torch.equal(v1, w1) and torch.equal(v2, w2)
    assert not torch.equal(v1, v2)  # two independent views
    assert not torch.equal(ds[(1, 1)][0], v1)  # a new epoch gives new views
    other = PretrainDataset(ds.images, ds.transform, seed=8)
    assert not torch.equal(other[(0, 1)][0], v1)


def test_augmentations_shapes_and_blur_kernel():
    img = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8)
    assert mocov2_augmentation(24)(img).shape == (3, 24, 24)
    assert mae_augmentation(24)(img).shape == (3, 24, 24)
    assert blur_kernel_size(224) == 23 and blur_kernel_size(64) == 7  # SimCLR: 10 % of the side, odd


def test_step_sampler_partitions_global_batches_and_resumes():
    n, batch = 50, 12  # 4 steps per epoch, 2 images dropped per epoch
    single = GlobalStepSampler(n, batch, seed=1, end_step=8)
    steps = list(single)
    assert len(steps) == 8 and all(len(b) == 12 for b in steps)
    epoch0 = [i for b in steps[:4] for (_, i) in b]
    assert len(set(epoch0)) == 48 and all(e == 0 for b in steps[:4] for (e, _) in b)
    assert [i for (_, i) in steps[4]] != [i for (_, i) in steps[0]]  # reshuffled each epoch
    ranks = [list(GlobalStepSampler(n, batch, rank=r, world_size=3, seed=1, end_step=8)) for r in range(3)]
    for s in range(8):  # the three ranks' slices, in rank order, are the single-process batch
        assert ranks[0][s] + ranks[1][s] + ranks[2][s] == steps[s]
    assert list(GlobalStepSampler(n, batch, seed=1, start_step=5, end_step=8)) == steps[5:]


def test_step_sampler_refuses_tiny_data():
    with pytest.raises(QBHeatError, match="fewer than one batch"):
        GlobalStepSampler(5, 8)
    with pytest.raises(QBHeatError, match="does not split"):
        GlobalStepSampler(50, 10, world_size=3)


def test_unknown_spec_and_empty_spec():
    with pytest.raises(QBHeatError, match="does not exist"):
        build_pretrain_dataset("/no/such/folder", 32)
    with pytest.raises(QBHeatError, match="no data given"):
        build_pretrain_dataset("", 32)
