"""Image folders: the built-in ImageNet class map and several folders mixed."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cora_onnx.onnx.data import Preprocess, imagenet_class_map, load_images
from cora_onnx.core.errors import DataError, InputError

from realdata import SHARED


def _images(folder, n, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def test_builtin_imagenet_map_ships_with_the_package():
    m = imagenet_class_map()
    assert len(m) == 1000 and sorted(m.values()) == list(range(1000))
    assert m["n01440764"] == 0 and m["n02102040"] == 217 and m["n15075141"] == 999
    assert list(m) == sorted(m)  # the ILSVRC order: sorted WordNet ids
    shared = SHARED / "data" / "imagenet_class_index.json"
    if shared.is_file():
        assert json.loads(shared.read_text()) == m


def test_wordnet_folders_label_a_1000_class_model(tmp_path):
    _images(tmp_path / "a" / "n02102040", 2)
    _images(tmp_path / "a" / "n01440764", 3)
    s = load_images(tmp_path / "a", Preprocess(8), labelled=True, num_classes=1000)
    assert sorted(s.labels.tolist()) == [0, 0, 0, 217, 217]
    # not a 1000-class model, or not all folders WordNet ids: the sorted-folder rule, as before
    with pytest.raises(DataError, match="2 class folders but the model has 10"):
        load_images(tmp_path / "a", Preprocess(8), labelled=True, num_classes=10)
    assert sorted(load_images(tmp_path / "a", Preprocess(8), labelled=True, num_classes=2).labels.tolist()) == [0, 0, 0, 1, 1]
    _images(tmp_path / "a" / "cats", 1)
    with pytest.raises(DataError, match="--class-map"):
        load_images(tmp_path / "a", Preprocess(8), labelled=True, num_classes=1000)


def test_several_folders_are_mixed(tmp_path):
    _images(tmp_path / "c1", 3)
    _images(tmp_path / "c2" / "sub", 2, seed=1)
    s = load_images([tmp_path / "c1", tmp_path / "c2"], Preprocess(8))
    assert len(s) == 5 and s.labels is None
    assert len(load_images([str(tmp_path / "c1")], Preprocess(8))) == 3
    # labelled: class names across folders form one set (a name that recurs is one class)
    _images(tmp_path / "v1" / "x", 2)
    _images(tmp_path / "v2" / "y", 1)
    _images(tmp_path / "v2" / "x", 1)
    s = load_images([tmp_path / "v1", tmp_path / "v2"], Preprocess(8), labelled=True, num_classes=2)
    assert sorted(s.labels.tolist()) == [0, 0, 0, 1]
    with pytest.raises(InputError, match="nowhere does not exist"):
        load_images([tmp_path / "c1", tmp_path / "nowhere"], Preprocess(8), what="calibration folder")
    with pytest.raises(DataError, match="no calibration folder given"):
        load_images([], Preprocess(8), what="calibration folder")


class _Fixed(torch.nn.Module):
    """A 1000-class classifier that always answers class 217."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 1)
        self.fc = torch.nn.Linear(4, 1000)
        with torch.no_grad():
            self.fc.weight.zero_()
            self.fc.bias.zero_()
            self.fc.bias[217] = 5.0

    def forward(self, x):
        return self.fc(self.conv(x).mean(dim=(2, 3)))


def test_eval_cli_scores_wordnet_folders_without_class_map(tmp_path):
    """Two folders (given as two --data), each with one WordNet-id class folder: scored 1000-way."""
    from click.testing import CliRunner

    from cora_onnx.cli.main import main
    from cora_onnx.torch.export import export_onnx, onnx_bytes

    (tmp_path / "m.onnx").write_bytes(onnx_bytes(export_onnx(_Fixed().eval(), 8)))
    _images(tmp_path / "d1" / "n02102040", 2)  # class 217: right
    _images(tmp_path / "d2" / "n01440764", 2)  # class 0: wrong
    res = CliRunner().invoke(main, ["eval", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "d1"),
                                    "--data", str(tmp_path / "d2"), "--input-size", "8"])
    assert res.exit_code == 0, res.output
    assert "top-1 50.00% on 4 images" in res.output


@pytest.mark.parametrize("n", [1, 2, 7, 300])
@pytest.mark.parametrize("seed", [0, 1, 12345])
def test_subsets_pick_the_images_torch_randperm_picked(n, seed):
    """ImageSet holds numpy arrays now; its subsets must stay the images they were (the figures
    measured on subsets repeat)."""
    from cora_onnx.onnx.data import permutation

    expected = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    np.testing.assert_array_equal(permutation(n, seed), expected)


def test_image_set_is_numpy_and_the_torch_view_shares_its_memory(tmp_path):
    from cora_onnx.torch.images import as_torch

    _images(tmp_path / "a" / "x", 2)
    _images(tmp_path / "a" / "y", 1, seed=1)
    s = load_images(tmp_path / "a", Preprocess(8), labelled=True)
    assert isinstance(s.images, np.ndarray) and s.images.dtype == np.uint8 and s.images.shape == (3, 3, 8, 8)
    assert isinstance(s.labels, np.ndarray) and s.labels.dtype == np.int64
    b = next(s.batches(2))
    assert isinstance(b, np.ndarray) and b.dtype == np.float32 and b.shape == (2, 3, 8, 8)
    t = as_torch(s)
    assert t.images.data_ptr() == s.images.ctypes.data and torch.equal(t.labels, torch.from_numpy(s.labels))
    tb = next(t.batches(2))
    assert tb.dtype == torch.float32 and np.array_equal(tb.numpy(), b)
    assert np.array_equal(t.preprocess.normalize(t.images).numpy(), s.preprocess.normalize(s.images))
    assert t.subset(2, 1).paths == s.subset(2, 1).paths and as_torch(t) is t
