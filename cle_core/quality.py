"""Quality helpers, public: the SQNR and top-1 agreement every figure of this project is
measured with, the comparison and table every evaluation reports, the quantization
grids of the simulations, the weights exactly as onnxruntime deploys them
(:func:`deployed_weights`), and the natural-image sample
set (scikit-image, imported on first use). Pure NumPy; no backend needed."""

from ._quality import (
    NATURAL_IMAGE_NAMES,
    calibration_images,
    compare_outputs,
    deployed_weights,
    images_from_folder,
    natural_images,
    quality_table,
    quantization_grid,
    quantize_array,
    sqnr_db,
    top1_agreement,
    weights_on_grid,
)

__all__ = [
    "NATURAL_IMAGE_NAMES",
    "calibration_images",
    "compare_outputs",
    "deployed_weights",
    "images_from_folder",
    "natural_images",
    "quality_table",
    "quantization_grid",
    "quantize_array",
    "sqnr_db",
    "top1_agreement",
    "weights_on_grid",
]
