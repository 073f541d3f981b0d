"""Build ONNX artifacts of a model version, check their agreement with the source model, register them.

- :mod:`~pgsynapse.export.fp32`: the fp32 graph (``torch.onnx.export``, fused by ONNX Runtime's optimizer);
- :mod:`~pgsynapse.export.quantize`: its INT8 schemes (:data:`SCHEMES`) and their calibration;
- :mod:`~pgsynapse.export.sample`: the real text an export is calibrated and checked on;
- :mod:`~pgsynapse.export.agreement`: the check (top-10 neighbour overlap with the source model);
- :mod:`~pgsynapse.export.register`: registration, ``pgsynapse model export``, and the ``runtime`` setting's
  once-per-version switch (and the rebuild of a switched version's artifact on another host).

The public names are re-exported here: ``from pgsynapse.export import optimise_version`` works.
"""

from pgsynapse.export.agreement import DEFAULT_THRESHOLD, Agreement, ExportReport, agreement, export_and_check
from pgsynapse.export.fp32 import export_fp32
from pgsynapse.export.quantize import (
    REMOVED_SCHEMES,
    SCHEMES,
    quantize_int8,
    scheme_error,
    smooth_static,
    split_outliers_static,
    unfuse_attention,
)
from pgsynapse.export.register import (
    EXPORT_LOCK,
    Abandon,
    ExportAbandoned,
    new_artifact_dir,
    optimise_active_version,
    optimise_version,
    rebuild_artifact,
    register,
    run_export,
    source_model_path,
)
from pgsynapse.export.sample import sample_texts

__all__ = [
    "Abandon", "DEFAULT_THRESHOLD", "EXPORT_LOCK", "REMOVED_SCHEMES", "SCHEMES", "Agreement", "ExportAbandoned",
    "ExportReport", "agreement", "export_and_check", "export_fp32", "new_artifact_dir", "optimise_active_version",
    "optimise_version", "quantize_int8", "rebuild_artifact", "register", "run_export", "scheme_error", "smooth_static",
    "source_model_path", "split_outliers_static", "unfuse_attention", "sample_texts",
]
