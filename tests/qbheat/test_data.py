"""Data: ImageFolder trees, Fashion-MNIST, the synthetic set, deterministic views, the step sampler."""
import numpy as np
import pytest
import torch
from PIL import Image

from qbheat.data import fashion_mnist
from qbheat.data.build import (GlobalStepSampler, PretrainDataset, batch_iterator, build_pretrain_dataset, store_size,
                               view_generator)
from qbheat.data.image_folder import ImageFolderImages, read_image
from qbheat.data.synthetic import SyntheticImages
from qbheat.data.transforms import (MultiView, blur_kernel_size, crop_resize, mae_augmentation, mocov2_augmentation,
                                    random_resized_crop_boxes)
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
    side = store_size(16)  # 16 / 0.875 → 19
    stored = ds[4]
    assert side == 19 and stored.shape == (3, side, side) and stored.dtype == torch.uint8
    (view,) = MultiView(mae_augmentation(16), 1)(ds.batch([(0, 4), (0, 1)]), torch.Generator().manual_seed(0))
    assert view.shape == (2, 3, 16, 16) and view.dtype == torch.float32


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
    assert ds.in_memory
    batch = next(batch_iterator(ds, GlobalStepSampler(len(ds), 8, end_step=1)))
    assert batch.shape == (8, 1, 28, 28) and batch.dtype == torch.uint8  # grey stays one channel
    view = mae_augmentation(32)(batch, torch.Generator().manual_seed(0))
    assert view.shape == (8, 3, 32, 32)
    assert torch.allclose(view[:, 0] * 0.229 + 0.485, view[:, 1] * 0.224 + 0.456, atol=1e-5)  # still grey


def test_synthetic_set_is_deterministic_and_structured():
    a, b = SyntheticImages(n=8, size=32, seed=3), SyntheticImages(n=8, size=32, seed=3)
    assert torch.equal(a[5], b[5]) and not torch.equal(a[5], a[6])
    assert a[0].shape == (3, 32, 32) and a[0].dtype == torch.uint8
    assert a.labels.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    img = a.image(0)  # smooth: neighbouring pixels are far closer than random pairs
    assert np.abs(np.diff(img, axis=1)).mean() < 0.5 * np.abs(img - img[::-1, ::-1]).mean()


def test_views_depend_only_on_seed_step_and_rank():
    images = torch.stack([SyntheticImages(n=4, size=32)[i] for i in range(4)])
    views = MultiView(mocov2_augmentation(32), 2)
    cpu = torch.device("cpu")
    state = torch.get_rng_state()
    v1, v2 = views(images, view_generator(7, 3, cpu))
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched
    torch.manual_seed(123)  # another global RNG state changes nothing
    w1, w2 = views(images, view_generator(7, 3, cpu))
    assert torch.equal(v1, w1) and torch.equal(v2, w2)
    assert not torch.equal(v1, v2)  # two independent views
    assert not torch.equal(views(images, view_generator(7, 4, cpu))[0], v1)  # the next step gets new views
    # a rank's share of the global batch gets exactly the single-process views of those rows
    half = views(images[2:], view_generator(7, 3, cpu), 2, 4)
    assert torch.equal(half[0], v1[2:]) and torch.equal(half[1], v2[2:])
    assert not torch.equal(views(images, view_generator(8, 3, cpu))[0], v1)  # and another seed


def test_augmentations_shapes_and_blur_kernel():
    img = torch.randint(0, 256, (5, 3, 40, 50), dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    assert mocov2_augmentation(24)(img, g).shape == (5, 3, 24, 24)
    assert mae_augmentation(24)(img, g).shape == (5, 3, 24, 24)
    assert blur_kernel_size(224) == 23 and blur_kernel_size(64) == 7  # SimCLR: 10 % of the side, odd


def test_random_resized_crop_follows_torchvision_rule():
    g = torch.Generator().manual_seed(0)
    top, left, h, w = random_resized_crop_boxes(2000, 40, 50, (0.2, 1.0), g).unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 40).all() and (left + w <= 50).all()
    area = h * w / (40 * 50)
    assert area.min() >= 0.2 - 0.03 and area.max() <= 1.0  # rounding of the sides moves the area a little
    ratio = w / h
    assert ratio.min() >= 0.75 * 0.9 and ratio.max() <= 4 / 3 * 1.1
    assert area.mean() > 0.5  # the draw is uniform in area, not stuck at the fallback


def test_crop_resize_identity_flip_and_grey_path():
    x = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    full = torch.tensor([[0.0, 0.0, 16.0, 16.0]]).expand(2, 4)
    same = crop_resize(x, full, 16, mode="bilinear")
    torch.testing.assert_close(same, x.float() / 255, atol=1e-5, rtol=0)  # the whole image at its own size
    flipped = crop_resize(x, full, 16, torch.tensor([True, False]), mode="bilinear")
    torch.testing.assert_close(flipped[0], same[0].flip(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(flipped[1], same[1], atol=1e-5, rtol=0)
    grey = torch.randint(0, 256, (6, 1, 20, 20), dtype=torch.uint8)
    for aug in (mae_augmentation(24), mocov2_augmentation(24)):  # one-channel grey = its three-channel copy
        a = aug(grey, torch.Generator().manual_seed(1))
        b = aug(grey.expand(-1, 3, -1, -1), torch.Generator().manual_seed(1))
        torch.testing.assert_close(a, b, atol=1e-3, rtol=0)  # ≪ one grey level (0.017 after normalising)


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
